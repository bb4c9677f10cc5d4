"""One conversation's turns, checked field by field, and the one form every later stage reads.

A conversation is a list of ``{role, content}`` turns; with tool calling it also has the tools
the model may call, and is kept as ``{"messages": [...], "tools": [...]}``. Turns may be:

- ``system``, ``user``: ``content`` text;
- ``assistant``: ``content`` text, or ``tool_calls`` (then ``content`` may be empty), or both;
- ``tool``: the ``content`` a call returned, with the data's ``tool_call_id`` when it has one.

ShareGPT data as LLaMA-Factory writes it for tool calling has a ``function_call`` turn, whose
``value`` is the call (or a list of calls) as JSON ``{"name", "arguments"}``, and an
``observation`` turn for the result; its tools may be bare function schemas. Both become the
turns and tools above.

A call is kept as transformers' chat templates read it: ``{"type": "function", "function":
{"arguments", "name"}}``, the arguments a JSON object (the data may hold them as JSON text, as
OpenAI's API does), with the data's ``id`` when it has one. vLLM's API takes the arguments as
text and parses them back before templating (``openai_messages``), so both render the same.
"""

from __future__ import annotations

import json
import re

from tasks.core.errors import InputError

SURROGATE = re.compile("[\ud800-\udfff]")


class BadRecord(InputError):
    """A record that cannot be used; the message is the quarantine reason."""


def text_field(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise BadRecord(f"missing field {key!r}" if key not in record else f"field {key!r} is null")
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} is a {type(value).__name__}, not a string")
    if "\x00" in value:
        raise BadRecord(f"field {key!r} contains a NUL character")
    if SURROGATE.search(value):  # a JSON escape like \ud800 with no partner: not encodable text
        raise BadRecord(f"field {key!r} contains an unpaired surrogate (invalid Unicode)")
    if required and not value.strip():
        raise BadRecord(f"field {key!r} is empty")
    return value


def _json_value(value, where: str):
    if isinstance(value, str):  # CSV and Parquet exports, and OpenAI's arguments, keep JSON as text
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{where} is text that is not JSON ({e.msg})") from None
    return value


def _function(value, where: str) -> dict:
    if isinstance(value, dict) and "function" not in value and "name" in value:
        value = {"type": "function", "function": value}  # a bare schema or call (LLaMA-Factory, Glaive)
    if not isinstance(value, dict) or value.get("type", "function") != "function":
        raise BadRecord(f"{where} must be an object of type 'function'")
    function = value.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise BadRecord(f"{where}.function must be an object with a non-empty 'name'")
    return function


def tools_field(record: dict, key: str) -> list[dict] | None:
    """A record's tools (OpenAI's function schemas), or None when it has none."""
    tools = _json_value(record.get(key), f"field {key!r}")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise BadRecord(f"field {key!r} must be a list of tools")
    # kept as OpenAI's API and the templates take them, bare schemas wrapped
    return [{"type": "function", "function": _function(tool, f"{key}[{n}]")} for n, tool in enumerate(tools)]


def tool_calls_field(turn: dict, where: str) -> list[dict]:
    calls = _json_value(turn.get("tool_calls"), f"{where}.tool_calls")
    if not isinstance(calls, list) or not calls:
        raise BadRecord(f"{where}.tool_calls must be a non-empty list of calls")
    out = []
    for n, call in enumerate(calls):
        function = _function(call, f"{where}.tool_calls[{n}]")
        arguments = _json_value(function.get("arguments", {}), f"{where}.tool_calls[{n}].function.arguments")
        if not isinstance(arguments, dict):
            raise BadRecord(f"{where}.tool_calls[{n}].function.arguments must be a JSON object")
        # in the order OpenAI's API types declare, as vLLM hands the call to the template: one that
        # dumps the whole object (Mistral's ``tool_call.function|tojson``) then renders the same
        kept = {"type": "function", "function": {"arguments": arguments, "name": function["name"]}}
        if call.get("id") is not None:
            kept["id"] = str(call["id"])
        out.append(kept)
    return out


def chat_turn(turn: dict, role: str, text_key: str, where: str) -> dict:
    """One turn of a ``messages`` or ShareGPT record, its ``role`` already mapped."""
    if role == "function_call":  # ShareGPT: the calls as JSON text in the turn's value
        calls = _json_value(text_field(turn, text_key), f"{where}.{text_key}")
        calls = calls if isinstance(calls, list) else [calls]
        return {
            "role": "assistant",
            "content": "",
            "tool_calls": tool_calls_field({"tool_calls": calls}, where),
        }
    if role == "assistant" and turn.get("tool_calls") not in (None, []):
        out = {"role": role, "content": text_field(turn, text_key, required=False)}
        return out | {"tool_calls": tool_calls_field(turn, where)}
    out = {"role": role, "content": text_field(turn, text_key)}
    if role == "tool" and turn.get("tool_call_id") is not None:
        out["tool_call_id"] = str(turn["tool_call_id"])
    return out


def conversation(messages: list[dict], tools: list[dict] | None):
    """The stored form: the turns alone, or with the tools they may call."""
    return {"messages": messages, "tools": tools} if tools else messages


def split_conversation(conv) -> tuple[list[dict], list[dict] | None]:
    """A stored conversation's turns and tools (None without any)."""
    if isinstance(conv, dict):
        return conv["messages"], conv.get("tools")
    return conv, None


def is_text(conv) -> bool:
    """Plain text (a completion record's ``text``), trained on everything."""
    return isinstance(conv, list) and conv[0]["role"] == "text"


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or "tool_calls" in m for m in messages)


def check_tools_rendered(
    messages: list[dict], tools: list[dict] | None, pieces: list[tuple[str, bool]]
) -> None:
    """A template that ignores tools or calls would drop them from training without a word:
    each call's name must be in a trained piece, each tool's name in the text."""
    whole = "".join(text for text, _ in pieces)
    trained = "".join(text for text, tr in pieces if tr)
    calls = [c["function"]["name"] for m in messages for c in m.get("tool_calls", [])]
    missing = [f"call {n!r}" for n in calls if n not in trained]
    missing += [f"tool {t['function']['name']!r}" for t in tools or [] if t["function"]["name"] not in whole]
    if missing:
        raise InputError(
            f"data.template does not render {', '.join(missing)} (it ignores tools or tool_calls), so "
            "training would drop them; use a template that carries tools (llama3, llama3.2, qwen2.5, qwen3, mistral)"
        )


def openai_messages(messages: list[dict]) -> list[dict]:
    """The turns as OpenAI's chat API takes them (vLLM's included): arguments as JSON text, and
    an id on each call, which the API requires (``call_<turn>_<n>`` where the data has none)."""
    out = []
    for i, m in enumerate(messages):
        if "tool_calls" in m:
            calls = [
                {"id": c.get("id", f"call_{i}_{n}"), "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
                for n, c in enumerate(m["tool_calls"])
            ]  # fmt: skip
            m = m | {"tool_calls": calls}
        out.append(m)
    return out
