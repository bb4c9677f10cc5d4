"""Evaluate stage: base vs candidate (vs the current champion) on the same held-out samples.

Reads the format stage's eval split and eval prompts, the merged model, the base and the
registry's champion; writes ``<run>/evaluate/``: ``scores.json``, ``report.md``,
``metrics.png`` and ``generations.jsonl`` (every model's answer to every prompt).

Eval loss and perplexity come from the tokenized eval split; generation metrics (ROUGE-L,
exact match, BLEU) from greedy, batched, left-padded generation with the training chat
template, scored by `evaluate` modules that ship with sftflow and load offline. The gate
decides whether the candidate may become the champion.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from tasks.config import SHIPPED_METRICS, PipelineConfig
from tasks.files import read_json, read_jsonl, write_json
from tasks.gate import (
    SampleStats,
    gate,
    intervals,
    lower_is_better,
    resampled,
    retention_failures,
    shown,
    slice_failures,
    slice_scores,
    spreads,
)
from tasks.losssets import past_eval_sets, retention_rows
from tasks.models import load_model, load_tokenizer, pick_dtype, resolve_model
from tasks.paths import stage_dir
from tasks.results import EvalResult, FormatResult, MergeResult
from tasks.stage import open_stage, prefect_markdown
from tasks.templating import prompt_text, stop_token_ids, template_sha

SECTIONS = ("eval", "merge")
METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def row_losses(model, dataset, pad_id: int, batch_size: int):
    """Per eval row: the summed loss of its trained tokens and their count (eval loss is the
    sum over rows divided by the count, as a token-weighted mean)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from tasks.batching import IGNORE, Collator

    collate = Collator(pad_id)
    rows = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
            rows += zip(losses.sum(1).tolist(), (labels != IGNORE).sum(1).tolist())
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


def generate(
    model, tokenizer, prompts: list[list[dict]], eos_ids: list[int], max_new_tokens: int, batch_size: int
) -> tuple[list[str], list[bool]]:
    """Greedy answers, and whether each ended on a stop token (else it ran to ``max_new_tokens``)."""
    import torch

    tokenizer.padding_side = "left"
    texts, stopped = [], []
    for start in range(0, len(prompts), batch_size):
        chats = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
        enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers = gen[:, enc["input_ids"].shape[1] :]
        texts += [t.strip() for t in tokenizer.batch_decode(answers, skip_special_tokens=True)]
        stopped += [bool(set(row.tolist()) & set(eos_ids)) for row in answers]
    return texts, stopped


def metric_stats(name: str, module, preds: list[str], refs: list[str], corpus: dict) -> dict:
    """Per-sample statistics for each value a metric module returns, where the corpus value can
    be rebuilt from them: a mean of per-sample values, or sacrebleu's n-gram counts for BLEU."""
    import numpy as np

    if name == "bleu" and name in SHIPPED_METRICS:
        from sacrebleu.metrics import BLEU

        return {
            "bleu": ("bleu", np.array(BLEU()._extract_corpus_statistics(preds, [refs]), dtype=np.float64))
        }
    singles = [module.compute(predictions=[p], references=[r]) for p, r in zip(preds, refs)]
    out = {}
    for key, value in corpus.items():
        per = np.array([s[key] for s in singles], dtype=np.float64)
        if abs(per.mean() - value) < 1e-9:  # decomposable: a resample's value is its mean
            out[key] = ("mean", per)
    return out


