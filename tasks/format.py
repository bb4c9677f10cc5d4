"""Format stage: raw records -> validated -> templated -> tokenized, prompt-masked, packed.

Reads ``data.path`` (and ``data.eval_path``); writes ``<run>/format/``: ``train/`` and ``eval/``
(datasets of input_ids, labels, position_ids, length), ``eval_records.jsonl`` (the prompts and
reference answers later stages generate from), ``chat_template.jinja`` (the template training
used), ``quarantine.jsonl``, ``stats.json`` and ``token_lengths.png``.

Every record is either accepted or written to ``quarantine.jsonl`` with its file, line and
reason; the counts always add up (records_in = accepted + quarantined + duplicates + too_long +
left_out_by_mix - repeated_by_mix, the last two from a data mix: ``tasks/data/mixing.py``).
Memory stays bounded: validated records stream into an Arrow file, and tokenizing and packing
are ``datasets.map`` passes over it (``data.num_proc``). The output is cached under
``<output_dir>/.cache/format/<key>`` (``tasks/data/plan.py`` says what the key covers).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from prefect import task

from tasks.config import PipelineConfig
from tasks.core.errors import InputError
from tasks.core.files import atomic_dir, copy_tree, read_json, write_json
from tasks.core.results import FormatResult, Lineage
from tasks.core.stage import Stage, kept_result, open_stage, prefect_markdown
from tasks.data.checks import check_bad_fraction, check_stops
from tasks.data.messages import split_conversation
from tasks.data.mixing import left_out_and_repeats, planned_counts, recorded_source, select
from tasks.data.packing import pack, with_positions
from tasks.data.plan import DataPlan, plan_data
from tasks.data.records import read_records
from tasks.data.report import length_histogram, summary_markdown
from tasks.data.templating import (
    OK,
    TOO_LONG,
    TRUNCATED,
    Renderer,
    chat_template,
    pinned_date,
    template_sha,
    tokenize_batch,
)
from tasks.evaluation.losssets import retention_conversations
from tasks.models.loading import check_context, load_tokenizer, resolve_model

SECTIONS = ("model", "data", "eval")  # eval: the retention set is checked before training
PACK_WINDOW = 2000  # examples per best-fit-decreasing window: bounded memory, ~full rows


def num_proc(setting: int | None, records: int) -> int:
    if setting:
        return setting
    # below ~20k records one process tokenizes them before worker processes would have started
    return 1 if records < 20_000 else max(1, min(8, os.cpu_count() or 1))


@contextlib.contextmanager
def no_progress_bars():
    """datasets' "Saving the dataset" bars say nothing the stage's log does not."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------- the stage


def split_train_eval(records, cfg: PipelineConfig, plan: DataPlan) -> tuple:
    """The mix's records (tasks/data/mixing.py) split into train and eval: an explicit eval file, or
    a seeded eval_fraction of each source's share (file order kept within each split)."""
    import numpy as np

    d = cfg.data
    share_of_entry = np.array([-1 if share is None else share for _, _, share in plan.sources])
    share = share_of_entry[np.asarray(records.data.column("source"))]
    available = np.bincount(share[share >= 0], minlength=len(plan.shares)).tolist()
    counts = planned_counts(plan.shares, available, d.replay)
    train, evals = select(share, counts, 0.0 if d.eval_path else d.eval_fraction, d.seed)
    if d.eval_path:
        evals = np.flatnonzero(np.asarray(records.data.column("split")) == 1)
    mix = {
        s.source.label: {"available": a, "planned": c, "replay": s.replay}
        for s, a, c in zip(plan.shares, available, counts)
    }
    return records.select(train), records.select(evals), mix, left_out_and_repeats(train, evals, share)


