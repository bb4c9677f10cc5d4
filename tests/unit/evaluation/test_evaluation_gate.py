"""The gate's arithmetic and the evaluation report, on real numbers (no models needed)."""

import numpy as np
import pytest

from tasks.evaluation.gate import gate, intervals, slice_failures, slice_scores
from tasks.evaluation.report import bar_chart, report_markdown

from conftest import make_config

SCORES = {
    "base": {"eval_loss": 2.0, "rouge_l": 0.40},
    "candidate": {"eval_loss": 1.5, "rouge_l": 0.60},
    "champion": {"eval_loss": 1.4, "rouge_l": 0.55},
}


def cfg_with(tmp_path, **gate_cfg):
    return make_config(tmp_path, "data/demo/train.jsonl", eval={"metrics": ["rouge_l"], "gate": gate_cfg})


@pytest.mark.parametrize(
    "gate_cfg,scores,passed,fragment",
    [
        (
            {"metric": "rouge_l", "min_delta": 0.0, "against": "both"},
            SCORES,
            True,
            "vs champion 0.5500: improvement +0.0500",
        ),
        ({"metric": "rouge_l", "min_delta": 0.1, "against": "both"}, SCORES, False, "<= min_delta 0.1"),
        (
            {"metric": "rouge_l", "min_delta": 0.1, "against": "base"},
            SCORES,
            True,
            "vs base 0.4000: improvement +0.2000",
        ),
        # lower is better for loss: 1.5 loses to the champion's 1.4
        (
            {"metric": "eval_loss", "against": "both"},
            SCORES,
            False,
            "vs champion 1.4000: improvement -0.1000",
        ),
        ({"metric": "eval_loss", "against": "base"}, SCORES, True, "improvement +0.5000"),
        # no champion yet: only the base counts
        (
            {"metric": "rouge_l", "against": "both"},
            {k: SCORES[k] for k in ("base", "candidate")},
            True,
            "no champion to compare with",
        ),
        # an equal score is not an improvement
        (
            {"metric": "rouge_l", "against": "base"},
            {"base": SCORES["candidate"], "candidate": SCORES["candidate"]},
            False,
            "improvement +0.0000 <= min_delta 0.0",
        ),
    ],
)
def test_gate(tmp_path, gate_cfg, scores, passed, fragment):
    ok, reason = gate(cfg_with(tmp_path, **gate_cfg).eval.gate, scores)
    assert ok is passed
    assert fragment in reason


