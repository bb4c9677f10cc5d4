"""Run directories, manifests, hashing and atomic writes.

A run lives in ``<output_dir>/<run_id>/`` with one folder per stage. A stage's
``manifest.json`` is written last, atomically: a folder without a complete manifest is
never taken as a finished stage.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import errno
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

STAGES = ("format", "train", "merge", "evaluate", "handoff")
CODE_ROOT = Path(__file__).resolve().parent.parent


def new_run_id(run_name: str) -> str:
    return f"{run_name}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


def run_dir(output_dir: Path, run_id: str) -> Path:
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise ValueError(f"invalid run id {run_id!r}")
    return Path(output_dir) / run_id


def stage_dir(output_dir: Path, run_id: str, stage: str) -> Path:
    assert stage in STAGES, stage
    return run_dir(output_dir, run_id) / stage


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; rename it into place only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a process that was killed
        if not _alive(int(stale.name.rsplit("-", 2)[-2]) if stale.name.count("-") >= 2 else 0):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process that may own a temp folder still runs (another run may be writing it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def copy_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Hard links where the filesystem allows (no second copy of weights or data), copies otherwise."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if n in skip])


def fault(point: str) -> None:
    """Fault injection for the reliability tests: ``SFTFLOW_FAULT=<point>`` SIGKILLs this process
    at that point; ``SFTFLOW_FAULT=enospc@<point>`` raises the disk-full error a full disk gives."""
    spec = os.environ.get("SFTFLOW_FAULT", "")
    kind, _, where = spec.rpartition("@")
    if where != point:
        return
    if kind == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")
    os.kill(os.getpid(), signal.SIGKILL)


def start_stage(folder: Path) -> None:
    """A stage that starts again is not complete until it finishes again: drop its old manifest."""
    (Path(folder) / "manifest.json").unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: Path) -> str:
    """Hash of a file, or of a folder's relative names and file contents."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def code_version() -> str:
    """git sha of the checkout (with -dirty), or a hash of the code when not in git."""
    try:
        sha = subprocess.run(["git", "-C", str(CODE_ROOT), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(CODE_ROOT), "status", "--porcelain", "--", "tasks", "flows"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        h = hashlib.sha256()
        for f in sorted((CODE_ROOT / "tasks").rglob("*.py")):
            h.update(f.read_bytes())
        return "nogit-" + h.hexdigest()[:12]


@dataclass
class Manifest:
    """What a stage read, what it wrote, what it measured, and when."""

    stage: str
    run_id: str
    config_hash: str
    inputs: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    status: str = "running"
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())
    ended_at: str | None = None
    duration_s: float | None = None
    code_version: str = field(default_factory=code_version)
    _t0: float = field(default_factory=time.monotonic, repr=False)

    def add_input(self, name: str, path: Path, sha256: str | None = None) -> None:
        self.inputs[name] = {"path": str(path), "sha256": sha256 or tree_sha256(path)}

    def finish(self, folder: Path, status: str = "completed") -> dict:
        self.status = status
        self.ended_at = dt.datetime.now(dt.UTC).isoformat()
        self.duration_s = round(time.monotonic() - self._t0, 3)
        data = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        write_json(Path(folder) / "manifest.json", data)
        return data


def load_manifest(output_dir: Path, run_id: str, stage: str) -> dict:
    """The manifest of a completed stage, or a clear error saying which stage must run first."""
    path = stage_dir(output_dir, run_id, stage) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the {stage!r} stage for run {run_id!r} first")
    data = read_json(path)
    if data.get("status") != "completed":
        raise RuntimeError(f"{path}: the {stage!r} stage did not complete (status {data.get('status')!r})")
    return data
