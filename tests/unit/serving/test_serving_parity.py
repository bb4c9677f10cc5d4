"""The parity gate's reading of evaluated tool calls and its verdict on the parser's answers
(tests/test_families.py checks both against the real vLLM)."""

from tasks.config import ParityConfig
from tasks.serving.parity import verdict, written_call


def test_an_evaluated_answer_is_one_whole_call_in_each_familys_writing():
    weather = {"name": "weather", "arguments": {"city": "Graz"}}
    assert written_call('{"name": "weather", "arguments": {"city": "Graz"}}') == weather  # Hermes
    assert written_call('{"name": "weather", "parameters": {"city": "Graz"}}') == weather  # Llama 3
    assert written_call('[{"name": "weather", "arguments": {"city": "Graz"}}]') == weather  # Mistral
    assert written_call('{"name": "now"}') == {"name": "now", "arguments": {}}
    for words in ("It is sunny in Graz.", '{"name": "weather", "arguments": {"city"', '{"city": "Graz"}',
                  '[{"name": "a"}, {"name": "b"}]', '{"name": 3}', "42"):  # fmt: skip
        assert written_call(words) is None, words


def result(served: list[dict]) -> dict:
    call = {"name": "weather", "arguments": {"city": "Graz"}}
    item = {"template_match": True, "agrees": True, "stop_ok": True}
    item |= {"tool_call": {"evaluated": call, "served": served}, "tool_call_ok": served == [call]}
    return {
        "prompts": 2,
        "template_match": 1.0,
        "agreement": 1.0,
        "stop_mismatches": 0,
        "tool_calls": 1,
        "tool_calls_parsed": int(item["tool_call_ok"]),
        "items": [{"template_match": True, "agrees": True, "stop_ok": True}, item],
    }


def test_a_call_the_parser_does_not_return_fails_tool_call_parity():
    assert verdict(result([{"name": "weather", "arguments": {"city": "Graz"}}]), ParityConfig()) == []
    failures = verdict(result([]), ParityConfig())  # the parser left the call in the text
    assert failures == [
        "tool-call parity: 1/1 evaluated tool calls did not come back as that call in tool_calls "
        "(first: {'name': 'weather', 'arguments': {'city': 'Graz'}} came back as []); does the "
        "bundle's --tool-call-parser read this template's calls?"
    ]
    wrong = [{"name": "weather", "arguments": {"city": "Wien"}}]
    assert len(verdict(result(wrong), ParityConfig())) == 1
    assert verdict(result(wrong), ParityConfig(max_tool_call_mismatches=1)) == []
