"""The flow's first step after the pre-check: the champion this run continues from or replays."""

from __future__ import annotations

from prefect import task

from tasks.config import PipelineConfig
from tasks.core.results import Lineage
from tasks.core.stage import stage_logger
from tasks.registry.lineage import find_lineage

SECTIONS = ("model", "data", "train", "tracking")


def run_lineage(cfg: PipelineConfig, log=print) -> Lineage | None:
    return find_lineage(cfg.model, cfg.data, cfg.train, cfg.mlflow_uri, cfg.registered_model, log)


@task(name="lineage", retries=2, retry_delay_seconds=5)
def lineage_task(cfg: PipelineConfig) -> Lineage | None:
    return run_lineage(cfg, stage_logger().info)
