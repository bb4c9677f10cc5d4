"""The champion a nightly run continues from: its version, training sources and weights.

``train.init_from: champion`` starts training from the champion's adapter (lora, qlora) or its
weights (full); ``data.replay`` mixes a share of its training sources back in. Both read the
registry's ``champion`` once (the flow's lineage task), and the run records which version it
started from.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.config import DataConfig, ModelConfig, TrainConfig
from tasks.core.errors import InputError
from tasks.core.results import Lineage
from tasks.registry.tags import BASE_TAG, METHOD_TAG, SOURCES_TAG, WEIGHTS_TAG
from tasks.registry.versions import alias_version


def find_lineage(
    model: ModelConfig, data: DataConfig, train: TrainConfig, uri: str, name: str, log=print
) -> Lineage | None:
    """The current champion when this run starts from it or replays its data, else None."""
    if train.init_from == "base" and not data.replay:
        return None
    mv = alias_version(uri, name, "champion")
    if mv is None:
        log(f"lineage: {name} has no champion yet: training from the base, nothing to replay")
        return None
    tags = mv.tags
    found = Lineage(
        str(mv.version),
        tags.get("sftflow.run_id", "?"),
        tags.get(METHOD_TAG, ""),
        tags.get(WEIGHTS_TAG, ""),
        json.loads(tags.get(SOURCES_TAG, "[]")),
    )
    if train.init_from == "champion":
        base = tags.get(BASE_TAG, model.name_or_path)
        if base != model.name_or_path:
            raise InputError(
                f"train.init_from: champion: {found.label} was trained on {base}, this run's "
                f"model.name_or_path is {model.name_or_path}; set train.init_from: base to start over"
            )
        if found.method and found.method != train.method:
            raise InputError(
                f"train.init_from: champion: {found.label} was trained with method {found.method}, "
                f"this run uses {train.method}; set train.init_from: base to start over"
            )
        if not found.weights_uri:
            raise InputError(
                f"train.init_from: champion: {found.label} records no weights ({WEIGHTS_TAG}; versions "
                "registered before sftflow recorded them have none): set train.init_from: base for one night"
            )
    log(
        f"lineage: {found.label}"
        + (
            f"; training starts from its {'weights' if train.method == 'full' else 'adapter'}"
            if train.init_from == "champion"
            else ""
        )
        + (f"; replaying {data.replay:.0%} from its {len(found.sources)} source(s)" if data.replay else "")
    )
    return found


def fetch_weights(uri: str, lineage: Lineage, dst: Path) -> Path:
    """The champion's adapter or model folder, downloaded from MLflow into ``dst``."""
    from mlflow.artifacts import download_artifacts

    dst.mkdir(parents=True, exist_ok=True)
    return Path(download_artifacts(artifact_uri=lineage.weights_uri, dst_path=str(dst), tracking_uri=uri))
