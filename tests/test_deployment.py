"""prefect.yaml for real: a Prefect server on PostgreSQL, a process work pool, `prefect deploy`,
a worker, and `prefect deployment run` to Completed, then the unchanged rerun."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT
from services import free_port, fresh_database, start_prefect, stop

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).parent / "prefect")


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefect")
    with fresh_database("sftflow_prefect") as db:
        port = free_port()
        env = {
            **os.environ,
            "PREFECT_HOME": str(tmp / "home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_API_DATABASE_CONNECTION_URL": db.replace("postgresql://", "postgresql+asyncpg://", 1),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        }
        env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
        server_log = tmp / "server.log"

        servers = [start_prefect(env, port, server_log)]

        def restart_server(while_down=lambda: None) -> None:
            """Stop the server, run ``while_down``, start it again on the same port and database."""
            stop(servers[-1])
            while_down()
            servers.append(start_prefect(env, port, server_log))

        worker = None
        try:

            def prefect(*args, check=True):
                res = subprocess.run(
                    [PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
                )
                assert not check or res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
                return res

            # what `make prefect-setup` does
            prefect("work-pool", "create", "sftflow-process", "--type", "process")
            prefect("work-pool", "create", "sftflow-docker", "--type", "docker")  # test_images.py runs it
            prefect("concurrency-limit", "create", "gpu", "1")
            prefect("--no-prompt", "deploy", "--all")
            worker_log = tmp / "worker.log"
            worker = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "sftflow-process"],
                cwd=ROOT,
                env=env,
                stdout=open(worker_log, "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            yield {
                "api": env["PREFECT_API_URL"],
                "prefect": prefect,
                "tmp": tmp,
                "worker_log": worker_log,
                "restart_server": restart_server,
            }
        finally:
            if worker is not None:
                stop(worker)
            stop(servers[-1])


def wait_final(api: str, flow_run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout}s")


def finished_run(stack, *params: str, timeout: float = 600) -> dict:
    """`prefect deployment run` of the on-demand deployment, waited on to its final state."""
    args = [x for p in params for x in ("-p", p)]
    res = stack["prefect"]("deployment", "run", "sft-pipeline/on-demand", *args)
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", res.stdout).group(1)
    return wait_final(stack["api"], flow_run_id, timeout)


def run_deployment(stack, *params: str) -> tuple[dict, float]:
    t0 = time.monotonic()
    run = finished_run(stack, *params)
    assert run["state"]["type"] == "COMPLETED", (run["state"], stack["worker_log"].read_text()[-4000:])
    return run, time.monotonic() - t0


def test_deployment_run_completes_then_an_unchanged_rerun_is_cheap(prefect_stack):
    out = prefect_stack["tmp"] / "runs"
    overrides = json.dumps([f"output_dir={out}"])
    first, wall = run_deployment(prefect_stack, "config_path=configs/tiny.yaml", f"overrides={overrides}")
    assert first["state"]["name"] == "Completed"
    manifests = list(out.glob("tiny-*/handoff/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["status"] == "completed"

    second, _ = run_deployment(prefect_stack, "config_path=configs/tiny.yaml", f"overrides={overrides}")
    assert second["state"]["name"] == "Unchanged"
    # nothing retrained, nothing registered (bench/rerun.py measures what the rerun costs)
    assert len(list(out.glob("tiny-*"))) == 1
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db", f"sqlite:///{out}/mlflow.db")
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny'")] == ["1"]
    print(
        f"\ndeployment run: {wall:.1f}s wall (flow {first['total_run_time']:.1f}s); unchanged rerun flow "
        f"{second['total_run_time']:.1f}s"
    )
    deployments = httpx.post(f"{prefect_stack['api']}/deployments/filter", json={}).json()
    nightly = next(d for d in deployments if d["name"] == "nightly")
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert nightly["global_concurrency_limit"]["limit"] == 1
    limit = httpx.get(f"{prefect_stack['api']}/concurrency_limits/tag/gpu").json()
    assert limit["concurrency_limit"] == 1


def test_a_bad_parameter_is_rejected_when_the_run_is_created(prefect_stack):
    res = prefect_stack["prefect"](
        "deployment",
        "run",
        "sft-pipeline/on-demand",
        "-p",
        "config_path=configs/tiny.yaml",
        "-p",
        "epochs_typo=3",
        check=False,
    )
    assert res.returncode != 0
    assert "epochs_typo" in res.stdout + res.stderr


def test_a_hub_dataset_name_fails_the_same_way_as_on_the_cli(prefect_stack):
    """Same config, same environment (HF_HUB_OFFLINE=1 here), same behaviour from both entry points."""
    from conftest import run_cli

    override = "data.path=someorg/somedata"
    run = finished_run(prefect_stack, "config_path=configs/tiny.yaml", f"overrides={json.dumps([override])}")
    cli = run_cli("validate", "configs/tiny.yaml", "--set", override)
    assert cli.returncode == 2 and "HF_HUB_OFFLINE is set" in cli.stderr
    state = run["state"]
    assert state["type"] == "FAILED" and "HF_HUB_OFFLINE is set" in state["message"], state


def stage_time(summary: dict, stage: str, key: str):
    import datetime as dt

    manifest = json.loads((Path(summary["run_dir"]) / stage / "manifest.json").read_text())
    return dt.datetime.fromisoformat(manifest[key])


@pytest.mark.reliability
def test_two_runs_at_once_share_the_output_dir_and_never_train_together(prefect_stack):
    """Two flow runs against the same server and output dir: separate run directories, both
    complete, and the `sftflow-pipeline` limit keeps the runs (the `gpu` tag limit, their train
    stages) from overlapping."""
    import datetime as dt

    out = prefect_stack["tmp"] / "shared"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_stack["api"],
        "PREFECT_HOME": str(prefect_stack["tmp"] / "home"),
        "PREFECT_TASK_RUN_TAG_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "run",
                "configs/tiny.yaml",
                "--set",
                f"output_dir={out}",
                "--set",
                f"train.seed={seed}",
                "--summary-json",
                str(out.parent / f"two-{seed}.json"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    summaries = [json.loads((out.parent / f"two-{seed}.json").read_text()) for seed in (1, 2)]
    assert summaries[0]["run_id"] != summaries[1]["run_id"]
    spans = []
    for s in summaries:
        train = json.loads((Path(s["run_dir"]) / "train/manifest.json").read_text())
        assert train["status"] == "completed" and train["run_id"] == s["run_id"]
        spans.append(
            (dt.datetime.fromisoformat(train["started_at"]), dt.datetime.fromisoformat(train["ended_at"]))
        )
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0, f"train stages overlapped: {spans}"
    # and the runs as a whole: the second waited for the pipeline slot before its first stage
    first, second = sorted(summaries, key=lambda s: stage_time(s, "format", "started_at"))
    assert stage_time(first, "handoff", "ended_at") <= stage_time(second, "format", "started_at")
    assert sorted(s["version"] for s in summaries) == ["1", "2"]


def flow_run_processes(flow_run_id: str) -> list[int]:
    """The pids of a flow run's process and of everything it started (they inherit its id)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours
            pass
    return pids


