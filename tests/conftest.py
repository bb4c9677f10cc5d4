"""Shared fixtures: state under the working dir, a tiny model built once, the CLI as a subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"

# Everything the tests write stays in the checkout; nothing reaches a hub or telemetry endpoint.
os.environ.setdefault("SFTFLOW_HOME", str(CACHE / "sftflow"))
os.environ.setdefault("HF_HOME", str(CACHE / "huggingface"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
# Tests never write into a server the shell happens to point at (e.g. `make stack`'s).
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session", autouse=True)
def prefect_server(tmp_path_factory):
    """One Prefect server on PostgreSQL for every `sftflow run` the tests start; each would
    otherwise boot a temporary server of its own (10-20 s apiece). Without PostgreSQL the runs
    fall back to those temporary servers (or fail, under SFTFLOW_REQUIRE_SERVICES=1)."""

    from services import free_port, fresh_database, postgres_error, start_prefect, stop

    if (error := postgres_error()) is not None:
        if os.environ.get("SFTFLOW_REQUIRE_SERVICES") == "1":
            pytest.fail(error)
        yield None
        return
    tmp = tmp_path_factory.mktemp("prefect-server")
    with fresh_database("sftflow_prefect_tests") as db:
        port = free_port()
        env = {
            **os.environ,
            "PREFECT_HOME": str(tmp),
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
            "PREFECT_API_DATABASE_CONNECTION_URL": db.replace("postgresql://", "postgresql+asyncpg://", 1),
        }
        proc = start_prefect(env, port, tmp / "server.log")
        try:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"  # for `sftflow run` subprocesses
            # and for flows run in this process
            with temporary_settings({PREFECT_API_URL: os.environ["PREFECT_API_URL"]}):
                yield os.environ["PREFECT_API_URL"]
        finally:
            from prefect.logging.handlers import APILogWorker

            try:  # logs of in-process flows go out while the server is still up
                APILogWorker.drain_all(timeout=10)
            except Exception as e:
                print(f"could not flush Prefect logs: {e}", file=sys.stderr)
            os.environ.pop("PREFECT_API_URL", None)
            stop(proc)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from tasks.models.loading import resolve_model

    return resolve_model("tiny-llama")


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


def make_config(tmp_path: Path, data_path, **sections):
    """A PipelineConfig on the tiny model with its output under tmp_path."""
    from tasks.config import PipelineConfig

    raw = {
        "run_name": "t",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": data_path if isinstance(data_path, list) else str(data_path), "max_seq_len": 256},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value) if isinstance(value, dict) else raw.__setitem__(key, value)
    return PipelineConfig.model_validate(raw)


def llama_on_tiny_tokenizer(target: Path, **shape) -> Path:
    """A randomly initialised (seed 0) Llama of the given shape with tiny-llama's tokenizer, saved to target."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.models.loading import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
    special = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{"vocab_size": len(tok), **special, **shape})).save_pretrained(target)
    tok.save_pretrained(target)
    return target


def write_jsonl(path: Path, records: list) -> Path:
    import json

    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8"
    )
    return path


@contextlib.contextmanager
def small_disk(path: Path, size_mb: int) -> Iterator[Path]:
    """A size-limited tmpfs mounted at ``path`` (the test skips unless run as root), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(disk: Path, leave: int = 0) -> Path:
    """A file taking all but ``leave`` bytes of the free space on ``disk``; unlink it to give them back."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free - leave)
    return filler


@pytest.hookimpl(trylast=True)  # after -m and -k deselect
def pytest_collection_modifyitems(config, items):
    """The family matrix through vLLM takes about 20 minutes: ``make test-families`` runs it
    (``-m families``), ``make test`` (CI) runs only the family it names on the command line. When
    image tests are selected, the Docker engine, base and train image are made in the background
    from the start (tests/dockerhost.py)."""
    if "families" not in (config.option.markexpr or ""):
        skip = pytest.mark.skip(reason="the family matrix through vLLM: make test-families runs it")
        for item in items:
            if "families" in item.keywords and item.nodeid not in config.args:
                item.add_marker(skip)
    if any("docker" in item.keywords and item.module.__name__ == "test_images" for item in items):
        from dockerhost import warm_up

        warm_up()
