"""The vLLM pre-flight checks and the server line, without a server (tests/test_vllm.py runs vLLM)."""

import json
import shutil
from pathlib import Path

import pytest

from tasks.serving.server import preflight

from conftest import ROOT

SERVE = ["transformers", "serve", "model", "--host", "{host}", "--port", "{port}", "--device", "cpu"]


def _template():
    from tasks.data.templating import CHATML_TEMPLATE

    return CHATML_TEMPLATE


# ---------------------------------------------------------------- pre-flight (no server needed)


@pytest.fixture
def bundle(tmp_path, tiny_model):
    """A bundle folder whose model/ is hard-linked to a copy of the tiny model, as handoff builds it."""
    from tasks.core.files import copy_tree

    source = tmp_path / "merged"
    shutil.copytree(tiny_model, source)
    (tmp_path / "bundle").mkdir()
    copy_tree(source, tmp_path / "bundle/model")
    return tmp_path / "bundle", source


def test_preflight_accepts_the_tiny_model_unchanged(bundle):
    folder, _ = bundle
    notes, extra = preflight(folder, folder / "model", _template(), 64)
    assert notes == [] and extra == [] and (folder / "chat_template.jinja").read_text() == _template()


def test_preflight_adds_the_end_of_turn_token_to_eos_without_touching_the_merge_output(bundle):
    folder, source = bundle
    gen = json.loads((source / "generation_config.json").read_text())
    gen["eos_token_id"] = 0  # <|endoftext|>: the template ends turns with <|im_end|> (id 2)
    (source / "generation_config.json").write_text(json.dumps(gen))  # hard link: the bundle sees it too
    notes, _ = preflight(folder, folder / "model", _template(), 64)
    assert "end-of-turn token '<|im_end|>' (2)" in notes[0]
    assert json.loads((folder / "model/generation_config.json").read_text())["eos_token_id"] == [0, 2]
    assert json.loads((source / "generation_config.json").read_text())["eos_token_id"] == 0


def test_preflight_refuses_what_vllm_cannot_serve(bundle):
    folder, source = bundle
    adapter = folder / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 128}))
    with pytest.raises(ValueError, match="r=128 exceeds serve.max_lora_rank=64"):
        preflight(folder, source, _template(), 64, adapter_dir=adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        preflight(folder, source, _template(), 64, adapter_dir=adapter)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").unlink()
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["MyOwnForCausalLM"]}))
    with pytest.raises(ValueError, match="MyOwnForCausalLM.*not served by vLLM"):
        preflight(folder, source, _template(), 64)


def test_preflight_gives_vllm_the_training_template_when_the_tokenizer_has_none(bundle):
    folder, source = bundle
    other = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
    notes, extra = preflight(folder, folder / "model", other, 64)
    assert extra == ["--chat-template", "chat_template.jinja"] and "chat template" in notes[0]


# ---------------------------------------------------------------- the server line


def test_adapter_mode_serves_the_adapter_on_the_base():
    from tasks.serving.bundle import serve_argv

    from conftest import make_config

    cfg = make_config(
        Path("/tmp"), ROOT / "data/demo/train.jsonl", serve={"mode": "adapter", "max_lora_rank": 16}
    )
    argv = serve_argv(
        cfg.served_model_name,
        cfg.data.max_seq_len,
        cfg.serve.max_lora_rank,
        "/models/base",
        "float32",
        "adapter",
    )
    assert argv[:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/base"]
    assert (
        argv[argv.index("--lora-modules") + 1] == "t=adapter"
        and argv[argv.index("--max-lora-rank") + 1] == "16"
    )
    assert "--enable-lora" in argv and argv[argv.index("--max-model-len") + 1] == "256"
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--served-model-name") + 1] == "t-base"  # vLLM refuses a LoRA named like its base
