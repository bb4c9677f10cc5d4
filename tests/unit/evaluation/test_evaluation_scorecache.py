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
    (tmp_path / "empty.json").write_text("{}")
    assert load_scores(tmp_path, "k") is None and load_scores(tmp_path, "absent") is None
    assert load_scores(tmp_path, "empty") is None
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    logs = []
    store_scores(blocked, "k", "night2", scored(), logs.append)
    assert len(logs) == 1 and "could not store the score cache entry k" in logs[0]


def test_a_night_with_new_training_data_and_a_fixed_eval_set_keeps_the_key(tmp_path):
    """Two nights train on different records and evaluate on the same data.eval_path: what the
    base's scores depend on is unchanged, so it is not scored again. Another eval set, or another
    max_new_tokens, changes it."""
    from datasets import load_from_disk

    from tasks.core.files import read_jsonl
    from tasks.evaluate import EvalSet, score_inputs
    from tasks.evaluation.scoring import spread
    from tasks.format import run_format

    from conftest import ROOT, write_jsonl

    lines = (ROOT / "data/demo/train.jsonl").read_text(encoding="utf-8").splitlines()
    files = {
        name: write_jsonl(tmp_path / f"{name}.jsonl", part)
        for name, part in (("a", lines[:150]), ("b", lines[150:300]), ("eval", lines[300:340]), ("other", lines[340:]))
    }  # fmt: skip

    def inputs(run_id: str, train: str, held_out: str, **eval_cfg):
        cfg = make_config(
            tmp_path, str(files[train]), data={"eval_path": str(files[held_out])}, eval=eval_cfg
        )
        res = run_format(cfg, run_id, log=lambda *_: None)
        records = spread(read_jsonl(res.eval_records), cfg.eval.max_samples)
        s = EvalSet(res.template(), records, load_from_disk(res.eval_path), [2], {}, res.template_kwargs)
        return score_inputs(cfg.eval, s)

    night1 = inputs("n1", "a", "eval")
    assert inputs("n2", "b", "eval") == night1
    assert inputs("n3", "b", "other") != night1
    assert inputs("n4", "b", "eval", max_new_tokens=12) != night1
