"""Merge stage on real DeepSpeed-trained tiny models: QLoRA bases, full fine-tuning, atomic failure."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasks.format import run_format
from tasks.merge import run_merge
from tasks.results import FormatResult, TrainResult
from tasks.train import run_train

from conftest import make_config

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parent.parent / "data/demo/train.jsonl"
quiet = lambda *_: None


def trained(tmp_path, method: str, **train):
    cfg = make_config(
        tmp_path,
        DATA,
        train={
            "method": method,
            "max_steps": 3,
            "learning_rate": 1e-2,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            **train,
        },
    )
    run_train(cfg, "r", run_format(cfg, "r", log=quiet), log=quiet)
    return cfg


def merge(cfg):
    """The merge stage on run "r", its inputs rebuilt from the format and train manifests."""
    return run_merge(
        cfg, "r", FormatResult.from_manifest(cfg, "r"), TrainResult.from_manifest(cfg, "r"), log=quiet
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
