"""Handoff stage: a vLLM-ready serving bundle, registered in the MLflow Model Registry.

Reads the merged model (or, in adapter mode, the trained adapter and the base), the training
chat template, the eval prompts and the gate's decision; writes ``<run>/handoff/bundle/`` and
``smoke.json``, and registers the bundle as a new version of ``tracking.registered_model``.

``<run>/handoff/bundle/`` holds the model folder (or the adapter, in adapter mode),
``serve.json`` with the exact ``vllm serve`` argv, ``serve.sh``, and an ``MLmodel`` file so
the registry can track it. The version gets ``candidate``; ``champion`` moves to it only
when the evaluate gate passed.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from urllib.parse import urlparse

import yaml
from prefect import task

from tasks.config import PipelineConfig
from tasks.faults import fault
from tasks.files import atomic_dir, copy_tree, read_jsonl, write_json
from tasks.fingerprint import pipeline_fingerprint
from tasks.hashing import code_version
from tasks.models import resolve_model
from tasks.registry import promote, register_bundle, set_alias, version_for_run
from tasks.results import EvalResult, FormatResult, HandoffResult, MergeResult, TrainResult
from tasks.serving import hot_swap, launch, preflight, smoke_test, stop, wait_healthy
from tasks.stage import Stage, open_stage, prefect_markdown

SECTIONS = ("serve", "tracking")
VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"


def serve_argv(cfg: PipelineConfig, model_ref: str, adapter_ref: str | None = None) -> list[str]:
    argv = [
        "vllm",
        "serve",
        model_ref,
        "--served-model-name",
        cfg.served_model_name,
        "--max-model-len",
        str(cfg.data.max_seq_len),
        "--dtype",
        cfg.serve.dtype,
    ]
    if adapter_ref:
        argv += [
            "--enable-lora",
            "--lora-modules",
            f"{cfg.served_model_name}={adapter_ref}",
            "--max-lora-rank",
            str(cfg.serve.max_lora_rank),
        ]
    return argv


def compose_snippet(cfg: PipelineConfig, argv: list[str]) -> dict:
    """A docker compose service for this bundle on the official vLLM image (docker/compose.yaml has the stack)."""
    return {
        "services": {
            f"vllm-{cfg.served_model_name}": {
                "image": VLLM_IMAGE,
                "command": argv[2:],
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


def build_bundle(
    cfg: PipelineConfig, run_id: str, folder: Path, template: str, merged: MergeResult, trained: TrainResult
) -> dict:
    """The bundle folder, checked by the vLLM pre-flight (which may fix it, with notes)."""
    if cfg.serve.mode == "merged":
        copy_tree(Path(merged.model_path), folder / "model")
        notes, extra = preflight(folder, folder / "model", template, cfg.serve.max_lora_rank)
        argv = serve_argv(cfg, "model") + extra
    else:
        copy_tree(Path(trained.output), folder / "adapter")
        base = resolve_model(cfg.model.name_or_path)
        notes, extra = preflight(
            folder, base, template, cfg.serve.max_lora_rank, adapter_dir=folder / "adapter"
        )
        argv = serve_argv(cfg, str(base), "adapter") + extra
    info = {
        "served_model_name": cfg.served_model_name,
        "mode": cfg.serve.mode,
        "run_id": run_id,
        "model": "model" if cfg.serve.mode == "merged" else argv[2],
        "argv": argv,
        "preflight_notes": notes,
        "note": "paths are relative to this bundle folder; serve.sh runs from anywhere",
    }
    write_json(folder / "serve.json", info)
    script = folder / "serve.sh"
    script.write_text(
        "#!/usr/bin/env bash\n# Serve this bundle with vLLM (OpenAI-compatible API on :8000).\n"
        'cd "$(dirname "$0")"\nexec ' + shlex.join(argv) + ' "$@"\n'
    )
    script.chmod(0o755)
    (folder / "compose.yaml").write_text(yaml.safe_dump(compose_snippet(cfg, argv), sort_keys=False))
    from mlflow.models import Model

    mlmodel = Model(artifact_path="bundle", run_id=None)
    mlmodel.add_flavor(
        "sftflow_vllm",
        serve="serve.json",
        mode=cfg.serve.mode,
        model_dir="model" if cfg.serve.mode == "merged" else "adapter",
    )
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


def smoke(cfg: PipelineConfig, eval_records: Path, bundle: Path, argv: list[str], out: Path, log) -> dict:
    """The OpenAI-compatible smoke test on serve.endpoint, launching the server first if asked."""
    prompts = [r["messages"] for r in read_jsonl(eval_records, cfg.serve.smoke_prompts)]
    proc = None
    if cfg.serve.launch:
        proc = launch(
            server_command(cfg, bundle, argv),
            bundle,
            cfg.serve.endpoint,
            cfg.serve.health_timeout_s,
            out / "server.log",
            log,
        )
    try:
        wait_healthy(cfg.serve.endpoint, 30 if proc is None else 5)
        result = smoke_test(
            cfg.serve.endpoint,
            cfg.served_model_name,
            prompts,
            cfg.serve.max_tokens,
            os.environ.get(cfg.serve.api_key_env, "EMPTY"),
        )
    finally:
        if proc is not None:
            stop(proc)
    write_json(out / "smoke.json", result)
    for a in result["answers"]:
        log(
            f"smoke: {a['prompt'][:60]!r} -> {a['answer'][:80]!r} (finish_reason {a['finish_reason']}, {a['seconds']}s)"
        )
    if not result["passed"]:
        raise RuntimeError(f"smoke test on {cfg.serve.endpoint} failed: " + "; ".join(result["failures"]))
    return result


def register(
    cfg: PipelineConfig,
    run_id: str,
    stage: Stage,
    bundle: Path,
    info: dict,
    data: FormatResult,
    scores: EvalResult,
):
    """One registry version per pipeline run: a retried handoff finds the one it made."""
    name, uri = cfg.registered_model, cfg.mlflow_uri
    mv = version_for_run(uri, name, run_id)
    if mv is not None:
        stage.log(f"handoff: {name} version {mv.version} already holds run {run_id}; not registering again")
        return mv
    if stage.run is None:
        raise RuntimeError("handoff needs an MLflow stage run to upload the bundle to")
    stage.run.artifact(bundle, "bundle")
    fault("handoff:upload")
    tags = {
        "sftflow.run_id": run_id,
        "sftflow.config_hash": cfg.section_hash(),
        "sftflow.data_hash": data.data_hash,
        "sftflow.git_sha": code_version(),
        "sftflow.fingerprint": pipeline_fingerprint(cfg, data.cache_key),
        "sftflow.promoted": scores.gate_passed,
        "sftflow.gate": scores.reason[:4000],
        "sftflow.serve_argv": json.dumps(info["argv"]),
        "sftflow.bundle": str(bundle.resolve()),
        **{f"metric.{k}": f"{v:.6g}" for k, v in scores.scores["candidate"].items()},
    }
    mv = register_bundle(uri, name, stage.run.id, "bundle", tags)
    stage.log(f"handoff: registered {name} version {mv.version}")
    fault("handoff:register")
    return mv


def run_handoff(
    cfg: PipelineConfig,
    run_id: str,
    data: FormatResult,
    trained: TrainResult,
    merged: MergeResult,
    scores: EvalResult,
    log=None,
    track: bool = False,
) -> HandoffResult:
    """Reads the merged model (or adapter), ``data``'s template and prompts and the gate's decision;
    writes ``<run>/handoff/bundle`` and registers it: ``candidate`` always, ``champion`` if the gate passed."""
    with open_stage(cfg, run_id, "handoff", SECTIONS, log, track) as stage:
        out, bundle = stage.dir, stage.dir / "bundle"
        stage.manifest.add_input("evaluate_manifest", stage.dir.parent / "evaluate" / "manifest.json")
        with atomic_dir(bundle) as tmp:
            info = build_bundle(cfg, run_id, tmp, data.template(), merged, trained)
        fault("handoff:bundle")
        stage.manifest.notes += info["preflight_notes"]
        for note in info["preflight_notes"]:
            stage.log(f"handoff: pre-flight fixed: {note}")
        stage.log(f"handoff: bundle at {bundle}; serve with: {shlex.join(info['argv'])}")
        # a model that does not answer properly is never registered
        smoke_result = (
            smoke(cfg, Path(data.eval_records), bundle, info["argv"], out, stage.log)
            if cfg.serve.endpoint
            else None
        )
        mv = register(cfg, run_id, stage, bundle, info, data, scores)
        name, uri = cfg.registered_model, cfg.mlflow_uri
        set_alias(uri, name, "candidate", mv.version)
        aliases = ["candidate"]
        if scores.gate_passed:
            promote(uri, name, mv.version)
            aliases.append("champion")
            stage.log(f"handoff: {name}@champion -> version {mv.version}")
            if cfg.serve.hot_swap:
                hot_swap(
                    cfg.serve.endpoint,
                    cfg.served_model_name,
                    str((bundle / "adapter").resolve()),
                    os.environ.get(cfg.serve.api_key_env, "EMPTY"),
                )
                stage.log(f"handoff: hot-swapped adapter {cfg.served_model_name} into {cfg.serve.endpoint}")
        else:
            stage.log(f"handoff: not promoted ({scores.reason}); champion unchanged")
        stage.manifest.outputs = {
            "bundle": str(bundle),
            "serve_json": str(bundle / "serve.json"),
            "registered_model": name,
            "version": str(mv.version),
            "aliases": aliases,
            "model_uri": f"models:/{name}/{mv.version}",
            "smoke": str(out / "smoke.json") if smoke_result else None,
        }
        stage.manifest.metrics = {"smoke_passed": int(smoke_result["passed"])} if smoke_result else {}
        serve_script = f"cd {shlex.quote(str(bundle))} && ./serve.sh"
        stage.tags({"sftflow.version": mv.version, "sftflow.serve_script": serve_script})
        if smoke_result:
            stage.artifact(out / "smoke.json")
            prefect_markdown(
                f"smoke-{cfg.run_name}",
                smoke_markdown(cfg.serve.endpoint, smoke_result),
                "OpenAI-compatible smoke test",
            )
        return stage.finish(HandoffResult(run_id, str(bundle), name, str(mv.version), aliases, serve_script))


def smoke_markdown(endpoint: str, result: dict) -> str:
    rows = "\n".join(
        f"| {a['prompt'][:80]!r} | {a['answer'][:120]!r} | {a['finish_reason']} | {a['seconds']} |"
        for a in result["answers"]
    )
    return f"# Smoke test: {endpoint}\n\n| prompt | answer | finish | s |\n|---|---|---|---|\n{rows}\n"


@task(name="handoff", retries=2, retry_delay_seconds=10)
def handoff_task(
    cfg: PipelineConfig,
    run_id: str,
    data: FormatResult,
    trained: TrainResult,
    merged: MergeResult,
    scores: EvalResult,
) -> HandoffResult:
    return run_handoff(cfg, run_id, data, trained, merged, scores, track=True)
