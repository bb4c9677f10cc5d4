"""Servers the tests start themselves on 127.0.0.1, backed by the machine's PostgreSQL.

The database URL comes from SFTFLOW_TEST_DATABASE_URL (default: the local PostgreSQL's `test`
database, trust auth). Each server gets a fresh database of its own (MLflow and Prefect both
keep an `alembic_version` table). When PostgreSQL is unreachable the tests skip, unless
SFTFLOW_REQUIRE_SERVICES=1 (set by .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

DATABASE_URL = os.environ.get("SFTFLOW_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_error() -> str | None:
    import psycopg

    try:
        with psycopg.connect(DATABASE_URL, connect_timeout=5) as conn:
            conn.execute("select 1")
    except psycopg.Error as e:
        return f"PostgreSQL at {DATABASE_URL} is unreachable: {e}"
    return None


def require_postgres() -> str:
    if (msg := postgres_error()) is not None:
        if os.environ.get("SFTFLOW_REQUIRE_SERVICES") == "1":
            pytest.fail(msg + " (SFTFLOW_REQUIRE_SERVICES=1)")
        pytest.skip(msg)
    return DATABASE_URL


@contextlib.contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new, empty database; yields its URL (driver-less postgresql:// form) and drops it after."""
    import psycopg

    admin = require_postgres()
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def mlflow_server(
    tmp: Path, port: int | None = None, db_url: str | None = None, admin_password: str | None = None
) -> Iterator[dict]:
    """`mlflow server` with its backend store on PostgreSQL and artifacts under tmp; with
    ``admin_password``, behind MLflow's basic-auth app (user `admin`, users kept under tmp)."""
    with contextlib.ExitStack() as stack:
        url = db_url or stack.enter_context(fresh_database("sftflow_mlflow"))
        info = start_mlflow(tmp, url, port or free_port(), admin_password)
        stack.callback(stop, info["proc"])
        yield info


# MLflow 3's server otherwise starts ~7 huey job consumers (its GenAI jobs, unused here), each
# a Python process importing MLflow and polling: ~40 s of CPU per server start on 2 cores.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_mlflow(tmp: Path, db_url: str, port: int, admin_password: str | None = None) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / f"mlflow-server-{port}.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", **MLFLOW_SERVER_ENV}
    auth = []
    if admin_password:
        ini = tmp / "basic_auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp}/basic_auth.db\n")
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
                "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test"}  # fmt: skip
        auth = ["--app-name", "basic-auth"]
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        db_url.replace("postgresql://", "postgresql+psycopg://", 1),
        "--artifacts-destination",
        str(tmp / "mlartifacts"),
        "--workers",
        "1",
        *auth,
    ]
    proc = subprocess.Popen(
        cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    wait_http(uri + "/health", 180, proc, log)
    return {"uri": uri, "proc": proc, "db_url": db_url, "port": port, "log": log}


def start_prefect(env: dict, port: int, log: Path) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:``port`` with ``env`` (its PREFECT_HOME, database),
    its output appended to ``log``, once /api/health answers; stopped again if it never does."""
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 180, proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=8)  # test servers: no need to wait out a slow graceful shutdown
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
