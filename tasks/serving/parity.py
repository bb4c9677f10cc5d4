"""The train/serve parity gate: the server answers like the model that was evaluated.

On the evaluate stage's prompts, against a running vLLM started from the bundle:

- template: the server's token ids for each prompt (``/tokenize`` with the chat messages and
  the generation prompt) equal the ids sftflow evaluated with;
- generation: greedy answers equal the evaluate stage's candidate answers; each mismatch keeps
  the first divergent token and both texts;
- stop: an answer may end on ``length`` only where the evaluated one also ran out of tokens;
- tool calls: where the bundle has a tool parser, each evaluated answer that is one whole call
  comes back from the same prompt, with the tools and the API's default ``tool_choice``, as that
  call in ``tool_calls`` (name and arguments), as a client with tools gets it.

The verdict compares these with ``serve.parity``'s thresholds.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.config import ParityConfig, ServeConfig
from tasks.core.errors import StageFailed
from tasks.core.faults import fault
from tasks.core.files import read_jsonl, write_json
from tasks.core.results import EvalResult
from tasks.data.messages import openai_messages
from tasks.data.templating import prompt_text
from tasks.serving.server import Server
from tasks.serving.venv import server_env, vllm_python


class ParityError(StageFailed):
    """The served bundle does not answer like the evaluated model: retrying cannot change that."""


def start_server(bundle: Path, info: dict, out: Path, timeout_s: float, log) -> Server:
    """vLLM on the bundle, exactly as serve.json says, started without waiting for it to answer
    (it loads and compiles while evaluate scores the models); its log is ``out/vllm.log``."""
    argv = [str(vllm_python(log)), *info["argv"][1:]]
    key = secrets.token_urlsafe(24)  # the gate's server answers only the gate, even on loopback
    env = server_env(info["env"]) | {"VLLM_API_KEY": key}
    return Server.start(argv, bundle, env, out / "vllm.log", timeout_s, log, key)


def parity_gate(
    s: ServeConfig,
    served_name: str,
    max_new_tokens: int,
    bundle: Path,
    info: dict,
    tokenizer,
    scores: EvalResult,
    out: Path,
    log,
    server: Server | None = None,
    template_kwargs: dict | None = None,
):
    """Serve the bundle exactly as serve.json says, with the real vLLM (``server``, when one was
    started from this bundle already), and compare it with the evaluated candidate, whose prompts
    carried ``template_kwargs`` (the pinned date). The server is stopped at the end. Writes
    parity.json and parity.md into out; returns the result."""
    rows = read_jsonl(Path(scores.generations))
    waited_from = time.time()
    if server is not None and not server.alive():  # it crashed, or a retry finds it stopped
        log(f"parity: the server started early is gone (its log: {server.log_path}); starting another")
        server = None
    server = server or start_server(bundle, info, out, s.health_timeout_s, log)
    try:
        started = server.wait(log)
        waited = time.time() - waited_from
        fault("handoff:serving")
        result = check_parity(
            server.url,
            served_name,
            tokenizer,
            rows,
            max_new_tokens,
            server.api_key,
            s.parity.concurrency,
            log,
            template_kwargs,
            parses_tools="--enable-auto-tool-choice" in info["argv"],
        )
    finally:
        server.stop()
    failures = verdict(result, s.parity)
    result |= {
        "passed": not failures,
        "failures": failures,
        "server_started_at": dt.datetime.fromtimestamp(server.started_at, dt.UTC).isoformat(),
        "server_start_s": round(started, 1),
        "server_wait_s": round(waited, 1),  # what the gate waited for it: less when it started early
        "concurrency": s.parity.concurrency,
    }
    write_json(out / "parity.json", result)
    (out / "parity.md").write_text(parity_markdown(result, failures, started), encoding="utf-8")
    log(
        f"parity: template {result['template_match']:.0%}, agreement {result['agreement']:.0%} "
        f"({result['prompts']} prompts, {s.parity.concurrency} at a time), finish {result['finish_reasons']}, "
        f"server start {started:.0f}s (waited {waited:.0f}s), checks {result['seconds']:.0f}s: "
        f"{'FAILED' if failures else 'PASSED'}"
    )
    return result


def parity_table(result: dict) -> dict[str, list]:
    keys = ("prompt", "template_match", "agrees", "finish_reason", "evaluated_stopped", "served", "evaluated")
    return {k: [i[k] for i in result["items"]] for k in keys}


def chat_request(messages: list[dict], tools: list[dict] | None) -> dict:
    """A prompt as OpenAI's chat API takes it; its tools reach the template, and the answer comes
    back as the text the model wrote (tool_choice "none": the answers compare as text; the calls in
    them are checked through the parser apart, in ``served_calls``)."""
    return {"messages": openai_messages(messages)} | (
        {"tools": tools, "tool_choice": "none"} if tools else {}
    )


def served_ids(
    base_url: str, model: str, messages: list[dict], api_key: str, tools: list | None = None
) -> list[int]:
    """The server's token ids for a chat prompt (vLLM's ``/tokenize`` lives beside ``/v1``)."""
    body = {"model": model, "messages": openai_messages(messages), "add_generation_prompt": True}
    if tools:
        body["tools"] = tools
    req = urllib.request.Request(
        base_url.rstrip("/").removesuffix("/v1") + "/tokenize",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["tokens"]


def first_difference(a: list[int], b: list[int]) -> int:
    """The first index where two id lists differ (the shorter one's length when one extends the other)."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def first_divergence(tokenizer, served: str, evaluated: str) -> dict:
    """Where two answers part: the token index and each side's token there (None past the end)."""
    a = tokenizer(served, add_special_tokens=False)["input_ids"]
    b = tokenizer(evaluated, add_special_tokens=False)["input_ids"]
    i = first_difference(a, b)
    token = lambda ids: tokenizer.decode([ids[i]]) if i < len(ids) else None
    return {"index": i, "served_token": token(a), "evaluated_token": token(b)}


def check_parity(
    base_url: str,
    model: str,
    tokenizer,
    rows: list[dict],
    max_tokens: int,
    api_key: str,
    concurrency: int = 1,
    log=print,
    template_kwargs: dict | None = None,
    parses_tools: bool = False,
) -> dict:
    """Every prompt of ``rows`` (evaluate's generations.jsonl) against the server, ``concurrency``
    requests at a time (vLLM batches them, as in production); the figures and one item per prompt.
    ``tokenizer`` carries the training chat template, ``template_kwargs`` the date it was pinned to;
    ``parses_tools``: the server has a tool parser, so each evaluated call is checked through it."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, timeout=300, max_retries=1)
    t0, done = time.monotonic(), []

    # the tokenizer is used here, in one thread: a Rust tokenizer shared by threads can refuse
    # ("Already borrowed")
    trained = [
        tokenizer(
            prompt_text(tokenizer, r["prompt"], r.get("tools"), template_kwargs), add_special_tokens=False
        )["input_ids"]
        for r in rows
    ]

    def check(row_ids: tuple[dict, list[int]]) -> dict:
        item = check_prompt(client, base_url, model, *row_ids, max_tokens, api_key, parses_tools)
        done.append(item)  # list.append is atomic: the progress count needs no lock
        if len(done) % 10 == 0 or len(done) == len(rows):
            log(f"parity: {len(done)}/{len(rows)} prompts, {sum(i['agrees'] for i in done)} answers agree")
        return item

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        items = list(pool.map(check, zip(rows, trained)))  # in the prompts' order, however they finish
    for item, row in zip(items, rows):
        if not item["agrees"]:
            item["divergence"] = first_divergence(tokenizer, item["served"], row["candidate"])
    count = max(len(items), 1)
    return {
        "prompts": len(items),
        "tool_prompts": sum(bool(r.get("tools")) for r in rows),
        "template_match": sum(i["template_match"] for i in items) / count,
        "agreement": sum(i["agrees"] for i in items) / count,
        "finish_reasons": {
            f: sum(i["finish_reason"] == f for i in items) for f in {i["finish_reason"] for i in items}
        },
        "stop_mismatches": sum(not i["stop_ok"] for i in items),
        "tool_calls": sum("tool_call" in i for i in items),
        "tool_calls_parsed": sum(i.get("tool_call_ok", False) for i in items),
        "seconds": round(time.monotonic() - t0, 1),
        "items": items,
    }


def check_prompt(
    client,
    base_url: str,
    model: str,
    row: dict,
    ours: list[int],
    max_tokens: int,
    api_key: str,
    parses_tools: bool = False,
) -> dict:
    """One prompt: the served token ids against ``ours`` (training's), the greedy answer against
    the evaluated one and, where the server parses tool calls, the evaluated call against its parse."""
    theirs = served_ids(base_url, model, row["prompt"], api_key, row.get("tools"))
    r = client.chat.completions.create(
        model=model, **chat_request(row["prompt"], row.get("tools")), max_tokens=max_tokens, temperature=0
    )
    answer = (r.choices[0].message.content or "").strip()
    item = {
        "prompt": row["prompt"][-1]["content"][:200],
        "template_match": ours == theirs,
        "agrees": answer == row["candidate"],
        "finish_reason": r.choices[0].finish_reason,
        "evaluated_stopped": row["candidate_stopped"],
        "served": answer,
        "evaluated": row["candidate"],
    }
    item["stop_ok"] = item["finish_reason"] == "stop" or not row["candidate_stopped"]
    call = written_call(row["candidate"]) if parses_tools and row.get("tools") else None
    if call is not None and row["candidate_stopped"]:
        item["tool_call"] = {"evaluated": call, "served": served_calls(client, model, row, max_tokens)}
        item["tool_call_ok"] = item["tool_call"]["served"] == [call]
    if not item["template_match"]:
        k = first_difference(ours, theirs)
        item["template_diff"] = {"index": k, "trained": ours[k : k + 8], "served": theirs[k : k + 8]}
    return item


def written_call(text: str) -> dict | None:
    """The one tool call an evaluated answer is, as the tool parsers read it: a JSON object with a
    name (Hermes; Llama 3 writes "parameters"), or a list of one (Mistral's ``[TOOL_CALLS]``, a
    special token the answer's text leaves out); None for words or a garbled call."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if isinstance(call, list) and len(call) == 1:
        call = call[0]
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
        return None
    return {"name": call["name"], "arguments": call.get("arguments", call.get("parameters", {}))}


def served_calls(client, model: str, row: dict, max_tokens: int) -> list[dict]:
    """The tool calls the server returns for the prompt with its tools and the API's default
    ``tool_choice`` (auto): what its tool parser made of the answer."""
    r = client.chat.completions.create(
        model=model,
        messages=openai_messages(row["prompt"]),
        tools=row["tools"],
        max_tokens=max_tokens,
        temperature=0,
    )
    calls = []
    for c in r.choices[0].message.tool_calls or []:
        try:
            arguments = json.loads(c.function.arguments)
        except ValueError:  # a parser that passed on text it could not read
            arguments = c.function.arguments
        calls.append({"name": c.function.name, "arguments": arguments})
    return calls


def verdict(result: dict, limits: ParityConfig) -> list[str]:
    """Why the served bundle is not the evaluated model; empty when it is."""
    failures, n = [], result["prompts"]
    if result["template_match"] < limits.min_template_match:
        bad = next(i for i in result["items"] if not i["template_match"])
        failures.append(
            f"template parity {result['template_match']:.0%} < {limits.min_template_match:.0%}: the server "
            f"renders prompts differently from training (first at token {bad['template_diff']['index']}: "
            f"trained {bad['template_diff']['trained']}, served {bad['template_diff']['served']})"
        )
    if result["agreement"] < limits.min_agreement:
        failures.append(
            f"generation parity {round(result['agreement'] * n)}/{n} ({result['agreement']:.1%}) < "
            f"{limits.min_agreement:.1%}: greedy answers differ from the evaluated model's"
        )
    if result["stop_mismatches"] > limits.max_stop_mismatches:
        failures.append(
            f"stop parity: {result['stop_mismatches']}/{n} answers ran to max_tokens where the evaluated "
            "model stopped (does the EOS cover the end-of-turn token?)"
        )
    missed = result["tool_calls"] - result["tool_calls_parsed"]
    if missed > limits.max_tool_call_mismatches:
        bad = next(i for i in result["items"] if i.get("tool_call_ok") is False)
        failures.append(
            f"tool-call parity: {missed}/{result['tool_calls']} evaluated tool calls did not come back as "
            f"that call in tool_calls (first: {bad['tool_call']['evaluated']} came back as "
            f"{bad['tool_call']['served']}); does the bundle's --tool-call-parser read this template's calls?"
        )
    return failures


def parity_markdown(result: dict, failures: list[str], started_s: float) -> str:
    lines = [
        "# Train/serve parity (vLLM)",
        "",
        f"**{'FAILED' if failures else 'PASSED'}** on {result['prompts']} prompts: template "
        f"{result['template_match']:.0%}, answers agree {result['agreement']:.0%}, finish reasons "
        f"{result['finish_reasons']}, stop mismatches {result['stop_mismatches']}, tool calls parsed "
        f"{result['tool_calls_parsed']}/{result['tool_calls']}; server healthy after "
        f"{started_s:.0f}s, checks {result['seconds']:.0f}s.",
        "",
        *[f"- {f}" for f in failures],
        "",
        "| prompt | template | agrees | finish | first divergence | served | evaluated |",
        "|---|---|---|---|---|---|---|",
    ]
    cell = lambda s: repr(s)[:100].replace("|", "\\|")
    differing = [
        i
        for i in result["items"]
        if not (i["template_match"] and i["agrees"] and i["stop_ok"] and i.get("tool_call_ok", True))
    ]
    for i in differing:
        d = i.get("divergence")
        where = f"token {d['index']}: {d['served_token']!r} vs {d['evaluated_token']!r}" if d else ""
        lines.append(
            f"| {cell(i['prompt'])} | {'ok' if i['template_match'] else 'DIFF'} | {i['agrees']} | "
            f"{i['finish_reason']} | {cell(where)} | {cell(i['served'])} | {cell(i['evaluated'])} |"
        )
    if not differing:
        lines.append("| (every prompt matched) | | | | | | |")
    return "\n".join(lines) + "\n"
