"""Reliability: bad data, bad configs, crashes, an unreachable MLflow and disk-full saves.

Every case here is listed in docs/reliability.md with its outcome.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from tasks.format import run_format
from tasks.training.worker import COMPLETE

from conftest import ROOT, fill_disk, make_config, run_cli, small_disk, write_jsonl
from services import free_port

pytestmark = pytest.mark.reliability
GOOD = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def parquet_bytes(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    schema = pa.schema([("instruction", pa.string()), ("output", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue()


def good(i: int) -> dict:
    return {"instruction": f"Say {i}.", "input": "", "output": f"{i}."}


# ---------------------------------------------------------------- bad data: record by record

JSONL_CASES = [  # (line bytes, reason fragment)
    (b'{"instruction": "x", "output": ', "invalid JSON"),  # truncated JSON
    (b"[1, 2]", "not an object"),  # a non-object
    (b'"just a string"', "not an object"),
    (b'{"instruction": "x"}', "missing field 'output'"),  # missing field
    (b'{"instruction": "x", "output": null}', "field 'output' is null"),  # null field
    (b'{"instruction": "x", "output": 3}', "is a int, not a string"),  # wrong type
    (b'{"instruction": "x", "output": ["a"]}', "is a list, not a string"),
    (b'{"instruction": "x", "output": ""}', "is empty"),  # empty answer
    (b'{"instruction": "x", "output": " \\t\\n "}', "is empty"),  # whitespace-only
    (b'{"instruction": "x\\u0000y", "output": "z"}', "NUL character"),  # NUL
    (b'{"instruction": "caf\xe9", "output": "z"}', "invalid UTF-8"),  # invalid UTF-8
    (b'{"instruction": "x\\ud800y", "output": "z"}', "unpaired surrogate"),  # escaped invalid Unicode
    (b'{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),  # bad role
    (b'{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),  # no assistant
    (b'{"messages": []}', "non-empty list of turns"),
    (b'{"messages": ["hi"]}', "is not an object"),
    (b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 5}]}', "not a string"),
    (b'{"unrelated": 1}', "cannot tell the data format"),
]


def test_jsonl_bad_records_are_quarantined_with_line_and_exact_counts(tmp_path, tiny_model):
    lines = [b"\xef\xbb\xbf" + json.dumps(good(0)).encode()]  # a BOM on line 1
    lines += [json.dumps(good(i)).encode() + b"\r" for i in range(1, 40)]  # CRLF line endings
    lines += [case for case, _ in JSONL_CASES]
    lines += [b"", b"   "]  # blank lines: skipped
    lines += [json.dumps(good(1)).encode(), json.dumps({**good(2), "output": " 2. "}).encode()]  # duplicates
    lines += [json.dumps({"instruction": "long " * 2000, "output": "x"}).encode()]  # huge: too long
    lines += [json.dumps({**good(99), "extra": {"ignored": True}}).encode()]  # unknown fields: ignored
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    res = run_format(make_config(tmp_path, path, data={"max_bad_fraction": 0.5}), "r", log=lambda *_: None)
    q = [json.loads(x) for x in (tmp_path / "runs/r/format/quarantine.jsonl").read_text().splitlines()]
    assert [(e["line"], e["source"]) for e in q] == [(41 + i, str(path)) for i in range(len(JSONL_CASES))]
    for entry, (_, fragment) in zip(q, JSONL_CASES):
        assert fragment in entry["reason"], (entry, fragment)
    c = res.counts
    assert (c["records_in"], c["quarantined"], c["duplicates"], c["too_long"]) == (
        40 + len(JSONL_CASES) + 4,
        len(JSONL_CASES),
        2,
        1,
    )
    assert (
        c["records_in"] == c["accepted"] + c["quarantined"] + c["duplicates"] + c["too_long"]
        and c["accepted"] == 41
    )


def test_csv_json_and_parquet_bad_records(tmp_path, tiny_model):
    import pandas as pd

    csv = tmp_path / "d.csv"
    csv.write_bytes(
        b"instruction,input,output\r\n"
        + b"".join(f"q{i},,a{i}\r\n".encode() for i in range(20))
        + b'"multi\nline",,"answer, with comma"\r\n'  # quoted newline: one good row (21)
        + b"q,,\r\n"  # row 22: empty answer
        + b"q,x,y,z\r\n"
    )  # row 23: too many fields
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([good(i) for i in range(100, 120)] + [7, {"instruction": "q", "output": None}]))
    pq = tmp_path / "d.parquet"
    pd.DataFrame(
        [good(i) for i in range(200, 220)] + [{"instruction": "q", "input": "", "output": "  "}]
    ).to_parquet(pq)
    res = run_format(
        make_config(tmp_path, [str(csv), str(arr), str(pq)], data={"max_bad_fraction": 0.5}),
        "r",
        log=lambda *_: None,
    )
    q = [
        (Path(e["source"]).name, e["line"], e["reason"])
        for e in map(json.loads, (tmp_path / "runs/r/format/quarantine.jsonl").read_text().splitlines())
    ]
    assert [(n, line) for n, line, _ in q] == [
        ("d.csv", 22),
        ("d.csv", 23),
        ("d.json", 21),
        ("d.json", 22),
        ("d.parquet", 21),
    ]
    assert "is empty" in q[0][2] and "fields" in q[1][2] and "not an object" in q[2][2] and "null" in q[3][2]
    assert res.counts["accepted"] == 61 and res.counts["quarantined"] == 5


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("broken.json", b'[{"instruction": "x", "output": "y"},', "broken.json:1: not a valid JSON file"),
        ("object.json", b'{"instruction": "x"}', "expected a JSON array"),
        ("latin1.csv", "instruction,output\nq,caf\xe9\n".encode("latin-1"), "100.0% of 1 records are bad"),
        ("data.txt", b"hello", "unsupported file type '.txt'"),
        ("missing.jsonl", None, "missing.jsonl does not exist"),
        ("allbad.jsonl", b"nope\n" * 10, "100.0% of 10 records are bad"),
        # an empty night's drop is a clear error, not a KeyError out of pyarrow
        ("empty.jsonl", b"", "empty.jsonl: no records"),
        ("blank.jsonl", b"\n  \n\r\n", "blank.jsonl: no records"),
        ("empty.json", b"[]", "empty.json: no records"),
        ("header.csv", b"instruction,output\n", "header.csv: no records"),
        ("empty.csv", b"", "empty.csv: the CSV file has no header row"),
        ("none.parquet", parquet_bytes([]), "none.parquet: no records"),
        ("garbage.parquet", b"not parquet\n", "garbage.parquet: not a Parquet file"),
    ],
)
def test_whole_file_problems_are_one_clear_error(tmp_path, tiny_model, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        run_format(make_config(tmp_path, path, data={"max_bad_fraction": 0.5}), "r", log=lambda *_: None)


def test_an_empty_eval_file_beside_good_training_data_is_named(tmp_path, tiny_model):
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(train, [good(i) for i in range(20)])
    evals.write_text("\n")
    with pytest.raises(ValueError, match=re.escape(f"no eval records in {evals}")):
        run_format(make_config(tmp_path, train, data={"eval_path": str(evals)}), "r", log=lambda *_: None)


def test_the_user_sees_the_message_not_a_traceback(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "x", "output": "y"},')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"run_name: t\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name_or_path: tiny-llama}}\n"
        f"data: {{path: {path}}}\n"
    )
    res = run_cli("format", str(cfg), "--run-id", "r")
    assert res.returncode == 1 and "broken.json:1: not a valid JSON file" in res.stderr
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------- bad configs: exit 2 before a model loads


@pytest.mark.parametrize(
    "body,message",
    [
        ("", "the file is empty"),
        ("run_name: t\ndata: [unclosed\n", "YAML syntax error"),
        ("- just\n- a list\n", "expected a mapping"),
        ("run_name: ../escape\ndata: {path: data/demo/train.jsonl}\n", "run_name"),
        ("run_name: t\n", "data: required key is missing"),
        (
            "run_name: t\ndata: {path: data/demo/train.jsonl}\nserve: {hot_swap: true}\n",
            "needs serve.endpoint",
        ),
        ("run_name: t\ndata: {path: data/demo/train.jsonl, roles: {bot: robot}}\n", "data.roles"),
        ("run_name: t\ndata: {path: data/demo/train.jsonl, num_proc: 0}\n", "data.num_proc"),
        (
            "run_name: t\ndata: {path: data/demo/train.jsonl}\nserve: {endpoint: localhost:8000}\n",
            "must start with http",
        ),
        (  # an API key never crosses the network in clear text
            "run_name: t\ndata: {path: data/demo/train.jsonl}\nserve: {endpoint: 'http://10.0.0.5:8000/v1'}\n",
            "plain http to another host: the API key in $OPENAI_API_KEY",
        ),
    ],
)
def test_more_bad_configs_exit_2(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    res = run_cli("run", str(path))
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_non_utf8_config_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"run_name: caf\xe9\n")
    res = run_cli("validate", str(path))
    assert res.returncode == 2 and "not UTF-8" in res.stderr


# ---------------------------------------------------------------- outages and resources


def test_unreachable_mlflow_fails_fast_with_a_clear_message(tmp_path):
    import time

    t0 = time.monotonic()
    res = run_cli(
        "run",
        "configs/tiny.yaml",
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        f"tracking.mlflow_uri=http://user:s3cret@127.0.0.1:{free_port()}",
    )
    assert res.returncode == 1 and "cannot reach MLflow at http://***@127.0.0.1:" in res.stderr, res.stderr[
        -2000:
    ]
    assert "s3cret" not in res.stdout + res.stderr and "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 120


# ---------------------------------------------------------------- crashes, registry and secrets
# One pipeline run against a real `mlflow server` (PostgreSQL) whose URI carries credentials,
# with secrets in the environment; then every stage is SIGKILLed at three points and rerun.

SECRETS = {
    "HF_TOKEN": "hf_SECRETtoken0123456789",
    "MLFLOW_TRACKING_PASSWORD": "mlflowSECRETpw42",
    "AWS_SECRET_ACCESS_KEY": "awsSECRETkey/abc+XYZ",
}
URI_PASSWORD = "uriSECRETpass77"


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory):
    import yaml

    from services import mlflow_server

    tmp = tmp_path_factory.mktemp("crash")
    with mlflow_server(tmp / "mlflow") as server:
        cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
        cfg["output_dir"] = str(tmp / "runs")
        cfg["train"]["save_steps"] = 4
        # the URI and its password come as an override, as `prefect deployment run -p overrides=`
        # gives them, so the flow run's recorded parameters carry them too
        uri = server["uri"].replace("http://", f"http://sftflow:{URI_PASSWORD}@")
        path = tmp / "pipeline.yaml"
        path.write_text(yaml.safe_dump(cfg))
        logs = tmp / "cli-logs"
        logs.mkdir()

        def cli(*args, fault=None):
            env = {**SECRETS, **({"SFTFLOW_FAULT": fault} if fault else {})}
            res = run_cli(*args, "--set", f"tracking.mlflow_uri={uri}", env=env)
            n = len(list(logs.iterdir()))
            (logs / f"{n:02d}.log").write_text(res.stdout + res.stderr)
            return res

        summary = tmp / "summary.json"
        res = cli("run", str(path), "--summary-json", str(summary))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
        yield {
            "tmp": tmp,
            "config": str(path),
            "cli": cli,
            "server": server,
            "summary": json.loads(summary.read_text()),
        }


def _manifest(run: Path, stage: str):
    path = run / stage / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.mark.slow  # trains a model
def test_train_killed_three_times_resumes_to_the_same_weights(crash_run):
    import torch
    from safetensors.torch import load_file

    run = Path(crash_run["summary"]["run_dir"])
    original = {k: v.clone() for k, v in load_file(run / "train/adapter/adapter_model.safetensors").items()}
    cli, cfg, rid = crash_run["cli"], crash_run["config"], crash_run["summary"]["run_id"]
    for fault, resume in (
        ("train:step", []),
        ("train:checkpoint", ["--resume"]),
        ("train:final", ["--resume"]),
    ):
        res = cli("train", cfg, "--run-id", rid, *resume, fault=fault)
        assert res.returncode == 1 and "training failed" in res.stderr, (fault, res.stderr[-2000:])
        assert _manifest(run, "train") is None, fault  # never marked complete
        if fault == "train:checkpoint":  # killed while saving: a checkpoint without its completion marker
            incomplete = run / "train/checkpoints/checkpoint-8"
            assert incomplete.is_dir() and not (incomplete / COMPLETE).exists()
    res = cli("train", cfg, "--run-id", rid, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _manifest(run, "train")["status"] == "completed"
    final = load_file(run / "train/adapter/adapter_model.safetensors")
    assert all(torch.equal(original[k], final[k]) for k in original), (
        "resumed weights differ from the unbroken run"
    )


@pytest.mark.slow  # trains a model
def test_merge_killed_three_times_then_completes_verified(crash_run):
    run = Path(crash_run["summary"]["run_dir"])
    cli, cfg, rid = crash_run["cli"], crash_run["config"], crash_run["summary"]["run_id"]
    for fault in ("merge:reference", "merge:written", "merge:manifest"):
        res = cli("merge", cfg, "--run-id", rid, fault=fault)
        assert res.returncode == -9, (fault, res.stderr[-2000:])
        assert _manifest(run, "merge") is None, fault
    res = cli("merge", cfg, "--run-id", rid)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _manifest(run, "merge")["metrics"]["max_logit_diff"] <= 1e-3
    assert not list((run / "merge").glob(".model.tmp-*")), "a killed attempt's temp folder was left behind"


@pytest.mark.slow  # trains a model
def test_handoff_killed_three_times_registers_exactly_one_version(crash_run):
    from mlflow import MlflowClient

    first = Path(crash_run["summary"]["run_dir"])
    rid = first.name + "-b"
    second = first.parent / rid  # a second pipeline run, up to evaluate
    for stage in ("format", "train", "merge", "evaluate"):
        shutil.copytree(first / stage, second / stage)
    cli, cfg = crash_run["cli"], crash_run["config"]
    client = MlflowClient(crash_run["server"]["uri"], crash_run["server"]["uri"])

    def versions(run_id):
        return client.search_model_versions(f"name = 'tiny' and tag.`sftflow.run_id` = '{run_id}'")

    for fault, registered in (("handoff:bundle", 0), ("handoff:upload", 0), ("handoff:register", 1)):
        res = cli("handoff", cfg, "--run-id", rid, fault=fault)
        assert res.returncode == -9, (fault, res.stderr[-2000:])
        assert _manifest(second, "handoff") is None and len(versions(rid)) == registered, fault
    res = cli("handoff", cfg, "--run-id", rid)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _manifest(second, "handoff")["outputs"]["version"] == versions(rid)[0].version
    assert len(versions(rid)) == 1 and len(versions(first.name)) == 1
    parent = json.loads((second / "mlflow.json").read_text())["parent"]
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert [c.data.tags["sftflow.stage"] for c in children] == ["handoff"]  # one MLflow run per stage


@pytest.mark.slow  # trains a model
def test_disk_full_during_the_merge_save_is_a_clear_error(crash_run):
    run = Path(crash_run["summary"]["run_dir"])
    res = crash_run["cli"](
        "merge", crash_run["config"], "--run-id", crash_run["summary"]["run_id"], fault="enospc@merge:written"
    )
    assert res.returncode == 1 and "No space left on device" in res.stderr and "Traceback" not in res.stderr
    assert _manifest(run, "merge") is None and not list((run / "merge").glob(".model.tmp-*"))
    assert (
        crash_run["cli"]("merge", crash_run["config"], "--run-id", crash_run["summary"]["run_id"]).returncode
        == 0
    )


@pytest.mark.slow  # trains a model
def test_secrets_never_reach_files_logs_or_mlflow(crash_run, prefect_server):
    from mlflow import MlflowClient

    needles = [v.encode() for v in SECRETS.values()] + [URI_PASSWORD.encode()]
    roots = [crash_run["tmp"] / "runs", crash_run["tmp"] / "mlflow", crash_run["tmp"] / "cli-logs"]
    scanned = 0
    for root in roots:
        for f in (p for p in root.rglob("*") if p.is_file()):
            if f.name.startswith("mlflow-server-"):
                continue  # the server's own access log sees requests, not what sftflow wrote
            data = f.read_bytes()
            scanned += 1
            assert not any(n in data for n in needles), f"a secret leaked into {f}"
    assert scanned > 50
    client = MlflowClient(crash_run["server"]["uri"], crash_run["server"]["uri"])
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id]):
            text = json.dumps([r.data.params, r.data.tags])
            assert not any(n.decode() in text for n in needles), r.info.run_id
    for mv in client.search_model_versions("name = 'tiny'"):
        assert not any(n.decode() in json.dumps(mv.tags) for n in needles)
    if (
        prefect_server is not None
    ):  # the flow and task logs, artifacts and parameters the Prefect server keeps
        import httpx

        flow_run = {"flow_run_id": {"any_": [crash_run["summary"]["prefect_flow_run_id"]]}}
        logs = httpx.post(f"{prefect_server}/logs/filter", json={"logs": flow_run, "limit": 200}).json()
        artifacts = httpx.post(f"{prefect_server}/artifacts/filter", json={"artifacts": flow_run}).json()
        params = httpx.get(f"{prefect_server}/flow_runs/{crash_run['summary']['prefect_flow_run_id']}").json()
        assert logs and artifacts and "tracking.mlflow_uri=http://***@" in str(params["parameters"])
        text = json.dumps([logs, artifacts, params])
        assert not any(n.decode() in text for n in needles), "a secret leaked into the Prefect server"


@pytest.mark.slow  # trains a model
def test_mlflow_stopped_mid_training_and_restarted_loses_no_metrics(tmp_path):
    """The MLflow server goes away during training and stays away until the worker is done:
    training goes on, the metric values it could not send are kept in a file, and the stage's own
    MLflow calls (artifacts, then that file) wait with backoff until the server is back on the
    same port and database. Nothing is lost and the stage completes."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from mlflow import MlflowClient

    from services import fresh_database, start_mlflow, stop

    def log_has(text):
        return any(text in p.read_text() for p in (tmp_path / "runs").glob("*/train/train.log"))

    def wait_for_step(step):
        deadline = time.monotonic() + 300
        while not log_has(f"[train] step {step}/"):
            assert time.monotonic() < deadline and proc.poll() is None, f"training never reached step {step}"
            time.sleep(0.3)

    with fresh_database("sftflow_outage") as db:
        port = free_port()
        servers = [start_mlflow(tmp_path / "mlflow", db, port)]
        args = [
            "configs/tiny.yaml",
            "--run-id",
            "outage",
            "--set",
            f"output_dir={tmp_path / 'runs'}",
            "--set",
            f"tracking.mlflow_uri={servers[0]['uri']}",
        ]
        assert run_cli("format", *args).returncode == 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "train", *args],
            cwd=ROOT,
            env={**os.environ, "SFTFLOW_STEP_DELAY_S": "1"},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_step(2)
            os.killpg(servers[0]["proc"].pid, signal.SIGKILL)  # an outage is abrupt
            servers[0]["proc"].wait()
            down_at = max(
                int(x)
                for x in re.findall(
                    r"\[train\] step (\d+)/", next((tmp_path / "runs").glob("*/train/train.log")).read_text()
                )
            )
            pending = tmp_path / "runs/outage/train/pending_metrics.json"
            deadline = time.monotonic() + 300
            while not pending.is_file():  # the worker finished with MLflow still down
                assert time.monotonic() < deadline and proc.poll() is None, (
                    "the worker never kept its metrics"
                )
                time.sleep(0.3)
            assert (
                max(
                    int(x)
                    for x in re.findall(
                        r"\[train\] step (\d+)/",
                        next((tmp_path / "runs").glob("*/train/train.log")).read_text(),
                    )
                )
                >= down_at + 3
            )
            servers.append(start_mlflow(tmp_path / "mlflow", db, port))
            log = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, log[-4000:]
            assert log_has("MLflow unreachable")
            assert "metric values kept while MLflow was unreachable" in log, log[-4000:]
            assert not pending.exists()
            ids = json.loads((tmp_path / "runs/outage/mlflow.json").read_text())["stages"]
            losses = MlflowClient(servers[-1]["uri"]).get_metric_history(ids["train"], "loss")
            assert sorted(m.step for m in losses) == list(range(1, 13)), "metric values were lost"
            assert (
                json.loads((tmp_path / "runs/outage/train/manifest.json").read_text())["status"]
                == "completed"
            )
            logged = {a.path for a in MlflowClient(servers[-1]["uri"]).list_artifacts(ids["train"])}
            assert {"loss.png", "train.log", "manifest.json"} <= logged, logged
        finally:
            if proc.poll() is None:
                proc.kill()
            for server in servers:
                stop(server["proc"])


