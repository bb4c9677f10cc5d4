"""What the format stage will read, and the cache key of what it will write.

The key covers the input files' contents, the template, the tokenizer files, the data
settings and the code the format stage runs (``tasks/format.py`` and every project module it
imports). The format stage caches its output under it; the nightly unchanged-check reads it
without loading a tokenizer or a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.hashing import file_sha256, hash_json, imports_hash, tree_sha256
from tasks.models import resolve_model
from tasks.records import resolve_sources

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


@dataclass
class DataPlan:
    sources: list[tuple[str, str]]  # (split, source), in reading order
    hashes: list[str]
    model_dir: Path
    key: str
    data_hash: str


def tokenizer_hash(model_dir: Path) -> str:
    """Vocabulary, merges, added and special tokens and the chat template, from the files themselves."""
    return hash_json({f: file_sha256(model_dir / f) for f in TOKENIZER_FILES if (model_dir / f).is_file()})


def template_source(setting: str) -> str:
    """What the template setting names: 'auto' is covered by the tokenizer files."""
    if setting in ("auto", "alpaca", "chatml"):
        return setting
    path = Path(setting)
    return path.read_text(encoding="utf-8") if path.is_file() else setting


def format_code_hash() -> str:
    return imports_hash("tasks.format")


def plan_data(cfg: PipelineConfig) -> DataPlan:
    d = cfg.data
    sources = [("train", s) for s in resolve_sources(d.path)]
    if d.eval_path:
        sources += [("eval", s) for s in resolve_sources(d.eval_path, "data.eval_path")]
    model_dir = resolve_model(cfg.model.name_or_path)
    hashes = [source_hash(s) for _, s in sources]
    inputs = [(split, h) for (split, _), h in zip(sources, hashes)]
    settings = d.model_dump(mode="json", exclude={"path", "eval_path", "cache", "num_proc"})
    key = hash_json(
        {
            "inputs": inputs,
            "template": template_source(d.template),
            "tokenizer": tokenizer_hash(model_dir),
            "data": settings,
            "code": format_code_hash(),
        }
    )
    data_hash = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    return DataPlan(sources, hashes, model_dir, key, data_hash)


def source_hash(source: str) -> str:
    return "hub" if source.startswith("hub:") else tree_sha256(Path(source))
