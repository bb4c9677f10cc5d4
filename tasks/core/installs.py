"""The package indexes pip is configured with, as uv's flags, so both venvs install with uv.

uv reads neither pip's config nor its ``PIP_*`` variables. Where pip is set up with a private
index, a CA bundle or a folder of local wheels (the CPU torch wheel, say), uv gets the same
from here. pip takes the best version across all its indexes, and so does uv with
``--index-strategy unsafe-best-match``.

Standard library only: the Makefile runs it as ``python -I tasks/core/installs.py`` before any
venv exists, and prints the flags.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

# pip's name for a setting -> uv's flag; pip's lists are whitespace-separated
FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "cert": "--cert",
    "constraint": "--constraint",
}


def pip_settings(python: str = sys.executable) -> dict[str, list[str]]:
    """``pip config list`` (files and ``PIP_*`` variables) as setting -> values."""
    done = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    settings: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        name = key.rsplit(".", 1)[-1]  # global.find-links, install.cert, :env:.find-links
        for item in shlex.split(value.strip().strip("'\"")):
            if item not in settings.setdefault(name, []):
                settings[name].append(item)
    return settings


def uv_flags(settings: dict[str, list[str]]) -> list[str]:
    """uv pip install's flags for the same indexes, wheels, CA bundle and constraints as pip's."""
    flags: list[str] = []
    for name, flag in FLAGS.items():
        for value in settings.get(name, []):
            flags += [flag, value]
    if settings.get("extra-index-url") or settings.get("find-links"):
        flags += ["--index-strategy", "unsafe-best-match"]
    return flags


if __name__ == "__main__":
    print(shlex.join(uv_flags(pip_settings())))
