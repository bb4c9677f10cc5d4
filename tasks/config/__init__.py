"""The pipeline config: one module per section, the cross-section checks, and loading.

cfg = load_config("configs/tiny.yaml", ["train.lora.r=8"])
cfg.train.method, cfg.data.max_seq_len
"""

from tasks.config.base import Section
from tasks.config.data import HUB_NAME, KNOWN_COLUMNS, DataConfig, RecordFormat, SourceConfig, source_problem
from tasks.config.eval import DEFAULT_RETENTION, SHIPPED_METRICS, EvalConfig, GateConfig, RetentionConfig
from tasks.config.loading import format_errors, load_config
from tasks.config.merge import MergeConfig
from tasks.config.model import ModelConfig
from tasks.config.pipeline import SECTION_NAMES, PipelineConfig
from tasks.config.retention import RetentionPolicy
from tasks.config.serve import ParityConfig, ServeConfig
from tasks.config.tracking import TrackingConfig
from tasks.config.train import DEEPSPEED_PRESETS, LoraConfig, TrainConfig
from tasks.core.errors import ConfigError

__all__ = [
    "DEEPSPEED_PRESETS",
    "DEFAULT_RETENTION",
    "HUB_NAME",
    "KNOWN_COLUMNS",
    "SECTION_NAMES",
    "SHIPPED_METRICS",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GateConfig",
    "LoraConfig",
    "MergeConfig",
    "ModelConfig",
    "ParityConfig",
    "PipelineConfig",
    "RecordFormat",
    "RetentionConfig",
    "RetentionPolicy",
    "Section",
    "ServeConfig",
    "SourceConfig",
    "TrackingConfig",
    "TrainConfig",
    "format_errors",
    "load_config",
    "source_problem",
]
