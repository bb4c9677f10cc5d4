"""docker/ without an engine: the Dockerfiles linted with hadolint, their default bases and the
compose file checked against the project's pins. tests/test_images.py builds and runs them."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT

DOCKER = ROOT / "docker"
PINS = dict(re.findall(r"^([a-z0-9_.-]+)==([^\s+]+)", (ROOT / "constraints.txt").read_text(), re.M))


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    for dockerfile in sorted(DOCKER.glob("Dockerfile.*")):
        res = subprocess.run(
            [str(hadolint), "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True
        )
        assert res.returncode == 0, f"{dockerfile.name}:\n{res.stdout}{res.stderr}"


def test_images_are_pinned_and_match_the_project():
    train = (DOCKER / "Dockerfile.train").read_text()
    serve = (DOCKER / "Dockerfile.serve").read_text()
    # the default CUDA base ships the torch the project pins (constraints.txt: the CPU build of it)
    base = re.search(r"^ARG BASE=pytorch/pytorch:(\S+)-cuda[\d.]+-cudnn\d+-devel$", train, re.M)
    assert base and base.group(1) == PINS["torch"].split("+")[0]
    from tasks.serving.bundle import VLLM_IMAGE

    # the compose snippet in each bundle uses the same image, of the version configs/vllm pins
    assert f"ARG BASE={VLLM_IMAGE}" in serve
    assert all("\nFROM ${BASE}\n" in dockerfile for dockerfile in (train, serve))
    # the train image installs under the project's constraints (deepspeed's pin among them)
    assert "-c /tmp/constraints.txt -e ." in train and "constraints.txt" in train
    assert VLLM_IMAGE.endswith(
        ":v" + re.search(r"^vllm==(\S+)", (ROOT / "configs/vllm/cuda.txt").read_text(), re.M)[1]
    )


def test_compose_file_is_a_consistent_stack():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services, volumes = compose["services"], set(compose.get("volumes", {}))
    assert {"postgres", "prefect-server", "mlflow-server", "worker", "vllm"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        if "image" in svc:
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), f"{name}: pin the image"
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source.startswith(".") or source in volumes, f"{name}: undeclared volume {source}"
    for name in ("prefect-server", "mlflow-server", "vllm"):  # published on loopback unless told
        assert all(p.startswith("${SFTFLOW_BIND:-127.0.0.1}:") for p in services[name]["ports"]), name
    assert services["prefect-server"]["image"].startswith(f"prefecthq/prefect:{PINS['prefect']}")
    assert services["mlflow-server"]["image"].endswith(f"mlflow:v{PINS['mlflow']}")
    # Prefect and MLflow each get their own database on the one PostgreSQL (both keep alembic_version)
    sql = (DOCKER / "initdb/01-databases.sql").read_text()
    assert "CREATE DATABASE prefect" in sql and "CREATE DATABASE mlflow" in sql
    assert "/prefect" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "/mlflow" in services["mlflow-server"]["command"]
    # the same MLflow server as the tests' and `make stack`'s: no idle job consumers
    assert services["mlflow-server"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_compose_stack_needs_credentials_for_every_server():
    """Secure by default: each server gets its credentials from a required variable (compose
    stops with the variable's name when it is unset), and the worker the same ones as a client;
    tests/test_images.py brings the stack up and checks that each refuses requests without them."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]

    def required(value: str) -> str:
        found = re.fullmatch(r"\$\{(\w+):\?set \1[^}]*\}", value)
        assert found, f"{value!r} is not a required variable"
        return found[1]

    prefect = services["prefect-server"]["environment"]
    assert required(prefect["PREFECT_SERVER_API_AUTH_STRING"]) == "PREFECT_API_AUTH_STRING"
    mlflow = services["mlflow-server"]
    assert (
        "--app-name basic-auth" in mlflow["command"]
        and "mlflow[auth]==" + PINS["mlflow"] in mlflow["command"]
    )
    env = mlflow["environment"]
    assert required(env["MLFLOW_AUTH_ADMIN_USERNAME"]) == "MLFLOW_TRACKING_USERNAME"
    assert required(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == "MLFLOW_TRACKING_PASSWORD"
    assert required(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == "MLFLOW_FLASK_SERVER_SECRET_KEY"
    ini = env["MLFLOW_AUTH_CONFIG_PATH"]
    assert any(v.endswith(f":{ini}:ro") and (DOCKER / v.split(":")[0]).is_file() for v in mlflow["volumes"])
    assert "/mlflow_auth" in (DOCKER / "mlflow/basic_auth.ini").read_text()
    assert "CREATE DATABASE mlflow_auth" in (DOCKER / "initdb/01-databases.sql").read_text()
    # the worker reaches MLflow as mlflow-server:5000, a Host MLflow refuses unless allowed
    assert ":-mlflow-server:5000," in env["MLFLOW_SERVER_ALLOWED_HOSTS"]
    assert services["worker"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow-server:5000"
    worker = services["worker"]["environment"]
    for name in ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert required(worker[name]) == name
    assert required(services["vllm"]["environment"]["VLLM_API_KEY"]) == "VLLM_API_KEY"
