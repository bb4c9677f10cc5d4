"""Which eval prompts evaluate asks when ``eval.max_samples`` is fewer than the eval split."""

from tasks.evaluation.scoring import spread


def test_max_samples_asks_every_source_of_a_mix_in_proportion():
    """The format stage writes a mix's eval records source after source (here 42 demo, 18 tools):
    the first 8 were all demo prompts, so the tool prompts were never generated or served."""
    records = [{"source": "demo", "i": i} for i in range(42)] + [
        {"source": "tools", "i": i} for i in range(18)
    ]
    asked = spread(records, 8)
    assert len(asked) == 8 and asked == sorted(asked, key=records.index)  # distinct, in file order
    assert [r["source"] for r in asked].count("tools") == 2  # 18/60 of 8, rounded down
    assert asked[0] is records[0]
    assert spread(records, 60) == spread(records, 100) == records
