"""Format stage on the tiny model: masking, quarantine accounting, packing without cross-talk."""

import json
import os

import pytest
import torch
from datasets import load_from_disk

from tasks.core.errors import InputError
from tasks.data.batching import IGNORE, Collator
from tasks.format import run_format
from tasks.models.loading import load_model, load_tokenizer

from conftest import make_config, write_jsonl

ALPACA = [
    {
        "instruction": f"Say the number {i} in words.",
        "input": "" if i % 2 else f"Context {i}",
        "output": f"Answer number {i}.",
    }
    for i in range(30)
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Hi {i}"},
            {"role": "assistant", "content": f"Hello {i}!"},
            {"role": "user", "content": "And again?"},
            {"role": "assistant", "content": f"Again {i}."},
        ]
    }
    for i in range(30)
]


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


@pytest.mark.parametrize(
    "records,answers",
    [
        (ALPACA, lambda r: [r["output"]]),
        (CHAT, lambda r: [m["content"] for m in r["messages"] if m["role"] == "assistant"]),
    ],
)
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


def test_a_template_that_never_trains_the_stop_is_refused_naming_the_record(tmp_path, tiny_model):
    """A template without an end of turn after the answer (a common hand-written one) trains a model
    that never stops: refused before training, naming the first such record and the setting."""
    template = tmp_path / "no_stop.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cfg = make_config(tmp_path, data, data={"template": str(template)})
    with pytest.raises(
        InputError, match=r"d.jsonl:\d+: 27 train example\(s\), this one first, never train the stop"
    ):
        run_format(cfg, "r1", log=lambda *_: None)
    cfg = make_config(tmp_path, data, data={"template": str(template), "require_stop": False})
    assert run_format(cfg, "r2", log=lambda *_: None).counts["trains_stop"] == 0


def test_every_example_trains_its_stop_and_the_stage_counts_them(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA + CHAT)
    res = run_format(make_config(tmp_path, data), "r1", log=lambda *_: None)
    assert res.counts["trains_stop"] == res.counts["train"] + res.counts["eval"] == 60


def test_tool_calling_data_trains_the_calls_and_evaluates_them_with_their_tools(tmp_path):
    """data/tools/train.jsonl on tiny-qwen2.5 with Qwen 2.5's template: every example trains its
    calls and its stop, and the eval prompts carry their tools, with the call as the reference a
    perfect model's decoded answer equals; ChatML, which renders no tools, is refused by name."""
    from tasks.models.loading import resolve_model

    from conftest import ROOT

    data = str(ROOT / "data/tools/train.jsonl")
    tiny = {"model": {"name_or_path": "tiny-qwen2.5"}}  # the tools' schema makes prompts of ~500 tokens
    cfg = make_config(tmp_path, data, **tiny, data={"template": "qwen2.5", "max_seq_len": 768})
    res = run_format(cfg, "r1", log=lambda *_: None)
    assert res.counts["trains_stop"] == res.counts["train"] + res.counts["eval"] == 200
    tok = load_tokenizer(resolve_model("tiny-qwen2.5"))
    rows = load_from_disk(res.train_path)
    trained = [text for i in range(3) for text in trained_text(tok, rows[i])]
    assert any('"name": "lookup_city", "arguments": {"city": ' in text for text in trained)
    records = [json.loads(line) for line in open(res.eval_records, encoding="utf-8")]
    assert all(r["tools"][0]["function"]["name"] == "lookup_city" for r in records)
    calls = [r for r in records if r["messages"][-1]["role"] == "user"]  # the answer is a call
    assert calls and len(calls) < len(records)
    for r in calls:
        city = r["reference"].split('"city": "')[1].split('"')[0]
        assert r["reference"] == json.dumps({"name": "lookup_city", "arguments": {"city": city}})
        assert city in r["messages"][0]["content"]
    for r in records:  # the others answer with the tool's result
        if r not in calls:
            assert r["reference"].endswith(f" is in {json.loads(r['messages'][-1]['content'])['country']}.")

    chatml = make_config(tmp_path, data, **tiny, data={"template": "chatml", "max_seq_len": 768})
    with pytest.raises(InputError, match="data.template does not render call 'lookup_city'"):
        run_format(chatml, "r2", log=lambda *_: None)


