"""Has this exact pipeline run already produced a registered model?

The fingerprint covers everything a trained model depends on: the format stage's cache key
(input contents, template, tokenizer, data settings, format code), the rest of the config that
shapes training, merging, the gate and the bundle, and the code (tasks/, flows/) by content. A
nightly run whose fingerprint is already on a registry version has nothing new to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.config import PipelineConfig
from tasks.dataplan import plan_data
from tasks.hashing import hash_json, package_hash

# Where things go and how the endpoint is reached do not change the model.
OPERATIONAL = {
    "run_name": True,
    "output_dir": True,
    "tracking": True,
    "serve": {"endpoint", "health_timeout_s", "hot_swap", "api_key_env"},
}


@dataclass
class Unchanged:
    version: str
    run_id: str
    fingerprint: str
    bundle: str | None
    promoted: bool


def pipeline_fingerprint(cfg: PipelineConfig, format_key: str) -> str:
    config = cfg.model_dump(mode="json", exclude=OPERATIONAL)
    return hash_json({"format": format_key, "config": config, "code": package_hash()})


def registered_with(cfg: PipelineConfig, fingerprint: str) -> tuple[str, dict[str, str]] | None:
    """The oldest registry version built from this fingerprint, with its tags, or None."""
    from tasks.registry import versions_tagged
    from tasks.tracking import check_reachable

    check_reachable(cfg.mlflow_uri)  # a down server fails the run here, fast and clearly
    found = versions_tagged(cfg.mlflow_uri, cfg.registered_model, "sftflow.fingerprint", fingerprint)
    return found[0] if found else None


def find_unchanged(cfg: PipelineConfig, log=print) -> Unchanged | None:
    key = plan_data(cfg).declared_key  # replayed sources follow the champion, not the config
    fingerprint = pipeline_fingerprint(cfg, key)
    found = registered_with(cfg, fingerprint)
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
