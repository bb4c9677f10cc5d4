"""The promotion gate: does the candidate beat each reference by more than min_delta, beyond noise?

Every model is scored on the same samples, and keeps per-sample statistics from which any
resample's metric can be recomputed exactly:

    mean   one value per sample (exact match, ROUGE-L): the metric is their mean
    ratio  per eval row, summed token loss and token count: eval loss is sum / count
    exp    the same rows: perplexity is exp(sum / count)
    bleu   per sample, sacrebleu's n-gram counts: corpus BLEU of their sum

A paired bootstrap (the same seeded resamples for the candidate and the reference) gives each
metric's improvement a confidence interval. The gate promotes only if, for the gate metric and
against every reference, the interval's lower bound clears ``gate.min_delta``, and no slice of
the eval data with enough samples regresses by more than ``gate.max_slice_regression``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tasks.config import EvalConfig, GateConfig, RetentionConfig

LOWER_IS_BETTER = {"eval_loss", "perplexity"}


@dataclass
class SampleStats:
    """One model's per-sample statistics: metric -> (kind, array)."""

    stats: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)

    def value(self, metric: str, index: np.ndarray | None = None) -> float:
        kind, data = self.stats[metric]
        rows = data if index is None else data[index]
        if kind == "mean":
            return float(rows.mean())
        if kind in ("ratio", "exp"):
            loss = float(rows[:, 0].sum() / max(rows[:, 1].sum(), 1))
            return loss if kind == "ratio" else math.exp(min(loss, 50))
        from sacrebleu.metrics import BLEU

        return float(BLEU()._compute_score_from_stats(rows.sum(0).tolist()).score)

    def size(self, metric: str) -> int:
        return len(self.stats[metric][1])


def lower_is_better(metric: str) -> bool:
    """Loss-like: eval_loss, perplexity, retention_loss, past_v<N>_loss."""
    return metric in LOWER_IS_BETTER or metric.endswith("_loss")


def improvement(metric: str, candidate: float, reference: float) -> float:
    return reference - candidate if lower_is_better(metric) else candidate - reference


def resampled(g: GateConfig, stats: dict[str, SampleStats]) -> dict[str, dict[str, np.ndarray]]:
    """model -> metric -> the metric on each seeded resample, the same resamples for every model
    (so differences are paired); empty when ``gate.bootstrap_samples`` is 0."""
    if g.bootstrap_samples == 0:
        return {}
    rng = np.random.default_rng(g.seed)
    resamples: dict[int, np.ndarray] = {}
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in stats}
    for metric in stats["candidate"].stats:
        n = stats["candidate"].size(metric)
        if n not in resamples:
            resamples[n] = rng.integers(0, n, size=(g.bootstrap_samples, n))
        for name, model in stats.items():
            if metric in model.stats:
                out[name][metric] = np.array([model.value(metric, i) for i in resamples[n]])
    return out


def intervals(
    g: GateConfig, stats: dict[str, SampleStats], values: dict | None = None
) -> dict[str, dict[str, dict]]:
    """reference -> metric -> {point, low, high}: the candidate's improvement, paired bootstrap.
    ``values``: ``resampled``'s output, when the caller already has it."""
    values = resampled(g, stats) if values is None else values
    if not values:
        return {}
    tail = (1 - g.confidence) / 2 * 100
    candidate = stats["candidate"]
    out: dict[str, dict[str, dict]] = {}
    for ref in (r for r in ("base", "champion") if r in stats):
        out[ref] = {}
        for metric in (m for m in candidate.stats if m in values[ref]):
            diffs = improvement(metric, values["candidate"][metric], values[ref][metric])
            low, high = np.percentile(diffs, [tail, 100 - tail])
            point = improvement(metric, candidate.value(metric), stats[ref].value(metric))
            out[ref][metric] = {"point": point, "low": float(low), "high": float(high)}
    return out


def spreads(g: GateConfig, values: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, tuple]]:
    """model -> metric -> (low, high): each model's own interval on the resamples, for the chart."""
    tail = (1 - g.confidence) / 2 * 100
    return {
        name: {m: tuple(float(x) for x in np.percentile(v, [tail, 100 - tail])) for m, v in metrics.items()}
        for name, metrics in values.items()
    }


def shown(interval: dict | None) -> str:
    """An improvement and its interval as the console table and the report print it."""
    if interval is None:
        return "n/a"
    return f"{interval['point']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]"


def slice_scores(metric: str, stats: dict[str, SampleStats], slices: list[str | None]) -> dict[str, dict]:
    """slice -> {n, model: metric on that slice's samples}."""
    labels = np.array(["(none)" if s is None else str(s) for s in slices])
    out = {}
    for label in sorted(set(labels.tolist())):
        index = np.flatnonzero(labels == label)
        out[label] = {"n": len(index), **{name: s.value(metric, index) for name, s in stats.items()}}
    return out