# ---------------------------------------------------------------- a killed flow leaves no process behind


@pytest.mark.slow  # trains a model and starts vLLM twice
def test_a_flow_killed_mid_run_leaves_no_process_once_the_retry_starts(tmp_path):
    """SIGKILL of the flow process skips every finally: the ranks (or vLLM) it started live on, and
    its pipeline slot stays taken. Each retry in the same output_dir reaps them and frees the slot
    before it starts anything: the run is killed while it trains, its retry while the parity gate's
    vLLM serves, and the retry after that completes. Each retry keeps the stages the attempt before
    it finished: the first keeps format and trains on from a checkpoint, the last keeps format,
    train and merge."""
    from tasks.core.orphans import find_orphans, start_time

    out = tmp_path / "runs"
    args = ["run", "configs/tiny.yaml", "--run-id", "night", "--set", f"output_dir={out}",
            "--set", "serve.parity.enabled=true", "--set", "serve.served_model_name=model"]  # fmt: skip
    left = []
    for point, what in [("train:running", "tasks.training.worker"), ("handoff:serving", "vllm"), ("", "")]:
        fault = {"SFTFLOW_FAULT": point, "SFTFLOW_FAULT_ONCE": str(tmp_path / f"fired-{point}")}
        res = run_cli(*args, env=fault if point else {})
        said = res.stdout + res.stderr
        assert res.returncode == (-9 if point else 0), said[-5000:]
        if left:  # the killed run's processes, reaped, and its pipeline slot, freed at once
            assert "process(es) left by a killed run" in said, said[-3000:]
            assert "released the pipeline slot a killed run held" in said, said[-3000:]
            assert "for the concurrency limit" not in said, said[-3000:]
            assert not [o for o in left if start_time(o.pid)], left
        left = find_orphans(out)
        if point:  # without reaping, these would stay
            assert any(what in o.command for o in left), left
        kept = re.findall(r"(\w+): kept what an earlier attempt of run night finished", said)
        assert (
            kept
            == {"train:running": [], "handoff:serving": ["format"], "": ["format", "train", "merge"]}[point]
        )
    assert left == []