def test_report_has_the_table_and_five_samples_side_by_side(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": f"question {i} | with a pipe"}], "reference": f"ref {i}"}
        for i in range(8)
    ]
    preds = {name: [f"{name} answer {i}" for i in range(8)] for name in SCORES}
    text = report_markdown("run-1", SCORES, records, preds, False, "rouge_l 0.6 vs champion 0.55")
    assert "**NOT PROMOTED**: rouge_l 0.6 vs champion 0.55" in text
    assert (
        "| metric | base | candidate | champion |" in text
        and "| rouge_l | 0.4000 | 0.6000 | 0.5500 |" in text
    )
    sample_rows = [line for line in text.splitlines() if line.startswith("| question")]
    assert len(sample_rows) == 5
    assert (
        sample_rows[0]
        == "| question 0 \\| with a pipe | ref 0 | base answer 0 | candidate answer 0 | champion answer 0 |"
    )
    bar_chart(SCORES, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_chart_draws_what_the_scores_say_each_metric_on_its_own_scale(tmp_path):
    scores = {"base": {"eval_loss": 0.69, "perplexity": 1.99, "exact_match": 0.0, "bleu": 76.0},
              "candidate": {"eval_loss": 0.03, "perplexity": 1.03, "exact_match": 0.85, "bleu": 98.9}}  # fmt: skip
    drawn = bar_chart(scores, tmp_path / "metrics.png")
    assert drawn == {name: {m: v for m, v in s.items() if m != "perplexity"} for name, s in scores.items()}
    from PIL import Image

    width, height = Image.open(tmp_path / "metrics.png").size
    assert width > height  # three panels side by side, so 0.85 is not flattened against 98.9


# ---------------------------------------------------------------- the gate's statistics


def stats_of(**metrics):
    from tasks.evaluation.gate import SampleStats

    return SampleStats({m: ("mean", np.array(v, dtype=float)) for m, v in metrics.items()})


def scored(stats: dict) -> dict:
    return {name: {m: s.value(m) for m in s.stats} for name, s in stats.items()}


def exact_match_cfg(tmp_path, **gate_cfg):
    gate_cfg = {"metric": "exact_match", "against": "base", **gate_cfg}
    evals = {"metrics": ["exact_match"], "gate": gate_cfg}
    return make_config(tmp_path, "data/demo/train.jsonl", data={"slice_column": "category"}, eval=evals)


def test_a_noisy_tie_is_refused_where_a_point_comparison_would_promote(tmp_path):
    """40 samples, half right for both; the candidate flips 3 wrong answers right and 2 right
    answers wrong: +0.025 on the mean, which is noise. A plain min_delta comparison promotes it."""
    base = [1.0] * 20 + [0.0] * 20
    candidate = [1.0] * 18 + [0.0] * 2 + [1.0] * 3 + [0.0] * 17
    stats = {"base": stats_of(exact_match=base), "candidate": stats_of(exact_match=candidate)}
    cfg = exact_match_cfg(tmp_path)
    assert gate(cfg.eval.gate, scored(stats))[0] is True  # the point estimate alone
    bounds = intervals(cfg.eval.gate, stats)
    ok, reason = gate(cfg.eval.gate, scored(stats), bounds)
    assert not ok and "improvement +0.0250 (95% CI" in reason and "lower bound <= min_delta 0.0" in reason
    assert bounds["base"]["exact_match"]["low"] < 0 < bounds["base"]["exact_match"]["high"]
    assert intervals(cfg.eval.gate, stats) == bounds  # seeded


def test_a_real_improvement_is_promoted_with_its_interval(tmp_path):
    stats = {
        "base": stats_of(exact_match=[0.0] * 40),
        "candidate": stats_of(exact_match=[1.0] * 34 + [0.0] * 6),
    }
    cfg = exact_match_cfg(tmp_path, min_delta=0.5)
    bounds = intervals(cfg.eval.gate, stats)
    ok, reason = gate(cfg.eval.gate, scored(stats), bounds)
    assert (
        ok and "lower bound > min_delta 0.5" in reason and 0.5 < bounds["base"]["exact_match"]["low"] < 0.85
    )


def test_a_regressed_slice_refuses_promotion_naming_it(tmp_path):
    """The mean improves (0.25 -> 0.80), but on the 'math' slice the candidate drops from 1.0 to 0.2."""
    slices = ["qa"] * 10 + ["math"] * 10 + ["summary"] * 10 + ["tiny"] * 3
    base = [0.0] * 10 + [1.0] * 10 + [0.0] * 10 + [0.0] * 3
    candidate = [1.0] * 10 + [1.0] * 2 + [0.0] * 8 + [1.0] * 10 + [1.0] * 3
    stats = {"base": stats_of(exact_match=base), "candidate": stats_of(exact_match=candidate)}
    cfg = exact_match_cfg(tmp_path)
    by_slice = slice_scores("exact_match", stats, slices)
    assert by_slice["math"] == {"n": 10, "base": 1.0, "candidate": pytest.approx(0.2)}
    failures = slice_failures(cfg.eval.gate, cfg.data.slice_column, "exact_match", by_slice)
    ok, reason = gate(cfg.eval.gate, scored(stats), intervals(cfg.eval.gate, stats), failures)
    assert not ok and len(failures) == 1
    assert (
        "slice category='math' (10 samples): exact_match 0.2000 vs base 1.0000, a regression of 0.8000"
        in reason
    )
    assert (
        intervals(cfg.eval.gate, stats)["base"]["exact_match"]["low"] > 0
    )  # the mean alone would have promoted it


def test_resampled_bleu_and_loss_are_the_corpus_metrics_of_the_resample():
    import sacrebleu
    from sacrebleu.metrics import BLEU

    from tasks.evaluation.gate import SampleStats

    preds = ["the cat sat on the mat", "a dog barks at night", "rain falls in spring", "the sun is hot today"]
    refs = [
        "the cat sat on a mat",
        "the dog barks at night",
        "rain falls in the spring",
        "the sun is warm today",
    ]
    losses = np.array([[2.0, 4], [9.0, 3], [1.0, 1], [6.0, 2]])
    stats = SampleStats({"bleu": ("bleu", np.array(BLEU()._extract_corpus_statistics(preds, [refs]), dtype=float)),
                         "eval_loss": ("ratio", losses), "perplexity": ("exp", losses)})  # fmt: skip
    for index in ([0, 1, 2, 3], [1, 1, 3], [2, 0, 0, 3]):
        idx = np.array(index)
        expected = sacrebleu.corpus_bleu([preds[i] for i in idx], [[refs[i] for i in idx]]).score
        assert stats.value("bleu", idx) == pytest.approx(expected)
        assert stats.value("eval_loss", idx) == pytest.approx(losses[idx, 0].sum() / losses[idx, 1].sum())
        assert stats.value("perplexity", idx) == pytest.approx(
            np.exp(losses[idx, 0].sum() / losses[idx, 1].sum())
        )
