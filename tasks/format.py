"""Format stage: raw records -> validated -> templated -> tokenized, prompt-masked, packed.

Every record is either accepted or written to ``quarantine.jsonl`` with its file, line and
reason; the manifest's counts always add up (records_in = accepted + quarantined +
duplicates + too_long).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from prefect import task

from tasks.config import PipelineConfig
from tasks.models import CHATML_TEMPLATE, load_tokenizer, resolve_model
from tasks.rundir import Manifest, atomic_dir, file_sha256, stage_dir, write_json
from tasks.stage import prefect_markdown, tracked_stage

ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
IGNORE = -100


class BadRecord(ValueError):
    """A record that cannot be used; the message is the quarantine reason."""


@dataclass
class FormatResult:
    run_id: str
    train_path: str
    eval_path: str
    eval_records: str
    data_hash: str
    counts: dict


# ---------------------------------------------------------------- reading and validation

def _input_files(spec: str | list[str]) -> list[Path]:
    files = [Path(p) for p in ([spec] if isinstance(spec, str) else spec)]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"data.path: {f} does not exist")
        if f.suffix not in (".jsonl", ".json"):
            raise ValueError(f"data.path: {f}: unsupported file type {f.suffix!r} (expected .jsonl or .json)")
    return files


def read_records(path: Path) -> Iterator[tuple[int, dict | BadRecord]]:
    """(1-based line, record or the reason it is bad). Blank lines are skipped."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid JSON file: {e}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of records")
        for i, rec in enumerate(data, 1):
            yield i, rec if isinstance(rec, dict) else BadRecord(f"record is a {type(rec).__name__}, not an object")
        return
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, BadRecord(f"invalid UTF-8 at byte {e.start}")
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, BadRecord(f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            yield i, rec if isinstance(rec, dict) else BadRecord(f"record is a {type(rec).__name__}, not an object")


def detect_format(record: dict, columns: dict[str, str]) -> str:
    col = lambda name: columns.get(name, name)  # noqa: E731
    if col("messages") in record:
        return "messages"
    if col("conversations") in record:
        return "sharegpt"
    if col("instruction") in record or col("output") in record:
        return "alpaca"
    if col("prompt") in record or col("text") in record:
        return "completion"
    raise BadRecord(f"cannot tell the data format from the keys {sorted(record)[:8]}")


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise BadRecord(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} is a {type(value).__name__}, not a string")
    if "\x00" in value:
        raise BadRecord(f"field {key!r} contains a NUL character")
    if required and not value.strip():
        raise BadRecord(f"field {key!r} is empty")
    return value


def to_messages(record: dict, fmt: str, columns: dict[str, str]) -> list[dict]:
    """One record in any supported shape -> a list of {role, content} with >= 1 assistant turn."""
    col = lambda name: columns.get(name, name)  # noqa: E731
    if fmt == "alpaca":
        instruction, extra = _text(record, col("instruction")), _text(record, col("input"), required=False)
        msgs = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
                {"role": "assistant", "content": _text(record, col("output"))}]
        system = _text(record, col("system"), required=False)
        return ([{"role": "system", "content": system}] if system.strip() else []) + msgs
    if fmt == "completion":
        if col("text") in record and col("prompt") not in record:
            return [{"role": "text", "content": _text(record, col("text"))}]
        return [{"role": "user", "content": _text(record, col("prompt"))},
                {"role": "assistant", "content": _text(record, col("completion"))}]
    key, role_key, text_key = (col("messages"), "role", "content") if fmt == "messages" else (
        col("conversations"), "from", "value")
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"field {key!r} must be a non-empty list of turns")
    roles = {"system": "system", "user": "user", "assistant": "assistant"}
    if fmt == "sharegpt":
        roles |= {"human": "user", "gpt": "assistant"}
    msgs = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(f"{key}[{n}] is not an object")
        role = turn.get(role_key)
        if role not in roles:
            raise BadRecord(f"{key}[{n}].{role_key}: unknown role {role!r}")
        msgs.append({"role": roles[role], "content": _text(turn, text_key)})
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRecord("no assistant turn")
    return msgs


# ---------------------------------------------------------------- templating and tokenizing

def chat_template(setting: str, tokenizer) -> str:
    if setting == "auto":
        return tokenizer.chat_template or ALPACA_TEMPLATE
    if setting == "alpaca":
        return ALPACA_TEMPLATE
    if setting == "chatml":
        return CHATML_TEMPLATE
    path = Path(setting)
    if not path.is_file():
        raise FileNotFoundError(f"data.template: {setting} is not auto/alpaca/chatml and not a file")
    return path.read_text(encoding="utf-8")


