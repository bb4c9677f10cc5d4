"""A stage's manifest: what it read, wrote and measured, and the result it passes on.

``manifest.json`` is written last and atomically: a stage folder without a completed
manifest is never taken as a finished stage.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.errors import MissingError, StageFailed
from tasks.core.files import read_json, write_json
from tasks.core.hashing import code_version, package_hash, tree_sha256
from tasks.core.paths import stage_dir


@dataclass
class Manifest:
    stage: str
    run_id: str
    config_hash: str
    inputs: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())
    ended_at: str | None = None
    duration_s: float | None = None
    code_version: str = field(default_factory=code_version)
    code_hash: str = field(default_factory=package_hash)  # tasks/ and flows/ by content, dirty or not
    _t0: float = field(default_factory=time.monotonic, repr=False)

    def add_input(self, name: str, path: Path, sha256: str | None = None) -> None:
        self.inputs[name] = {"path": str(path), "sha256": sha256 or tree_sha256(path)}

    def finish(self, folder: Path, result: Any = None) -> dict:
        self.status = "completed"
        self.ended_at = dt.datetime.now(dt.UTC).isoformat()
        self.duration_s = round(time.monotonic() - self._t0, 3)
        if result is not None:
            self.result = asdict(result)
        data = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        write_json(Path(folder) / "manifest.json", data)
        return data


def manifest_path(output_dir: Path, run_id: str, stage: str) -> Path:
    return stage_dir(output_dir, run_id, stage) / "manifest.json"


def load_manifest(output_dir: Path, run_id: str, stage: str) -> dict:
    """The manifest of a completed stage, or a clear error saying which stage must run first."""
    path = manifest_path(output_dir, run_id, stage)
    if not path.is_file():
        raise MissingError(f"{path} is missing: run the {stage!r} stage for run {run_id!r} first")
    data = read_json(path)
    if data.get("status") != "completed":
        raise StageFailed(f"{path}: the {stage!r} stage did not complete (status {data.get('status')!r})")
    return data