def test_a_template_that_writes_todays_date_is_pinned_and_a_cache_hit_keeps_its_day(tmp_path):
    """Llama 3.2's template writes today's date: the format stage pins it, every example holds it,
    the result carries it to evaluate, the parity gate and the bundle, and a later night that reuses
    the cached data keeps the day that data was rendered on."""
    import datetime as dt

    from tasks.models.loading import resolve_model

    data = write_jsonl(tmp_path / "d.jsonl", CHAT)
    cfg = make_config(tmp_path, data, model={"name_or_path": "tiny-llama3"}, data={"template": "llama3.2"})
    res = run_format(cfg, "r1", log=lambda *_: None)
    today = dt.date.today().strftime("%d %b %Y")
    assert res.template_kwargs == {"date_string": today}
    tok = load_tokenizer(resolve_model("tiny-llama3"))
    texts = [tok.decode(row["input_ids"]) for row in load_from_disk(res.train_path)]
    assert all(t.count(f"Today Date: {today}\n") == t.count("Cutting Knowledge Date") > 0 for t in texts)
    cached = next((tmp_path / "runs/.cache/format").glob("*/chat_template_kwargs.json"))
    cached.write_text(json.dumps({"date_string": "02 Jan 2024"}))  # as if rendered on that day
    again = run_format(cfg, "r2", log=lambda *_: None)
    assert again.cache_hit and again.template_kwargs == {"date_string": "02 Jan 2024"}


def _mistral(markers: bool) -> str:
    """Mistral v0.3's template (the shipped one): the system prompt goes into the last user turn, so
    a conversation's prefix does not render as a prefix; with markers around what the model says."""
    from tasks.data.templating import named_templates

    template = named_templates()["mistral"].read_text(encoding="utf-8")
    answer = '{{- " " + content|trim + eos_token }}'
    assert answer in template
    marked = "{%- generation %}" + answer + "{%- endgeneration %}"
    return template.replace(answer, marked) if markers else template


def test_multi_turn_masks_on_a_template_that_moves_the_system_prompt(tmp_path, tiny_model):
    """Without markers such a template is refused, naming the cure; with {% generation %} markers
    the trained tokens are exactly transformers' assistant mask on the whole conversation."""
    data = write_jsonl(tmp_path / "d.jsonl", CHAT)
    for markers in (False, True):
        (tmp_path / f"m{markers}.jinja").write_text(_mistral(markers))
    plain = make_config(tmp_path, data, data={"template": str(tmp_path / "mFalse.jinja")})
    with pytest.raises(
        InputError, match=r"the answer in message 2 cannot be masked exactly: .*\{% generation %\}"
    ):
        run_format(plain, "r1", log=lambda *_: None)

    cfg = make_config(tmp_path, data, data={"template": str(tmp_path / "mTrue.jinja"), "packing": False})
    res = run_format(cfg, "r2", log=lambda *_: None)
    tok = load_tokenizer(tiny_model)
    by_text = {tok.decode(r["input_ids"]): r for r in load_from_disk(res.train_path)}
    assert len(by_text) == res.counts["train"] == 27
    for record in CHAT:
        out = tok.apply_chat_template(
            record["messages"], chat_template=_mistral(True), tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )  # fmt: skip
        row = by_text.get(tok.decode(out["input_ids"]))
        if row is None:  # an eval record
            continue
        assert row["input_ids"] == out["input_ids"]
        assert [label != IGNORE for label in row["labels"]] == [bool(m) for m in out["assistant_masks"]]
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert trained_text(tok, row) == [f" {a}<|im_end|>" for a in answers]