def segments(messages: list[dict], tokenizer, template: str) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) pieces.

    Each assistant answer (with its end-of-turn token) is one trained piece; prompts are
    rendered with the generation prompt so they tokenize exactly as at inference time.
    """
    if messages[0]["role"] == "text":
        return [(messages[0]["content"] + (tokenizer.eos_token or ""), True)]
    render = lambda msgs, gen: tokenizer.apply_chat_template(  # noqa: E731
        msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)
    pieces, done = [], ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("data.template: the chat template does not render conversations prefix by prefix; "
                             "prompt masking needs a template whose rendering of a prefix is a prefix")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces


def tokenize_batch(convs: list[list[dict]], tokenizer, template: str, train_on_inputs: bool) -> list[dict]:
    """All pieces of all conversations go through the tokenizer in one batched call."""
    plan = [segments(c, tokenizer, template) for c in convs]
    flat = [text for pieces in plan for text, _ in pieces]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for pieces in plan:
        input_ids, labels = [], []
        for _, trained in pieces:
            input_ids += ids[k]
            labels += ids[k] if (trained or train_on_inputs) else [IGNORE] * len(ids[k])
            k += 1
        out.append({"input_ids": input_ids, "labels": labels})
    return out


def pack(examples: list[dict], max_len: int) -> list[dict]:
    """First-fit-decreasing bins; positions restart per example, and with no attention mask the
    model builds a block-diagonal causal mask from them (transformers' packed-sequence detection
    on sdpa/eager, varlen kernels on flash-attention): no token attends across examples."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for b, free in enumerate(room):
            if free >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_len - n)
    rows = []
    for b in bins:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for i in b:
            ex = examples[i]
            row["input_ids"] += ex["input_ids"]
            # the first token of an example is never a target of the previous one
            row["labels"] += [IGNORE] + ex["labels"][1:]
            row["position_ids"] += list(range(len(ex["input_ids"])))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the stage

def _dedup_key(messages: list[dict]) -> str:
    norm = [(m["role"], " ".join(m["content"].split())) for m in messages]
    return hashlib.sha256(json.dumps(norm).encode()).hexdigest()


