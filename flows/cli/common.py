"""The environment every command that runs sets first, before Prefect or MLflow are imported."""

from __future__ import annotations

import os
from pathlib import Path

from tasks.config import PipelineConfig


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
