"""Free disk space, checked before a stage writes, against an estimate of what it writes.

A full disk found by ENOSPC halfway through a save leaves a night failed late and a partial
folder behind; the same night refused before the write names the path and the numbers.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from tasks.core.errors import DiskFull

MARGIN = 1.10  # estimates are of the tensors; files carry headers, configs and tokenizers too


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (a file: its own size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def require_free(path: Path, need: int, what: str) -> int:
    """Refuse (DiskFull) unless the filesystem holding ``path`` has ``need`` bytes (plus a margin)
    free; returns the free bytes. ``what``: the stage and what it writes, for the message."""
    probe = Path(path).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need * MARGIN:
        raise DiskFull(
            errno.ENOSPC,
            f"{what}: {probe} has {human(free)} free, and this writes about {human(need)} "
            f"(an estimate, plus {MARGIN - 1:.0%}); free some space there, or set output_dir elsewhere",
        )
    return free


SQLITE_FULL = "database or disk is full"  # SQLite's SQLITE_FULL, as MLflow's SQLite store reports it


@contextlib.contextmanager
def disk_full_named(where: str) -> Iterator[None]:
    """A full disk met in the body (ENOSPC, a quota, or a SQLite store that could not grow) is
    the environment, not a bug: raised as one DiskFull line naming ``where``, what could not be
    written. Every other error, and a DiskFull already named, passes through as it is."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(e.errno, f"{e.strerror}: {where}") from e
    except Exception as e:
        if SQLITE_FULL not in str(e):
            raise
        raise DiskFull(errno.ENOSPC, f"{SQLITE_FULL}: {where}") from e
