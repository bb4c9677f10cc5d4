"""The nightly pre-check: has this exact pipeline (data, config, code) already been registered?"""

from __future__ import annotations

from prefect import task

from tasks.config import SECTION_NAMES, PipelineConfig
from tasks.core.results import Unchanged
from tasks.core.stage import stage_logger
from tasks.data.plan import plan_data
from tasks.models.loading import resolve_model
from tasks.registry.fingerprint import pipeline_fingerprint, registered_with

SECTIONS = SECTION_NAMES  # the fingerprint covers every section


def run_unchanged(cfg: PipelineConfig, log=print) -> Unchanged | None:
    # replayed sources follow the champion, not the config
    key = plan_data(cfg.data, resolve_model(cfg.model.name_or_path)).declared_key
    fingerprint = pipeline_fingerprint(cfg, key)
    found = registered_with(cfg.mlflow_uri, cfg.registered_model, fingerprint)
    if found is None:
        log(
            f"inputs changed or never trained (fingerprint {fingerprint}, format key {key}): running every stage"
        )
        return None
    version, tags = found
    run = tags.get("sftflow.run_id", "?")
    log(
        f"nothing changed: data, config and code match {cfg.registered_model} version {version} "
        f"(run {run}, fingerprint {fingerprint}); no retraining and no new registry version (use --force to retrain)"
    )
    promoted = tags.get("sftflow.promoted") == "True"
    return Unchanged(version, run, fingerprint, tags.get("sftflow.bundle"), promoted)


@task(name="check-unchanged", retries=2, retry_delay_seconds=5)
def unchanged_task(cfg: PipelineConfig) -> Unchanged | None:
    return run_unchanged(cfg, stage_logger().info)
