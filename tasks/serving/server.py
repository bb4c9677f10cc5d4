"""vLLM pre-flight checks, a server started without waiting for it, the OpenAI-compatible smoke
test and LoRA hot swap.

The checks catch what otherwise fails at serving time: an architecture vLLM has no
implementation for, a LoRA rank above ``--max-lora-rank``, adapter features vLLM's LoRA
path does not load, a missing chat template, and a generation config whose EOS does not
include the template's end-of-turn token (the "never stops generating" failure).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.config import ServeConfig
from tasks.core.errors import InputError, StageFailed, StageTimeout
from tasks.core.files import read_jsonl, write_json
from tasks.data.messages import openai_messages
from tasks.data.templating import end_of_turn_id

# vLLM's model registry, for when vLLM itself is not installed (it lives in its own image).
VLLM_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "PhiForCausalLM",
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "FalconForCausalLM",
    "StableLmForCausalLM",
    "Starcoder2ForCausalLM",
    "OlmoForCausalLM",
    "Olmo2ForCausalLM",
    "GraniteForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "InternLM2ForCausalLM",
    "BaichuanForCausalLM",
    "CohereForCausalLM",
    "ExaoneForCausalLM",
    "GPTBigCodeForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
}


def supported_architectures() -> set[str]:
    try:
        from vllm import ModelRegistry

        return set(ModelRegistry.get_supported_archs())
    except ImportError:
        return VLLM_ARCHITECTURES


def preflight(
    bundle: Path, model_dir: Path, template: str, max_lora_rank: int, adapter_dir: Path | None = None
) -> tuple[list[str], list[str]]:
    """Refuse (ValueError) what vLLM cannot serve; fix in the bundle what can be fixed.

    Returns notes saying what was fixed and extra vLLM server arguments. Nothing outside
    the bundle is modified: in adapter mode the base stays as it is and the fixes travel
    as ``--chat-template`` / ``--generation-config`` pointing into the bundle.
    """
    from transformers import AutoTokenizer

    notes: list[str] = []
    extra: list[str] = []
    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or []
    supported = supported_architectures()
    if not any(a in supported for a in archs):
        raise InputError(
            f"{model_dir}/config.json: architectures {archs} are not served by vLLM "
            f"(known: {', '.join(sorted(supported)[:8])}, ...)"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if adapter_dir is not None:
        adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
        if int(adapter.get("r", 0)) > max_lora_rank:
            raise InputError(
                f"adapter rank r={adapter['r']} exceeds serve.max_lora_rank={max_lora_rank} "
                "(vLLM's --max-lora-rank)"
            )
        if adapter.get("modules_to_save"):
            raise InputError(
                f"the adapter has modules_to_save {adapter['modules_to_save']}, which vLLM's LoRA "
                "loader does not serve: use serve.mode merged"
            )
        if (adapter_dir / "tokenizer_config.json").is_file():
            added = len(AutoTokenizer.from_pretrained(adapter_dir)) - len(tokenizer)
            if added > 0:
                raise InputError(
                    f"the adapter's tokenizer adds {added} token(s) to the base's: added tokens "
                    "need serve.mode merged"
                )
    (bundle / "chat_template.jinja").write_text(template, encoding="utf-8")
    if (tokenizer.chat_template or "").strip() != template.strip():
        extra += ["--chat-template", "chat_template.jinja"]
        notes.append(
            "the model's tokenizer has no (or another) chat template: vLLM is given the one training used"
        )
    eot_id = end_of_turn_id(tokenizer, template)
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if eot_id is not None and eot_id not in eos_ids:
        gen["eos_token_id"] = eos_ids + [eot_id]
        # merged: the bundle's own copy, replaced, since it may be a hard link to the merge output
        if adapter_dir is None:
            target = gen_path
        else:
            target, extra = bundle / "generation_config.json", extra + ["--generation-config", "."]
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(gen, indent=2) + "\n")
        os.replace(tmp, target)
        notes.append(
            f"generation_config.json: eos_token_id {eos_ids} did not include the end-of-turn token "
            f"{tokenizer.convert_ids_to_tokens(eot_id)!r} ({eot_id}); now it does, so generation stops after an answer"
        )
    return notes, extra


# ---------------------------------------------------------------- a running server


def wait_healthy(
    base_url: str, timeout_s: float, proc: subprocess.Popen | None = None, api_key: str | None = None
) -> float:
    """Poll ``/v1/models`` (with ``api_key`` as the bearer token) until it answers; fail early if
    the server process exits."""
    t0 = time.monotonic()
    url = base_url.rstrip("/") + "/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    last = ""
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise StageFailed(f"the serving process exited with code {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = str(e)
        time.sleep(1)
    raise StageTimeout(
        f"{url} did not answer within {timeout_s:.0f}s (serve.health_timeout_s; last error: {last})"
    )


@dataclasses.dataclass
class Server:
    """A server started in its own process group on a free port of 127.0.0.1. Starting does not
    wait: the caller does other work (evaluate scores the models) while it loads and compiles, and
    a thread notes when it first answers. With ``api_key`` (vLLM's VLLM_API_KEY in its env) every
    request, the health check's too, carries it. Plain data: the process lives in ``_STARTED``."""

    pid: int
    url: str  # the OpenAI base URL, http://127.0.0.1:<port>/v1
    log_path: Path
    api_key: str | None = None
    started_at: float = dataclasses.field(default_factory=time.time)

    @classmethod
    def start(
        cls, argv: list[str], cwd: Path, env: dict, log_path: Path, timeout_s: float, log=print, api_key=None
    ) -> Server:
        """Start it; it has ``timeout_s`` to answer, or ``wait`` stops it and fails."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [*argv, "--host", "127.0.0.1", "--port", str(port)]
        log(f"serve: starting {shlex.join(argv)} (log: {log_path})")
        with log_path.open("w") as out:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = cls(proc.pid, f"http://127.0.0.1:{port}/v1", log_path, api_key)
        health: dict = {}

        def watch() -> None:
            try:
                wait_healthy(server.url, timeout_s, proc, api_key)
                health["at"] = time.time()
            except Exception as e:
                health["error"] = e

        watcher = threading.Thread(target=watch, name=f"health of {proc.pid}", daemon=True)
        _STARTED[proc.pid] = (proc, watcher, health)
        watcher.start()
        return server

    def wait(self, log=print) -> float:
        """Block until it answers; how long it took to start (it may have answered long before
        this call). A server that died or never answered is stopped, with its log's tail in the error."""
        _, watcher, health = _STARTED[self.pid]
        watcher.join()
        if "error" in health:
            self.stop()
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
            raise StageFailed(f"{health['error']}; the server's log ({self.log_path}) ends with:\n{tail}")
        started = health["at"] - self.started_at
        log(f"serve: healthy {started:.1f}s after it started")
        return started

    def alive(self) -> bool:
        """Started by this process and still running (a server stopped once is not restarted)."""
        return self.pid in _STARTED and _STARTED[self.pid][0].poll() is None

    def stop(self) -> None:
        if (started := _STARTED.pop(self.pid, None)) is not None:
            stop(started[0])


# the servers this process started, by pid, each with its health watcher and what it found:
# stopping one waits for it, so no zombie is left behind
_STARTED: dict[int, tuple[subprocess.Popen, threading.Thread, dict]] = {}


def stop(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop a server and every process of its group (vLLM's engine, workers and resource tracker)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + grace_s
    while True:  # helpers may outlive the main process by a moment while they clean up
        try:
            os.killpg(proc.pid, signal.SIGKILL if time.monotonic() > deadline else 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def smoke_test(
    base_url: str, model: str, prompts: list[list[dict]], max_tokens: int, api_key: str = "EMPTY"
) -> dict:
    """``/v1/models`` plus one chat completion per prompt; every answer must be non-empty and
    end because the model stopped (finish_reason "stop"), not because it ran out of tokens."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, timeout=300, max_retries=1)
    models = [m.id for m in client.models.list().data]
    # vLLM lists exactly its --served-model-name (and LoRA names); a mismatch would only surface
    # as a 404 per request. (transformers serve lists hub-cached models only, often none.)
    if models and model not in models:
        return {
            "endpoint": base_url,
            "models": models,
            "answers": [],
            "passed": False,
            "failures": [f"the endpoint serves {models}, not {model!r} (check serve.served_model_name)"],
        }
    answers, failures = [], []
    for messages in prompts:
        t0 = time.monotonic()
        r = client.chat.completions.create(
            model=model, messages=openai_messages(messages), max_tokens=max_tokens, temperature=0
        )
        choice = r.choices[0]
        text = choice.message.content or ""
        answers.append(
            {
                "prompt": messages[-1]["content"][:200],
                "answer": text[:500],
                "finish_reason": choice.finish_reason,
                "seconds": round(time.monotonic() - t0, 2),
            }
        )
        if not text.strip():
            failures.append(f"empty answer to {messages[-1]['content'][:60]!r}")
        elif choice.finish_reason != "stop":
            failures.append(
                f"finish_reason {choice.finish_reason!r} (not 'stop') for "
                f"{messages[-1]['content'][:60]!r}: the model did not end its turn within {max_tokens} tokens"
            )
    return {
        "endpoint": base_url,
        "models": models,
        "answers": answers,
        "passed": not failures,
        "failures": failures,
    }


def smoke_check(s: ServeConfig, served_name: str, eval_records: Path, out: Path, log) -> dict:
    """The OpenAI-compatible smoke test on a running ``serve.endpoint`` (the production server,
    say), with the first eval prompts; writes ``out/smoke.json`` and raises when it fails."""
    prompts = [r["messages"] for r in read_jsonl(eval_records, s.smoke_prompts)]
    api_key = os.environ.get(s.api_key_env, "EMPTY")
    wait_healthy(s.endpoint, 30, api_key=api_key)
    result = smoke_test(s.endpoint, served_name, prompts, s.max_tokens, api_key)
    write_json(out / "smoke.json", result)
    for a in result["answers"]:
        log(
            f"smoke: {a['prompt'][:60]!r} -> {a['answer'][:80]!r} (finish_reason {a['finish_reason']}, {a['seconds']}s)"
        )
    if not result["passed"]:
        raise StageFailed(f"smoke test on {s.endpoint} failed: " + "; ".join(result["failures"]))
    return result


def hot_swap(base_url: str, lora_name: str, lora_path: str, api_key: str = "EMPTY") -> None:
    """Load a new adapter into a running vLLM (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True there)."""
    root = base_url.rstrip("/")
    for path, body in (
        ("/unload_lora_adapter", {"lora_name": lora_name}),
        ("/load_lora_adapter", {"lora_name": lora_name, "lora_path": lora_path}),
    ):
        req = urllib.request.Request(
            root + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
        )
        try:
            urllib.request.urlopen(req, timeout=60).read()
        except urllib.error.HTTPError as e:
            if path == "/unload_lora_adapter" and e.code in (400, 404):
                continue  # nothing loaded under that name yet
            raise StageFailed(f"vLLM refused {path}: {e.code} {e.read()[:300]!r}") from None


def smoke_markdown(endpoint: str, result: dict) -> str:
    rows = "\n".join(
        f"| {a['prompt'][:80]!r} | {a['answer'][:120]!r} | {a['finish_reason']} | {a['seconds']} |"
        for a in result["answers"]
    )
    return f"# Smoke test: {endpoint}\n\n| prompt | answer | finish | s |\n|---|---|---|---|\n{rows}\n"
