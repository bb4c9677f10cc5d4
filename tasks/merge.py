"""Merge stage: adapter + base -> one standalone model, verified before it is put in place.

Reads the train stage's adapter (or full model), the base model and the format stage's eval
prompts; writes ``<run>/merge/model/`` (safetensors shards, config, tokenizer with the training
chat template, and a generation config whose EOS covers the end-of-turn token).

The merge runs shard by shard over the base's safetensors files (peak memory near one copy
of the model). The result is written to a temp folder, reloaded from disk and compared with
base+adapter on fixed eval prompts; only if the max |logit diff| is within
``merge.max_logit_diff`` is it renamed into place. For QLoRA the default base is the
dequantized 4- or 8-bit one the adapter was trained against (``merge.base: dequantized``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import tempfile
from pathlib import Path

from prefect import task

from tasks.config import PipelineConfig
from tasks.core.errors import InputError
from tasks.core.faults import fault
from tasks.core.files import atomic_dir
from tasks.core.hashing import file_sha256
from tasks.core.manifest import manifest_path
from tasks.core.results import FormatResult, MergeResult, TrainResult
from tasks.core.space import require_free
from tasks.core.stage import kept_result, open_stage
from tasks.data.templating import stop_token_ids
from tasks.models.loading import load_tokenizer, pick_dtype, qlora_config, resolve_model, weights_bytes

SECTIONS = ("model", "train", "merge")


def verification_inputs(tokenizer, eval_records: Path, n: int, template_kwargs: dict | None = None) -> list:
    """Full prompt+reference sequences of the first n eval records (fixed, so reruns compare alike)."""
    import torch

    out = []
    with open(eval_records, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            msgs = rec["messages"] + [{"role": "assistant", "content": rec["reference"]}]
            text = tokenizer.apply_chat_template(
                msgs, tools=rec.get("tools"), tokenize=False, **(template_kwargs or {})
            )
            out.append(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]))
            if len(out) == n:
                break
    return out


def compare_logits(reference, candidate) -> tuple[float, float]:
    """Max |diff| and top-1 agreement; either side may be tensors or files written by spill_logits."""
    import torch

    max_diff, agree, total = 0.0, 0, 0
    for a, b in zip(reference, candidate):
        a = torch.load(a, mmap=True) if isinstance(a, Path) else a
        b = torch.load(b, mmap=True) if isinstance(b, Path) else b
        max_diff = max(max_diff, (a.float() - b.float()).abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[1]
    return max_diff, agree / max(total, 1)


def spill_logits(model, inputs: list, folder: Path, name: str) -> list[Path]:
    """Reference logits go to disk: (prompts x tokens x vocab) floats can outweigh a small model."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, logits in enumerate(iter_logits(model, inputs)):
        paths.append(folder / f"{name}-{i}.pt")
        torch.save(logits, paths[-1])
    return paths


def iter_logits(model, inputs: list):
    """One prompt's logits at a time, so a comparison never holds a second full set."""
    import torch

    for x in inputs:
        with torch.no_grad():
            yield model(input_ids=x, use_cache=False).logits[0:1].float()


def release_memory() -> None:
    """Collect a dropped model (peft's wrappers and hooks hold it in reference cycles), then hand
    the freed heap back to the OS. A collection walks every object the imports made (0.3-0.6 s
    here), so tensors that only plain dicts held are released with ``trim_heap`` alone."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def lora_factors(adapter_dir: Path) -> dict[str, tuple]:
    """Base weight name -> (A, B, scale) from a saved peft adapter; B @ A is formed one weight at a time."""
    from safetensors.torch import load_file

    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [
        k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if adapter.get(k)
    ]
    if unsupported or adapter.get("fan_in_fan_out"):
        raise NotImplementedError(f"shard-wise merge does not handle adapter options {unsupported}")
    scale = adapter["lora_alpha"] / (adapter["r"] ** 0.5 if adapter.get("use_rslora") else adapter["r"])
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    factors = {
        key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight"): (
            a,
            tensors[key.replace(".lora_A.", ".lora_B.")],
            scale,
        )
        for key, a in tensors.items()
        if ".lora_A." in key
    }
    if not factors:
        raise InputError(f"{adapter_dir}: the adapter holds no LoRA weights (an empty ZeRO-3 save?)")
    return factors


def _shard_plan(base_dir: Path, max_mb: int) -> list[list[tuple[str, str]]]:
    """Groups of (weight name, source file) of about equal size, each at most max_mb."""
    from safetensors import safe_open

    index = base_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    sizes = []
    for file in files:
        with safe_open(str(base_dir / file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                sl = f.get_slice(name)
                sizes.append((name, file, sl.get_shape(), sl.get_dtype()))
    nbytes = [math.prod(shape) * (2 if "16" in dt else 1 if "8" in dt else 4) for _, _, shape, dt in sizes]
    n_shards = max(1, math.ceil(sum(nbytes) / (max_mb * 2**20)))
    target = sum(nbytes) / n_shards
    groups, current, size = [], [], 0
    for (name, file, _, _), b in zip(sizes, nbytes):
        if current and size + b > target * 1.05 and len(groups) < n_shards - 1:
            groups.append(current)
            current, size = [], 0
        current.append((name, file))
        size += b
    return groups + [current]


def dequantize(module):
    """The float weight of a bitsandbytes 4-bit or 8-bit linear (8-bit keeps its scales in ``state``)."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(module.weight, getattr(module, "state", None))