def score_model(
    path: Path,
    cfg: PipelineConfig,
    template: str,
    records: list[dict],
    eval_ds,
    eos_ids: list[int],
    log=print,
    loss_sets: dict | None = None,
) -> tuple[dict[str, float], list[str], list[bool], SampleStats]:
    """Loss, perplexity and the generation metrics of one model, with per-sample statistics, its
    answers and whether each stopped; ``loss_sets``: metric name -> rows, loss only."""
    import evaluate as hf_evaluate  # the Hugging Face library, not this stage

    tokenizer = load_tokenizer(path)
    tokenizer.chat_template = template
    model = load_model(path, pick_dtype(cfg.merge.dtype))
    losses = row_losses(model, eval_ds, tokenizer.pad_token_id, cfg.eval.batch_size)
    prompts = [r["messages"] for r in records]
    preds, stopped = generate(
        model, tokenizer, prompts, eos_ids, cfg.eval.max_new_tokens, cfg.eval.batch_size
    )
    refs = [r["reference"] for r in records]
    stats = SampleStats({"eval_loss": ("ratio", losses), "perplexity": ("exp", losses)})
    for name, rows in (loss_sets or {}).items():
        stats.stats[name] = ("ratio", row_losses(model, rows, tokenizer.pad_token_id, cfg.eval.batch_size))
    scores = {name: stats.value(name) for name in stats.stats}
    for name in cfg.eval.metrics:
        module = hf_evaluate.load(str(METRICS_DIR / name) if name in SHIPPED_METRICS else name)
        corpus = module.compute(predictions=preds, references=refs)
        scores |= corpus
        stats.stats |= metric_stats(name, module, preds, refs, corpus)
    log(f"evaluate: {path}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    return scores, preds, stopped, stats


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")[:200]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def report_markdown(
    run_id: str,
    scores: dict,
    records: list[dict],
    preds: dict[str, list[str]],
    passed: bool,
    reason: str,
    bounds: dict | None = None,
    by_slice: dict | None = None,
    cfg: PipelineConfig | None = None,
) -> str:
    names = list(scores)
    metrics = list(scores[names[0]])
    lines = [
        f"# Evaluation of `{run_id}`",
        "",
        f"**{'PROMOTED' if passed else 'NOT PROMOTED'}**: {reason}",
        "",
    ]
    lines += markdown_table(
        ["metric", *names], [[m, *(f"{scores[n][m]:.4f}" for n in names)] for m in metrics]
    )
    if bounds:
        level = f"{cfg.eval.gate.confidence:.0%}" if cfg else "95%"
        lines += ["", f"## Improvement of the candidate ({level} paired-bootstrap interval; + is better)", ""]
        lines += markdown_table(
            ["metric", *(f"vs {r}" for r in bounds)],
            [[m, *(shown(bounds[r].get(m)) for r in bounds)] for m in metrics],
        )
    if by_slice:
        lines += ["", f"## Slices ({cfg.data.slice_column if cfg else 'slice'})", ""]
        rows = [[label, row["n"], *(f"{row[n]:.4f}" for n in names)] for label, row in by_slice.items()]
        lines += markdown_table(["slice", "samples", *names], rows)
    lines += ["", "## Sample generations", ""]
    rows = [
        [r["messages"][-1]["content"], r["reference"], *(preds[n][i] for n in names)]
        for i, r in enumerate(records[:5])
    ]
    lines += markdown_table(["prompt", "reference", *names], rows)
    return "\n".join(lines) + "\n"


