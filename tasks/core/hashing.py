"""Content hashes: files, folders, JSON values, and the pipeline's own code."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from tasks.core.paths import CODE_ROOT


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        git = ["git", "-C", str(CODE_ROOT)]
        sha = subprocess.run(
            [*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "tasks", "flows"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "nogit-" + package_hash(CODE_ROOT)[:12]


def package_hash(root: Path = CODE_ROOT) -> str:
    """The pipeline's own code (tasks/, flows/) by content: a docs-only commit changes nothing."""
    files = sorted([*(root / "tasks").rglob("*.py"), *(root / "flows").rglob("*.py")])
    return _hash_files(root, files)


def imports_hash(module: str, root: Path = CODE_ROOT) -> str:
    """``module`` and every project module it imports, at any depth and inside functions too,
    by content: what shapes a stage's output, read from the code rather than listed by hand."""
    seen: set[str] = set()
    todo = [module]
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        path = _module_file(root, name)
        if name in seen or path is None:
            continue
        seen.add(name)
        files.add(path)
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    return _hash_files(root, sorted(files))


def _module_file(root: Path, name: str) -> Path | None:
    """A module's file, or a package's ``__init__.py``; None for names that are neither (classes)."""
    base = root / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _hash_files(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]