@pytest.mark.reliability
def test_a_retried_flow_run_resumes_its_run_after_a_server_restart_mid_training(prefect_stack):
    """The Prefect server restarts mid-training, and the flow run's processes die while it is
    down (a host restart). `prefect flow-run retry` then resumes the same run: the run id its first
    attempt recorded in the flow run's parameters, training from the newest checkpoint, one
    registry version, the format stage kept as it was. Before, the retry started over in a new run
    directory."""
    import signal

    from mlflow import MlflowClient

    from tasks.training.worker import COMPLETE

    out = prefect_stack["tmp"] / "resume"
    overrides = json.dumps([f"output_dir={out}"])
    res = prefect_stack["prefect"](
        "deployment", "run", "sft-pipeline/on-demand", "-p", "config_path=configs/tiny.yaml",
        "-p", f"overrides={overrides}", "--job-variable", 'env={"SFTFLOW_STEP_DELAY_S": "2"}',
    )  # fmt: skip
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", res.stdout).group(1)
    deadline = time.monotonic() + 300
    while not list(out.glob(f"tiny-*/train/checkpoints/checkpoint-5/{COMPLETE}")):
        assert time.monotonic() < deadline, prefect_stack["worker_log"].read_text()[-4000:]
        time.sleep(0.3)

    def host_restart():
        pids = flow_run_processes(flow_run_id)
        assert pids, "the flow run's processes were not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    prefect_stack["restart_server"](while_down=host_restart)
    api = prefect_stack["api"]
    deadline = time.monotonic() + 180  # the worker reports the crash once the server is back
    while httpx.get(f"{api}/flow_runs/{flow_run_id}").json()["state"]["type"] != "CRASHED":
        assert time.monotonic() < deadline, prefect_stack["worker_log"].read_text()[-4000:]
        time.sleep(1)
    run_ids = [d.name for d in out.glob("tiny-*")]
    formatted = (out / run_ids[0] / "format/manifest.json").read_text()

    prefect_stack["prefect"]("flow-run", "retry", flow_run_id)
    run = wait_final(api, flow_run_id, 600)
    assert run["state"]["type"] == "COMPLETED", (
        run["state"],
        prefect_stack["worker_log"].read_text()[-4000:],
    )
    assert [d.name for d in out.glob("tiny-*")] == run_ids, "the retry started another run"
    recorded = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()["parameters"]
    assert recorded["run_id"] == run_ids[0], (recorded, run_ids)  # shown in Prefect's UI too
    assert (out / run_ids[0] / "format/manifest.json").read_text() == formatted, "the retry formatted again"
    train = json.loads((out / run_ids[0] / "train/manifest.json").read_text())
    assert train["status"] == "completed"
    resumed = str(train["metrics"]["resumed_from"])  # checkpoint-5, or 10 if the restart was slow
    assert resumed.startswith(str(out / run_ids[0] / "train/checkpoints/checkpoint-")), train["metrics"]
    uri = f"sqlite:///{out}/mlflow.db"
    assert len(MlflowClient(uri, uri).search_model_versions("name = 'tiny'")) == 1
