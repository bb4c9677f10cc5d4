"""Where a run lives: ``<output_dir>/<run_id>/<stage>/``, one folder per stage."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from pathlib import Path

from tasks.core.errors import InputError

STAGES = ("format", "train", "merge", "evaluate", "handoff")
CODE_ROOT = Path(__file__).resolve().parents[2]


def sftflow_home() -> Path:
    """Models, vLLM's venv and compile cache, DeepSpeed's built ops: kept across runs."""
    return Path(os.environ.get("SFTFLOW_HOME", Path.home() / ".cache" / "sftflow"))


def new_run_id(run_name: str) -> str:
    return f"{run_name}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


def run_dir(output_dir: Path, run_id: str) -> Path:
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise InputError(f"invalid run id {run_id!r}")
    return Path(output_dir) / run_id


def stage_dir(output_dir: Path, run_id: str, stage: str) -> Path:
    if stage not in STAGES:
        raise InputError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return run_dir(output_dir, run_id) / stage
