"""Shared fixtures: state under the working dir, a tiny model built once, the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
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


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from tasks.models import resolve_model

    return resolve_model("tiny-llama")


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def make_config(tmp_path: Path, data_path, **sections):
    """A PipelineConfig on the tiny model with its output under tmp_path."""
    from tasks.config import PipelineConfig

    raw = {"run_name": "t", "output_dir": str(tmp_path / "runs"), "model": {"name_or_path": "tiny-llama"},
           "data": {"path": data_path if isinstance(data_path, list) else str(data_path), "max_seq_len": 256}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value) if isinstance(value, dict) else raw.__setitem__(key, value)
    return PipelineConfig.model_validate(raw)


def write_jsonl(path: Path, records: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path