def merge_shards(
    base_dir: Path, out_dir: Path, factors: dict, dtype, max_shard_mb: int, dequantized: dict | None = None
) -> None:
    """Write the merged model one output shard at a time, so peak memory stays near one shard.

    The base files are opened per output shard (safetensors memory-maps them; closing releases
    the pages). ``dequantized`` maps weight names to the 4-/8-bit modules the adapter was trained
    against; their weights are taken dequantized (exactly what training saw).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    groups = _shard_plan(base_dir, max_shard_mb)
    weight_map, total, left = {}, 0, set(factors)
    for i, group in enumerate(groups, 1):
        shard = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        out = {}
        with contextlib.ExitStack() as stack:
            handles = {
                f: stack.enter_context(safe_open(str(base_dir / f), "pt")) for f in {f for _, f in group}
            }
            for name, file in group:
                w = handles[file].get_tensor(name)
                if dequantized and name in dequantized:
                    w = dequantize(dequantized[name])
                if name in factors:
                    a, b, scale = factors[name]
                    w = w.float() + (b.float() @ a.float()) * scale
                    left.discard(name)
                out[name] = (w.to(dtype) if w.is_floating_point() else w).contiguous()
                weight_map[name] = shard
                total += out[name].numel() * out[name].element_size()
            save_file(out, str(out_dir / shard), metadata={"format": "pt"})
            del out
        trim_heap()
    if left:
        raise InputError(f"adapter weights without a base weight: {sorted(left)[:3]}")
    if len(groups) > 1:
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    config = json.loads((base_dir / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def dequantized_copy(base_path: Path, quantized: dict, dtype):
    """The base in float with the quantized linears' weights replaced by their dequantized values."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in quantized.items():
            params[name].copy_(dequantize(m))
    return model


def full_reference(model_dir: Path, out: Path, inputs: list, scratch: Path, dtype, max_shard_mb: int) -> list:
    """Full fine-tuning: the trained model is the merged model; its logits are the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    reference = spill_logits(model, inputs, scratch, "trained")
    fault("merge:reference")
    model.save_pretrained(out, max_shard_size=f"{max_shard_mb}MB")
    return reference


def quantized_reference(
    cfg: PipelineConfig,
    base_path: Path,
    adapter: Path,
    inputs: list,
    scratch: Path,
    dtype,
    original: list,
    metrics: dict,
    log,
):
    """QLoRA: base+adapter logits as trained, on the 4-/8-bit base; returns them and the quantized
    linears by weight name (their dequantized values are what the merge writes)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bits = cfg.train.quantization_bits
    qbase = AutoModelForCausalLM.from_pretrained(
        base_path, quantization_config=qlora_config(dtype, bits), dtype=dtype
    )
    quantized = {
        f"{n}.weight": m
        for n, m in qbase.named_modules()
        if type(m).__name__ in ("Linear4bit", "Linear8bitLt")
    }
    for m in quantized.values():
        # bitsandbytes repacks 4-bit weights for a bf16 CPU kernel in eval mode; training used the
        # plain dequantize + matmul path, so verify against that one.
        m.support_avx512bf16_for_cpu = False
    as_trained = spill_logits(PeftModel.from_pretrained(qbase, adapter), inputs, scratch, f"{bits}bit")
    if bits == 8:
        # LLM.int8 also rounds the activations to int8, which no float model reproduces: check the
        # merge against the dequantized weights + adapter in float, and record how much that moves.
        floats = PeftModel.from_pretrained(dequantized_copy(base_path, quantized, dtype), adapter)
        as_float = spill_logits(floats, inputs, scratch, "8bit-float")
        metrics["int8_activation_logit_diff"] = compare_logits(as_float, as_trained)[0]
        log(
            f"merge: int8 activation rounding moves the logits by up to {metrics['int8_activation_logit_diff']:.3e}; "
            "verifying against the dequantized base in float"
        )
        as_trained = as_float
    metrics["base_choice_logit_diff"] = compare_logits(original, as_trained)[0]
    log(
        f"merge: {bits}-bit vs original base (with the adapter) differ by up to "
        f"{metrics['base_choice_logit_diff']:.3e} in the logits; merging onto the {cfg.merge.base} base"
    )
    return as_trained, quantized