def run_format(cfg: PipelineConfig, run_id: str, log=print) -> FormatResult:
    d = cfg.data
    files = _input_files(d.path) + (_input_files(d.eval_path) if d.eval_path else [])
    out_dir = stage_dir(cfg.output_dir, run_id, "format")
    man = Manifest("format", run_id, cfg.section_hash("data", "model"))
    for f in files:
        man.add_input(str(f), f, file_sha256(f))
    model_path = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(model_path)
    template = chat_template(d.template, tokenizer)

    counts = Counter(records_in=0, accepted=0, quarantined=0, duplicates=0, too_long=0, truncated=0)
    per_source: dict[str, Counter] = {}
    formats: Counter = Counter()
    quarantine: list[dict] = []
    seen: set[str] = set()
    splits: dict[str, list[list[dict]]] = {"train": [], "eval": []}
    for f in files:
        split = "eval" if d.eval_path and f == files[-1] else "train"
        src = per_source.setdefault(str(f), Counter())
        for line, rec in read_records(f):
            counts["records_in"] += 1
            src["records_in"] += 1
            try:
                if isinstance(rec, BadRecord):
                    raise rec
                fmt = d.format if d.format != "auto" else detect_format(rec, d.columns)
                msgs = to_messages(rec, fmt, d.columns)
            except BadRecord as e:
                quarantine.append({"source": str(f), "line": line, "reason": str(e)})
                counts["quarantined"] += 1
                src["quarantined"] += 1
                continue
            key = _dedup_key(msgs)
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            formats[fmt] += 1
            splits[split].append(msgs)

    bad = counts["quarantined"] / max(counts["records_in"], 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "quarantine.jsonl").open("w", encoding="utf-8") as q:
        q.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in quarantine)
    if bad > d.max_bad_fraction:
        first = "\n".join(f"  {e['source']}:{e['line']}: {e['reason']}" for e in quarantine[:5])
        raise ValueError(f"{bad:.1%} of {counts['records_in']} records are bad (data.max_bad_fraction is "
                         f"{d.max_bad_fraction:.1%}); first ones:\n{first}\nall of them: {out_dir / 'quarantine.jsonl'}")
    log(f"format: {counts['records_in']} records read, formats {dict(formats)}, {counts['quarantined']} quarantined, "
        f"{counts['duplicates']} duplicates")

    if not d.eval_path:
        rng = random.Random(d.seed)
        order = list(range(len(splits["train"])))
        rng.shuffle(order)
        n_eval = max(1, round(len(order) * d.eval_fraction))
        eval_idx = set(order[:n_eval])
        splits["eval"] = [c for i, c in enumerate(splits["train"]) if i in eval_idx]
        splits["train"] = [c for i, c in enumerate(splits["train"]) if i not in eval_idx]

    tokenized: dict[str, list[dict]] = {}
    kept: dict[str, list[list[dict]]] = {}
    for split, convs in splits.items():
        tokenized[split], kept[split] = [], []
        for start in range(0, len(convs), 1000):
            batch = convs[start:start + 1000]
            for conv, ex in zip(batch, tokenize_batch(batch, tokenizer, template, d.train_on_inputs)):
                if len(ex["input_ids"]) > d.max_seq_len:
                    if d.excess_length == "error":
                        raise ValueError(f"a {split} record has {len(ex['input_ids'])} tokens > data.max_seq_len="
                                         f"{d.max_seq_len} (data.excess_length: error)")
                    if d.excess_length == "drop":
                        counts["too_long"] += 1
                        continue
                    counts["truncated"] += 1
                    ex = {k: v[: d.max_seq_len] for k, v in ex.items()}
                if all(label == IGNORE for label in ex["labels"]):
                    counts["too_long"] += 1  # truncation removed every trained token
                    continue
                tokenized[split].append(ex)
                kept[split].append(conv)
            log(f"format: tokenized {min(start + 1000, len(convs))}/{len(convs)} {split} records")
    counts["accepted"] = len(tokenized["train"]) + len(tokenized["eval"])
    counts["train"], counts["eval"] = len(tokenized["train"]), len(tokenized["eval"])
    if not tokenized["train"] or not tokenized["eval"]:
        raise ValueError(f"format: no {'train' if not tokenized['train'] else 'eval'} records left after "
                         f"validation and length filtering (counts {dict(counts)})")

    from datasets import Dataset

    train_rows = pack(tokenized["train"], d.max_seq_len) if d.packing else [
        {**ex, "position_ids": list(range(len(ex["input_ids"])))} for ex in tokenized["train"]]
    eval_rows = [{**ex, "position_ids": list(range(len(ex["input_ids"])))} for ex in tokenized["eval"]]
    train_tokens = sum(len(r["input_ids"]) for r in train_rows)
    trained_tokens = sum(sum(1 for x in r["labels"] if x != IGNORE) for r in train_rows)
    with atomic_dir(out_dir / "train") as tmp:
        Dataset.from_list(train_rows).save_to_disk(str(tmp))
    with atomic_dir(out_dir / "eval") as tmp:
        Dataset.from_list(eval_rows).save_to_disk(str(tmp))
    eval_records = out_dir / "eval_records.jsonl"
    with eval_records.open("w", encoding="utf-8") as f:
        for conv in kept["eval"]:
            if conv[0]["role"] == "text":  # plain text has no prompt to generate from; it still counts for loss
                continue
            last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
            f.write(json.dumps({"messages": conv[:last], "reference": conv[last]["content"]}, ensure_ascii=False) + "\n")

    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    data_hash = hashlib.sha256("".join(sorted(i["sha256"] for i in man.inputs.values())).encode()).hexdigest()[:16]
    man.outputs = {"train": str(out_dir / "train"), "eval": str(out_dir / "eval"), "eval_records": str(eval_records),
                   "quarantine": str(out_dir / "quarantine.jsonl"), "data_hash": data_hash,
                   "chat_template": str(out_dir / "chat_template.jinja"),
                   "template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16]}
    man.metrics = {"counts": dict(counts), "per_source": {k: dict(v) for k, v in per_source.items()},
                   "formats": dict(formats), "train_rows": len(train_rows), "train_tokens": train_tokens,
                   "trained_tokens": trained_tokens,
                   "packing_efficiency": round(train_tokens / (len(train_rows) * d.max_seq_len), 4)}
    man.finish(out_dir)
    write_json(out_dir / "stats.json", man.metrics)
    log(f"format: {counts['train']} train / {counts['eval']} eval records -> {len(train_rows)} rows of "
        f"<= {d.max_seq_len} tokens ({man.metrics['packing_efficiency']:.1%} full)")
    return FormatResult(run_id, str(out_dir / "train"), str(out_dir / "eval"), str(eval_records), data_hash, dict(counts))


def summary_markdown(result: FormatResult, manifest_metrics: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.counts.items())
    return (f"# Format: `{result.run_id}`\n\n| count | value |\n|---|---|\n{rows}\n"
            f"| train rows (packed) | {manifest_metrics['train_rows']} |\n"
            f"| packing efficiency | {manifest_metrics['packing_efficiency']:.1%} |\n")


@task(name="format", retries=2, retry_delay_seconds=5)
def format_task(cfg: PipelineConfig, run_id: str) -> FormatResult:
    with tracked_stage(cfg, run_id, "format", "data", "model") as st:
        result = run_format(cfg, run_id, log=st.log)
        st.run.artifact(st.dir / "stats.json")
        st.run.artifact(st.dir / "quarantine.jsonl")
        metrics = json.loads((st.dir / "stats.json").read_text())
        prefect_markdown(f"format-{cfg.run_name}", summary_markdown(result, metrics), "format stage counts")
    return result
