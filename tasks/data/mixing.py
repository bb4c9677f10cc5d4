"""Which records a data mix takes from each source, deterministically from the seed.

Per source (after validation and deduplication), in the order of ``data.sources``:

    nothing set   all of its records
    count: N      exactly N (its records repeated, whole passes first, when it has fewer)
    fraction: f   round(f x its records)
    weight: w     the weighted sources share the mix in proportion to their weights, as many
                  records as the scarcest of them allows (none is repeated)
    replay        the champion's own sources together make up ``data.replay`` of the mix's
                  records (train and eval alike), as far as they have records (shared in
                  proportion to what each has)

Without an eval file, the eval split is taken from each source's share (``eval_fraction`` of
it, never a repeated record), so train and eval both follow the mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import SourceConfig


@dataclass
class Share:
    source: SourceConfig
    replay: bool = False  # one of the champion's sources, joined by data.replay


def planned_counts(shares: list[Share], available: list[int], replay: float) -> list[int]:
    """How many records each source contributes (train and eval together)."""
    counts = [0] * len(shares)
    weighted = [i for i, s in enumerate(shares) if s.source.weight is not None and not s.replay]
    for i, share in enumerate(shares):
        if not share.replay and i not in weighted:
            counts[i] = own_count(share.source, available[i])
    if weighted:
        total = sum(shares[i].source.weight for i in weighted)
        size = min(available[i] * total / shares[i].source.weight for i in weighted)
        for i in weighted:
            counts[i] = math.floor(size * shares[i].source.weight / total + 1e-9)
    replayed = [i for i, s in enumerate(shares) if s.replay]
    have = sum(available[i] for i in replayed)
    if replayed and have:
        want = min(have, round(sum(counts) * replay / (1 - replay)))
        for i in replayed:  # largest remainders, so the shares add up to exactly `want`
            counts[i] = want * available[i] // have
        order = sorted(replayed, key=lambda i: -(want * available[i] % have))
        for i in order[: want - sum(counts[i] for i in replayed)]:
            counts[i] += 1
    return counts


def own_count(source: SourceConfig, available: int) -> int:
    """A source without a weight: its count, its fraction of what it has, or all of it."""
    if source.count is not None:
        return source.count
    return round(source.fraction * available) if source.fraction is not None else available


def eval_size(n: int, fraction: float) -> int:
    return 0 if n < 2 or fraction == 0 else min(n - 1, max(1, round(n * fraction)))


def select(
    source_of: np.ndarray, counts: list[int], eval_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Record indices (into ``source_of``) for the train and eval splits, each in file order."""
    rng = np.random.default_rng(seed)
    train, evals = [], []
    for i, want in enumerate(counts):
        mine = rng.permutation(np.flatnonzero(source_of == i))
        n_eval = eval_size(min(want, len(mine)), eval_fraction)
        evals.append(mine[:n_eval])
        pool, need = mine[n_eval:], want - n_eval
        if len(pool):
            whole, rest = divmod(need, len(pool))
            train.append(np.concatenate([np.tile(np.sort(pool), whole), np.sort(pool[:rest])]))
    join = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    return join(train), join(evals)


def left_out_and_repeats(train, evals, share) -> dict:
    """What the mix did not take, and the extra copies it made, so the counts still add up."""
    taken = np.unique(np.concatenate([train, evals]))
    return {
        "left_out_by_mix": int((share >= 0).sum() - (share[taken] >= 0).sum()),
        "repeated_by_mix": len(train) + len(evals) - len(taken),
    }


def recorded_source(source: SourceConfig) -> dict:
    """A source as a later run replays it: absolute paths, its reading options, no amount."""
    paths = [source.path] if isinstance(source.path, str) else source.path
    name = source.label if source.label.startswith("replay ") else f"replay {source.label}"
    update = {
        "path": [str(Path(p).resolve()) if Path(p).exists() else p for p in paths],
        "name": name,
        "weight": None,
        "count": None,
        "fraction": None,
    }
    return source.model_copy(update=update).model_dump(mode="json")
