"""A DeepSpeed hostfile as the config reads it: (host, slots) per line, checked at validation."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

HOSTFILE_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:-]+)(\s+slots=(?P<slots>\d+))?\s*$")


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """(host, slots) per line of a DeepSpeed hostfile, in order; comments and blank lines skipped."""
    hosts = []
    for n, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = HOSTFILE_LINE.match(line)
        if not m:
            raise ValueError(f"{path}:{n}: expected 'host slots=N', got {raw.strip()!r}")
        host = m["host"]
        if host in (h for h, _ in hosts):
            raise ValueError(f"{path}:{n}: host {host!r} is listed twice")
        hosts.append((host, int(m["slots"] or 1)))
    if not hosts:
        raise ValueError(f"{path}: no hosts")
    return hosts


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"
