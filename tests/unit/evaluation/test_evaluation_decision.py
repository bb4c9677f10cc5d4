"""The gate's decision from per-sample statistics, with its parts named."""

import numpy as np

from tasks.config import EvalConfig
from tasks.evaluation.gate import SampleStats, decide, resampled, slice_metric


def stats(values):
    return SampleStats({"exact_match": ("mean", np.array(values, dtype=float))})


def test_decide_names_the_verdict_and_what_it_rests_on():
    e = EvalConfig(
        metrics=["exact_match"], gate={"metric": "exact_match", "against": "base", "min_delta": 0.1}
    )
    by_model = {"base": stats([0] * 20), "candidate": stats([1] * 18 + [0] * 2)}
    scores = {name: {"exact_match": s.value("exact_match")} for name, s in by_model.items()}
    d = decide(e, None, scores, by_model, [None] * 20, None, resampled(e.gate, by_model))
    assert d.passed and d.intervals["base"]["exact_match"]["low"] > 0.1 and d.slices == {}
    assert "exact_match 0.9000 vs base 0.0000" in d.reason


def test_slices_are_scored_on_a_per_sample_metric():
    e = EvalConfig(metrics=["exact_match"], gate={"metric": "eval_loss"})
    assert slice_metric(e.gate, stats([1, 0]), rows_sliced=False) == "exact_match"
    assert slice_metric(e.gate, stats([1, 0]), rows_sliced=True) == "eval_loss"
