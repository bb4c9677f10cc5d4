"""Tiny random models of the families people fine-tune, built locally for tests and CI.

Each has its family's config shape (sliding windows, softcaps, qk-norm, tied embeddings, GQA,
its RoPE variant), its family's special tokens in a small byte-level BPE tokenizer, and its
official chat template (``tasks/data/templates``). Dimensions are a few MB: hidden 64, two
layers, head_dim 32 (vLLM's CPU attention has no kernel for head_dim 16). The window is 64
tokens, so the demo's examples run past it in training, evaluation and serving alike.

    resolve_model("tiny-gemma3")  # a folder under $SFTFLOW_HOME/models, built on first use
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tasks.core.files import atomic_dir
from tasks.core.paths import CODE_ROOT
from tasks.data.templating import named_templates

WINDOW = 64
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=2048,
)
LOCAL_THEN_GLOBAL = ["sliding_attention", "full_attention"]


@dataclass(frozen=True)
class Family:
    config: str  # the transformers config class
    template: str  # a name in tasks/data/templates
    specials: list[str]
    bos: str | None
    eos: str
    pad: str
    shape: dict = field(default_factory=dict)


GEMMA = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
# fmt: off
FAMILIES = {
    "llama3": Family(
        config="LlamaConfig", template="llama3",
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        shape=dict(tie_word_embeddings=True, max_position_embeddings=131072, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=8192)),
    ),
    "qwen2.5": Family(
        config="Qwen2Config", template="qwen2.5", specials=QWEN,
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        shape=dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    ),
    "qwen3": Family(
        config="Qwen3Config", template="qwen3",
        specials=[*QWEN, "<tool_response>", "</tool_response>", "<think>", "</think>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        shape=dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    ),
    "gemma2": Family(
        config="Gemma2Config", template="gemma2", specials=GEMMA, bos="<bos>", eos="<eos>", pad="<pad>",
        shape=dict(sliding_window=WINDOW, layer_types=LOCAL_THEN_GLOBAL, query_pre_attn_scalar=32,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    ),
    "gemma3": Family(
        config="Gemma3TextConfig", template="gemma3", specials=GEMMA, bos="<bos>", eos="<eos>", pad="<pad>",
        shape=dict(sliding_window=WINDOW, layer_types=LOCAL_THEN_GLOBAL, query_pre_attn_scalar=32),
    ),
    "mistral": Family(
        config="MistralConfig", template="mistral",
        specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                  "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
        bos="<s>", eos="</s>", pad="<unk>", shape=dict(sliding_window=WINDOW),
    ),
    "phi3": Family(
        config="Phi3Config", template="phi3",
        specials=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", shape=dict(sliding_window=WINDOW),
    ),
}
# fmt: on
ALIASES = {f"tiny-{name}": name for name in FAMILIES}


def small_tokenizer(specials: list[str], bos, eos, pad, unk, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer (512 tokens) trained on the demo data, with ``specials`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        corpus = (CODE_ROOT / "data" / "demo" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad
    )


def family_config(name: str, vocab_size: int, **overrides):
    """``name``'s tiny config: the family's shape at the tiny dimensions, then ``overrides``."""
    import transformers

    family = FAMILIES[name]
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # some defaults lie past a tiny vocabulary
    return getattr(transformers, family.config)(
        vocab_size=vocab_size, **{**SHAPE, **ids, **family.shape, **overrides}
    )


def build_tiny(name: str, target: Path, seed: int = 0) -> Path:
    """The tiny ``name`` model with its tokenizer and official template, saved at ``target``."""
    import torch
    from transformers import AutoModelForCausalLM

    family = FAMILIES[name]
    unk = "<unk>" if "<unk>" in family.specials else family.pad
    tok = small_tokenizer(family.specials, family.bos, family.eos, family.pad, unk)
    tok.chat_template = named_templates()[family.template].read_text(encoding="utf-8")
    ids = {
        f"{k}_token_id": tok.convert_tokens_to_ids(t)
        for k, t in (("bos", family.bos), ("eos", family.eos), ("pad", family.pad))
        if t
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, len(tok), **ids))
    with atomic_dir(target) as out:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return target
