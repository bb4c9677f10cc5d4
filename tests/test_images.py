"""docker/ for real: the train and serving images built on a local CPU base and run, the compose
file validated by docker-compose, and a Prefect docker work pool running the pipeline in a
container of the train image.

The run directory and MLflow store sit on a volume mounted at the same path inside and outside
the containers, so what a container recorded (paths included) reads the same on the host.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ROOT
from dockerhost import build, build_context, cpu_base, ready, sh
from services import free_port, stop
from test_deployment import wait_final

pytestmark = [pytest.mark.slow, pytest.mark.docker]
PREFECT = str(Path(sys.executable).parent / "prefect")
# full fine-tuning long enough for the 2-layer model to end its turns (as in test_vllm.py), so
# the served answers can stop on their own and be compared with the evaluated ones
FULL = [
    "train.method=full", "train.max_steps=160", "train.learning_rate=1e-2", "train.save_steps=200",
    "eval.max_new_tokens=48", "serve.served_model_name=model",
]  # fmt: skip
# the serving containers' vllm-cache volume (docker/compose.yaml): the serving image's start fills
# it, and the compose stack's vLLM starts from it
VLLM_CACHE = ROOT / ".cache/vllm-container-cache"


@pytest.fixture(scope="module")
def engine():
    proc = ready().engine
    yield
    if proc is not None:
        stop(proc)


@pytest.fixture(scope="module")
def train_image(engine) -> dict:
    built = ready().train_image
    print(f"\ntrain image: {built}")
    return built


def mlflow_client(runs: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{runs}/mlflow.db"
    return MlflowClient(uri, uri)


# make test's thread setting reaches the containers' torch too (a container sees every core)
THREADS = [k for k in ("OMP_NUM_THREADS",) if os.environ.get(k)]


@pytest.fixture(scope="module")
def container_run(train_image, tmp_path_factory, prefect_server) -> dict:
    """`sftflow run configs/tiny.yaml` in a container of the train image, reporting to the tests'
    Prefect server; the run directory and MLflow store on a mounted volume."""
    store = tmp_path_factory.mktemp("store")
    runs = store / "runs"
    sets = [x for s in [f"output_dir={runs}", *FULL] for x in ("--set", s)]
    env = ["-e", f"PREFECT_API_URL={prefect_server}"] if prefect_server else []
    env += [x for k in THREADS for x in ("-e", f"{k}={os.environ[k]}")]
    t0 = time.monotonic()
    done = sh(
        "docker", "run", "--rm", "--network", "host", "-v", f"{store}:{store}", *env, "-e", "HF_HUB_OFFLINE=1",
        train_image["tag"], "sftflow", "run", "configs/tiny.yaml", *sets, "--summary-json", f"{store}/summary.json",
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((store / "summary.json").read_text())
    print(f"\ncontainer run: {time.monotonic() - t0:.0f}s; {done.stdout[-1500:]}")
    return {"runs": runs, "summary": summary, "stdout": done.stdout}


def test_tiny_pipeline_in_the_train_image_is_read_from_the_host(container_run):
    """The registry the container wrote is read on the host: the version, its run, its bundle."""
    summary, runs = container_run["summary"], container_run["runs"]
    client = mlflow_client(runs)
    versions = client.search_model_versions(f"name = '{summary['registered_model']}'")
    assert [str(v.version) for v in versions] == [str(summary["version"])] == ["1"]
    version = versions[0]
    assert version.tags["sftflow.run_id"] == summary["run_id"]
    assert str(client.get_model_version_by_alias(summary["registered_model"], "champion").version) == "1"
    assert client.get_run(version.run_id).info.status == "FINISHED"
    scored = summary["scores"]["candidate"]["eval_loss"]
    assert float(version.tags["metric.eval_loss"]) == pytest.approx(scored, abs=1e-4)
    bundle = Path(summary["bundle"])
    assert (
        bundle.is_relative_to(runs)
        and json.loads((bundle / "serve.json").read_text())["served_model_name"] == "model"
    )
    # the train stage ran DeepSpeed in the container, on the image's CPU torch
    train = json.loads((Path(summary["run_dir"]) / "train/manifest.json").read_text())
    assert train["status"] == "completed" and summary["steps"] == 160


def test_serving_image_serves_what_the_container_evaluated(engine, container_run, tmp_path):
    """vLLM for CPU in the serving image, on the bundle the container run made: the smoke test
    passes from the host and the answers are the ones the evaluate stage scored."""
    from tasks.core.files import read_jsonl
    from tasks.serving.server import smoke_test

    built = build("Dockerfile.serve", "sftflow-serve:test", BASE=cpu_base(), VLLM_PINS="configs/vllm/cpu.txt")
    print(f"\nserving image: {built}")
    summary, port = container_run["summary"], free_port()
    name = f"sftflow-serve-test-{port}"
    sh(
        "docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "--shm-size", "1g",
        "-v", f"{summary['bundle']}:/bundle:ro", "-v", f"{VLLM_CACHE}:/root/.cache/vllm",
        "-e", "VLLM_CPU_KVCACHE_SPACE=1", built["tag"],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        t0 = time.monotonic()
        wait_http_ok(url + "/models", 600, container=name)
        waited = time.monotonic() - t0
        rows = read_jsonl(Path(summary["run_dir"]) / "evaluate/generations.jsonl")[:3]
        smoke = smoke_test(url, "model", [r["prompt"] for r in rows], max_tokens=48)
        print(f"serving container healthy after {waited:.0f}s; smoke: {smoke}")
        assert any((VLLM_CACHE / "torch_compile_cache").rglob("*"))  # vLLM's compiled model outlives it
        assert smoke["passed"], smoke["failures"]
        assert [a["answer"].strip() for a in smoke["answers"]] == [r["candidate"] for r in rows]
    except Exception:
        print(sh("docker", "logs", "--tail", "40", name, check=False).stderr)
        raise
    finally:
        sh("docker", "rm", "-f", name, check=False)


def local_stack(folder: Path, images: dict[str, str], bundle: Path) -> tuple[Path, dict[str, int]]:
    """docker/compose.yaml with what cannot run here replaced: locally built images for the ones
    it pulls, no GPU reservations, free host ports on 127.0.0.1, the bundle at its own path."""
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    ports = {}
    for name, svc in compose["services"].items():
        svc.pop("build", None)
        svc.pop("deploy", None)
        svc["image"] = images[name]
        for i, mapping in enumerate(svc.get("ports", [])):
            ports[name] = free_port()
            svc["ports"][i] = f"127.0.0.1:{ports[name]}:{mapping.split(':')[-1]}"
        svc["volumes"] = [
            v.replace("./bundle", str(bundle))
            .replace("./", f"{ROOT}/docker/", 1)
            .replace("vllm-cache:", f"{VLLM_CACHE}:")
            for v in svc.get("volumes", [])
        ]
    compose["services"]["vllm"]["environment"]["VLLM_CPU_KVCACHE_SPACE"] = "1"
    path = folder / "compose.yaml"
    path.write_text(yaml.safe_dump(compose, sort_keys=False))
    return path, ports


# what a user sets before `up` (docker/compose.yaml's header); every service needs its part
CREDENTIALS = {
    "PREFECT_API_AUTH_STRING": "sftflow:prefect-test-pass",
    "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-test-pass",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-test-key",
    "VLLM_API_KEY": "vllm-test-key",
}


def test_compose_stack_validates_and_comes_up_on_local_images(engine, train_image, container_run, tmp_path):
    """`docker-compose config` refuses docker/compose.yaml without credentials and passes with
    them; the whole stack then comes up on local images (the official postgres, Prefect and MLflow
    images cannot be pulled here): the Prefect and MLflow servers on their PostgreSQL databases,
    each refusing requests without its credentials, the worker online in its pool and able to
    write to MLflow, and vLLM serving the container run's bundle to its key only."""
    bare = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    done = sh("docker-compose", "-f", str(ROOT / "docker/compose.yaml"), "config", check=False, env=bare)
    assert done.returncode != 0 and "set PREFECT_API_AUTH_STRING=user:password" in done.stderr, done.stderr
    env = bare | CREDENTIALS
    done = sh("docker-compose", "-f", str(ROOT / "docker/compose.yaml"), "config", check=False, env=env)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {"postgres", "prefect-server", "mlflow-server", "worker", "vllm"}

    postgres = build_context(ROOT / "tests/images/postgres", "sftflow-postgres:test")
    serve = build("Dockerfile.serve", "sftflow-serve:test", BASE=cpu_base(), VLLM_PINS="configs/vllm/cpu.txt")
    images = {"postgres": postgres, "prefect-server": train_image["tag"], "mlflow-server": train_image["tag"],
              "worker": train_image["tag"], "vllm": serve["tag"]}  # fmt: skip
    path, ports = local_stack(tmp_path, images, Path(container_run["summary"]["bundle"]))
    compose = ["docker-compose", "-p", f"sftflowtest{ports['vllm']}", "-f", str(path)]
    try:
        sh(*compose, "up", "-d", timeout=600, env=env)
        t0 = time.monotonic()
        check_stack(ports)
        print(f"\ncompose stack up and checked in {time.monotonic() - t0:.0f}s")
        tables = sh(*compose, "exec", "-T", "postgres", "psql", "-U", "sftflow", "-d", "mlflow", "-Atc",
                    "select count(*) from alembic_version", env=env).stdout  # fmt: skip
        assert tables.strip() == "1"  # MLflow migrated its own database
        # the worker's flows reach MLflow with the stack's credentials, past sftflow's pre-check
        code = (
            "import os; from mlflow import MlflowClient; from tasks.core import check_reachable; "
            "check_reachable(os.environ['MLFLOW_TRACKING_URI']); print(MlflowClient().create_experiment('c'))"
        )
        assert sh(*compose, "exec", "-T", "worker", "python", "-c", code, env=env).stdout.strip().isdigit()
    except Exception:
        print(sh(*compose, "logs", "--tail", "30", check=False, env=env).stdout[-6000:])
        raise
    finally:
        sh(*compose, "down", "-v", check=False, timeout=300, env=env)


