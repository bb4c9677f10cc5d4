"""The champion a nightly run continues from: its version, training sources and weights.

``train.init_from: champion`` starts training from the champion's adapter (lora, qlora) or its
weights (full); ``data.replay`` mixes a share of its training sources back in. Both read the
registry's ``champion`` once, here, and the run records which version it started from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from tasks.config import PipelineConfig
from tasks.stage import stage_logger

SOURCES_TAG = "sftflow.sources"  # the version's training sources, as SourceConfig dicts
WEIGHTS_TAG = "sftflow.weights_uri"  # MLflow URI of the adapter (lora, qlora) or model (full) it trained
METHOD_TAG = "sftflow.method"
BASE_TAG = "sftflow.base_model"


@dataclass
class Lineage:
    version: str
    run_id: str
    method: str
    weights_uri: str
    sources: list[dict]

    @property
    def label(self) -> str:
        return f"champion v{self.version} (run {self.run_id})"


def find_lineage(cfg: PipelineConfig, log=print) -> Lineage | None:
    """The current champion when this run starts from it or replays its data, else None."""
    if cfg.train.init_from == "base" and not cfg.data.replay:
        return None
    from tasks.registry import alias_version

    mv = alias_version(cfg.mlflow_uri, cfg.registered_model, "champion")
    if mv is None:
        log(f"lineage: {cfg.registered_model} has no champion yet: training from the base, nothing to replay")
        return None
    tags = mv.tags
    found = Lineage(
        str(mv.version),
        tags.get("sftflow.run_id", "?"),
        tags.get(METHOD_TAG, ""),
        tags.get(WEIGHTS_TAG, ""),
        json.loads(tags.get(SOURCES_TAG, "[]")),
    )
    if cfg.train.init_from == "champion":
        base = tags.get(BASE_TAG, cfg.model.name_or_path)
        if base != cfg.model.name_or_path:
            raise ValueError(
                f"train.init_from: champion: {found.label} was trained on {base}, this run's "
                f"model.name_or_path is {cfg.model.name_or_path}; set train.init_from: base to start over"
            )
        if found.method and found.method != cfg.train.method:
            raise ValueError(
                f"train.init_from: champion: {found.label} was trained with method {found.method}, "
                f"this run uses {cfg.train.method}; set train.init_from: base to start over"
            )
        if not found.weights_uri:
            raise ValueError(
                f"train.init_from: champion: {found.label} records no weights ({WEIGHTS_TAG}; versions "
                "registered before sftflow recorded them have none): set train.init_from: base for one night"
            )
    log(
        f"lineage: {found.label}"
        + (f"; training starts from its {'weights' if cfg.train.method == 'full' else 'adapter'}"
           if cfg.train.init_from == "champion" else "")
        + (f"; replaying {cfg.data.replay:.0%} from its {len(found.sources)} source(s)" if cfg.data.replay else "")
    )  # fmt: skip
    return found


def fetch_weights(cfg: PipelineConfig, lineage: Lineage, dst: Path) -> Path:
    """The champion's adapter or model folder, downloaded from MLflow into ``dst``."""
    from mlflow.artifacts import download_artifacts

    dst.mkdir(parents=True, exist_ok=True)
    uri = lineage.weights_uri
    return Path(download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=cfg.mlflow_uri))


@task(name="lineage", retries=2, retry_delay_seconds=5)
def lineage_task(cfg: PipelineConfig) -> Lineage | None:
    return find_lineage(cfg, stage_logger().info)
