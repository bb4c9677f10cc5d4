"""Whole-data checks the format stage refuses on, each naming where to look."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tasks.core.errors import InputError
from tasks.data.templating import Renderer


def check_bad_fraction(counts: Counter, quarantine: Path, limit: float) -> None:
    bad = counts["quarantined"] / max(counts["records_in"], 1)
    if bad <= limit:
        return
    lines = quarantine.read_text(encoding="utf-8").splitlines()[:5]
    first = "\n".join("  {source}:{line}: {reason}".format(**json.loads(x)) for x in lines)
    raise InputError(
        f"{bad:.1%} of {counts['records_in']} records are bad (data.max_bad_fraction is {limit:.1%}); "
        f"first ones:\n{first}\nall of them: {quarantine}"
    )


def check_stops(tokens, missing, renderer: Renderer, names: list[str], split: str) -> None:
    """Refuses examples that fit whole yet never train their stop token (TRL only warns, #5988):
    a model trained on them never learns to end its turn, and runs to max_tokens in vLLM."""
    if not len(missing):
        return
    first = int(missing[0])
    source, line = (tokens.data.column(c)[first].as_py() for c in ("source", "line"))
    where = f"{names[source]}:{line}"
    token = renderer.stop_text or None
    raise InputError(
        f"{where}: {len(missing):,} {split} example(s), this one first, never train the stop token "
        f"{token!r}: the template (data.template) puts no {token!r} after the answer, or masks it; a "
        "model trained on them does not learn to end its turn. Fix the template, or set "
        "data.require_stop: false to train anyway"
    )
