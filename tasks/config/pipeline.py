"""The whole config: its sections, the checks that span two of them, and derived values."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from tasks.config.base import Section
from tasks.config.data import DataConfig
from tasks.config.eval import EvalConfig
from tasks.config.merge import MergeConfig
from tasks.config.model import ModelConfig
from tasks.config.retention import RetentionPolicy
from tasks.config.serve import ServeConfig
from tasks.config.tracking import TrackingConfig
from tasks.config.train import TrainConfig
from tasks.core.hashing import hash_json
from tasks.core.stage import StageScope
from tasks.core.tracking import TrackingTarget

SECTION_NAMES = ("model", "data", "train", "merge", "eval", "serve", "tracking")


class PipelineConfig(Section):
    run_name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="letters, digits, . _ - (it names run directories and the registered model)",
    )
    output_dir: Path = Path("runs")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    retention: RetentionPolicy = Field(default_factory=RetentionPolicy)

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        if self.serve.mode == "adapter" and self.train.method == "full":
            raise ValueError(
                "serve.mode: adapter needs train.method lora or qlora (full fine-tuning has no adapter)"
            )
        # vLLM sees the rank only when it loads the adapter; a merged model has none
        if self.serve.mode == "adapter" and self.train.lora.r > self.serve.max_lora_rank:
            raise ValueError(
                f"train.lora.r={self.train.lora.r} exceeds serve.max_lora_rank={self.serve.max_lora_rank}"
                " (vLLM's --max-lora-rank in adapter mode)"
            )
        return self

    # Derived values live here so every stage computes them the same way.
    @property
    def mlflow_uri(self) -> str:
        return self.tracking.mlflow_uri or f"sqlite:///{self.output_dir.resolve() / 'mlflow.db'}"

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or self.run_name

    @property
    def served_model_name(self) -> str:
        return self.serve.served_model_name or self.run_name

    @property
    def tracking_target(self) -> TrackingTarget:
        return self._tracking_target(self.model_dump(mode="json"))

    def scope(self, sections: tuple[str, ...]) -> StageScope:
        """What a stage that declared ``sections`` hands the stage scaffold."""
        data = self.model_dump(mode="json")
        return StageScope(self.output_dir, {s: data[s] for s in sections}, self._tracking_target(data))

    def _tracking_target(self, data: dict) -> TrackingTarget:
        """``data``: this config as JSON, dumped once by the caller."""
        return TrackingTarget(
            self.mlflow_uri, self.tracking.experiment, self.output_dir, data, hash_json(data)
        )

    def section_hash(self, *sections: str) -> str:
        data = self.model_dump(mode="json")
        return hash_json({s: data[s] for s in sections} if sections else data)
