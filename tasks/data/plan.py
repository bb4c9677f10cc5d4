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

from tasks.config import DataConfig, SourceConfig
from tasks.core.errors import MissingError
from tasks.core.hashing import file_sha256, hash_json, imports_hash, tree_sha256
from tasks.core.results import Lineage
from tasks.data.mixing import Share
from tasks.data.records import resolve_sources
from tasks.data.templating import named_templates

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
    sources: list[tuple[str, str, int | None]]  # (split, file, its share of the mix), in reading order
    shares: list[Share]  # the mix: the configured sources, then the champion's if replayed
    hashes: list[str]
    model_dir: Path
    key: str  # the format stage's cache key
    declared_key: str  # the same without the replayed sources: what the nightly fingerprint covers
    data_hash: str


def tokenizer_hash(model_dir: Path) -> str:
    """Vocabulary, merges, added and special tokens and the chat template, from the files themselves."""
    return hash_json({f: file_sha256(model_dir / f) for f in TOKENIZER_FILES if (model_dir / f).is_file()})


def template_source(setting: str) -> str:
    """What the template setting names: 'auto' is covered by the tokenizer files."""
    if setting in ("auto", "alpaca", "chatml"):
        return setting
    path = named_templates().get(setting) or Path(setting)
    return path.read_text(encoding="utf-8") if path.is_file() else setting


def format_code_hash() -> str:
    return imports_hash("tasks.format")


def plan_data(d: DataConfig, model_dir: Path, lineage: Lineage | None = None) -> DataPlan:
    """``model_dir``: the model whose tokenizer the data is for. ``lineage``: the champion this run
    starts from; with ``data.replay`` its sources join the mix."""
    shares = [Share(s) for s in d.mix()]
    files = [
        resolve_sources(s.source.path, f"data.sources[{s.source.label}]" if d.sources else "data.path")
        for s in shares
    ]
    if d.replay and lineage is not None:
        replayed = replay_shares(lineage, d.replay_sources, {f for found in files for f in found})
        shares += [share for share, _ in replayed]
        files += [found for _, found in replayed]
    sources = [("train", f, i) for i, found in enumerate(files) for f in found]
    if d.eval_path:
        sources += [("eval", s, None) for s in resolve_sources(d.eval_path, "data.eval_path")]
    hashes = [source_hash(s) for _, s, _ in sources]
    inputs = [(split, i, h) for (split, _, i), h in zip(sources, hashes)]
    settings = d.model_dump(mode="json", exclude={"path", "eval_path", "cache", "num_proc"})
    options = [s.source.model_dump(mode="json", exclude={"path"}) for s in shares]
    settings["sources"] = options
    common = {
        "template": template_source(d.template),
        "tokenizer": tokenizer_hash(model_dir),
        "code": format_code_hash(),
    }
    key = hash_json({"inputs": inputs, "data": settings, **common})
    declared = [x for x in inputs if x[1] is None or not shares[x[1]].replay]
    settings["sources"] = [o for o, s in zip(options, shares) if not s.replay]
    declared_key = hash_json({"inputs": declared, "data": settings, **common})
    data_hash = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    return DataPlan(sources, shares, hashes, model_dir, key, declared_key, data_hash)


def replay_shares(lineage: Lineage, limit: int, taken: set[str]) -> list[tuple[Share, list[str]]]:
    """The champion's training sources, newest first as its version recorded them, each file once
    (not already in ``taken``), at most ``limit`` of them: a month of nights replays a bounded mix,
    and a file that has aged out of it may be gone. Each replayed file must still exist."""
    out = []
    for source in lineage.sources:
        if len(out) == limit:
            break
        for item in [source["path"]] if isinstance(source["path"], str) else source["path"]:
            if not Path(item).exists() and not item.startswith("hub:"):
                raise MissingError(
                    f"data.replay: champion version {lineage.version} was trained on {item}, which no "
                    "longer exists (restore it, or set data.replay: 0)"
                )
        label = f"data.sources[{source.get('name') or source['path']}]"
        found = [f for f in resolve_sources(source["path"], label) if f not in taken]
        if found:
            taken.update(found)
            out.append((Share(SourceConfig.model_validate({**source, "path": found}), replay=True), found))
    return out


def source_hash(source: str) -> str:
    return "hub" if source.startswith("hub:") else tree_sha256(Path(source))