def tokenize_split(
    part,
    split: str,
    cfg: PipelineConfig,
    renderer: Renderer,
    names: list[str],
    work: Path,
    key: str,
    counts: Counter,
    per_source: dict,
    kept_per_entry: dict,
):
    """One split's records -> its tokenized examples that fit, counting the ones that do not."""
    import numpy as np

    d = cfg.data
    procs = min(num_proc(d.num_proc, len(part)), max(len(part), 1))
    tokens = part.with_format("arrow").map(
        tokenize_batch,
        batched=True,
        batch_size=1000,
        num_proc=procs if procs > 1 else None,
        remove_columns=part.column_names,
        desc=f"tokenize {split}",
        new_fingerprint=f"{key}-{split}-tok",
        cache_file_name=str(work / f"{split}-tok.arrow"),
        fn_kwargs={
            "renderer": renderer,
            "max_len": d.max_seq_len,
            "excess": d.excess_length,
            "train_on_inputs": d.train_on_inputs,
            "source_names": names,
        },
    )
    status = np.asarray(tokens.data.column("status"))
    source = np.asarray(tokens.data.column("source"))  # map wrote a fresh table: no index mapping
    for label, mask in (("too_long", status == TOO_LONG), ("accepted", status != TOO_LONG)):
        for name, n in zip(names, np.bincount(source[mask], minlength=len(names))):
            per_source[name][label] = per_source[name].get(label, 0) + int(n)
    kept_per_entry[split] = np.bincount(source[status != TOO_LONG], minlength=len(names))
    counts["too_long"] += int((status == TOO_LONG).sum())
    counts["truncated"] += int((status == TRUNCATED).sum())
    stops = np.asarray(tokens.data.column("stops"))
    counts["trains_stop"] += int((stops & (status != TOO_LONG)).sum())
    if d.require_stop:
        check_stops(tokens, np.flatnonzero((status == OK) & ~stops), renderer, names, split)
    keep = np.flatnonzero(status != TOO_LONG)
    if len(keep) == len(tokens):  # nothing to leave out: no second copy of every token
        kept, records = tokens, part
    else:
        kept = tokens.select(keep).flatten_indices(cache_file_name=str(work / f"{split}-kept.arrow"))
        records = part.select(keep)
    counts[split] = len(kept)
    return kept, records, procs


def write_eval_records(records, path: Path, renderer: Renderer) -> None:
    """The prompt of each eval conversation (with its tools) and its last answer (and its slice,
    when the data names one), as the later stages ask them; an answer that calls tools is the
    text the template trains for it. With slices, also ``eval_slices.json``: the slice of each
    row of the eval split, for the loss per slice."""
    has_slice = "slice" in records.column_names
    slices = list(records["slice"]) if has_slice else [None] * len(records)
    if has_slice:
        write_json(path.with_name("eval_slices.json"), slices)
    with path.open("w", encoding="utf-8") as f:
        for conv, label in zip(records["conv"], slices):
            messages, tools = split_conversation(json.loads(conv))
            # plain text has no prompt to generate from; it still counts for loss
            if messages[0]["role"] == "text":
                continue
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            answer = messages[last]
            reference = (
                renderer.answer(messages[: last + 1], tools) if "tool_calls" in answer else answer["content"]
            )
            record = {"messages": messages[:last], "reference": reference}
            if tools:
                record["tools"] = tools
            if has_slice:
                record["slice"] = label
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def one_per_row(examples, name: str, key: str, work: Path):
    """Unpacked rows: each example alone, with positions 0..n-1."""
    with no_progress_bars():
        return examples.map(
            with_positions,
            batched=True,
            remove_columns=examples.column_names,
            new_fingerprint=f"{key}-{name}-pos",
            cache_file_name=str(work / f"{name}-pos.arrow"),
        )


def save_rows(train_examples, eval_examples, d, key: str, work: Path, out: Path) -> int:
    """Train examples packed into rows (or one per row), eval examples one per row, saved as
    ``out/train`` and ``out/eval``; returns the number of train rows."""
    train_in = train_examples.with_format("arrow")
    if d.packing:  # one process: windows, and so rows, do not depend on num_proc
        train = train_in.map(
            pack,
            batched=True,
            batch_size=PACK_WINDOW,
            remove_columns=train_in.column_names,
            desc="pack",
            fn_kwargs={"max_len": d.max_seq_len},
            new_fingerprint=f"{key}-pack",
            cache_file_name=str(work / "packed.arrow"),
        )
    else:
        train = one_per_row(train_in, "train", key, work)
    evals = one_per_row(eval_examples.with_format("arrow"), "eval", key, work)
    with no_progress_bars():
        for name, dataset in (("train", train), ("eval", evals)):
            with atomic_dir(out / name) as tmp:
                dataset.with_format(None).save_to_disk(str(tmp))
    return len(train)


