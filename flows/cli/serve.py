"""`sftflow serve NAME@ALIAS` and `sftflow serve-command NAME@ALIAS`: a registry version served by vLLM."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from tasks.core.errors import InputError
from tasks.core.files import read_json
from tasks.core.tracking import redact
from tasks.registry.versions import alias_version, download_bundle
from tasks.serving.bundle import check_serve_info
from tasks.serving.venv import server_env, vllm_python


def registry_bundle(args) -> tuple[Path, dict]:
    """``models:/NAME@ALIAS``'s bundle folder (downloaded when not local) and its serve.json."""
    name, _, alias = args.ref.removeprefix("models:/").partition("@")
    if not alias:
        raise InputError(f"{args.ref!r}: expected NAME@ALIAS, e.g. tiny@champion")
    mv = alias_version(args.mlflow_uri, name, alias)
    if mv is None:
        raise InputError(f"{redact(args.mlflow_uri)} has no version {name}@{alias}")
    local = mv.tags.get("sftflow.bundle")
    if args.download or not (local and Path(local).is_dir()):
        dst = Path(args.download or f"bundles/{name}-v{mv.version}")
        local = str(download_bundle(args.mlflow_uri, name, alias, dst))
    print(f"# models:/{name}@{alias} = version {mv.version} (run {mv.tags.get('sftflow.run_id', '?')})")
    info = read_json(Path(local) / "serve.json")
    check_serve_info(info, f"models:/{name}/{mv.version}")
    return Path(local).resolve(), info


def serve_command(args, cfg) -> int:
    """Print the vLLM server line of models:/NAME@ALIAS, with the bundle downloaded (or found) locally."""
    bundle, info = registry_bundle(args)
    env = "".join(f"{k}={v} " for k, v in info["env"].items())
    print(f"cd {shlex.quote(str(bundle))} && {env}{shlex.join(info['argv'])}")
    return 0


def serve(args, cfg) -> int:
    """models:/NAME@ALIAS served by vLLM (its own venv, built on first use) until interrupted."""
    bundle, info = registry_bundle(args)
    python = str(vllm_python())
    argv = [python, *info["argv"][1:], "--host", args.host, "--port", str(args.port)]
    url = f"http://{args.host}:{args.port}/v1"
    body = json.dumps(
        {"model": info["served_model_name"], "messages": [{"role": "user", "content": "Hello!"}]}
    )
    print(f"# serving {bundle} at {url} (vLLM log below; Ctrl-C stops it)")
    print(
        f"curl {url}/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}", flush=True
    )
    os.chdir(bundle)
    os.execve(python, argv, server_env(info["env"]))
