"""Tool-calling turns and tools: kept in the shape templates read, or quarantined with the reason."""

import json

import pytest

from tasks.data.messages import BadRecord, openai_messages, split_conversation
from tasks.data.records import SHAREGPT_ROLES, to_messages

TOOLS = [{"type": "function", "function": {"name": "lookup_city", "parameters": {"type": "object"}}}]
CALL = {
    "id": "call00001",
    "type": "function",
    "function": {"name": "lookup_city", "arguments": '{"city": "Pune"}'},
}


def record(**changes) -> dict:
    messages = [
        {"role": "user", "content": "Which country is Pune in?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": '{"country": "IN"}', "tool_call_id": "call00001", "name": "lookup_city"},
        {"role": "assistant", "content": "IN."},
    ]
    return {"tools": TOOLS, "messages": messages} | changes


def test_calls_are_kept_with_their_arguments_as_an_object_and_tools_beside_the_turns():
    messages, tools = split_conversation(to_messages(record(), "messages", {}, {}))
    assert tools == TOOLS
    call = {
        "type": "function",
        "function": {"name": "lookup_city", "arguments": {"city": "Pune"}},
        "id": "call00001",
    }
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert messages[2] == {"role": "tool", "content": '{"country": "IN"}', "tool_call_id": "call00001"}
    # tools as JSON text (CSV, Parquet) read the same; a record without tools stays a plain list
    assert to_messages(record(tools=json.dumps(TOOLS)), "messages", {}, {}) == {
        "messages": messages,
        "tools": TOOLS,
    }
    assert to_messages(record(tools=None), "messages", {}, {}) == messages


def test_openai_messages_give_the_api_its_arguments_as_text_and_every_call_an_id():
    messages, _ = split_conversation(to_messages(record(), "messages", {}, {}))
    without_id = [m | {"tool_calls": [{k: v for k, v in c.items() if k != "id"} for c in m["tool_calls"]]}
                  if "tool_calls" in m else m for m in messages]  # fmt: skip
    sent = openai_messages(without_id)
    call = sent[1]["tool_calls"][0]
    assert call == {
        "id": "call_1_0",
        "type": "function",
        "function": {"name": "lookup_city", "arguments": '{"city": "Pune"}'},
    }
    assert without_id[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Pune"}  # not changed in place
    assert sent[0] is without_id[0]


@pytest.mark.parametrize(
    "changes,reason",
    [
        ({"tools": {"name": "x"}}, "field 'tools' must be a list of tools"),
        ({"tools": "[{"}, "field 'tools' is text that is not JSON"),
        (
            {"tools": [{"type": "function", "function": {}}]},
            r"tools\[0\].function must be an object with a non-empty 'name'",
        ),
        ({"tools": [{"type": "retrieval"}]}, r"tools\[0\] must be an object of type 'function'"),
    ],
)
def test_bad_tools_are_quarantined_with_the_reason(changes, reason):
    with pytest.raises(BadRecord, match=reason):
        to_messages(record(**changes), "messages", {}, {})


@pytest.mark.parametrize(
    "call,reason",
    [
        (
            {"type": "function", "function": {"name": "lookup_city", "arguments": "{city"}},
            "arguments is text that is not JSON",
        ),
        (
            {"type": "function", "function": {"name": "lookup_city", "arguments": "[1]"}},
            "arguments must be a JSON object",
        ),
        ({"type": "function", "function": {"arguments": "{}"}}, "non-empty 'name'"),
        ("lookup_city()", r"messages\[1\].tool_calls\[0\] must be an object of type 'function'"),
    ],
)
def test_bad_calls_are_quarantined_naming_the_turn(call, reason):
    rec = record()
    rec["messages"][1]["tool_calls"] = [call]
    with pytest.raises(BadRecord, match=reason):
        to_messages(rec, "messages", {}, {})


def test_a_tool_result_needs_its_content_and_an_answer_needs_text_or_calls():
    rec = record()
    rec["messages"][2]["content"] = ""
    with pytest.raises(BadRecord, match="field 'content' is empty"):
        to_messages(rec, "messages", {}, {})
    rec = record()
    rec["messages"][1]["tool_calls"] = []
    with pytest.raises(BadRecord, match="field 'content' is null"):
        to_messages(rec, "messages", {}, {})


def test_sharegpt_function_call_and_observation_turns_read_as_calls_and_results():
    """LLaMA-Factory's ShareGPT for tool calling: a `function_call` turn holds the call as JSON
    text, an `observation` turn the result, `tools` bare schemas as JSON text, `system` a column."""
    rec = {
        "system": "Use tools.",
        "tools": json.dumps([{"name": "lookup_city", "parameters": {"type": "object"}}]),
        "conversations": [
            {"from": "human", "value": "Which country is Pune in?"},
            {"from": "function_call", "value": '{"name": "lookup_city", "arguments": {"city": "Pune"}}'},
            {"from": "observation", "value": '{"country": "IN"}'},
            {"from": "gpt", "value": "IN."},
        ],
    }
    messages, tools = split_conversation(to_messages(rec, "sharegpt", {}, SHAREGPT_ROLES))
    from_messages, _ = split_conversation(to_messages(record(), "messages", {}, {}))
    assert tools == TOOLS
    assert messages[0] == {"role": "system", "content": "Use tools."}
    without_ids = [{k: v for k, v in m.items() if k != "tool_call_id"} for m in from_messages]
    without_ids[1]["tool_calls"] = [
        {k: v for k, v in c.items() if k != "id"} for c in without_ids[1]["tool_calls"]
    ]
    assert messages[1:] == without_ids  # the same turns the messages form of this record gives
    # parallel calls: a list in one turn
    rec["conversations"][1]["value"] = json.dumps(
        [{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{}"}]
    )
    messages, _ = split_conversation(to_messages(rec, "sharegpt", {}, SHAREGPT_ROLES))
    assert [c["function"] for c in messages[2]["tool_calls"]] == [
        {"arguments": {}, "name": "a"},
        {"arguments": {}, "name": "b"},
    ]
    rec["conversations"][1]["value"] = "lookup_city(Pune)"
    with pytest.raises(BadRecord, match=r"conversations\[1\].value is text that is not JSON"):
        to_messages(rec, "sharegpt", {}, SHAREGPT_ROLES)
