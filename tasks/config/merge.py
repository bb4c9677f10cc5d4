"""``merge``: how the adapter is merged into a standalone model and verified."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import Section


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
