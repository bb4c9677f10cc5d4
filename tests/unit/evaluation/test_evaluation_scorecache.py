"""The score cache: what it stores comes back exactly, what its key covers, and what it survives."""

import numpy as np

from tasks.evaluation.gate import SampleStats, intervals
from tasks.evaluation.scorecache import library_versions, load_scores, score_key, store_scores

from conftest import make_config


def scored():
    rng = np.random.default_rng(0)
    losses = np.column_stack([rng.random(7) * 30, rng.integers(5, 40, 7)]).astype(np.float64)
    stats = SampleStats(
        {
            "eval_loss": ("ratio", losses),
            "perplexity": ("exp", losses),
            "exact_match": ("mean", (rng.random(7) > 0.5).astype(np.float64)),
            "bleu": ("bleu", rng.integers(0, 9, (7, 10)).astype(np.float64)),
        }
    )
    scores = {name: stats.value(name) for name in stats.stats}
    return scores, [f"answer {i}" for i in range(7)], [True] * 6 + [False], stats


def test_an_entry_comes_back_as_stored_and_gates_the_same(tmp_path):
    """Scores, answers, stops and every per-sample array (shape and float64 values) round-trip,
    so the gate's paired bootstrap over a reused entry is the one over the scored model."""
    scores, answers, stopped, stats = scored()
    logs = []
    store_scores(tmp_path, "k", "night1", (scores, answers, stopped, stats), logs.append)
    entry = load_scores(tmp_path, "k")
    assert not logs and entry["run_id"] == "night1"
    assert entry["scores"] == scores and entry["answers"] == answers and entry["stopped"] == stopped
    back = SampleStats(entry["stats"])
    for name, (kind, rows) in stats.stats.items():
        assert back.stats[name][0] == kind and back.stats[name][1].dtype == np.float64
        np.testing.assert_array_equal(back.stats[name][1], rows)
        assert back.value(name) == stats.value(name)
    g = make_config(tmp_path, "data/demo/train.jsonl").eval.gate
    candidate = SampleStats({k: (kind, rows * 0.9) for k, (kind, rows) in stats.stats.items()})
    # the gate's intervals come from the stats: the same from the entry as from the scored model
    assert intervals(g, {"base": back, "candidate": candidate}) == intervals(
        g, {"base": stats, "candidate": candidate}
    )


def test_the_key_follows_weights_inputs_and_libraries():
    inputs = {"data": "abc", "eval": {"max_new_tokens": 40}}
    key = score_key(["w1", None, "float32"], inputs)
    assert key == score_key(["w1", None, "float32"], dict(inputs))
    assert key != score_key(["w2", None, "float32"], inputs)
    assert key != score_key(["w1", "adapter", "float32"], inputs)
    assert key != score_key(["w1", None, "bfloat16"], inputs)
    assert key != score_key(["w1", None, "float32"], {**inputs, "eval": {"max_new_tokens": 41}})
    assert library_versions()["torch"] and library_versions()["transformers"]


def test_a_cut_short_entry_is_scored_again_and_a_failed_write_is_logged(tmp_path):
    (tmp_path / "k.json").write_text('{"run_id": "night1", "scores": {')  # the disk filled mid-write
    assert load_scores(tmp_path, "k") is None and load_scores(tmp_path, "absent") is None
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    logs = []
    store_scores(blocked, "k", "night2", scored(), logs.append)
    assert len(logs) == 1 and "could not store the score cache entry k" in logs[0]
