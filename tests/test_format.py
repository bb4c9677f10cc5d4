"""Format stage on the tiny model: masking, quarantine accounting, packing without cross-talk."""

import json

import pytest
import torch
from datasets import load_from_disk

from conftest import make_config, write_jsonl
from tasks.batching import IGNORE, Collator
from tasks.format import run_format
from tasks.models import load_model, load_tokenizer

ALPACA = [{"instruction": f"Say the number {i} in words.", "input": "" if i % 2 else f"Context {i}",
           "output": f"Answer number {i}."} for i in range(30)]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}!"},
                      {"role": "user", "content": "And again?"}, {"role": "assistant", "content": f"Again {i}."}]}
        for i in range(30)]


def trained_text(tok, row) -> list[str]:
    """Decode each contiguous run of trained tokens."""
    runs, cur = [], []
    for tid, lab in zip(row["input_ids"], row["labels"]):
        if lab != IGNORE:
            cur.append(tid)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("records,answers", [
    (ALPACA, lambda r: [r["output"]]),
    (CHAT, lambda r: [m["content"] for m in r["messages"] if m["role"] == "assistant"]),
])
def test_only_answers_and_end_of_turn_are_trained(tmp_path, tiny_model, records, answers):
    data = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = make_config(tmp_path, data, data={"packing": False, "eval_fraction": 0.1})
    res = run_format(cfg, "r1", log=lambda *_: None)
    tok = load_tokenizer(tiny_model)
    rows = load_from_disk(res.train_path)
    expected = [[a + "<|im_end|>\n" for a in answers(r)] for r in records]
    for row in rows:
        assert trained_text(tok, row) in expected
    assert len(rows) == res.counts["train"] == len(records) - res.counts["eval"]


def test_train_on_inputs_trains_everything(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cfg = make_config(tmp_path, data, data={"packing": False, "train_on_inputs": True})
    rows = load_from_disk(run_format(cfg, "r1", log=lambda *_: None).train_path)
    assert all(IGNORE not in r["labels"] for r in rows)


def test_bad_records_are_quarantined_with_line_and_reason(tmp_path, tiny_model):
    good = [json.dumps(r) for r in ALPACA]
    bad = ['{"instruction": "x", "output": ', '[1, 2]', '{"instruction": "x"}', '{"instruction": "x", "output": 3}',
           '{"instruction": "x", "output": "   "}', '{"messages": [{"role": "robot", "content": "x"}]}',
           '{"messages": [{"role": "user", "content": "only a question"}]}']
    lines = good[:10] + bad + [""] + good[10:] + [good[0]]  # a blank line and a duplicate
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = make_config(tmp_path, path, data={"max_bad_fraction": 0.5})
    res = run_format(cfg, "r1", log=lambda *_: None)
    q = [json.loads(x) for x in (tmp_path / "runs/r1/format/quarantine.jsonl").read_text().splitlines()]
    assert [e["line"] for e in q] == list(range(11, 18))
    reasons = " | ".join(e["reason"] for e in q)
    for fragment in ("invalid JSON", "not an object", "missing field 'output'", "is a int, not a string",
                     "is empty", "unknown role 'robot'", "no assistant turn"):
        assert fragment in reasons
    c = res.counts
    assert c["records_in"] == 38 and c["quarantined"] == 7 and c["duplicates"] == 1
    assert c["records_in"] == c["accepted"] + c["quarantined"] + c["duplicates"] + c["too_long"]
    manifest = json.loads((tmp_path / "runs/r1/format/manifest.json").read_text())
    assert manifest["metrics"]["counts"] == c and manifest["status"] == "completed"


def test_too_many_bad_records_fail_with_the_first_ones_named(tmp_path, tiny_model):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in ALPACA[:5]] + ["not json"] * 5) + "\n")
    cfg = make_config(tmp_path, path)
    with pytest.raises(ValueError, match=r"(?s)50.0% of 10 records are bad.*d.jsonl:6: invalid JSON"):
        run_format(cfg, "r1", log=lambda *_: None)


def test_too_long_records_are_counted(tmp_path, tiny_model):
    records = ALPACA + [{"instruction": "long " * 400, "output": "x"}]
    cfg = make_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", records))
    res = run_format(cfg, "r1", log=lambda *_: None)
    assert res.counts["too_long"] == 1 and res.counts["accepted"] == len(ALPACA)


def test_packed_losses_equal_unpacked(tmp_path, tiny_model):
    """Per-example losses inside a packed row match the same examples run alone."""
    cfg = make_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", CHAT + ALPACA), data={"packing": True})
    rows = load_from_disk(run_format(cfg, "r1", log=lambda *_: None).train_path)
    row = max(rows, key=lambda r: r["position_ids"].count(0))
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    assert len(starts) > 3, "the test needs a row with several examples"
    model = load_model(tiny_model)
    collate = Collator(load_tokenizer(tiny_model).pad_token_id)

    def per_token_loss(batch):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="none",
                                                 ignore_index=IGNORE)

    packed = per_token_loss(collate([row]))
    for a, b in zip(starts, starts[1:]):
        alone = per_token_loss(collate([{k: row[k][a:b] for k in ("input_ids", "labels", "position_ids")}]))
        labels = torch.tensor(row["labels"][a + 1:b])
        mask = labels != IGNORE
        assert torch.allclose(packed[a:b - 1][mask], alone[: b - a - 1][mask], atol=1e-5)
