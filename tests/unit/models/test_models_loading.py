"""Model aliases and folders."""

import pytest

from tasks.core.errors import MissingError
from tasks.models.loading import load_tokenizer, resolve_model


def test_an_unknown_name_is_refused_naming_the_aliases(tmp_path):
    with pytest.raises(
        MissingError, match=r"model.name_or_path: .*neither an alias \(smollm2-135m, tiny-llama\)"
    ):
        resolve_model(str(tmp_path / "no-model"))


def test_the_tiny_model_speaks_chatml_with_its_own_special_tokens(tiny_model):
    tok = load_tokenizer(tiny_model)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"
