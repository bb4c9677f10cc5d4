"""Model aliases, building the local models, loading models and tokenizers."""

from tasks.models.loading import (
    dtype_name,
    load_model,
    load_tokenizer,
    pick_dtype,
    qlora_config,
    resolve_model,
)

__all__ = ["dtype_name", "load_model", "load_tokenizer", "pick_dtype", "qlora_config", "resolve_model"]