def build_dataset(cfg: PipelineConfig, plan: DataPlan, renderer: Renderer, out: Path, log) -> dict:
    """Read and validate every record, mix, tokenize each split, pack the train split; returns the stats."""
    import numpy as np
    from datasets import Dataset

    d, work, key = cfg.data, out / ".work", plan.key
    work.mkdir(parents=True)
    t0 = time.monotonic()
    options = [s.source for s in plan.shares]
    counts, per_source, formats = read_records(
        d, plan.sources, options, work / "records.arrow", out / "quarantine.jsonl", log
    )
    check_bad_fraction(counts, out / "quarantine.jsonl", d.max_bad_fraction)
    log(
        f"format: {counts['records_in']:,} records read in {time.monotonic() - t0:.1f}s, formats {dict(formats)}, "
        f"{counts['quarantined']} quarantined, {counts['duplicates']} duplicates"
    )

    names = [s for _, s, _ in plan.sources]
    kept, records, procs, per_entry = {}, {}, {}, {}
    *parts, mix, mixed = split_train_eval(Dataset.from_file(str(work / "records.arrow")), cfg, plan)
    counts.update(mixed)
    for split, part in zip(("train", "eval"), parts):
        if not len(part):
            files = sorted({s for sp, s, _ in plan.sources if sp == split or not d.eval_path})
            raise InputError(f"format: no {split} records in {', '.join(files)} (counts {dict(counts)})")
        kept[split], records[split], procs[split] = tokenize_split(
            part, split, cfg, renderer, names, work, key, counts, per_source, per_entry
        )
        log(f"format: tokenized {len(part):,} {split} records ({time.monotonic() - t0:.1f}s)")
    for (_, _, share), n_train, n_eval in zip(plan.sources, per_entry["train"], per_entry["eval"]):
        if share is not None:
            row = mix[plan.shares[share].source.label]
            row["train"], row["eval"] = row.get("train", 0) + int(n_train), row.get("eval", 0) + int(n_eval)
    log("format: mix " + ", ".join(f"{k}: {v['train']} train / {v['eval']} eval" for k, v in mix.items()))
    counts["accepted"] = counts["train"] + counts["eval"]
    if not counts["train"] or not counts["eval"]:
        raise InputError(
            f"format: no {'train' if not counts['train'] else 'eval'} records left after validation "
            f"and length filtering (counts {dict(counts)})"
        )

    rows = save_rows(kept["train"], kept["eval"], cfg.data, key, work, out)
    write_eval_records(records["eval"], out / "eval_records.jsonl", renderer)
    lengths = np.asarray(kept["train"].data.column("length"))
    length_histogram(lengths, d.max_seq_len, out / "token_lengths.png")
    stats = {
        "counts": dict(counts),
        "per_source": {k: dict(v) for k, v in per_source.items()},
        "mix": mix,
        "formats": dict(formats),
        "train_rows": rows,
        "train_tokens": int(lengths.sum()),
        "real_token_fraction": round(float(lengths.sum()) / (rows * d.max_seq_len), 4) if d.packing else None,
        "length_p50": int(np.percentile(lengths, 50)),
        "length_p99": int(np.percentile(lengths, 99)),
        "length_max": int(lengths.max()),
        "num_proc": procs["train"],
        "seconds": round(time.monotonic() - t0, 2),
        "fast_template": bool(renderer.plans) and renderer.fast,
    }
    del kept, records
    shutil.rmtree(work, ignore_errors=True)
    return stats


def from_cache(cached: Path, out: Path, key: str, stage: Stage) -> dict:
    built = json.loads((cached / "manifest.json").read_text())
    os.utime(cached)  # used today: the retention policy deletes entries by their last use
    copy_tree(cached, out, skip=("manifest.json",))
    stage.manifest.notes.append(f"cache hit: key {key}, built by run {built['run_id']}")
    stage.log(
        f"format: cache hit (key {key}): inputs, template, tokenizer, data settings and code are unchanged "
        f"since run {built['run_id']}; reusing its output"
    )
    return built["metrics"]


def store_in_cache(out: Path, cached: Path, log) -> None:
    try:
        with atomic_dir(cached) as tmp:
            copy_tree(out, tmp)
    except OSError as e:  # e.g. another run filled the same cache entry at the same moment
        log(f"format: could not store the cache entry {cached}: {e}")


