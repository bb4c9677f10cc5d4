"""The gate's arithmetic and the evaluation report, on real numbers (no models needed)."""

import pytest

from tasks.evaluate import bar_chart, gate, report_markdown

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
    ok, reason = gate(cfg_with(tmp_path, **gate_cfg), scores)
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