def check_stack(ports: dict[str, int]) -> None:
    """Each server healthy, each refusing a request without its credentials and answering with them."""
    prefect, mlflow = (
        f"http://127.0.0.1:{ports['prefect-server']}/api",
        f"http://127.0.0.1:{ports['mlflow-server']}",
    )
    vllm = f"http://127.0.0.1:{ports['vllm']}/v1/models"
    prefect_auth = httpx.BasicAuth(*CREDENTIALS["PREFECT_API_AUTH_STRING"].split(":", 1))
    mlflow_auth = httpx.BasicAuth(
        CREDENTIALS["MLFLOW_TRACKING_USERNAME"], CREDENTIALS["MLFLOW_TRACKING_PASSWORD"]
    )
    vllm_key = {"Authorization": f"Bearer {CREDENTIALS['VLLM_API_KEY']}"}
    wait_http_ok(f"{prefect}/health", 300)  # health probes need no credentials
    wait_http_ok(f"{mlflow}/health", 300)
    workers = wait_http_ok(
        f"{prefect}/work_pools/sftflow-process/workers/filter", 120, post={}, auth=prefect_auth
    )
    print(f"\nworker {workers[0]['name']}")
    assert workers[0]["status"] == "ONLINE"  # the worker signed in with the stack's auth string
    wait_http_ok(vllm, 600, headers=vllm_key)
    refused = {
        "prefect": httpx.post(f"{prefect}/flows/filter", json={}, timeout=10).status_code,
        "prefect, wrong": httpx.post(
            f"{prefect}/flows/filter", json={}, auth=("sftflow", "x"), timeout=10
        ).status_code,
        "mlflow": httpx.get(
            f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10
        ).status_code,
        "vllm": httpx.get(vllm, timeout=10).status_code,
    }
    assert refused == dict.fromkeys(refused, 401), refused
    assert httpx.post(f"{prefect}/flows/filter", json={}, auth=prefect_auth, timeout=10).status_code == 200
    search = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(search, auth=mlflow_auth, timeout=10).status_code == 200


