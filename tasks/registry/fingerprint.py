"""Has this exact pipeline run already produced a registered model?

The fingerprint covers everything a trained model depends on: the format stage's cache key
(input contents, template, tokenizer, data settings, format code), the rest of the config that
shapes training, merging, the gate and the bundle, and the code (tasks/, flows/) by content. A
nightly run whose fingerprint is already on a registry version has nothing new to do.
"""

from __future__ import annotations

from tasks.config import PipelineConfig
from tasks.core.hashing import hash_json, package_hash
from tasks.core.tracking import check_reachable
from tasks.registry.tags import promotion_unfinished
from tasks.registry.versions import versions_tagged

# Where things go and how the endpoint is reached do not change the model.
OPERATIONAL = {
    "run_name": True,
    "output_dir": True,
    "tracking": True,
    "retention": True,
    "serve": {"endpoint", "health_timeout_s", "hot_swap", "api_key_env"},
}


def pipeline_fingerprint(cfg: PipelineConfig, format_key: str) -> str:
    """Of every section but the operational keys: the one helper that reads the whole config."""
    config = cfg.model_dump(mode="json", exclude=OPERATIONAL)
    return hash_json({"format": format_key, "config": config, "code": package_hash()})


def registered_with(uri: str, name: str, fingerprint: str) -> tuple[str, dict[str, str]] | None:
    """The oldest registry version built from this fingerprint, with its tags, or None. A version
    whose promotion never completed does not count: that night must run again."""
    check_reachable(uri)  # a down server fails the run here, fast and clearly
    found = versions_tagged(uri, name, "sftflow.fingerprint", fingerprint)
    return next(((v, tags) for v, tags in found if not promotion_unfinished(tags)), None)
