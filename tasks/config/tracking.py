"""``tracking``: where MLflow records runs and registers versions."""

from __future__ import annotations

from pydantic import Field

from tasks.config.base import Section


class TrackingConfig(Section):
    mlflow_uri: str | None = Field(None, description="default sqlite:///<output_dir>/mlflow.db")
    experiment: str = "sftflow"
    registered_model: str | None = Field(None, description="default: run_name")
