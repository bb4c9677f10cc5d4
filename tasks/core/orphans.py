"""Processes a killed run left behind, found by the mark they inherited, and stopped at the next start.

A SIGKILLed flow (the OOM killer, a cancelled worker, a host restart) runs no ``finally``: its
vLLM server, DeepSpeed ranks and temporary Prefect server live on, reparented to init, and on a
GPU a leftover vLLM holds most of the memory the next night needs. Each run marks its own process
with ``SFTFLOW_OWNER=<host>|<output_dir>|<pid>|<start time>`` before it starts anything, so every process
it starts, and theirs, inherits the mark (a process's initial environment is readable in
``/proc/<pid>/environ``). The next start in the same ``output_dir`` on the same host stops every
marked process whose owner is gone; a run that is still alive keeps its own, and a shared
``output_dir`` seen from another node is that node's business.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

OWNER_ENV = "SFTFLOW_OWNER"


@dataclass(frozen=True)
class Orphan:
    pid: int
    owner_pid: int
    command: str


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with the pid, a unique name), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def owner_mark(output_dir: Path, pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}|{Path(output_dir).resolve()}|{pid}|{start_time(pid)}"


def mark_owner(output_dir: Path) -> None:
    """Mark this process as the owner of what it starts from now on (idempotent)."""
    os.environ[OWNER_ENV] = owner_mark(output_dir)


def owner_gone(mark: str, output_dir: Path) -> bool:
    """Whether ``mark`` names an owner of ``output_dir`` on this host that no longer runs (a mark
    from another host, or for another folder, is never taken as gone: its pid means nothing here)."""
    if mark.count("|") < 3:
        return False
    where, owner, started = mark.rsplit("|", 2)
    here = f"{socket.gethostname()}|{Path(output_dir).resolve()}"
    return where == here and owner.isdigit() and start_time(int(owner)) != started


def _mark_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or another user's
        return None
    prefix = f"{OWNER_ENV}=".encode()
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def find_orphans(output_dir: Path) -> list[Orphan]:
    """Live processes marked for ``output_dir`` by an owner that no longer runs."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        mark = _mark_of(int(entry.name))
        if mark is None or not owner_gone(mark, output_dir):  # another folder's, or its owner lives
            continue
        owner = mark.rsplit("|", 2)[1]
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found.append(Orphan(int(entry.name), int(owner), command[:160]))
    return found


def reap_orphans(output_dir: Path, log=print, grace_s: float = 10) -> list[Orphan]:
    """Stop every orphan of ``output_dir`` (SIGTERM, then SIGKILL after ``grace_s``); say which."""
    orphans = find_orphans(output_dir)
    if not orphans:
        return []
    owners = sorted({o.owner_pid for o in orphans})
    log(
        f"reaping {len(orphans)} process(es) left by a killed run in {output_dir} (owner pid "
        + ", ".join(map(str, owners))
        + "): "
        + "; ".join(f"{o.pid} {o.command[:80]}" for o in orphans)
    )
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for o in orphans:
            try:
                os.kill(o.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(start_time(o.pid) for o in orphans):
            time.sleep(0.2)
    return orphans


def claim(output_dir: Path, log=print) -> list[Orphan]:
    """At a run's start: reap what killed runs left in ``output_dir``, then mark this run's own."""
    reaped = reap_orphans(output_dir, log)
    mark_owner(output_dir)
    return reaped
