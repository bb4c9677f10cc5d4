"""Merge stage on real DeepSpeed-trained tiny models: QLoRA bases, full fine-tuning, atomic failure."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasks.core.results import FormatResult, TrainResult
from tasks.format import run_format
from tasks.merge import run_merge
from tasks.train import run_train

from conftest import llama_on_tiny_tokenizer, make_config

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parent.parent / "data/demo/train.jsonl"
quiet = lambda *_: None


def trained(tmp_path, method: str, merge=None, model=None, **train):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    train = {"method": method, "max_steps": 3, "learning_rate": 1e-2, "lora": lora, **train}
    cfg = make_config(
        tmp_path, DATA, train=train, merge=merge or {}, model=model or {"name_or_path": "tiny-llama"}
    )
    run_train(cfg, "r", run_format(cfg, "r", log=quiet), log=quiet)
    return cfg


def merge(cfg):
    """The merge stage on run "r", its inputs rebuilt from the format and train manifests."""
    return run_merge(
        cfg,
        "r",
        FormatResult.from_manifest(cfg.output_dir, "r"),
        TrainResult.from_manifest(cfg.output_dir, "r"),
        log=quiet,
    )


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("qlora"), "qlora")


def test_qlora_merges_onto_the_dequantized_base_exactly(qlora_run):
    res = merge(qlora_run)
    manifest = json.loads((qlora_run.output_dir / "r/merge/manifest.json").read_text())
    assert res.max_logit_diff <= 1e-4 and res.top1_agreement == 1.0
    assert manifest["outputs"]["base"] == "dequantized"
    # the choice of base matters: 4-bit and original weights give visibly different logits
    assert manifest["metrics"]["base_choice_logit_diff"] > 1e-3


def test_qlora_original_base_is_verified_against_the_original_weights(qlora_run):
    dequantized = load_file(str(qlora_run.output_dir / "r/merge/model/model.safetensors"))
    cfg = qlora_run.model_copy(update={"merge": qlora_run.merge.model_copy(update={"base": "original"})})
    res = merge(cfg)
    manifest = json.loads((cfg.output_dir / "r/merge/manifest.json").read_text())
    assert res.max_logit_diff <= 1e-4 and manifest["outputs"]["base"] == "original"
    original = load_file(str(cfg.output_dir / "r/merge/model/model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (original[name] - dequantized[name]).abs().max() > 1e-4


def test_8bit_qlora_trains_and_merges_onto_its_dequantized_base(tmp_path):
    cfg = trained(tmp_path, "qlora", quantization_bits=8)
    adapter = load_file(str(cfg.output_dir / "r/train/adapter/adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k), "nothing was trained"
    res = merge(cfg)
    manifest = json.loads((cfg.output_dir / "r/merge/manifest.json").read_text())
    assert res.max_logit_diff <= 1e-4 and res.top1_agreement == 1.0
    # int8 rounding is finer than nf4's but still visible, so the base choice still matters
    assert (
        manifest["outputs"]["base"] == "dequantized" and manifest["metrics"]["base_choice_logit_diff"] > 1e-5
    )
    # LLM.int8 rounds activations too: recorded, and the reason the merge is checked in float
    assert manifest["metrics"]["int8_activation_logit_diff"] > 0


def test_failed_verification_leaves_no_model(qlora_run):
    cfg = qlora_run.model_copy(update={"merge": qlora_run.merge.model_copy(update={"max_logit_diff": 1e-12})})
    model_dir = cfg.output_dir / "r/merge/model"
    manifest = cfg.output_dir / "r/merge/manifest.json"
    manifest.unlink()
    import shutil

    shutil.rmtree(model_dir)
    with pytest.raises(ValueError, match="merge verification failed"):
        merge(cfg)
    assert not model_dir.exists() and not manifest.exists()
    assert not list(model_dir.parent.glob(".model.tmp-*"))


def test_full_fine_tuning_is_copied_and_verified(tmp_path):
    cfg = trained(tmp_path, "full")
    res = merge(cfg)
    assert res.max_logit_diff == 0.0
    gen = json.loads((Path(res.model_path) / "generation_config.json").read_text())
    assert 2 in gen["eos_token_id"]


def test_a_sharded_merge_equals_peft_computed_independently(tmp_path):
    """The merged shards, loaded by transformers, against PeftModel(base, adapter) logits this test
    computes itself (not the stage's own figure)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.merge import verification_inputs
    from tasks.models.loading import load_tokenizer

    # about 10 MB of fp32 weights, so a 1 MB shard limit gives several shards
    base = llama_on_tiny_tokenizer(
        tmp_path / "small",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    cfg = trained(tmp_path, "lora", merge={"max_shard_size_mb": 1}, model={"name_or_path": str(base)})
    merged = Path(merge(cfg).model_path)
    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (merged / "model.safetensors.index.json").is_file()
    tokenizer = load_tokenizer(merged)
    inputs = verification_inputs(tokenizer, cfg.output_dir / "r/format/eval_records.jsonl", 3)
    assert len(inputs) == 3
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), cfg.output_dir / "r/train/adapter"
    )
    candidate = AutoModelForCausalLM.from_pretrained(merged)
    with torch.no_grad():
        for x in inputs:
            expected = reference(input_ids=x).logits
            got = candidate(input_ids=x).logits
            assert (expected - got).abs().max().item() < 1e-4
            assert torch.equal(expected.argmax(-1), got.argmax(-1))


def test_zero3_full_fine_tuning_saves_trained_weights(tmp_path):
    """ZeRO-3 partitions the weights across ranks; what it saves must be the gathered, trained ones."""
    import torch
    from safetensors.torch import load_file

    from tasks.models.loading import resolve_model

    cfg = trained(tmp_path, "full", deepspeed="zero3")
    saved = load_file(str(cfg.output_dir / "r/train/model/model.safetensors"))
    base = load_file(str(resolve_model("tiny-llama") / "model.safetensors"))
    assert set(saved) == set(base) and all(saved[k].shape == base[k].shape for k in base)
    changed = [k for k in base if not torch.equal(saved[k].float(), base[k].float())]
    assert len(changed) > len(base) // 2, f"only {len(changed)} of {len(base)} tensors changed"