def wait_http_ok(url: str, timeout: float, post: dict | None = None, container: str | None = None, **auth):
    """The JSON of the first 200 answer (a non-empty one, for a list) within ``timeout``; fails
    at once if ``container`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            container
            and sh("docker", "inspect", "-f", "{{.State.Running}}", container).stdout.strip() != "true"
        ):
            raise RuntimeError(f"container {container} exited before {url} answered")
        try:
            r = (
                httpx.post(url, json=post, timeout=5, **auth)
                if post is not None
                else httpx.get(url, timeout=5, **auth)
            )
            body = r.json() if "json" in r.headers.get("content-type", "") else r.text
            if r.status_code == 200 and body != []:
                return body
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def test_docker_pool_deployment_runs_the_pipeline_in_a_container(train_image, prefect_server, tmp_path):
    """prefect.yaml's on-demand-docker deployment on a docker work pool: `prefect deployment run`
    is picked up by a prefect-docker worker, runs in a container of the train image, completes."""
    if prefect_server is None:
        pytest.skip("needs the tests' Prefect server (PostgreSQL)")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "home"),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}  # fmt: skip

    def prefect(*args):
        done = subprocess.run(
            [PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    prefect("work-pool", "create", "sftflow-docker", "--type", "docker", "--overwrite")
    prefect("--no-prompt", "deploy", "--name", "on-demand-docker")
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "sftflow-docker"], cwd=ROOT, env=env,
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    runs = tmp_path / "runs"
    runs.mkdir()
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    pool = next(d["work_pool"] for d in deployments if d["name"] == "on-demand-docker")
    pool_env = pool["job_variables"]["env"] | {k: os.environ[k] for k in THREADS}  # a run's env replaces
    try:
        out = prefect(
            "deployment", "run", "sft-pipeline/on-demand-docker",
            "-p", "config_path=configs/tiny.yaml", "-p", f"overrides={json.dumps([f'output_dir={runs}'])}",
            # the test's image, the run directory mounted at its own path, no GPU to request here
            "--job-variable", f"image={train_image['tag']}",
            "--job-variable", f"volumes={json.dumps([f'{runs}:{runs}'])}",
            "--job-variable", "container_create_kwargs={}",
            *(["--job-variable", f"env={json.dumps(pool_env)}"] if THREADS else []),
        )  # fmt: skip
        flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
        run = wait_final(prefect_server, flow_run_id, 900)
    finally:
        stop(worker)
    print(f"\ndocker-pool flow run: {run['state']['name']} after {run['total_run_time']:.0f}s")
    assert run["state"]["type"] == "COMPLETED", (run["state"], log.read_text()[-4000:])
    infra = httpx.get(f"{prefect_server}/flow_runs/{flow_run_id}").json()["infrastructure_pid"]
    assert infra and len(infra.split(":")[-1]) == 64  # a Docker container id, not a local process
    versions = mlflow_client(runs).search_model_versions("name = 'tiny'")
    assert [str(v.version) for v in versions] == ["1"]
