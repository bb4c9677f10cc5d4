"""The flow's last step: the retention policy, so a month of nights stays inside its disk."""

from __future__ import annotations

import dataclasses

from prefect import task

from tasks.config import PipelineConfig
from tasks.core.stage import stage_logger
from tasks.registry.retention import collect

SECTIONS = ("eval", "tracking", "retention")


def run_gc(cfg: PipelineConfig, dry_run: bool = False, log=print) -> dict:
    report = collect(
        cfg.retention,
        cfg.output_dir,
        cfg.mlflow_uri,
        cfg.registered_model,
        cfg.eval.past_eval_sets,
        dry_run,
        log,
    )
    return dataclasses.asdict(report)


@task(name="gc")
def gc_task(cfg: PipelineConfig) -> dict | None:
    """A cleanup that fails does not change the night's outcome: it says so, and the next one retries."""
    log = stage_logger()
    try:
        return run_gc(cfg, log=log.info)
    except Exception as e:
        log.warning(f"gc: the retention policy failed ({type(e).__name__}: {e}); `sftflow gc` retries it")
        return None
