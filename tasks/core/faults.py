"""Fault injection for the reliability tests, at named points in the stages.

``SFTFLOW_FAULT=<point>`` SIGKILLs the process there; ``enospc@<point>`` raises the error a
full disk gives; ``hang@<point>`` stops there silently (a hung rank). With
``SFTFLOW_FAULT_ONCE=<file>`` a fault fires only while that file does not exist, and creates
it, so a retry runs clean.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path


def fault(point: str) -> None:
    kind, _, where = os.environ.get("SFTFLOW_FAULT", "").rpartition("@")
    if where != point:
        return
    if once := os.environ.get("SFTFLOW_FAULT_ONCE"):
        try:
            Path(once).touch(exist_ok=False)
        except FileExistsError:
            return
    if kind == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")
    if kind == "hang":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
