"""Scoring models, the promotion gate's statistics, the retention and past eval sets, reports."""

from tasks.evaluation.gate import (
    SampleStats,
    decide,
    gate,
    intervals,
    resampled,
    shown,
    slice_failures,
    slice_metric,
    slice_scores,
    spreads,
)
from tasks.evaluation.losssets import past_eval_sets, retention_conversations, retention_rows
from tasks.evaluation.report import bar_chart, report_markdown, write_outputs
from tasks.evaluation.scoring import generate, metric_stats, row_losses, spread

__all__ = [
    "SampleStats",
    "bar_chart",
    "decide",
    "gate",
    "generate",
    "intervals",
    "metric_stats",
    "past_eval_sets",
    "report_markdown",
    "resampled",
    "retention_conversations",
    "retention_rows",
    "row_losses",
    "spread",
    "shown",
    "slice_failures",
    "slice_metric",
    "slice_scores",
    "spreads",
    "write_outputs",
]
