"""The data that made a version, as MLflow dataset inputs of its run."""

from __future__ import annotations

from pathlib import Path

from tasks.config import DataConfig
from tasks.core.hashing import file_sha256
from tasks.core.results import FormatResult


def dataset_inputs(run_name: str, d: DataConfig, data: FormatResult) -> list[tuple[str, str, str, str]]:
    """(name, source, digest, context) of the training mix and the eval set."""
    sources = lambda p: ", ".join(p) if isinstance(p, list) else str(p)
    train_source = sources([p for source in data.sources for p in source["path"]] or d.path)
    eval_source = sources(d.eval_path) if d.eval_path else f"{train_source} (held-out split)"
    eval_digest = file_sha256(Path(data.eval_records))[:16]
    return [
        (f"{run_name}-train", as_uri(train_source), data.data_hash[:16], "training"),
        (f"{run_name}-eval", as_uri(eval_source), eval_digest, "evaluation"),
    ]


def as_uri(source: str) -> str:
    """A local path as a file:// URI (resolved), anything else (a hub name, a glob, a list) as given."""
    path = Path(source)
    return path.resolve().as_uri() if path.exists() else source