def run_format(
    cfg: PipelineConfig,
    run_id: str,
    lineage: Lineage | None = None,
    log=None,
    track: bool = False,
    keep: bool = False,
) -> FormatResult:
    """Reads the data sources the config names (and with ``data.replay``, those of the champion
    ``lineage`` names); writes ``<run>/format/`` (see the module docstring). ``keep``: an earlier
    attempt's finished stage on the same data (the same cache key) is kept."""
    d = cfg.data
    plan: DataPlan = plan_data(cfg.data, resolve_model(cfg.model.name_or_path), lineage)
    scope, same = cfg.scope(SECTIONS), {"cache_key": plan.key}
    if keep and (kept := kept_result(scope, run_id, FormatResult, log, same=same)):
        return kept
    check_context(plan.model_dir, d.max_seq_len)
    if cfg.eval.retention.enabled:
        retention_conversations(cfg.eval.retention)  # a bad retention set fails here, not after training
    cached = Path(cfg.output_dir) / ".cache" / "format" / plan.key
    # fresh: what a failed attempt left is never reused (the manifest is written last)
    with open_stage(scope, run_id, "format", log, track, fresh=True) as stage:
        out = stage.dir
        for (split, src, _), sha in zip(plan.sources, plan.hashes):
            stage.manifest.add_input(f"{split}:{src}", src, sha)
        hit = d.cache and (cached / "manifest.json").is_file()
        if hit:
            stats = from_cache(cached, out, plan.key, stage)
        else:
            tokenizer = load_tokenizer(plan.model_dir)
            template = chat_template(d.template, tokenizer)
            (out / "chat_template.jinja").write_text(template, encoding="utf-8")
            pins = pinned_date(template, dt.date.today())  # before any work: an unpinnable one is refused
            write_json(out / "chat_template_kwargs.json", pins)
            stats = build_dataset(cfg, plan, Renderer(tokenizer, template, pins), out, stage.log)
        template = (out / "chat_template.jinja").read_text(encoding="utf-8")
        pins = template_kwargs(out)
        replayed = lineage.label if lineage and d.replay else None
        stage.manifest.outputs = format_outputs(out, plan, template, bool(hit), cached, replayed)
        stage.manifest.metrics = stats
        write_json(out / "stats.json", stats)
        result = FormatResult(
            run_id=run_id,
            train_path=str(out / "train"),
            eval_path=str(out / "eval"),
            eval_records=str(out / "eval_records.jsonl"),
            chat_template=str(out / "chat_template.jinja"),
            data_hash=plan.data_hash,
            cache_key=plan.key,
            counts=dict(stats["counts"]),
            cache_hit=bool(hit),
            declared_key=plan.declared_key,
            sources=stage.manifest.outputs["sources"],
            eval_slices=str(out / "eval_slices.json") if (out / "eval_slices.json").is_file() else "",
            template_kwargs=pins,
        )
        stage.finish(result)
        if d.cache and not hit:
            store_in_cache(out, cached, stage.log)
        c = stats["counts"]
        fill = f", rows {stats['real_token_fraction']:.1%} full" if stats.get("real_token_fraction") else ""
        if pins:
            stage.log(f"format: data.template writes today's date; pinned for every later stage: {pins}")
        stage.log(
            f"format: {c['train']:,} train / {c['eval']:,} eval records -> {stats['train_rows']:,} rows of "
            f"<= {d.max_seq_len} tokens{fill}; {c['trains_stop']:,} examples train their stop token"
        )
        stage.artifact(out / "stats.json", out / "quarantine.jsonl", out / "token_lengths.png")
        stage.tags({"sftflow.format_cache": "hit" if hit else "miss"})
        prefect_markdown(f"format-{cfg.run_name}", summary_markdown(result, stats), "format stage counts")
    return result


def template_kwargs(out: Path) -> dict:
    """The date pinned when this data was rendered (a cache hit keeps the day it was built)."""
    path = out / "chat_template_kwargs.json"
    return read_json(path) if path.is_file() else {}


def format_outputs(
    out: Path, plan: DataPlan, template: str, hit: bool, cached: Path, replayed: str | None
) -> dict:
    """The manifest's outputs: every file the stage wrote, the data hash, the cache and the mix."""
    return {
        "train": str(out / "train"),
        "eval": str(out / "eval"),
        "quarantine": str(out / "quarantine.jsonl"),
        "eval_records": str(out / "eval_records.jsonl"),
        "chat_template": str(out / "chat_template.jinja"),
        "token_lengths_png": str(out / "token_lengths.png"),
        "data_hash": plan.data_hash,
        "template_sha256": template_sha(template),
        "cache": {"key": plan.key, "hit": hit, "dir": str(cached)},
        "sources": [recorded_source(share.source) for share in plan.shares],
        "replayed_from": replayed,
    }


@task(name="format", retries=2, retry_delay_seconds=5)
def format_task(
    cfg: PipelineConfig, run_id: str, lineage: Lineage | None = None, keep: bool = False
) -> FormatResult:
    return run_format(cfg, run_id, lineage, track=True, keep=keep)