def test_train_on_inputs_trains_everything(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cfg = make_config(tmp_path, data, data={"packing": False, "train_on_inputs": True})
    rows = load_from_disk(run_format(cfg, "r1", log=lambda *_: None).train_path)
    assert all(IGNORE not in r["labels"] for r in rows)


def test_bad_records_are_quarantined_with_line_and_reason(tmp_path, tiny_model):
    good = [json.dumps(r) for r in ALPACA]
    bad = [
        '{"instruction": "x", "output": ',
        "[1, 2]",
        '{"instruction": "x"}',
        '{"instruction": "x", "output": 3}',
        '{"instruction": "x", "output": "   "}',
        '{"messages": [{"role": "robot", "content": "x"}]}',
        '{"messages": [{"role": "user", "content": "only a question"}]}',
    ]
    lines = good[:10] + bad + [""] + good[10:] + [good[0]]  # a blank line and a duplicate
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = make_config(tmp_path, path, data={"max_bad_fraction": 0.5})
    res = run_format(cfg, "r1", log=lambda *_: None)
    q = [json.loads(x) for x in (tmp_path / "runs/r1/format/quarantine.jsonl").read_text().splitlines()]
    assert [e["line"] for e in q] == list(range(11, 18))
    reasons = " | ".join(e["reason"] for e in q)
    for fragment in (
        "invalid JSON",
        "not an object",
        "missing field 'output'",
        "is a int, not a string",
        "is empty",
        "unknown role 'robot'",
        "no assistant turn",
    ):
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
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
        return torch.nn.functional.cross_entropy(
            logits[0, :-1], batch["labels"][0, 1:], reduction="none", ignore_index=IGNORE
        )

    packed = per_token_loss(collate([row]))
    for a, b in zip(starts, starts[1:]):
        alone = per_token_loss(collate([{k: row[k][a:b] for k in ("input_ids", "labels", "position_ids")}]))
        labels = torch.tensor(row["labels"][a + 1 : b])
        mask = labels != IGNORE
        assert torch.allclose(packed[a : b - 1][mask], alone[: b - a - 1][mask], atol=1e-5)


def test_training_attention_and_loss_positions_change_nothing_but_cost(tmp_path, tiny_model):
    """The train stage's set-up (attention per example, the LM head only where a label is) gives
    the loss and gradients transformers' default gives on the same packed rows."""
    from transformers import AutoModelForCausalLM

    from tasks.data.batching import TrainingCollator
    from tasks.training.attention import register

    cfg = make_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", CHAT + ALPACA), data={"packing": True})
    rows = list(load_from_disk(run_format(cfg, "r1", log=lambda *_: None).train_path))[:3]
    assert sum(r["position_ids"].count(0) for r in rows) > 3, "the test needs rows with several examples"
    pad = load_tokenizer(tiny_model).pad_token_id
    out = {}
    for attn, collate in (("sdpa", Collator(pad)), (register(), TrainingCollator(pad))):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model, attn_implementation=attn, dtype=torch.float32
        )
        batch = collate(rows)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        out[attn] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    batch = TrainingCollator(pad)(rows)
    assert batch["logits_to_keep"].sum() == len(batch["shift_labels"]) < batch["input_ids"].numel()
    (loss_default, grad_default), (loss_ours, grad_ours) = out.values()
    assert loss_ours == pytest.approx(loss_default, rel=1e-5)
    assert torch.allclose(grad_ours, grad_default, atol=1e-6)


# ---------------------------------------------------------------- sources and shapes


def _run(tmp_path, data, run="r1", **data_cfg):
    cfg = make_config(tmp_path, data, data={"packing": False, **data_cfg})
    return cfg, run_format(cfg, run, log=lambda *_: None)