# ---------------------------------------------------------------- a full disk


@pytest.mark.slow  # trains a model
def test_a_night_on_a_full_disk_fails_at_the_check_and_the_next_night_succeeds(tmp_path):
    """output_dir on a 24 MB tmpfs, filled until 2.2 MB are free: the format stage fits, the train
    stage's estimate (two full-weight checkpoints with Adam state, then the weights: about 3 MB)
    does not. The night ends at the check, naming the path and the numbers, with no registry
    version; with the filler gone, the same night resumes and completes."""
    from mlflow import MlflowClient

    with small_disk(tmp_path / "disk", 24) as disk:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the registry lives on a disk with room
        args = ["run", "configs/tiny.yaml", "--run-id", "night", "--set", f"output_dir={disk / 'runs'}",
                "--set", f"tracking.mlflow_uri={uri}", "--set", "train.method=full",
                "--set", "train.max_steps=4", "--set", "train.save_steps=2"]  # fmt: skip
        filler = fill_disk(disk, leave=int(2.2 * 2**20))
        res = run_cli(*args)
        assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
        assert "No space left" not in res.stderr, res.stderr[-3000:]  # refused before any write failed
        message = res.stderr[res.stderr.index("train (full: 2 checkpoint(s)") :].splitlines()[0]
        assert (
            f"{disk / 'runs' / 'night' / 'train'}" in message and "MiB free, and this writes about" in message
        )
        assert not (disk / "runs/night/train/checkpoints").exists()
        assert MlflowClient(uri, uri).search_model_versions("name = 'tiny'") == []
        filler.unlink()
        res = run_cli(*args)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert len(MlflowClient(uri, uri).search_model_versions("name = 'tiny'")) == 1