def slice_failures(g: GateConfig, column: str | None, metric: str, by_slice: dict[str, dict]) -> list[str]:
    """A slice with enough samples on which the candidate falls behind a reference by too much."""
    failures = []
    for label, row in by_slice.items():
        if row["n"] < g.slice_min_samples:
            continue
        for ref in (r for r in against(g) if r in row):
            drop = -improvement(metric, row["candidate"], row[ref])
            if drop > g.max_slice_regression:
                failures.append(
                    f"slice {column}={label!r} ({row['n']} samples): {metric} {row['candidate']:.4f} vs {ref} "
                    f"{row[ref]:.4f}, a regression of {drop:.4f} > gate.max_slice_regression {g.max_slice_regression}"
                )
    return failures


def retention_failures(r: RetentionConfig, g: GateConfig, scores: dict[str, dict[str, float]]) -> list[str]:
    """The candidate's loss on the retention set may exceed each reference's by max_loss_increase."""
    if not r.enabled:
        return []
    cand, failures = scores["candidate"]["retention_loss"], []
    for ref in (x for x in against(g) if x in scores):
        other = scores[ref]["retention_loss"]
        if cand > other * (1 + r.max_loss_increase):
            failures.append(
                f"retention set {r.file.name}: loss {cand:.4f} vs {ref} {other:.4f}, up {cand / other - 1:.1%} > "
                f"eval.retention.max_loss_increase {r.max_loss_increase:.1%} (the candidate forgot)"
            )
    return failures


def against(g: GateConfig) -> list[str]:
    return ["base", "champion"] if g.against == "both" else [g.against]


def gate(
    g: GateConfig, scores: dict[str, dict[str, float]], bounds: dict | None = None, failures: list[str] = ()
) -> tuple[bool, str]:
    """The candidate must beat each reference by min_delta on the gate metric: by the lower bound
    of the improvement's interval when there is one, else by the point estimate."""
    cand = scores["candidate"][g.metric]
    reasons, ok = [], True
    for ref in against(g):
        if ref not in scores:
            reasons.append(f"no {ref} to compare with")
            continue
        other = scores[ref][g.metric]
        better = improvement(g.metric, cand, other)
        interval = (bounds or {}).get(ref, {}).get(g.metric)
        if interval is None:
            passed = better > g.min_delta
            verdict = f"{'>' if passed else '<='} min_delta {g.min_delta}"
        else:
            passed = interval["low"] > g.min_delta
            verdict = (
                f"({g.confidence:.0%} CI {interval['low']:+.4f} to {interval['high']:+.4f}): lower bound "
                f"{'>' if passed else '<='} min_delta {g.min_delta}"
            )
        ok &= passed
        reasons.append(f"{g.metric} {cand:.4f} vs {ref} {other:.4f}: improvement {better:+.4f} {verdict}")
    ok &= not failures
    return ok, "; ".join([*reasons, *failures])


@dataclass
class Decision:
    """The gate's verdict, with what it was decided on."""

    intervals: dict  # reference -> metric -> {point, low, high}
    slices: dict  # slice -> {n, model: the slice metric}
    passed: bool
    reason: str


def decide(
    e: EvalConfig,
    slice_column: str | None,
    scores: dict,
    stats: dict[str, SampleStats],
    slices: list,
    row_slices: list | None,
    values: dict,
) -> Decision:
    """The improvement intervals, the per-slice scores and the gate's verdict with its reason.
    ``slices``: each generation sample's slice; ``row_slices``: each eval row's (for eval_loss);
    ``values``: every model's metrics on the bootstrap resamples (``gate.resampled``)."""
    bounds = intervals(e.gate, stats, values)
    by_slice, failures = {}, []
    metric = slice_metric(e.gate, stats["candidate"], row_slices is not None)
    if slice_column and metric:
        by_slice = slice_scores(metric, stats, row_slices if metric == "eval_loss" else slices)
        failures = slice_failures(e.gate, slice_column, metric, by_slice)
    failures += retention_failures(e.retention, e.gate, scores)
    passed, reason = gate(e.gate, scores, bounds, failures)
    return Decision(bounds, by_slice, passed, reason)


def slice_metric(g: GateConfig, candidate: SampleStats, rows_sliced: bool) -> str | None:
    """Slices are scored on a per-sample metric: the configured one, else the gate metric if it
    is one, else the first generation metric with per-sample statistics. eval_loss is per
    sample where the format stage wrote each eval row's slice."""
    per_sample = [m for m, (kind, _) in candidate.stats.items() if kind in ("mean", "bleu")]
    per_sample += ["eval_loss"] * rows_sliced
    if g.slice_metric:
        return g.slice_metric if g.slice_metric in per_sample else None
    return g.metric if g.metric in per_sample else next(iter(per_sample), None)