def test_csv_parquet_json_glob_and_saved_dataset_give_the_same_examples(tmp_path, tiny_model):
    import pandas as pd
    from datasets import Dataset

    # CSV quoted newlines
    records = [{**r, "output": r["output"] + '\nsecond line, "quoted"'} for r in ALPACA]
    frame = pd.DataFrame(records)
    (tmp_path / "in").mkdir()
    frame.to_csv(tmp_path / "in/a.csv", index=False)
    frame.to_parquet(tmp_path / "in/a.parquet")
    (tmp_path / "in/a.json").write_text(json.dumps(records))
    write_jsonl(tmp_path / "in/a.jsonl", records)
    Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    results = {}
    for name, path in [
        ("csv", "in/a.csv"),
        ("parquet", "in/a.parquet"),
        ("json", "in/a.json"),
        ("jsonl", "in/a.jsonl"),
        ("saved", "saved"),
    ]:
        _, res = _run(tmp_path, str(tmp_path / path), run=name, cache=False)
        results[name] = sorted(map(tuple, load_from_disk(res.train_path)["input_ids"]))
        assert res.counts["records_in"] == 30 and res.counts["accepted"] == 30, (name, res.counts)
    assert all(v == results["jsonl"] for v in results.values())
    # a glob over all four files: everything after the first copy is a duplicate, and counted
    _, res = _run(tmp_path, str(tmp_path / "in/a.*"), run="glob")
    assert res.counts["records_in"] == 120 and res.counts["duplicates"] == 90 and res.counts["accepted"] == 30
    stats = json.loads((tmp_path / "runs/glob/format/stats.json").read_text())
    assert stats["per_source"][str(tmp_path / "in/a.parquet")] == {
        "records_in": 30,
        "quarantined": 0,
        "duplicates": 30,
        "too_long": 0,
        "accepted": 0,
    }


def test_worker_processes_change_nothing(tmp_path, tiny_model):
    """num_proc=2 (each split tokenized in two worker processes) gives the same rows as one process,
    the too-long record left out and counted either way."""
    records = [
        {"instruction": f"Question {i}: " + "word " * (i % 40), "input": "", "output": f"Answer {i}."}
        for i in range(1200)
    ] + [{"instruction": "long " * 400, "input": "", "output": "x"}]
    write_jsonl(tmp_path / "d.jsonl", records)
    rows = {}
    for procs in (1, 2):
        cfg = make_config(
            tmp_path, tmp_path / "d.jsonl", data={"packing": True, "num_proc": procs, "cache": False}
        )
        res = run_format(cfg, f"p{procs}", log=lambda *_: None)
        assert res.counts["too_long"] == 1 and res.counts["accepted"] == 1200, res.counts
        assert json.loads((tmp_path / f"runs/p{procs}/format/stats.json").read_text())["num_proc"] == procs
        ds = load_from_disk(res.train_path)
        assert ds["length"] == [len(x) for x in ds["input_ids"]]
        rows[procs] = (ds["input_ids"], ds["labels"], ds["position_ids"])
    assert rows[1] == rows[2]


def test_csv_bad_rows_are_quarantined_by_row(tmp_path, tiny_model):
    path = tmp_path / "d.csv"
    rows = ["instruction,input,output"] + [f"q{i},,a{i}" for i in range(20)]
    rows[5] = "q,,"  # data row 5: empty output
    rows[7] = "q,x,y,extra"  # data row 7: too many fields
    path.write_bytes(("\n".join(rows) + "\n").encode() + b"bad \xff byte,,answer\n")
    _, res = _run(tmp_path, str(path), max_bad_fraction=0.5)
    q = [json.loads(x) for x in (tmp_path / "runs/r1/format/quarantine.jsonl").read_text().splitlines()]
    assert [(e["line"], e["reason"].split(" ")[0]) for e in q] == [(5, "field"), (7, "row"), (21, "field")]
    assert "invalid UTF-8" in q[2]["reason"] and "is empty" in q[0]["reason"]
    assert res.counts["quarantined"] == 3 and res.counts["accepted"] == 18


