"""Model aliases, building the local models, loading models and tokenizers."""

from tasks.models.loading import (
    auto_dtype,
    check_context,
    dtype_name,
    load_model,
    load_tokenizer,
    max_positions,
    pick_dtype,
    qlora_config,
    resolve_model,
)
from tasks.models.tiny import FAMILIES, build_tiny, family_config

__all__ = [
    "FAMILIES",
    "auto_dtype",
    "build_tiny",
    "check_context",
    "dtype_name",
    "family_config",
    "load_model",
    "load_tokenizer",
    "max_positions",
    "pick_dtype",
    "qlora_config",
    "resolve_model",
]