def merge_adapter(
    cfg: PipelineConfig,
    base_path: Path,
    adapter: Path,
    out: Path,
    inputs: list,
    scratch: Path,
    dtype,
    metrics: dict,
    log,
) -> list:
    """Reference logits (base+adapter as trained), then the shard-wise merge into ``out``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    factors = lora_factors(adapter)
    original = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    reference = spill_logits(PeftModel.from_pretrained(original, adapter), inputs, scratch, "original")
    fault("merge:reference")
    del original
    release_memory()
    quantized = None
    if cfg.train.method == "qlora":
        as_trained, quantized = quantized_reference(
            cfg, base_path, adapter, inputs, scratch, dtype, reference, metrics, log
        )
        if cfg.merge.base == "dequantized":
            reference = as_trained
        else:
            quantized = None
    merge_shards(base_path, out, factors, dtype, cfg.merge.max_shard_size_mb, quantized)
    del quantized, factors
    if cfg.train.method == "qlora":  # the quantized base, in peft's wrapper, is garbage only now
        release_memory()
    else:
        trim_heap()
    GenerationConfig.from_pretrained(base_path).save_pretrained(out)
    return reference


def kept_merge(cfg: PipelineConfig, run_id: str, log=None) -> MergeResult | None:
    """An earlier attempt's finished merge, kept when it merged this same training."""
    inputs = {"train_manifest": file_sha256(manifest_path(cfg.output_dir, run_id, "train"))}
    return kept_result(cfg.scope(SECTIONS), run_id, MergeResult, log, inputs)


def run_merge(
    cfg: PipelineConfig,
    run_id: str,
    data: FormatResult,
    trained: TrainResult,
    log=None,
    track: bool = False,
    keep: bool = False,
) -> MergeResult:
    """Reads ``trained.output``, the base and ``data.eval_records``; writes ``<run>/merge/model``.

    Reference logits first (base+adapter, as trained), then the shard-wise merge, then a reload
    from disk compared against them: at no point are two full copies of the model in memory.
    ``keep``: a merge an earlier attempt finished from this same training is not run again."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    if keep and (kept := kept_merge(cfg, run_id, log)):
        return kept
    with open_stage(cfg.scope(SECTIONS), run_id, "merge", log, track) as stage:
        out, method, trained_dir = stage.dir, cfg.train.method, Path(trained.output)
        stage.manifest.add_input("train_output", trained_dir)
        # which training this merge is of: a retry keeps the merge for that training only
        stage.manifest.add_input("train_manifest", manifest_path(cfg.output_dir, run_id, "train"))
        base_path = resolve_model(cfg.model.name_or_path)
        dtype = pick_dtype(cfg.merge.dtype, base_path, "merge.dtype")
        tokenizer = load_tokenizer(base_path)
        tokenizer.chat_template = data.template()
        inputs = verification_inputs(
            tokenizer, Path(data.eval_records), cfg.merge.verify_prompts, data.template_kwargs
        )
        source = trained_dir if method == "full" else base_path
        require_free(out, weights_bytes(source, dtype), f"merge (the {cfg.merge.dtype} merged model)")
        metrics: dict = {}
        with atomic_dir(out / "model") as tmp, tempfile.TemporaryDirectory(dir=out) as scratch:
            if method == "full":
                reference = full_reference(
                    trained_dir, tmp, inputs, Path(scratch), dtype, cfg.merge.max_shard_size_mb
                )
            else:
                reference = merge_adapter(
                    cfg, base_path, trained_dir, tmp, inputs, Path(scratch), dtype, metrics, stage.log
                )
            generation = GenerationConfig.from_pretrained(tmp)
            generation.eos_token_id = stop_token_ids(tokenizer, data.template())
            generation.pad_token_id = tokenizer.pad_token_id
            generation.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            fault("merge:written")  # the merged weights are on disk, not yet verified or renamed
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
            max_diff, top1 = compare_logits(reference, iter_logits(reloaded, inputs))
            against = "the trained model" if method == "full" else "base+adapter"
            stage.log(
                f"merge: merged model (from disk) vs {against} on {len(inputs)} prompts: "
                f"max |logit diff| {max_diff:.2e}, top-1 agreement {top1:.2%}"
            )
            if max_diff > cfg.merge.max_logit_diff:
                raise InputError(
                    f"merge verification failed: max |logit diff| {max_diff:.3e} > "
                    f"merge.max_logit_diff {cfg.merge.max_logit_diff:.1e}; the merged model is not kept"
                )
        fault("merge:manifest")  # renamed into place, manifest not yet written
        stage.manifest.outputs = {
            "model": str(out / "model"),
            "dtype": str(dtype).removeprefix("torch."),
            "eos_token_id": generation.eos_token_id,
            "base": cfg.merge.base if method == "qlora" else "original",
        }
        stage.manifest.metrics = {
            "max_logit_diff": max_diff,
            "top1_agreement": top1,
            "verify_prompts": len(inputs),
            **metrics,
        }
        return stage.finish(MergeResult(run_id, str(out / "model"), max_diff, top1))


@task(name="merge", retries=1, retry_delay_seconds=5)
def merge_task(
    cfg: PipelineConfig, run_id: str, data: FormatResult, trained: TrainResult, keep: bool = False
) -> MergeResult:
    return run_merge(cfg, run_id, data, trained, track=True, keep=keep)
