"""Merge stage: adapter + base -> one standalone model, verified before it is put in place.

The merged model is written to a temp folder, reloaded from disk and compared with
base+adapter on fixed eval prompts; only if the max |logit diff| is within
``merge.max_logit_diff`` is it renamed to ``<run>/merge/model``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from tasks.config import PipelineConfig
from tasks.models import load_tokenizer, pick_dtype, resolve_model
from tasks.rundir import Manifest, atomic_dir, load_manifest, stage_dir
from tasks.stage import tracked_stage


@dataclass
class MergeResult:
    run_id: str
    model_path: str
    max_logit_diff: float
    top1_agreement: float


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) that close an assistant turn in the chat template, plus EOS."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    marker = "sftflow-answer"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    after = text.split(marker, 1)[-1]
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    for tid in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if tid in special:
            ids.append(tid)
            break
    return list(dict.fromkeys(ids))


def verification_inputs(tokenizer, eval_records: Path, n: int) -> list:
    """Full prompt+reference sequences of the first n eval records (fixed, so reruns compare alike)."""
    import torch

    out = []
    with open(eval_records, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            msgs = rec["messages"] + [{"role": "assistant", "content": rec["reference"]}]
            text = tokenizer.apply_chat_template(msgs, tokenize=False)
            out.append(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]))
            if len(out) == n:
                break
    return out


def compare_logits(reference: list, candidate: list) -> tuple[float, float]:
    max_diff, agree, total = 0.0, 0, 0
    for a, b in zip(reference, candidate):
        max_diff = max(max_diff, (a.float() - b.float()).abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[1]
    return max_diff, agree / max(total, 1)


def logits_of(model, inputs: list) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=x, use_cache=False).logits[0:1].float() for x in inputs]


def run_merge(cfg: PipelineConfig, run_id: str, log=print) -> MergeResult:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    fmt = load_manifest(cfg.output_dir, run_id, "format")
    trained = load_manifest(cfg.output_dir, run_id, "train")
    out = stage_dir(cfg.output_dir, run_id, "merge")
    man = Manifest("merge", run_id, cfg.section_hash("merge"))
    man.add_input("train_output", Path(trained["outputs"]["model"]))
    base_path = resolve_model(cfg.model.name_or_path)
    dtype = pick_dtype(cfg.merge.dtype)
    tokenizer = load_tokenizer(base_path)
    tokenizer.chat_template = Path(fmt["outputs"]["chat_template"]).read_text(encoding="utf-8")
    inputs = verification_inputs(tokenizer, Path(fmt["outputs"]["eval_records"]), cfg.merge.verify_prompts)
    method, adapter = cfg.train.method, trained["outputs"]["model"]

    if method == "full":
        merged = AutoModelForCausalLM.from_pretrained(adapter, dtype=dtype)
        reference = logits_of(merged, inputs)
    elif method == "lora":
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        peft_model = PeftModel.from_pretrained(base, adapter)
        reference = logits_of(peft_model, inputs)
        merged = peft_model.merge_and_unload()
    else:  # qlora: merge onto the dequantized 4-bit base, which is what the adapter was trained against
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        qbase = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant, dtype=dtype)
        reference = logits_of(PeftModel.from_pretrained(qbase, adapter), inputs)
        base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant, dtype=dtype).dequantize()
        base.to(dtype)
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id

    with atomic_dir(out / "model") as tmp:
        merged.save_pretrained(tmp, max_shard_size="1GB")
        tokenizer.save_pretrained(tmp)
        del merged
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
        max_diff, top1 = compare_logits(reference, logits_of(reloaded, inputs))
        log(f"merge: merged model vs base+adapter on {len(inputs)} prompts: max |logit diff| {max_diff:.2e}, "
            f"top-1 agreement {top1:.2%}")
        if max_diff > cfg.merge.max_logit_diff:
            raise ValueError(f"merge verification failed: max |logit diff| {max_diff:.3e} > merge.max_logit_diff "
                             f"{cfg.merge.max_logit_diff:.1e}; the merged model is not kept")
    man.outputs = {"model": str(out / "model"), "dtype": str(dtype).removeprefix("torch."),
                   "eos_token_id": reloaded.generation_config.eos_token_id}
    man.metrics = {"max_logit_diff": max_diff, "top1_agreement": top1, "verify_prompts": len(inputs)}
    man.finish(out)
    return MergeResult(run_id, str(out / "model"), max_diff, top1)


@task(name="merge", retries=1, retry_delay_seconds=5)
def merge_task(cfg: PipelineConfig, run_id: str) -> MergeResult:
    with tracked_stage(cfg, run_id, "merge", "merge") as st:
        result = run_merge(cfg, run_id, log=st.log)
    return result
