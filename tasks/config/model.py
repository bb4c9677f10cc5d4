"""``model``: the base model to fine-tune."""

from __future__ import annotations

from pydantic import Field

from tasks.config.base import Section


class ModelConfig(Section):
    name_or_path: str = Field(
        "smollm2-135m",
        description="HF model folder, or an alias: smollm2-135m, tiny-llama, or a tiny random model "
        "of a family (tiny-llama3, tiny-qwen2.5, tiny-qwen3, tiny-gemma2, tiny-gemma3, tiny-mistral, "
        "tiny-phi3)",
    )
