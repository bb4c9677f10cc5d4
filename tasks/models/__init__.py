"""Model aliases, building the local models, loading models and tokenizers."""

from tasks.models.loading import load_model, load_tokenizer, pick_dtype, qlora_config, resolve_model

__all__ = ["load_model", "load_tokenizer", "pick_dtype", "qlora_config", "resolve_model"]
