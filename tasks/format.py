"""Format stage: raw records -> validated -> templated -> tokenized, prompt-masked, packed.

Every record is either accepted or written to ``quarantine.jsonl`` with its file, line and
reason; the manifest's counts always add up (records_in = accepted + quarantined +
duplicates + too_long). Memory stays bounded: validated records stream into an Arrow
file, and tokenizing and packing are ``datasets.map`` passes over it (``data.num_proc``).
The output is cached under ``<output_dir>/.cache/format/<key>``: the key covers the input
contents, the template, the tokenizer, the data settings and this code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson
from prefect import task

from tasks.config import PipelineConfig, hash_json
from tasks.models import load_tokenizer, resolve_model
from tasks.records import SHAREGPT_ROLES, BadRecord, detect_format, iter_source, resolve_sources, to_messages
from tasks.rundir import Manifest, atomic_dir, copy_tree, file_sha256, stage_dir, tree_sha256, write_json
from tasks.stage import prefect_markdown, tracked_stage
from tasks.templating import IGNORE, Renderer, chat_template, pack, tokenize_conversations

OK, TOO_LONG, TRUNCATED = 0, 1, 2
PACK_WINDOW = 2000  # examples per best-fit-decreasing window: bounded memory, ~full rows
CODE_FILES = ("format.py", "records.py", "templating.py")


@dataclass
class FormatResult:
    run_id: str
    train_path: str
    eval_path: str
    eval_records: str
    data_hash: str
    counts: dict
    cache_hit: bool = False


def code_hash() -> str:
    here = Path(__file__).resolve().parent
    return hashlib.sha256(b"".join((here / f).read_bytes() for f in CODE_FILES)).hexdigest()[:16]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


def tokenizer_hash(model_dir: Path) -> str:
    """Vocabulary, merges, added and special tokens and the chat template, from the files
    themselves: the key is known without loading transformers (a nightly no-op stays cheap)."""
    return hash_json({f: file_sha256(model_dir / f) for f in TOKENIZER_FILES if (model_dir / f).is_file()})


def template_source(setting: str) -> str:
    """What the template setting names: 'auto' is covered by the tokenizer files."""
    if setting in ("auto", "alpaca", "chatml"):
        return setting
    path = Path(setting)
    return path.read_text(encoding="utf-8") if path.is_file() else setting


def num_proc(setting: int | None, records: int) -> int:
    if setting:
        return setting
    # below ~20k records one process tokenizes them before worker processes would have started
    return 1 if records < 20_000 else max(1, min(8, os.cpu_count() or 1))


def cache_key(cfg: PipelineConfig, inputs: list[tuple[str, str]], template: str, tok_hash: str) -> str:
    settings = cfg.data.model_dump(mode="json", exclude={"path", "eval_path", "cache", "num_proc"})
    return hash_json({"inputs": inputs, "template": template, "tokenizer": tok_hash, "data": settings,
                      "code": code_hash()})


# ---------------------------------------------------------------- pass 1: read, validate, dedup

def read_all(cfg: PipelineConfig, sources: list[tuple[str, str]], arrow_path: Path, quarantine_path: Path,
             log) -> tuple[Counter, dict, Counter]:
    """Stream every record into an Arrow file of accepted conversations; quarantine the rest."""
    import pyarrow as pa

    d = cfg.data
    roles = {**SHAREGPT_ROLES, **d.roles}
    schema = pa.schema([("conv", pa.string()), ("source", pa.int32()), ("line", pa.int64()), ("split", pa.int8())])
    counts = Counter(records_in=0, quarantined=0, duplicates=0)
    per_source: dict[str, Counter] = {}
    formats: Counter = Counter()
    seen: set[int] = set()
    batch: dict[str, list] = {k: [] for k in schema.names}
    t0 = time.monotonic()
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            quarantine_path.open("w", encoding="utf-8") as quarantine:
        def flush():
            writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
            for v in batch.values():
                v.clear()

        for s, (split, source) in enumerate(sources):
            src = per_source.setdefault(source, Counter(records_in=0, quarantined=0, duplicates=0))
            for line, rec in iter_source(source):
                counts["records_in"] += 1
                src["records_in"] += 1
                try:
                    if isinstance(rec, BadRecord):
                        raise rec
                    fmt = d.format if d.format != "auto" else detect_format(rec, d.columns)
                    msgs = to_messages(rec, fmt, d.columns, roles)
                except BadRecord as e:
                    quarantine.write(json.dumps({"source": source, "line": line, "reason": str(e)},
                                                ensure_ascii=False) + "\n")
                    counts["quarantined"] += 1
                    src["quarantined"] += 1
                    continue
                conv = orjson.dumps(msgs).decode()
                norm = orjson.dumps([(m["role"], " ".join(m["content"].split())) for m in msgs])
                key = int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "little")
                if key in seen:
                    counts["duplicates"] += 1
                    src["duplicates"] += 1
                    continue
                seen.add(key)
                formats[fmt] += 1
                for k, v in zip(schema.names, (conv, s, line, int(split == "eval"))):
                    batch[k].append(v)
                if len(batch["conv"]) >= 10_000:
                    flush()
                if counts["records_in"] % 200_000 == 0:
                    log(f"format: read {counts['records_in']:,} records ({time.monotonic() - t0:.0f}s)")
        flush()
    return counts, per_source, formats


# ---------------------------------------------------------------- pass 2: tokenize, filter, pack

def _tokenize(batch, renderer: Renderer, max_len: int, excess: str, train_on_inputs: bool, source_names: list[str]):
    """One Arrow batch of conversations -> tokenized examples with a status (ok, too long, truncated)."""
    import numpy as np
    import pyarrow as pa

    convs = [orjson.loads(c) for c in batch.column("conv").to_pylist()]
    ids, labels, lengths = tokenize_conversations(convs, renderer, train_on_inputs)
    over = lengths > max_len
    if over.any() and excess == "error":
        i = int(np.flatnonzero(over)[0])
        raise ValueError(f"{source_names[batch.column('source')[i].as_py()]}:{batch.column('line')[i].as_py()}: "
                         f"{lengths[i]} tokens > data.max_seq_len={max_len} (data.excess_length: error)")
    status = np.where(over, TRUNCATED if excess == "truncate" else TOO_LONG, OK).astype(np.int8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if excess == "truncate" and over.any():
        keep = (np.arange(len(ids)) - np.repeat(starts, lengths)) < max_len
        ids, labels, lengths = ids[keep], labels[keep], np.minimum(lengths, max_len)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    trained = np.bincount(owner, weights=labels != IGNORE, minlength=len(lengths))
    status[trained == 0] = TOO_LONG  # nothing left to train on: counted, never kept silently empty
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
                     "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
                     "length": pa.array(lengths.astype(np.int32)), "status": pa.array(status),
                     "source": batch.column("source"), "line": batch.column("line")})


def _pack(batch, max_len: int):
    return pack(batch, max_len)


def _positions(batch):
    """Unpacked rows: positions 0..n-1 per example."""
    import numpy as np
    import pyarrow as pa

    ids = batch.column("input_ids").combine_chunks()
    lengths = batch.column("length").to_numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    positions = (np.arange(int(lengths.sum())) - np.repeat(starts, lengths)).astype(np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table({"input_ids": ids, "labels": batch.column("labels").combine_chunks(),
                     "position_ids": pa.ListArray.from_arrays(offsets, pa.array(positions)),
                     "length": pa.array(lengths.astype(np.int32))})


# ---------------------------------------------------------------- the stage

def _split(ds, cfg: PipelineConfig):
    """An explicit eval file, or a seeded random eval_fraction (file order kept within each split)."""
    import numpy as np

    if cfg.data.eval_path:
        flags = np.asarray(ds.data.column("split"))
        return ds.select(np.flatnonzero(flags == 0)), ds.select(np.flatnonzero(flags == 1))
    n = len(ds)
    if n < 2:
        raise ValueError(f"format: {n} usable record(s); at least 2 are needed to split off an eval set")
    n_eval = min(n - 1, max(1, round(n * cfg.data.eval_fraction)))
    perm = np.random.default_rng(cfg.data.seed).permutation(n)
    return ds.select(np.sort(perm[n_eval:])), ds.select(np.sort(perm[:n_eval]))


def length_histogram(lengths, max_len: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=min(60, max(10, len(lengths) // 20)), color="#3b75af")
    ax.axvline(max_len, color="#c44", linestyle="--", label=f"max_seq_len {max_len}")
    ax.set(xlabel="tokens per example", ylabel="examples", title="Token lengths of accepted train records")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _build(cfg: PipelineConfig, sources, renderer: Renderer, out: Path, key: str, log) -> tuple[Counter, dict]:
    import numpy as np
    from datasets import Dataset

    d, work = cfg.data, out / ".work"
    work.mkdir(parents=True)
    t0 = time.monotonic()
    counts, per_source, formats = read_all(cfg, sources, work / "records.arrow", out / "quarantine.jsonl", log)
    bad = counts["quarantined"] / max(counts["records_in"], 1)
    if bad > d.max_bad_fraction:
        lines = (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()[:5]
        first = "\n".join("  {source}:{line}: {reason}".format(**json.loads(x)) for x in lines)
        raise ValueError(f"{bad:.1%} of {counts['records_in']} records are bad (data.max_bad_fraction is "
                         f"{d.max_bad_fraction:.1%}); first ones:\n{first}\nall of them: {out / 'quarantine.jsonl'}")
    log(f"format: {counts['records_in']:,} records read in {time.monotonic() - t0:.1f}s, formats {dict(formats)}, "
        f"{counts['quarantined']} quarantined, {counts['duplicates']} duplicates")

    names = [s for _, s in sources]
    kept, parts, procs = {}, {}, {}
    for split, part in zip(("train", "eval"), _split(Dataset.from_file(str(work / "records.arrow")), cfg)):
        procs[split] = min(num_proc(d.num_proc, len(part)), max(len(part), 1))
        tok = part.with_format("arrow").map(
                       _tokenize, batched=True, batch_size=1000, num_proc=procs[split] if procs[split] > 1 else None,
                       remove_columns=part.column_names, desc=f"tokenize {split}", new_fingerprint=f"{key}-{split}-tok",
                       cache_file_name=str(work / f"{split}-tok.arrow"),
                       fn_kwargs={"renderer": renderer, "max_len": d.max_seq_len, "excess": d.excess_length,
                                  "train_on_inputs": d.train_on_inputs, "source_names": names})
        status = np.asarray(tok.data.column("status"))
        src = np.asarray(tok.data.column("source"))  # map wrote a fresh table: no index mapping
        for name, s in zip(names, np.bincount(src[status == TOO_LONG], minlength=len(names))):
            per_source[name]["too_long"] = per_source[name].get("too_long", 0) + int(s)
        for name, s in zip(names, np.bincount(src[status != TOO_LONG], minlength=len(names))):
            per_source[name]["accepted"] = per_source[name].get("accepted", 0) + int(s)
        counts["too_long"] += int((status == TOO_LONG).sum())
        counts["truncated"] += int((status == TRUNCATED).sum())
        keep = np.flatnonzero(status != TOO_LONG)
        if len(keep) == len(tok):  # nothing to leave out: no second copy of every token
            kept[split], parts[split] = tok, part
        else:
            kept[split] = tok.select(keep).flatten_indices(cache_file_name=str(work / f"{split}-kept.arrow"))
            parts[split] = part.select(keep)
        counts[split] = len(kept[split])
        log(f"format: tokenized {len(part):,} {split} records ({time.monotonic() - t0:.1f}s)")
    counts["accepted"] = counts["train"] + counts["eval"]
    if not counts["train"] or not counts["eval"]:
        raise ValueError(f"format: no {'train' if not counts['train'] else 'eval'} records left after validation "
                         f"and length filtering (counts {dict(counts)})")

    lengths = np.asarray(kept["train"].data.column("length"))
    if d.packing:
        train = kept["train"].with_format("arrow").map(_pack, batched=True, batch_size=PACK_WINDOW, remove_columns=kept["train"].column_names,
                                  desc="pack",  # one process: windows, and so rows, do not depend on num_proc
                                  fn_kwargs={"max_len": d.max_seq_len}, new_fingerprint=f"{key}-pack",
                                  cache_file_name=str(work / "packed.arrow"))
    else:
        train = kept["train"].with_format("arrow").map(_positions, batched=True, remove_columns=kept["train"].column_names, new_fingerprint=f"{key}-pos",
                                  cache_file_name=str(work / "train-pos.arrow"))
    evals = kept["eval"].with_format("arrow").map(_positions, batched=True, remove_columns=kept["eval"].column_names, new_fingerprint=f"{key}-eval-pos",
                             cache_file_name=str(work / "eval-pos.arrow"))
    for name, ds in (("train", train), ("eval", evals)):
        with atomic_dir(out / name) as tmp:
            ds.with_format(None).save_to_disk(str(tmp))
    with (out / "eval_records.jsonl").open("w", encoding="utf-8") as f:
        for conv in parts["eval"]["conv"]:
            conv = json.loads(conv)
            if conv[0]["role"] == "text":  # plain text has no prompt to generate from; it still counts for loss
                continue
            last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
            f.write(json.dumps({"messages": conv[:last], "reference": conv[last]["content"]}, ensure_ascii=False) + "\n")
    length_histogram(lengths, d.max_seq_len, out / "token_lengths.png")
    rows = len(train)
    metrics = {
        "counts": dict(counts), "per_source": {k: dict(v) for k, v in per_source.items()}, "formats": dict(formats),
        "train_rows": rows, "train_tokens": int(lengths.sum()),
        "real_token_fraction": round(float(lengths.sum()) / (rows * d.max_seq_len), 4) if d.packing else None,
        "length_p50": int(np.percentile(lengths, 50)), "length_p99": int(np.percentile(lengths, 99)),
        "length_max": int(lengths.max()), "num_proc": procs["train"], "seconds": round(time.monotonic() - t0, 2),
        "fast_template": renderer.plans != {} and all(p is not None for p in renderer.plans.values()),
    }
    del kept, parts, train, evals
    shutil.rmtree(work, ignore_errors=True)
    return counts, metrics


@dataclass
class Plan:
    """What the stage will read, and the cache key of what it will write."""
    sources: list[tuple[str, str]]
    hashes: list[str]
    model_dir: Path
    key: str
    data_hash: str


def plan(cfg: PipelineConfig) -> Plan:
    d = cfg.data
    sources = [("train", s) for s in resolve_sources(d.path)]
    if d.eval_path:
        sources += [("eval", s) for s in resolve_sources(d.eval_path, "data.eval_path")]
    model_dir = resolve_model(cfg.model.name_or_path)
    hashes = [(file_sha256(s) if Path(s).is_file() else tree_sha256(s)) if not s.startswith("hub:") else "hub"
              for _, s in sources]
    inputs = [(split, h) for (split, _), h in zip(sources, hashes)]
    key = cache_key(cfg, inputs, template_source(d.template), tokenizer_hash(model_dir))
    return Plan(sources, hashes, model_dir, key, hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16])


def run_format(cfg: PipelineConfig, run_id: str, log=print) -> FormatResult:
    d = cfg.data
    p = plan(cfg)
    sources, key, data_hash = p.sources, p.key, p.data_hash
    out = stage_dir(cfg.output_dir, run_id, "format")
    man = Manifest("format", run_id, cfg.section_hash("data", "model"))
    for (split, src), sha in zip(sources, p.hashes):
        man.add_input(f"{split}:{src}", src, sha)
    cached = Path(cfg.output_dir) / ".cache" / "format" / key
    if out.exists():
        shutil.rmtree(out)  # what a failed attempt left; the manifest is written last, so none of it was complete
    out.mkdir(parents=True)
    hit = d.cache and (cached / "manifest.json").is_file()
    if hit:
        built = json.loads((cached / "manifest.json").read_text())
        copy_tree(cached, out, skip=("manifest.json",))
        metrics = built["metrics"]
        man.notes.append(f"cache hit: key {key}, built by run {built['run_id']}")
        log(f"format: cache hit (key {key}): inputs, template, tokenizer, data settings and code are unchanged "
            f"since run {built['run_id']}; reusing its output")
    else:
        tokenizer = load_tokenizer(p.model_dir)
        template = chat_template(d.template, tokenizer)
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
        metrics = _build(cfg, sources, Renderer(tokenizer, template), out, key, log)[1]
    template = (out / "chat_template.jinja").read_text(encoding="utf-8")
    man.outputs = {"train": str(out / "train"), "eval": str(out / "eval"), "quarantine": str(out / "quarantine.jsonl"),
                   "eval_records": str(out / "eval_records.jsonl"), "chat_template": str(out / "chat_template.jinja"),
                   "token_lengths_png": str(out / "token_lengths.png"), "data_hash": data_hash,
                   "template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
                   "cache": {"key": key, "hit": bool(hit), "dir": str(cached)}}
    man.metrics = metrics
    write_json(out / "stats.json", metrics)
    man.finish(out)
    if d.cache and not hit:
        try:
            with atomic_dir(cached) as tmp:
                copy_tree(out, tmp)
        except OSError as e:  # e.g. another run filled the same cache entry at the same moment
            log(f"format: could not store the cache entry {cached}: {e}")
    c = metrics["counts"]
    fill = f", rows {metrics['real_token_fraction']:.1%} full" if metrics.get("real_token_fraction") else ""
    log(f"format: {c['train']:,} train / {c['eval']:,} eval records -> {metrics['train_rows']:,} rows of "
        f"<= {d.max_seq_len} tokens{fill}")
    return FormatResult(run_id, str(out / "train"), str(out / "eval"), str(out / "eval_records.jsonl"), data_hash,
                        dict(c), bool(hit))


def summary_markdown(result: FormatResult, metrics: dict) -> str:
    rows = "\n".join(f"| {k} | {v:,} |" for k, v in result.counts.items())
    sources = "\n".join(f"| `{name}` | " + " | ".join(str(c.get(k, 0)) for k in
                                                     ("records_in", "accepted", "quarantined", "duplicates", "too_long"))
                        + " |" for name, c in metrics["per_source"].items())
    fill = metrics.get("real_token_fraction")
    return (f"# Format: `{result.run_id}`{' (from cache)' if result.cache_hit else ''}\n\n"
            f"| count | value |\n|---|---|\n{rows}\n| train rows | {metrics['train_rows']:,} |\n"
            f"| real-token fraction | {f'{fill:.1%}' if fill else 'no packing'} |\n"
            f"| tokens p50 / p99 / max | {metrics['length_p50']} / {metrics['length_p99']} / {metrics['length_max']} |\n\n"
            f"| source | records in | accepted | quarantined | duplicates | too long |\n|---|---|---|---|---|---|\n"
            f"{sources}\n")


@task(name="format", retries=2, retry_delay_seconds=5)
def format_task(cfg: PipelineConfig, run_id: str) -> FormatResult:
    with tracked_stage(cfg, run_id, "format", "data", "model") as st:
        result = run_format(cfg, run_id, log=st.log)
        for name in ("stats.json", "quarantine.jsonl", "token_lengths.png"):
            st.run.artifact(st.dir / name)
        metrics = json.loads((st.dir / "stats.json").read_text())
        st.run.tags({"sftflow.format_cache": "hit" if result.cache_hit else "miss"})
        prefect_markdown(f"format-{cfg.run_name}", summary_markdown(result, metrics), "format stage counts")
    return result
