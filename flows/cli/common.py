"""The environment every command that runs sets first, before Prefect or MLflow are imported."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.core.orphans import claim


def quiet_defaults(cfg: PipelineConfig | None) -> None:
    """Set before Prefect or MLflow are imported: state under the output dir, no telemetry.
    HF_HUB_OFFLINE is left to the environment, as for a Prefect deployment (docs/testing.md)."""
    if cfg is not None:
        os.environ.setdefault("PREFECT_HOME", str((cfg.output_dir / ".prefect").resolve()))
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def claim_output_dir(cfg: PipelineConfig) -> None:
    """Reap what a killed run left in the output dir, and mark what this command starts as its own."""
    claim(cfg.output_dir, lambda line: print(f"sftflow: {line}", file=sys.stderr, flush=True))