def test_dolly_columns_eval_file_and_sharegpt_role_map(tmp_path, tiny_model):
    dolly = [
        {"instruction": f"Q{i}", "context": f"C{i}", "response": f"R{i}", "category": "qa"} for i in range(20)
    ]
    share = [
        {"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "bot", "value": f"yo {i}"}]}
        for i in range(10)
    ]
    train = write_jsonl(tmp_path / "dolly.jsonl", dolly)
    evals = write_jsonl(tmp_path / "share.jsonl", share)
    cfg, res = _run(
        tmp_path,
        str(train),
        eval_path=str(evals),
        roles={"bot": "assistant"},
        columns={"instruction": "instruction", "input": "context", "output": "response"},
    )
    assert res.counts["train"] == 20 and res.counts["eval"] == 10
    evals_out = [json.loads(x) for x in open(res.eval_records)]
    assert evals_out[0] == {"messages": [{"role": "user", "content": "hi 0"}], "reference": "yo 0"}
    tok = load_tokenizer(tiny_model)
    first = load_from_disk(res.train_path)[0]
    assert tok.decode(first["input_ids"]).count("C0") == 1 and trained_text(tok, first) == ["R0<|im_end|>\n"]
    # without the role map, 'bot' is an unknown role: the eval file is all quarantined
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        _run(
            tmp_path,
            str(train),
            run="r2",
            eval_path=str(evals),
            columns={"instruction": "instruction", "input": "context", "output": "response"},
        )


def test_truncate_and_error_modes(tmp_path, tiny_model):
    records = ALPACA + [{"instruction": "long " * 400, "output": "kept answer"}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    _, res = _run(tmp_path, str(data), excess_length="truncate", train_on_inputs=True)
    assert res.counts["truncated"] == 1 and res.counts["too_long"] == 0 and res.counts["accepted"] == 31
    rows = list(load_from_disk(res.train_path)["input_ids"]) + list(
        load_from_disk(res.eval_path)["input_ids"]
    )
    assert max(len(x) for x in rows) == 256
    with pytest.raises(ValueError, match=r"d.jsonl:31: \d+ tokens > data.max_seq_len=256"):
        _run(tmp_path, str(data), run="r2", excess_length="error")


def test_template_fast_path_matches_the_real_renderer(tiny_model):
    from tasks.data.templating import Renderer

    tok = load_tokenizer(tiny_model)
    trimming = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | trim + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    convs = [r["messages"] for r in CHAT] + [
        [{"role": "user", "content": "  padded  "}, {"role": "assistant", "content": " answer "}]
    ]
    for template in (tok.chat_template, trimming):
        renderer = Renderer(tok, template)
        assert [renderer.pieces(c) for c in convs] == [renderer.slow_pieces(c) for c in convs]
        assert renderer.fast == (template == tok.chat_template)


# ---------------------------------------------------------------- cache


def format_from_edited_copy(tmp_path, data, module: str | None, run: str) -> bool:
    """Copy the code, append a line to ``module`` (one format imports, not one it names), run the
    format stage from the copy on the same cache; returns whether it was a cache hit."""
    import shutil
    import subprocess
    import sys

    import yaml

    from conftest import ROOT

    code = tmp_path / f"code-{run.replace('/', '-')}"
    for part in ("tasks", "flows", "configs", "data"):
        shutil.copytree(ROOT / part, code / part)
    if module:
        with open(code / module, "a") as f:
            f.write("\n# an edit\n")
    cfg = make_config(tmp_path, str(data), data={"packing": False})
    (code / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    script = (
        "import json, tasks; from tasks.config import load_config; from tasks.format import run_format; "
        f"r = run_format(load_config('c.yaml'), {run!r}, log=lambda *_: None); "
        "print(json.dumps({'hit': r.cache_hit, 'code': tasks.__path__[0]}))"
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=code,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(code)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["code"] == str(code / "tasks")  # the edited copy ran, not the checkout
    return out["hit"]


def test_cache_hit_and_each_invalidation(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    first = _run(tmp_path, str(data), run="a")[1]
    again = _run(tmp_path, str(data), run="b")[1]
    assert not first.cache_hit and again.cache_hit
    assert load_from_disk(again.train_path)["input_ids"] == load_from_disk(first.train_path)["input_ids"]
    manifest = json.loads((tmp_path / "runs/b/format/manifest.json").read_text())
    assert manifest["outputs"]["cache"]["hit"] and "cache hit" in manifest["notes"][0]
    assert manifest["metrics"]["counts"] == first.counts

    write_jsonl(tmp_path / "d.jsonl", ALPACA[:-1])  # the data
    assert not _run(tmp_path, str(data), run="c")[1].cache_hit
    assert not _run(tmp_path, str(data), run="d", template="alpaca")[1].cache_hit  # the template
    assert not _run(tmp_path, str(data), run="e", max_seq_len=200)[1].cache_hit  # a setting
    assert not _run(tmp_path, str(data), run="f", train_on_inputs=True)[1].cache_hit
    assert format_from_edited_copy(tmp_path, data, None, run="g0")  # an unedited copy hits,
    for module in ("tasks/models/loading.py", "tasks/data/batching.py"):  # an edit of the code misses
        assert not format_from_edited_copy(tmp_path, data, module, run=f"g-{module[6:-3].replace('/', '-')}")
    tok = load_tokenizer(tiny_model)  # the tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(tmp_path / "tok2")
    import shutil

    for f in tiny_model.iterdir():
        if not (tmp_path / "tok2" / f.name).exists():
            shutil.copy(f, tmp_path / "tok2" / f.name)
    cfg = make_config(
        tmp_path, str(data), model={"name_or_path": str(tmp_path / "tok2")}, data={"packing": False}
    )
    assert not run_format(cfg, "h", log=lambda *_: None).cache_hit
    assert _run(tmp_path, str(data), run="i")[1].cache_hit  # and back to a hit


def test_the_slice_column_reaches_the_eval_records(tmp_path, tiny_model):
    records = [{**r, "category": ["open_qa", "math", "summary"][i % 3]} for i, r in enumerate(ALPACA)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = make_config(tmp_path, str(data), data={"slice_column": "category", "eval_fraction": 0.3})
    result = run_format(cfg, "s", log=lambda *_: None)
    rows = [json.loads(x) for x in open(result.eval_records)]
    by_answer = {r["output"]: r["category"] for r in records}
    assert rows and all(r["slice"] == by_answer[r["reference"]] for r in rows)


def test_a_mix_takes_counts_fractions_and_weights_and_repeats_only_what_it_must():
    import numpy as np

    from tasks.config import SourceConfig
    from tasks.data.mixing import Share, planned_counts, select

    path = "data/demo/train.jsonl"
    shares = [
        Share(SourceConfig(path=path, name="all")),
        Share(SourceConfig(path=path, name="count25", count=25)),
        Share(SourceConfig(path=path, name="half", fraction=0.5)),
        Share(SourceConfig(path=path, name="w2", weight=2)),
        Share(SourceConfig(path=path, name="w1", weight=1)),
        Share(SourceConfig(path=path, name="old"), replay=True),
    ]
    available = [7, 10, 9, 40, 50, 100]
    counts = planned_counts(shares, available, replay=0.25)
    # weights 2:1 sized by w2 (40 -> 60 in all); replay is a quarter of everything after it
    assert counts[:5] == [7, 25, 4, 40, 20] and counts[5] == round(sum(counts[:5]) / 3)
    source_of = np.repeat(np.arange(6), available)
    train, evals = select(source_of, counts, 0.1, seed=0)
    per = lambda idx: np.bincount(source_of[idx], minlength=6).tolist()
    assert [a + b for a, b in zip(per(train), per(evals))] == counts
    assert not set(train) & set(evals)  # a repeated record never lands in both splits
    assert len(train) - len(set(train)) == 25 - 10  # only "count25" repeats, whole passes first
    again = select(source_of, counts, 0.1, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(again, (train, evals)))


def test_a_bad_retention_record_fails_the_format_stage_naming_its_line(tmp_path):
    retention = write_jsonl(
        tmp_path / "keep.jsonl", [{"instruction": "Name a colour.", "output": "Red."}, "{oops"]
    )
    cfg = make_config(
        tmp_path, "data/demo/train.jsonl", eval={"retention": {"enabled": True, "path": str(retention)}}
    )
    with pytest.raises(ValueError, match=r"eval.retention: .*keep\.jsonl:2: "):
        run_format(cfg, "r1", log=lambda *_: None)
    assert not (tmp_path / "runs" / "r1" / "format" / "train").exists()  # before any tokenizing
