"""Has this exact pipeline run already produced a registered model?

The fingerprint covers everything a trained model depends on: the format stage's cache key
(input contents, template, tokenizer, data settings, format code), the rest of the config
that shapes training, merging, the gate and the bundle, and the code (tasks/, flows/) by content. A nightly
run whose fingerprint is already on a registry version has nothing new to do.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import task

from tasks.config import PipelineConfig, hash_json
from tasks.rundir import CODE_ROOT

# Where things go and how the endpoint is reached do not change the model.
OPERATIONAL = {"run_name": True, "output_dir": True, "tracking": True,
               "serve": {"endpoint", "launch", "command", "health_timeout_s", "hot_swap", "api_key_env"}}


def code_hash() -> str:
    """The pipeline's own code by content, so a commit that touches only docs retrains nothing."""
    h = hashlib.sha256()
    for f in sorted([*(CODE_ROOT / "tasks").rglob("*.py"), *(CODE_ROOT / "flows").rglob("*.py")]):
        h.update(f.relative_to(CODE_ROOT).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def pipeline_fingerprint(cfg: PipelineConfig, format_key: str) -> str:
    return hash_json({"format": format_key, "config": cfg.model_dump(mode="json", exclude=OPERATIONAL),
                      "code": code_hash()})


def registered_with(cfg: PipelineConfig, fingerprint: str):
    """The registry version built from this fingerprint, or None."""
    from mlflow import MlflowClient

    from tasks.tracking import check_reachable

    check_reachable(cfg.mlflow_uri)  # a down server fails the run here, fast and clearly
    if cfg.mlflow_uri.startswith("sqlite:///") and not Path(cfg.mlflow_uri.removeprefix("sqlite:///")).is_file():
        return None  # no store yet, so nothing registered (and no empty database created)
    client = MlflowClient(cfg.mlflow_uri, cfg.mlflow_uri)
    found = client.search_model_versions(
        f"name = '{cfg.registered_model}' and tag.`sftflow.fingerprint` = '{fingerprint}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def find_unchanged(cfg: PipelineConfig, log=print) -> dict | None:
    from tasks.format import plan

    key = plan(cfg).key
    fingerprint = pipeline_fingerprint(cfg, key)
    mv = registered_with(cfg, fingerprint)
    if mv is None:
        log(f"inputs changed or never trained (fingerprint {fingerprint}, format key {key}): running every stage")
        return None
    run = mv.tags.get("sftflow.run_id", "?")
    log(f"nothing changed: data, config and code match {cfg.registered_model} version {mv.version} "
        f"(run {run}, fingerprint {fingerprint}); no retraining and no new registry version (use --force to retrain)")
    return {"version": str(mv.version), "run_id": run, "fingerprint": fingerprint, "bundle": mv.tags.get("sftflow.bundle"),
            "promoted": mv.tags.get("sftflow.promoted") == "True"}


@task(name="check-unchanged", retries=2, retry_delay_seconds=5)
def unchanged_task(cfg: PipelineConfig) -> dict | None:
    from tasks.stage import stage_logger

    return find_unchanged(cfg, stage_logger().info)
