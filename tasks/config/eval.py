"""``eval``: what the candidate is scored on, and the gate that decides its promotion."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.config.base import Section
from tasks.config.data import RecordFormat
from tasks.core.paths import CODE_ROOT

SHIPPED_METRICS = ("rouge_l", "exact_match", "bleu")
DEFAULT_RETENTION = CODE_ROOT / "data" / "retention" / "general.jsonl"


class GateConfig(Section):
    metric: str = Field(
        "rouge_l", description="eval_loss, perplexity (lower is better) or a generation metric"
    )
    min_delta: float = Field(
        0.0,
        description="the lower bound of the improvement's interval must clear this (the point, without one)",
    )
    against: Literal["base", "champion", "both"] = "both"
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of the paired-bootstrap interval")
    bootstrap_samples: int = Field(
        1000, ge=0, description="paired resamples (seeded); 0: compare point values"
    )
    seed: int = 0
    slice_metric: str | None = Field(
        None,
        description="scored per data.slice_column slice (default: the gate metric if a generation metric)",
    )
    slice_min_samples: int = Field(10, gt=0, description="slices with fewer samples are reported, not gated")
    max_slice_regression: float = Field(
        0.05, ge=0, description="refuse if the candidate falls this far behind a reference on any slice"
    )


class RetentionConfig(Section):
    """A fixed eval set, unrelated to the task, the candidate must not get worse on (its loss)."""

    path: str | None = Field(
        None, description="a file of records (default: the shipped data/retention/general.jsonl)"
    )
    enabled: bool = False
    max_loss_increase: float = Field(
        0.05, ge=0, description="refuse if the candidate's loss on it exceeds a reference's by this share"
    )
    format: RecordFormat = "auto"

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"retention set {v} does not exist")
        return v

    @property
    def file(self) -> Path:
        return Path(self.path) if self.path else DEFAULT_RETENTION


class EvalConfig(Section):
    max_samples: int = Field(32, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(8, gt=0)
    metrics: list[str] = Field(
        default_factory=lambda: list(SHIPPED_METRICS),
        description="shipped (rouge_l, exact_match, bleu) or paths to local `evaluate` modules",
    )
    gate: GateConfig = Field(default_factory=GateConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    past_eval_sets: int = Field(
        0, ge=0, description="also report eval loss on the eval sets of this many earlier registered versions"
    )
    cache: bool = Field(
        True,
        description="reuse the scores of a model scored before on the same eval data and settings "
        "(the base, the champion): <output_dir>/.cache/scores",
    )

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in SHIPPED_METRICS and not Path(name).exists():
                close = difflib.get_close_matches(name, SHIPPED_METRICS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"unknown metric {name!r}{hint}: use {list(SHIPPED_METRICS)} or a path to a local "
                    "evaluate module (the hub is not reachable offline)"
                )
        return v

    @model_validator(mode="after")
    def _gate_metric(self) -> EvalConfig:
        custom = any(m not in SHIPPED_METRICS for m in self.metrics)
        if not custom and self.gate.metric not in {"eval_loss", "perplexity", *self.metrics}:
            raise ValueError(
                f"gate.metric {self.gate.metric!r} is not computed: choose eval_loss, perplexity "
                f"or one of eval.metrics {self.metrics}"
            )
        slice_metric = self.gate.slice_metric
        if slice_metric is not None and not custom and slice_metric not in ["eval_loss", *self.metrics]:
            raise ValueError(
                f"gate.slice_metric {slice_metric!r} must be eval_loss or one of eval.metrics {self.metrics}"
            )
        return self