def bar_chart(scores: dict, path: Path, spread: dict | None = None) -> dict[str, dict[str, float]]:
    """One panel per metric, each on its own scale (BLEU runs to 100, exact match to 1), with the
    value on every bar and, from ``spread`` (model -> metric -> (low, high)), its bootstrap
    interval as an error bar. Returns the heights as drawn, read back from the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in next(iter(scores.values())) if m != "perplexity"]
    names = list(scores)
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.2 * len(metrics) + 0.6, 3.2), squeeze=False)
    drawn: dict[str, dict[str, float]] = {name: {} for name in names}
    for ax, metric in zip(axes[0], metrics):
        values = [scores[n][metric] for n in names]
        errors = None
        if spread:  # asymmetric: value - low below, high - value above
            lows, highs = zip(*(spread.get(n, {}).get(metric, (v, v)) for n, v in zip(names, values)))
            errors = [
                [max(v - lo, 0) for v, lo in zip(values, lows)],
                [max(hi - v, 0) for v, hi in zip(values, highs)],
            ]
        bars = ax.bar(
            names, values, yerr=errors, capsize=3, color=["#9aa5b1", "#3b75af", "#e08a3c"][: len(names)]
        )
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(metric + (" (lower is better)" if lower_is_better(metric) else ""), fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.margins(y=0.15)
        for name, bar in zip(names, bars):
            drawn[name][metric] = bar.get_height()
    fig.suptitle("base vs candidate" + (" vs champion" if "champion" in scores else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def write_generations(
    path: Path, records: list[dict], preds: dict[str, list[str]], stopped: dict[str, list[bool]]
) -> None:
    """One row per prompt: each model's answer and ``<model>_stopped`` (it ended its turn)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            row = {"prompt": rec["messages"], "reference": rec["reference"]}
            for n in preds:
                row |= {n: preds[n][i], f"{n}_stopped": stopped[n][i]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def decide(
    cfg: PipelineConfig,
    scores: dict,
    stats: dict[str, SampleStats],
    slices: list,
    row_slices: list | None,
    values: dict,
):
    """The improvement intervals, the per-slice scores and the gate's verdict with its reason.
    ``slices``: each generation sample's slice; ``row_slices``: each eval row's (for eval_loss);
    ``values``: every model's metrics on the bootstrap resamples (``gate.resampled``)."""
    bounds = intervals(cfg, stats, values)
    by_slice, failures = {}, []
    metric = slice_metric(cfg, stats["candidate"], row_slices is not None)
    if cfg.data.slice_column and metric:
        by_slice = slice_scores(metric, stats, row_slices if metric == "eval_loss" else slices)
        failures = slice_failures(cfg, metric, by_slice)
    failures += retention_failures(cfg, scores)
    passed, reason = gate(cfg, scores, bounds, failures)
    return bounds, by_slice, passed, reason


def slice_metric(cfg: PipelineConfig, candidate: SampleStats, rows_sliced: bool) -> str | None:
    """Slices are scored on a per-sample metric: the configured one, else the gate metric if it
    is one, else the first generation metric with per-sample statistics. eval_loss is per
    sample where the format stage wrote each eval row's slice."""
    per_sample = [m for m, (kind, _) in candidate.stats.items() if kind in ("mean", "bleu")]
    per_sample += ["eval_loss"] * rows_sliced
    g = cfg.eval.gate
    if g.slice_metric:
        return g.slice_metric if g.slice_metric in per_sample else None
    return g.metric if g.metric in per_sample else next(iter(per_sample), None)


def run_evaluate(
    cfg: PipelineConfig,
    run_id: str,
    data: FormatResult,
    merged: MergeResult,
    champion_path: Path | None = None,
    log=None,
    track: bool = False,
) -> EvalResult:
    """Reads ``data`` (eval split and prompts), the merged model, the base and ``champion_path``;
    writes ``<run>/evaluate/`` (see the module docstring)."""
    from datasets import load_from_disk

    with open_stage(cfg, run_id, "evaluate", SECTIONS, log, track) as stage:
        out = stage.dir
        stage.manifest.add_input("eval_records", Path(data.eval_records))
        stage.manifest.add_input("candidate", Path(merged.model_path))
        template = data.template()
        records = read_jsonl(Path(data.eval_records), cfg.eval.max_samples)
        eval_ds = load_from_disk(data.eval_path)
        tokenizer = load_tokenizer(merged.model_path)
        eos_ids = stop_token_ids(tokenizer, template)
        loss_sets = extra_loss_sets(cfg, run_id, tokenizer, template, stage.log)
        models = {"base": resolve_model(cfg.model.name_or_path), "candidate": Path(merged.model_path)}
        if champion_path is not None:
            models["champion"] = champion_path
        scores, preds, stopped, stats = {}, {}, {}, {}
        for name, path in models.items():
            stage.log(f"evaluate: scoring {name} on {len(records)} samples ...")
            scores[name], preds[name], stopped[name], stats[name] = score_model(
                path, cfg, template, records, eval_ds, eos_ids, stage.log, loss_sets
            )
        row_slices = read_json(Path(data.eval_slices)) if data.eval_slices else None
        values = resampled(cfg, stats)  # once, for the gate's intervals and the chart's error bars
        bounds, by_slice, passed, reason = decide(
            cfg, scores, stats, [r.get("slice") for r in records], row_slices, values
        )
        stage.log(f"evaluate: gate {'PASSED' if passed else 'NOT PASSED'}: {reason}")

        report = report_markdown(run_id, scores, records, preds, passed, reason, bounds, by_slice, cfg)
        (out / "report.md").write_text(report, encoding="utf-8")
        bar_chart(scores, out / "metrics.png", spreads(cfg, values))
        write_generations(out / "generations.jsonl", records, preds, stopped)
        write_json(out / "scores.json", scores)
        stage.manifest.outputs = {
            "report": str(out / "report.md"),
            "chart": str(out / "metrics.png"),
            "generations": str(out / "generations.jsonl"),
            "gate_passed": passed,
            "reason": reason,
        }
        stage.manifest.metrics = {**scores, "improvement": bounds, "slices": by_slice}
        stage.artifact(*(out / n for n in ("report.md", "metrics.png", "generations.jsonl", "scores.json")))
        stage.tags({"sftflow.promote": passed, "sftflow.gate": reason[:4000]})
        prefect_markdown(f"evaluation-{cfg.run_name}", report, f"evaluation of {run_id}")
        dtype = str(pick_dtype(cfg.merge.dtype)).removeprefix("torch.")
        generations = str(out / "generations.jsonl")
        return stage.finish(
            EvalResult(run_id, scores, passed, reason, report, bounds, by_slice, generations, dtype)
        )


def extra_loss_sets(cfg: PipelineConfig, run_id: str, tokenizer, template: str, log) -> dict:
    """retention_loss and past_<version>_loss: the sets tasks/losssets.py describes."""
    sets = {}
    if cfg.eval.retention.enabled:
        sets["retention_loss"] = retention_rows(cfg, tokenizer, template)
        log(f"evaluate: retention set {cfg.eval.retention.file}: {len(sets['retention_loss'])} conversations")
    for version, rows in past_eval_sets(cfg, run_id, template_sha(template), log).items():
        sets[f"past_{version}_loss"] = rows
    return sets


def current_champion(cfg: PipelineConfig, run_id: str) -> Path | None:
    """The champion's model folder, downloaded from the registry, if there is one from another run."""
    from tasks.registry import alias_version, download_bundle

    mv = alias_version(cfg.mlflow_uri, cfg.registered_model, "champion")
    if mv is None or mv.tags.get("sftflow.run_id") == run_id:
        return None
    dst = stage_dir(cfg.output_dir, run_id, "evaluate") / f"champion-v{mv.version}"
    return download_bundle(cfg.mlflow_uri, cfg.registered_model, "champion", dst) / "model"


@task(name="evaluate", retries=1, retry_delay_seconds=5)
def evaluate_task(cfg: PipelineConfig, run_id: str, data: FormatResult, merged: MergeResult) -> EvalResult:
    return run_evaluate(cfg, run_id, data, merged, champion_path=current_champion(cfg, run_id), track=True)
