"""The nightly pre-check: has this exact pipeline (data, config, code) already been registered?"""

from __future__ import annotations

from prefect import task

from tasks.config import PipelineConfig
from tasks.fingerprint import Unchanged, find_unchanged
from tasks.stage import stage_logger


@task(name="check-unchanged", retries=2, retry_delay_seconds=5)
def unchanged_task(cfg: PipelineConfig) -> Unchanged | None:
    return find_unchanged(cfg, stage_logger().info)
