"""Handoff stage: a vLLM-ready serving bundle, registered in the MLflow Model Registry.

``<run>/handoff/bundle/`` holds the model folder (or the adapter, in adapter mode),
``serve.json`` with the exact ``vllm serve`` argv, ``serve.sh``, and an ``MLmodel`` file so
the registry can track it. The version gets ``candidate``; ``champion`` moves to it only
when the evaluate gate passed.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml

from prefect import task

from tasks.config import PipelineConfig
from tasks.models import resolve_model
from tasks.registry import promote, register_bundle, version_for_run
from tasks.fingerprint import pipeline_fingerprint
from tasks.rundir import Manifest, atomic_dir, code_version, copy_tree, fault, start_stage, load_manifest, stage_dir, write_json
from tasks.serving import hot_swap, launch, preflight, smoke_test, stop, wait_healthy
from tasks.stage import prefect_markdown, tracked_stage

VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"


@dataclass
class HandoffResult:
    run_id: str
    bundle: str
    registered_model: str
    version: str
    aliases: list[str]
    serve_command: str


def serve_argv(cfg: PipelineConfig, model_ref: str, adapter_ref: str | None = None) -> list[str]:
    argv = ["vllm", "serve", model_ref, "--served-model-name", cfg.served_model_name,
            "--max-model-len", str(cfg.data.max_seq_len), "--dtype", cfg.serve.dtype]
    if adapter_ref:
        argv += ["--enable-lora", "--lora-modules", f"{cfg.served_model_name}={adapter_ref}",
                 "--max-lora-rank", str(cfg.serve.max_lora_rank)]
    return argv


def compose_snippet(cfg: PipelineConfig, argv: list[str]) -> dict:
    """A docker compose service for this bundle on the official vLLM image (docker/compose.yaml has the stack)."""
    return {"services": {f"vllm-{cfg.served_model_name}": {
        "image": VLLM_IMAGE, "command": argv[2:], "working_dir": "/bundle", "ports": ["8000:8000"],
        "volumes": ["./:/bundle:ro"], "ipc": "host",
        "deploy": {"resources": {"reservations": {"devices": [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}},
    }}}


def build_bundle(cfg: PipelineConfig, run_id: str, folder: Path) -> dict:
    """The bundle folder, checked by the vLLM pre-flight (which may fix it, with notes)."""
    merged = load_manifest(cfg.output_dir, run_id, "merge")
    template = Path(load_manifest(cfg.output_dir, run_id, "format")["outputs"]["chat_template"]).read_text()
    if cfg.serve.mode == "merged":
        copy_tree(Path(merged["outputs"]["model"]), folder / "model")
        notes, extra = preflight(folder, folder / "model", template, cfg.serve.max_lora_rank)
        argv = serve_argv(cfg, "model") + extra
    else:
        trained = load_manifest(cfg.output_dir, run_id, "train")
        copy_tree(Path(trained["outputs"]["model"]), folder / "adapter")
        base = resolve_model(cfg.model.name_or_path)
        notes, extra = preflight(folder, base, template, cfg.serve.max_lora_rank, adapter_dir=folder / "adapter")
        argv = serve_argv(cfg, str(base), "adapter") + extra
    info = {"served_model_name": cfg.served_model_name, "mode": cfg.serve.mode, "run_id": run_id,
            "model": "model" if cfg.serve.mode == "merged" else argv[2], "argv": argv, "preflight_notes": notes,
            "note": "paths are relative to this bundle folder; serve.sh runs from anywhere"}
    write_json(folder / "serve.json", info)
    script = folder / "serve.sh"
    script.write_text("#!/usr/bin/env bash\n# Serve this bundle with vLLM (OpenAI-compatible API on :8000).\n"
                      'cd "$(dirname "$0")"\nexec ' + shlex.join(argv) + ' "$@"\n')
    script.chmod(0o755)
    (folder / "compose.yaml").write_text(yaml.safe_dump(compose_snippet(cfg, argv), sort_keys=False))
    from mlflow.models import Model

    mlmodel = Model(artifact_path="bundle", run_id=None)
    mlmodel.add_flavor("sftflow_vllm", serve="serve.json", mode=cfg.serve.mode,
                       model_dir="model" if cfg.serve.mode == "merged" else "adapter")
    mlmodel.save(str(folder / "MLmodel"))
    return info


def server_command(cfg: PipelineConfig, bundle: Path, argv: list[str]) -> list[str]:
    """serve.command with its placeholders filled in, or the bundle's vllm argv on the endpoint's port."""
    url = urlparse(cfg.serve.endpoint)
    host, port = url.hostname or "127.0.0.1", str(url.port or 8000)
    if cfg.serve.command:
        model = bundle / "model" if cfg.serve.mode == "merged" else Path(argv[2])
        fill = {"model": str(model), "host": host, "port": port, "served_model_name": cfg.served_model_name}
        return [part.format(**fill) for part in cfg.serve.command]
    return argv + ["--host", host, "--port", port]


def smoke(cfg: PipelineConfig, run_id: str, bundle: Path, argv: list[str], out: Path, log) -> dict:
    """The OpenAI-compatible smoke test on serve.endpoint, launching the server first if asked."""
    fmt = load_manifest(cfg.output_dir, run_id, "format")
    with open(fmt["outputs"]["eval_records"], encoding="utf-8") as f:
        prompts = [json.loads(line)["messages"] for line in f][: cfg.serve.smoke_prompts]
    proc = None
    if cfg.serve.launch:
        proc = launch(server_command(cfg, bundle, argv), bundle, cfg.serve.endpoint, cfg.serve.health_timeout_s,
                      out / "server.log", log)
    try:
        wait_healthy(cfg.serve.endpoint, 30 if proc is None else 5)
        result = smoke_test(cfg.serve.endpoint, cfg.served_model_name, prompts, cfg.serve.max_tokens,
                            os.environ.get(cfg.serve.api_key_env, "EMPTY"))
    finally:
        if proc is not None:
            stop(proc)
    write_json(out / "smoke.json", result)
    for a in result["answers"]:
        log(f"smoke: {a['prompt'][:60]!r} -> {a['answer'][:80]!r} (finish_reason {a['finish_reason']}, {a['seconds']}s)")
    if not result["passed"]:
        raise RuntimeError(f"smoke test on {cfg.serve.endpoint} failed: " + "; ".join(result["failures"]))
    return result


def run_handoff(cfg: PipelineConfig, run_id: str, stage_run=None, log=print) -> HandoffResult:
    fmt = load_manifest(cfg.output_dir, run_id, "format")
    evaluation = load_manifest(cfg.output_dir, run_id, "evaluate")
    out = stage_dir(cfg.output_dir, run_id, "handoff")
    man = Manifest("handoff", run_id, cfg.section_hash("serve", "tracking"))
    man.add_input("evaluate_manifest", out.parent / "evaluate" / "manifest.json")
    start_stage(out)
    with atomic_dir(out / "bundle") as tmp:
        info = build_bundle(cfg, run_id, tmp)
    bundle = out / "bundle"
    fault("handoff:bundle")
    man.notes += info["preflight_notes"]
    for note in info["preflight_notes"]:
        log(f"handoff: pre-flight fixed: {note}")
    log(f"handoff: bundle at {bundle}; serve with: {shlex.join(info['argv'])}")
    # a model that does not answer properly is never registered
    smoke_result = smoke(cfg, run_id, bundle, info["argv"], out, log) if cfg.serve.endpoint else None

    name, uri = cfg.registered_model, cfg.mlflow_uri
    mv = version_for_run(uri, name, run_id)
    if mv is None:
        if stage_run is None:
            raise RuntimeError("handoff needs an MLflow stage run to upload the bundle to")
        stage_run.artifact(bundle, "bundle")
        fault("handoff:upload")
        scores = evaluation["metrics"]["candidate"]
        tags = {"sftflow.run_id": run_id, "sftflow.config_hash": cfg.section_hash(),
                "sftflow.data_hash": fmt["outputs"]["data_hash"], "sftflow.git_sha": code_version(),
                "sftflow.fingerprint": pipeline_fingerprint(cfg, fmt["outputs"]["cache"]["key"]),
                "sftflow.promoted": evaluation["outputs"]["promote"],
                "sftflow.gate": evaluation["outputs"]["reason"][:4000],
                "sftflow.serve_argv": json.dumps(info["argv"]), "sftflow.bundle": str(bundle.resolve()),
                **{f"metric.{k}": f"{v:.6g}" for k, v in scores.items()}}
        mv = register_bundle(uri, name, stage_run.id, "bundle", tags)
        log(f"handoff: registered {name} version {mv.version}")
        fault("handoff:register")
    else:
        log(f"handoff: {name} version {mv.version} already holds run {run_id}; not registering again")
    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    client.set_registered_model_alias(name, "candidate", mv.version)
    aliases = ["candidate"]
    if evaluation["outputs"]["promote"]:
        promote(uri, name, mv.version)
        aliases.append("champion")
        log(f"handoff: {name}@champion -> version {mv.version}")
        if cfg.serve.hot_swap:
            hot_swap(cfg.serve.endpoint, cfg.served_model_name, str((bundle / "adapter").resolve()),
                     os.environ.get(cfg.serve.api_key_env, "EMPTY"))
            log(f"handoff: hot-swapped adapter {cfg.served_model_name} into {cfg.serve.endpoint}")
    else:
        log(f"handoff: not promoted ({evaluation['outputs']['reason']}); champion unchanged")
    man.outputs = {"bundle": str(bundle), "serve_json": str(bundle / "serve.json"), "registered_model": name,
                   "version": str(mv.version), "aliases": aliases, "model_uri": f"models:/{name}/{mv.version}",
                   "smoke": str(out / "smoke.json") if smoke_result else None}
    man.metrics = {"smoke_passed": int(smoke_result["passed"])} if smoke_result else {}
    man.finish(out)
    return HandoffResult(run_id, str(bundle), name, str(mv.version), aliases,
                         f"cd {bundle} && ./serve.sh")


@task(name="handoff", retries=2, retry_delay_seconds=10)
def handoff_task(cfg: PipelineConfig, run_id: str) -> HandoffResult:
    with tracked_stage(cfg, run_id, "handoff", "serve") as st:
        result = run_handoff(cfg, run_id, stage_run=st.run, log=st.log)
        st.run.tags({"sftflow.version": result.version, "sftflow.serve_command": result.serve_command})
        if (smoke_file := st.dir / "smoke.json").is_file():
            st.run.artifact(smoke_file)
            rows = "\n".join(f"| {a['prompt'][:80]!r} | {a['answer'][:120]!r} | {a['finish_reason']} | {a['seconds']} |"
                             for a in json.loads(smoke_file.read_text())["answers"])
            prefect_markdown(f"smoke-{cfg.run_name}", f"# Smoke test: {cfg.serve.endpoint}\n\n| prompt | answer | "
                             f"finish | s |\n|---|---|---|---|\n{rows}\n", "OpenAI-compatible smoke test")
    return result
