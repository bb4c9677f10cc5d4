"""Model aliases and folders."""

import pytest

from tasks.core.errors import ConfigError, MissingError
from tasks.models.loading import auto_dtype, check_context, load_tokenizer, pick_dtype, resolve_model


def test_an_unknown_name_is_refused_naming_the_aliases(tmp_path):
    with pytest.raises(
        MissingError,
        match=r"model.name_or_path: .*neither an alias \(smollm2-135m, tiny-llama, tiny-llama3, ",
    ):
        resolve_model(str(tmp_path / "no-model"))


def test_the_tiny_model_speaks_chatml_with_its_own_special_tokens(tiny_model):
    tok = load_tokenizer(tiny_model)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"


@pytest.mark.parametrize(
    "family, cuda, bf16, picked",
    [
        ("llama", False, False, "fp32"),
        ("gemma3_text", False, False, "fp32"),
        ("llama", True, True, "bf16"),
        ("gemma2", True, True, "bf16"),
        ("llama", True, False, "fp16"),
        ("gemma2", True, False, "fp32"),  # a V100 or T4: fp16 would overflow Gemma's activations
        ("gemma3_text", True, False, "fp32"),
    ],
)
def test_auto_precision_never_picks_fp16_for_a_family_that_overflows_it(family, cuda, bf16, picked):
    assert auto_dtype(family, cuda, bf16) == picked


def test_an_explicit_fp16_for_gemma_is_refused_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gemma3_text"}')
    with pytest.raises(ConfigError, match=r"merge.dtype: fp16 is refused for gemma3_text models: .*overflow"):
        pick_dtype("fp16", tmp_path, "merge.dtype")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert str(pick_dtype("fp16", tmp_path, "merge.dtype")) == "torch.float16"


def test_a_max_seq_len_past_the_models_positions_is_refused_naming_both(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "gemma3", "text_config": {"max_position_embeddings": 512}}'
    )
    check_context(tmp_path, 512)
    with pytest.raises(
        ConfigError, match=r"data.max_seq_len: 1024 exceeds the model's max_position_embeddings 512"
    ):
        check_context(tmp_path, 1024)
