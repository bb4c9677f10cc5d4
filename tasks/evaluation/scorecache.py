"""Scores of models that did not change, read back instead of generated again.

A nightly run scores the same base model on the same eval set every night, and its champion is
the model an earlier night scored as its candidate. Greedy generation and the loss passes are
most of the evaluate stage's time (SmolLM2-135M on 2 cores: about 35 s a model), so a model whose
bytes, eval data, template, settings, libraries and scoring code are all unchanged gets the
scores, answers and per-sample statistics it got then. Entries live under
``<output_dir>/.cache/scores/`` (one small JSON file each); the garbage collection deletes those
unused for ``retention.score_cache_days``.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from tasks.core.files import read_json, write_json
from tasks.core.hashing import hash_json

LIBRARIES = ("torch", "transformers", "peft", "evaluate", "sacrebleu", "rouge-score")


def library_versions() -> dict[str, str | None]:
    def one(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: one(name) for name in LIBRARIES}


def score_key(weights: list, inputs: dict) -> str:
    """The entry of a model (``weights``: the content hashes of its folder and adapter, and the
    dtype it is scored in) scored on ``inputs`` (eval data, template, settings, the scoring code);
    the libraries are added here."""
    return hash_json({"weights": weights, "inputs": inputs, "libraries": library_versions()})


def load_scores(folder: Path, key: str) -> dict | None:
    """A stored entry (``scores``, ``answers``, ``stopped``, ``stats`` as arrays, ``run_id``), or None."""
    path = Path(folder) / f"{key}.json"
    try:
        entry = read_json(path)
        entry["stats"] = {name: (kind, np.asarray(rows)) for name, (kind, rows) in entry["stats"].items()}
        os.utime(path)  # used today: the garbage collection deletes entries by their last use
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, cut short: scored again
        return None
    return entry


def store_scores(folder: Path, key: str, run_id: str, scored: tuple, log) -> None:
    """``scored``: score_model's (scores, answers, stopped, SampleStats). A failed write is logged,
    not raised: the scores are this run's either way."""
    scores, answers, stopped, stats = scored
    entry = {
        "run_id": run_id,
        "scores": scores,
        "answers": answers,
        "stopped": stopped,
        "stats": {name: [kind, rows.tolist()] for name, (kind, rows) in stats.stats.items()},
    }
    try:
        write_json(Path(folder) / f"{key}.json", entry)
    except OSError as e:
        log(f"evaluate: could not store the score cache entry {key}: {e}")
