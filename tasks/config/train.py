"""``train``: the method, DeepSpeed preset, hyperparameters and hosts of training."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.config.base import Section
from tasks.config.hostfile import is_loopback, read_hostfile

DEEPSPEED_PRESETS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


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
