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
import math
from pathlib import Path

from prefect import task

from tasks.config import SHIPPED_METRICS, PipelineConfig
from tasks.files import read_jsonl, write_json
from tasks.models import load_model, load_tokenizer, pick_dtype, resolve_model
from tasks.paths import stage_dir
from tasks.results import EvalResult, FormatResult, MergeResult
from tasks.stage import open_stage, prefect_markdown
from tasks.templating import stop_token_ids

SECTIONS = ("eval", "merge")
METRICS_DIR = Path(__file__).resolve().parent / "metrics"
LOWER_IS_BETTER = {"eval_loss", "perplexity"}


def eval_loss(model, dataset, pad_id: int, batch_size: int) -> float:
    """Token-weighted mean loss over every trained token of the eval split."""
    import torch

    from tasks.batching import Collator

    collate = Collator(pad_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            total += model(**batch, use_cache=False).loss.item() * n
            count += n
    return total / max(count, 1)


def generate(
    model, tokenizer, prompts: list[list[dict]], eos_ids: list[int], max_new_tokens: int, batch_size: int
) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts[start : start + batch_size]
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        out += [
            t.strip()
            for t in tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
    return out


def score_model(
    path: Path,
    cfg: PipelineConfig,
    template: str,
    records: list[dict],
    eval_ds,
    eos_ids: list[int],
    log=print,
) -> tuple[dict[str, float], list[str]]:
    import evaluate as hf_evaluate  # the Hugging Face library, not this stage

    tokenizer = load_tokenizer(path)
    tokenizer.chat_template = template
    model = load_model(path, pick_dtype(cfg.merge.dtype))
    loss = eval_loss(model, eval_ds, tokenizer.pad_token_id, cfg.eval.batch_size)
    preds = generate(
        model,
        tokenizer,
        [r["messages"] for r in records],
        eos_ids,
        cfg.eval.max_new_tokens,
        cfg.eval.batch_size,
    )
    refs = [r["reference"] for r in records]
    scores = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}
    for name in cfg.eval.metrics:
        module = str(METRICS_DIR / name) if name in SHIPPED_METRICS else name
        scores |= hf_evaluate.load(module).compute(predictions=preds, references=refs)
    log(f"evaluate: {path}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    return scores, preds


def gate(cfg: PipelineConfig, scores: dict[str, dict[str, float]]) -> tuple[bool, str]:
    """The candidate must beat each reference by min_delta on the gate metric."""
    g = cfg.eval.gate
    against = ["base", "champion"] if g.against == "both" else [g.against]
    cand = scores["candidate"][g.metric]
    reasons, ok = [], True
    for ref in against:
        if ref not in scores:
            reasons.append(f"no {ref} to compare with")
            continue
        other = scores[ref][g.metric]
        better = (other - cand) if g.metric in LOWER_IS_BETTER else (cand - other)
        passed = better > g.min_delta
        ok &= passed
        reasons.append(
            f"{g.metric} {cand:.4f} vs {ref} {other:.4f}: improvement {better:+.4f} "
            f"{'>' if passed else '<='} min_delta {g.min_delta}"
        )
    return ok, "; ".join(reasons)


def report_markdown(
    run_id: str, scores: dict, records: list[dict], preds: dict[str, list[str]], passed: bool, reason: str
) -> str:
    names = list(scores)
    metrics = list(scores[names[0]])
    lines = [
        f"# Evaluation of `{run_id}`",
        "",
        f"**{'PROMOTED' if passed else 'NOT PROMOTED'}**: {reason}",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {m} | " + " | ".join(f"{scores[n][m]:.4f}" for n in names) + " |" for m in metrics]
    lines += [
        "",
        "## Sample generations",
        "",
        "| prompt | reference | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:200]
    for i, rec in enumerate(records[:5]):
        prompt = rec["messages"][-1]["content"]
        lines.append(
            f"| {cell(prompt)} | {cell(rec['reference'])} | "
            + " | ".join(cell(preds[n][i]) for n in names)
            + " |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(scores: dict, path: Path) -> dict[str, dict[str, float]]:
    """One panel per metric, each on its own scale (BLEU runs to 100, exact match to 1), with the
    value on every bar. Returns the heights as drawn, read back from the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in next(iter(scores.values())) if m != "perplexity"]
    names = list(scores)
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.2 * len(metrics) + 0.6, 3.2), squeeze=False)
    drawn: dict[str, dict[str, float]] = {name: {} for name in names}
    for ax, metric in zip(axes[0], metrics):
        bars = ax.bar(
            names, [scores[n][metric] for n in names], color=["#9aa5b1", "#3b75af", "#e08a3c"][: len(names)]
        )
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""), fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.margins(y=0.15)
        for name, bar in zip(names, bars):
            drawn[name][metric] = bar.get_height()
    fig.suptitle("base vs candidate" + (" vs champion" if "champion" in scores else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def write_generations(path: Path, records: list[dict], preds: dict[str, list[str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            row = {
                "prompt": rec["messages"],
                "reference": rec["reference"],
                **{n: preds[n][i] for n in preds},
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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
        eos_ids = stop_token_ids(load_tokenizer(merged.model_path), template)
        models = {"base": resolve_model(cfg.model.name_or_path), "candidate": Path(merged.model_path)}
        if champion_path is not None:
            models["champion"] = champion_path
        scores, preds = {}, {}
        for name, path in models.items():
            stage.log(f"evaluate: scoring {name} on {len(records)} samples ...")
            scores[name], preds[name] = score_model(path, cfg, template, records, eval_ds, eos_ids, stage.log)
        passed, reason = gate(cfg, scores)
        stage.log(f"evaluate: gate {'PASSED' if passed else 'NOT PASSED'}: {reason}")

        report = report_markdown(run_id, scores, records, preds, passed, reason)
        (out / "report.md").write_text(report, encoding="utf-8")
        bar_chart(scores, out / "metrics.png")
        write_generations(out / "generations.jsonl", records, preds)
        write_json(out / "scores.json", scores)
        stage.manifest.outputs = {
            "report": str(out / "report.md"),
            "chart": str(out / "metrics.png"),
            "generations": str(out / "generations.jsonl"),
            "gate_passed": passed,
            "reason": reason,
        }
        stage.manifest.metrics = scores
        stage.artifact(*(out / n for n in ("report.md", "metrics.png", "generations.jsonl", "scores.json")))
        stage.tags({"sftflow.promote": passed, "sftflow.gate": reason[:4000]})
        prefect_markdown(f"evaluation-{cfg.run_name}", report, f"evaluation of {run_id}")
        return stage.finish(EvalResult(run_id, scores, passed, reason, report))


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
