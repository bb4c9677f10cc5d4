"""The evaluate stage's report: the markdown a person reads and the chart of every model's scores."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.core.files import write_json
from tasks.evaluation.gate import lower_is_better, shown


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
    confidence: float = 0.95,
    slice_column: str | None = None,
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
        level = f"{confidence:.0%}"
        lines += ["", f"## Improvement of the candidate ({level} paired-bootstrap interval; + is better)", ""]
        lines += markdown_table(
            ["metric", *(f"vs {r}" for r in bounds)],
            [[m, *(shown(bounds[r].get(m)) for r in bounds)] for m in metrics],
        )
    if by_slice:
        lines += ["", f"## Slices ({slice_column or 'slice'})", ""]
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
            if rec.get("tools"):
                row["tools"] = rec["tools"]
            for n in preds:
                row |= {n: preds[n][i], f"{n}_stopped": stopped[n][i]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_outputs(out: Path, report: str, scores: dict, records, preds, stopped, spread: dict) -> None:
    """report.md, metrics.png, generations.jsonl and scores.json, in the evaluate stage's folder."""
    (out / "report.md").write_text(report, encoding="utf-8")
    bar_chart(scores, out / "metrics.png", spread)
    write_generations(out / "generations.jsonl", records, preds, stopped)
    write_json(out / "scores.json", scores)
