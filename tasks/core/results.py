"""What one stage hands the next: small records of paths and figures, never tensors.

The flow passes them along (so Prefect draws the edges); each can be rebuilt from its
stage's manifest, which is how ``sftflow <stage> --run-id`` runs one stage alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from tasks.core.manifest import load_manifest


class StageResult:
    stage: str

    @classmethod
    def from_manifest(cls, output_dir: Path, run_id: str) -> Self:
        return cls(**load_manifest(output_dir, run_id, cls.stage)["result"])


@dataclass
class Unchanged:
    """A registry version already built from this exact pipeline (the nightly pre-check's answer)."""

    version: str
    run_id: str
    fingerprint: str
    bundle: str | None
    promoted: bool


@dataclass
class Lineage:
    """The champion a run continues from (train.init_from) or replays (data.replay)."""

    version: str
    run_id: str
    method: str
    weights_uri: str
    sources: list[dict]

    @property
    def label(self) -> str:
        return f"champion v{self.version} (run {self.run_id})"


@dataclass
class FormatResult(StageResult):
    stage = "format"
    run_id: str
    train_path: str
    eval_path: str
    eval_records: str  # JSONL of {messages, reference}: the prompts every later stage asks
    chat_template: str  # the template training used, as a file
    data_hash: str
    cache_key: str
    counts: dict
    cache_hit: bool = False
    declared_key: str = ""  # the cache key without replayed sources: what the nightly fingerprint covers
    sources: list = field(default_factory=list)  # the mix as a later run replays it
    eval_slices: str = ""  # with data.slice_column: JSON list of each eval row's slice
    template_kwargs: dict = field(default_factory=dict)  # the date pinned for a template reading the clock

    def template(self) -> str:
        return Path(self.chat_template).read_text(encoding="utf-8")


@dataclass
class TrainResult(StageResult):
    stage = "train"
    run_id: str
    output: str  # the adapter folder (lora, qlora) or the full model folder
    method: str
    train_loss: float
    global_step: int
    started_from: str | None = None  # the champion version training continued from
    weights_uri: str = ""  # the adapter logged to MLflow, for a later run's init_from


@dataclass
class MergeResult(StageResult):
    stage = "merge"
    run_id: str
    model_path: str
    max_logit_diff: float
    top1_agreement: float


@dataclass
class EvalResult(StageResult):
    stage = "evaluate"
    run_id: str
    scores: dict[str, dict[str, float]]
    gate_passed: bool
    reason: str
    report: str = ""
    intervals: dict = field(default_factory=dict)  # reference -> metric -> {point, low, high}
    slices: dict = field(default_factory=dict)  # slice -> {n, model: the slice metric}
    generations: str = ""  # generations.jsonl: every model's answer to every prompt
    dtype: str = "float32"  # the models ran in this torch dtype; the bundle serves in it
    champion_version: str | None = None  # the champion it was compared with: promotion moves only from it


@dataclass
class HandoffResult(StageResult):
    stage = "handoff"
    run_id: str
    bundle: str
    registered_model: str
    version: str
    aliases: list[str]
    serve_script: str  # the shell line that serves the bundle
    parity: dict = field(default_factory=dict)  # the parity gate's figures; empty when it was off
    not_promoted: str = ""  # why a candidate that passed its gate stayed candidate (the champion moved)
