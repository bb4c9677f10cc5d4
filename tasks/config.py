"""The one schema of a pipeline config.

Loaded from YAML, overridden with ``--set key.sub=value``, validated before any model is
loaded. Errors name the field (``train.lora.r``) and suggest the closest key for typos.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.hashing import hash_json
from tasks.multinode import is_loopback, read_hostfile

DEEPSPEED_PRESETS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field(
        "smollm2-135m", description="HF model folder, or an alias: smollm2-135m, tiny-llama"
    )


RecordFormat = Literal["auto", "alpaca", "messages", "sharegpt", "completion"]
KNOWN_COLUMNS = ("instruction", "input", "output", "system", "messages", "conversations", "prompt",
                 "completion", "text")  # fmt: skip


def check_roles(v: dict[str, str] | None) -> dict[str, str] | None:
    for key, role in (v or {}).items():
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"{key!r} maps to {role!r}; roles map onto system, user or assistant")
    return v


def check_columns(v: dict[str, str] | None) -> dict[str, str] | None:
    for key in v or {}:
        if key not in KNOWN_COLUMNS:
            raise ValueError(f"unknown canonical column {key!r}; expected one of {sorted(KNOWN_COLUMNS)}")
    return v


class SourceConfig(Section):
    """One source of a data mix. Without weight, count or fraction, all of its records are used."""

    path: str | list[str] = Field(..., description="file(s), globs, a save_to_disk folder or a hub name")
    name: str | None = Field(None, description="how counts and errors name it (default: the path)")
    weight: float | None = Field(
        None,
        description="weighted sources share the mix in proportion, as many records as the scarcest allows",
    )
    count: int | None = Field(None, gt=0, description="exactly this many records (repeated if it has fewer)")
    fraction: float | None = Field(None, gt=0, le=1, description="this share of the source's own records")
    format: RecordFormat | None = Field(None, description="default: data.format")
    columns: dict[str, str] | None = Field(None, description="default: data.columns")
    roles: dict[str, str] | None = Field(None, description="default: data.roles")

    _roles = field_validator("roles")(classmethod(lambda cls, v: check_roles(v)))
    _columns = field_validator("columns")(classmethod(lambda cls, v: check_columns(v)))

    @property
    def label(self) -> str:
        return self.name or (self.path if isinstance(self.path, str) else ",".join(self.path))

    @model_validator(mode="after")
    def _one_amount(self) -> SourceConfig:
        given = [k for k in ("weight", "count", "fraction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"source {self.label!r}: give one of weight, count or fraction, not {given}")
        if self.weight is not None and not self.weight > 0:
            raise ValueError(
                f"source {self.label!r}: weight {self.weight} must be > 0 (leave the source out instead)"
            )
        for item in [self.path] if isinstance(self.path, str) else self.path:
            if problem := source_problem(item):
                raise ValueError(f"source {self.label!r}: {problem}")
        return self


class DataConfig(Section):
    path: str | list[str] | None = Field(
        None,
        description="JSON/JSONL/CSV/Parquet file(s), globs, a save_to_disk folder, "
        "or a hub dataset name (when the hub is reachable); or give sources",
    )
    sources: list[SourceConfig] = Field(
        default_factory=list, description="a weighted mix of sources, each with its own options"
    )
    replay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of the training records drawn from the champion's own training sources",
    )
    eval_path: str | list[str] | None = Field(
        None, description="separate eval data; otherwise eval_fraction is split off"
    )
    format: RecordFormat = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="canonical name -> column in the file")
    roles: dict[str, str] = Field(
        default_factory=dict,
        description="sharegpt `from` value -> system/user/assistant, added to the defaults",
    )
    template: str = Field(
        "auto", description="auto (tokenizer chat template, else alpaca), alpaca, chatml, or a .jinja path"
    )
    max_seq_len: int = Field(512, gt=0)
    packing: bool = True
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="split off for eval when there is no eval_path")
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    train_on_inputs: bool = False
    excess_length: Literal["drop", "truncate", "error"] = "drop"
    seed: int = 42
    num_proc: int | None = Field(
        None, gt=0, description="tokenizing processes (default: 1 below 20k records, else the CPUs)"
    )
    cache: bool = Field(True, description="reuse the output of an identical earlier format run")
    slice_column: str | None = Field(
        None, description="a column of the raw records naming each one's slice (e.g. Dolly's category)"
    )

    @field_validator("path", "eval_path")
    @classmethod
    def _sources(cls, v: str | list[str] | None) -> str | list[str] | None:
        for item in [v] if isinstance(v, str) else v or []:
            if problem := source_problem(item):
                raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _eval_split(self) -> DataConfig:
        if (self.path is None) == (not self.sources):
            raise ValueError("give data.path (one source) or data.sources (a mix), not both or neither")
        names = [s.label for s in self.sources]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"data.sources: the name(s) {dupes} are used twice; give each source a name")
        if not self.eval_path and self.eval_fraction == 0:
            raise ValueError(
                "eval_fraction must be > 0 when there is no eval_path (the eval set is split off)"
            )
        return self

    _roles = field_validator("roles")(classmethod(lambda cls, v: check_roles(v)))
    _columns = field_validator("columns")(classmethod(lambda cls, v: check_columns(v)))

    def mix(self) -> list[SourceConfig]:
        """The sources, each with the data-wide format, columns and roles where it sets none."""
        given = self.sources or [SourceConfig(path=self.path)]
        return [
            s.model_copy(
                update={
                    "format": s.format or self.format,
                    "columns": self.columns if s.columns is None else s.columns,
                    "roles": self.roles if s.roles is None else s.roles,
                }
            )
            for s in given
        ]


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".tsv")
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def source_problem(item: str) -> str | None:
    """Why a data source cannot be read, for what can be told without reading it."""
    if any(ch in item for ch in "*?["):
        return None if glob.glob(item, recursive=True) else f"the glob {item!r} matches no file"
    path = Path(item)
    if path.exists():
        return None
    if path.is_absolute() or item.startswith(("./", "../", "~")) or path.suffix.lower() in DATA_SUFFIXES:
        return f"{item} does not exist"
    if HUB_NAME.match(item) and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return (
            f"{item!r} is neither a local file nor folder, and as a hub dataset name it cannot be loaded: "
            "HF_HUB_OFFLINE is set"
        )
    if not HUB_NAME.match(item):
        return f"{item} does not exist (and is not a hub dataset name such as 'org/name')"
    return None


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or module names")


class TrainConfig(Section):
    method: Literal["qlora", "lora", "full"] = "lora"
    quantization_bits: Literal[4, 8] = Field(
        4, description="method qlora: base weights in 4-bit nf4 (QLoRA) or 8-bit (LLM.int8)"
    )
    deepspeed: str = Field(
        "zero2",
        description=f"a preset ({', '.join(DEEPSPEED_PRESETS)}), a JSON file path, or none: the "
        "Trainer without DeepSpeed's engine (DDP across processes), for one process where ZeRO "
        "partitions nothing",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16/fp16 on GPU, fp32 on CPU"
    )
    learning_rate: float = Field(2e-4, ge=0)
    lr_scheduler: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1: run the epochs")
    micro_batch_size: int = Field(4, gt=0)
    group_by_length: bool = Field(
        True,
        description="batch rows of similar length together (transformers' LengthGroupedSampler): less padding",
    )
    gradient_accumulation_steps: int = Field(1, gt=0)
    num_processes: int = Field(1, gt=0, description="processes (GPUs) per node")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile for multi-node runs")
    launcher: Literal["ssh", "per_node"] = Field(
        "ssh",
        description="multi-node: ssh (DeepSpeed's runner reaches every host with pdsh) or per_node "
        "(this node is rank 0; each other host runs `sftflow join` with its node rank)",
    )
    master_addr: str = Field("127.0.0.1", description="multi-node: node 0's address the other hosts reach")
    master_port: int = Field(0, ge=0, lt=65536, description="0: pick a free port")
    rendezvous_timeout_s: int = Field(
        600, gt=0, description="how long the ranks wait for each other to join before failing"
    )
    memory_budget_gb: float | None = Field(
        None,
        gt=0,
        description="per-device memory the estimate is checked against (default: what the device has)",
    )
    init_from: Literal["base", "champion"] = Field(
        "base",
        description="champion: continue from the registry champion's adapter (or weights, method full); "
        "the base while there is none",
    )
    eval_steps: int | None = Field(
        None, gt=0, description="eval loss on the eval split every this many steps, and before the first"
    )
    save_steps: int = Field(50, gt=0)
    save_total_limit: int = Field(2, gt=0)
    logging_steps: int = Field(1, gt=0)
    seed: int = 42
    timeout_s: int = Field(6 * 3600, gt=0, description="the train subprocess is killed after this long")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (use epochs) or a positive number of steps")
        return v

    @field_validator("hostfile")
    @classmethod
    def _hostfile(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"hostfile {v} does not exist")
        if v is not None:
            read_hostfile(v)
        return v

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        if self.method == "qlora" and self.deepspeed in ("zero3", "zero3_offload"):
            raise ValueError(
                "method qlora cannot use ZeRO-3 (it would partition the quantized weights): "
                "use deepspeed zero2 or zero2_offload, or method lora with zero3"
            )
        # only a non-default value is an error, so a dumped config (MLflow's config.yaml) loads again
        if self.quantization_bits != 4 and self.method != "qlora":
            raise ValueError(
                f"quantization_bits: {self.quantization_bits} applies to method qlora only, not {self.method}"
            )
        if self.method == "qlora" and self.precision == "fp16":
            raise ValueError("method qlora with precision fp16 is unstable; use auto, bf16 or fp32")
        if self.hostfile and len(read_hostfile(self.hostfile)) > 1 and is_loopback(self.master_addr):
            raise ValueError(
                f"master_addr {self.master_addr} is a loopback address, which the other hosts of "
                f"{self.hostfile} cannot reach: set train.master_addr to node 0's address"
            )
        return self

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed(cls, v: str) -> str:
        if v in DEEPSPEED_PRESETS or v == "none":
            return v
        path = Path(v)
        if path.suffix == ".json":
            if not path.is_file():
                raise ValueError(f"DeepSpeed config file {v} does not exist")
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{v} is not valid JSON: {e}") from None
            return v
        close = difflib.get_close_matches(v, DEEPSPEED_PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown DeepSpeed preset {v!r}{hint}; expected one of {list(DEEPSPEED_PRESETS)}, none, or a .json path"
        )


class MergeConfig(Section):
    base: Literal["dequantized", "original"] = Field(
        "dequantized",
        description="QLoRA only: merge onto the dequantized 4-bit base (reproduces training) or the original weights",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp32 on CPU, bf16 on GPU"
    )
    max_logit_diff: float = Field(1e-3, gt=0)
    max_shard_size_mb: int = Field(
        400, gt=0, description="merged safetensors shards; the merge's peak RAM is about two shards"
    )
    verify_prompts: int = Field(4, gt=0)


SHIPPED_METRICS = ("rouge_l", "exact_match", "bleu")


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


DEFAULT_RETENTION = Path(__file__).resolve().parent.parent / "data" / "retention" / "general.jsonl"


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


class ParityConfig(Section):
    """Thresholds of the train/serve parity gate (tasks/parity.py); see README for the measurements."""

    enabled: bool = Field(
        True,
        description="serve the bundle with vLLM and compare it with the evaluated model before registering",
    )
    min_template_match: float = Field(
        1.0, ge=0, le=1, description="share of prompts whose served token ids equal training's"
    )
    # fp32 served as evaluated agreed 40/40 on every demo bundle; the bf16-served QLoRA bundle,
    # another model in effect, 38/40: this allows one near-tie flip in 40 and refuses that one
    min_agreement: float = Field(
        0.975, ge=0, le=1, description="share of greedy answers equal to the evaluated candidate's"
    )
    max_stop_mismatches: int = Field(
        0, ge=0, description="answers cut at max tokens where the evaluated one stopped"
    )


class ServeConfig(Section):
    mode: Literal["merged", "adapter"] = "merged"
    served_model_name: str | None = Field(None, description="default: run_name")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="vLLM's --dtype; default: the dtype the evaluate stage ran in"
    )
    max_lora_rank: int = Field(64, gt=0)
    parity: ParityConfig = Field(default_factory=ParityConfig)
    health_timeout_s: int = Field(600, gt=0, description="how long vLLM may take to answer /v1/models")
    endpoint: str | None = Field(
        None, description="a running OpenAI-compatible base URL (http://host:port/v1) to smoke-test"
    )
    smoke_prompts: int = Field(3, gt=0, description="eval prompts sent to serve.endpoint as chat completions")
    max_tokens: int = Field(256, gt=0)
    hot_swap: bool = Field(
        False, description="adapter mode: load a promoted adapter into the running vLLM at endpoint"
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="environment variable holding the endpoint's API key"
    )

    @model_validator(mode="after")
    def _needs_endpoint(self) -> ServeConfig:
        if self.hot_swap and not self.endpoint:
            raise ValueError("serve.hot_swap needs serve.endpoint (e.g. http://127.0.0.1:8000/v1)")
        if self.hot_swap and self.mode != "adapter":
            raise ValueError("serve.hot_swap loads a LoRA adapter: it needs serve.mode adapter")
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"serve.endpoint {self.endpoint!r} must start with http:// or https://")
        return self


class TrackingConfig(Section):
    mlflow_uri: str | None = Field(None, description="default sqlite:///<output_dir>/mlflow.db")
    experiment: str = "sftflow"
    registered_model: str | None = Field(None, description="default: run_name")


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

    def section_hash(self, *sections: str) -> str:
        data = self.model_dump(mode="json")
        return hash_json({s: data[s] for s in sections} if sections else data)


class ConfigError(Exception):
    """A config that cannot be used; the message names every bad field."""


def _suggest(loc: tuple, root: type[BaseModel]) -> str:
    """'did you mean' for an unknown key, searched among the fields at that level."""
    model: Any = root
    for part in loc[:-1]:
        field = (
            model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        )
        if field is None:
            return ""
        model = field.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {'.'.join(map(str, (*loc[:-1], close[0])))!r}?)" if close else ""


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} error{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _suggest(e["loc"], PipelineConfig)
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML, apply ``key.sub=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML syntax error: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}"
        )
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path))) from None


def deepspeed_config(cfg: PipelineConfig) -> dict:
    """The DeepSpeed config the Trainer gets; empty for ``deepspeed: none``."""
    if cfg.train.deepspeed == "none":
        return {}
    path = (
        PRESET_DIR / f"{cfg.train.deepspeed}.json"
        if cfg.train.deepspeed in DEEPSPEED_PRESETS
        else Path(cfg.train.deepspeed)
    )
    return json.loads(path.read_text())
