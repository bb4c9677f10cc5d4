"""A template that writes today's date (Llama 3.2's `strftime_now`): pinned once, at format time."""

import datetime as dt

import pytest

from tasks.core.errors import InputError
from tasks.data.templating import Renderer, named_templates, pinned_date, prompt_text

DAY = dt.date(2024, 1, 2)
CHAT = [{"role": "user", "content": "Which country is Pune in?"}, {"role": "assistant", "content": "IN"}]


@pytest.fixture(scope="module")
def tokenizer():
    from tasks.models.loading import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("tiny-llama"))


def test_llama_3_2_is_pinned_through_its_own_variable_and_other_templates_need_nothing():
    template = named_templates()["llama3.2"].read_text(encoding="utf-8")
    assert pinned_date(template, DAY) == {"date_string": "02 Jan 2024"}
    for name in ("llama3", "qwen3", "gemma3", "mistral", "phi3", "qwen2.5"):  # none reads the clock
        assert pinned_date(named_templates()[name].read_text(encoding="utf-8"), DAY) == {}


def test_a_date_no_caller_can_set_is_refused_naming_it():
    """Mistral Small 3's form: `today` is set from the clock unconditionally, so vLLM on another day
    would render another prompt than training did, and nothing can tell it otherwise."""
    unpinnable = '{%- set today = strftime_now("%Y-%m-%d") %}{{ today }}{{ messages[0].content }}'
    with pytest.raises(InputError, match=r"writes today's date \(today from strftime_now\)"):
        pinned_date(unpinnable, DAY)


def test_training_and_evaluate_render_the_pinned_date_not_todays(tokenizer):
    template = named_templates()["llama3.2"].read_text(encoding="utf-8")
    pins = pinned_date(template, DAY)
    tokenizer.chat_template = template
    pieces = Renderer(tokenizer, template, pins).pieces(CHAT)
    prompt = prompt_text(tokenizer, CHAT[:1], None, pins)
    assert "Today Date: 02 Jan 2024\n" in prompt and pieces[0] == (prompt, False)
    today = f"Today Date: {dt.date.today().strftime('%d %b %Y')}\n"  # what an unpinned render writes
    assert (
        today in prompt_text(tokenizer, CHAT[:1])
        and today in Renderer(tokenizer, template).pieces(CHAT)[0][0]
    )
