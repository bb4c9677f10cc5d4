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
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from tasks.config import PipelineConfig
from tasks.models import resolve_model
from tasks.registry import promote, register_bundle, version_for_run
from tasks.rundir import Manifest, atomic_dir, code_version, load_manifest, stage_dir, write_json
from tasks.stage import tracked_stage


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


def _copy_tree(src: Path, dst: Path) -> None:
    """Hard links where the filesystem allows (no second copy of the weights), copies otherwise."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link)


def build_bundle(cfg: PipelineConfig, run_id: str, folder: Path) -> dict:
    merged = load_manifest(cfg.output_dir, run_id, "merge")
    if cfg.serve.mode == "merged":
        _copy_tree(Path(merged["outputs"]["model"]), folder / "model")
        argv = serve_argv(cfg, "model")
    else:
        trained = load_manifest(cfg.output_dir, run_id, "train")
        _copy_tree(Path(trained["outputs"]["model"]), folder / "adapter")
        base = str(resolve_model(cfg.model.name_or_path))
        argv = serve_argv(cfg, base, "adapter")
    info = {"served_model_name": cfg.served_model_name, "mode": cfg.serve.mode, "run_id": run_id,
            "model": "model" if cfg.serve.mode == "merged" else argv[2], "argv": argv,
            "note": "paths are relative to this bundle folder; run serve.sh from anywhere"}
    write_json(folder / "serve.json", info)
    script = folder / "serve.sh"
    script.write_text("#!/usr/bin/env bash\n# Serve this bundle with vLLM (OpenAI-compatible API on :8000).\n"
                      'cd "$(dirname "$0")"\nexec ' + shlex.join(argv) + ' "$@"\n')
    script.chmod(0o755)
    from mlflow.models import Model

    mlmodel = Model(artifact_path="bundle", run_id=None)
    mlmodel.add_flavor("sftflow_vllm", serve="serve.json", mode=cfg.serve.mode,
                       model_dir="model" if cfg.serve.mode == "merged" else "adapter")
    mlmodel.save(str(folder / "MLmodel"))
    return info


def run_handoff(cfg: PipelineConfig, run_id: str, stage_run=None, log=print) -> HandoffResult:
    fmt = load_manifest(cfg.output_dir, run_id, "format")
    evaluation = load_manifest(cfg.output_dir, run_id, "evaluate")
    out = stage_dir(cfg.output_dir, run_id, "handoff")
    man = Manifest("handoff", run_id, cfg.section_hash("serve", "tracking"))
    man.add_input("evaluate_manifest", out.parent / "evaluate" / "manifest.json")
    with atomic_dir(out / "bundle") as tmp:
        info = build_bundle(cfg, run_id, tmp)
    bundle = out / "bundle"
    log(f"handoff: bundle at {bundle}; serve with: {shlex.join(info['argv'])}")

    name, uri = cfg.registered_model, cfg.mlflow_uri
    mv = version_for_run(uri, name, run_id)
    if mv is None:
        if stage_run is None:
            raise RuntimeError("handoff needs an MLflow stage run to upload the bundle to")
        stage_run.artifact(bundle, "bundle")
        scores = evaluation["metrics"]["candidate"]
        tags = {"sftflow.run_id": run_id, "sftflow.config_hash": cfg.section_hash(),
                "sftflow.data_hash": fmt["outputs"]["data_hash"], "sftflow.git_sha": code_version(),
                "sftflow.promoted": evaluation["outputs"]["promote"],
                "sftflow.gate": evaluation["outputs"]["reason"][:4000],
                "sftflow.serve_argv": json.dumps(info["argv"]),
                **{f"metric.{k}": f"{v:.6g}" for k, v in scores.items()}}
        mv = register_bundle(uri, name, stage_run.id, "bundle", tags)
        log(f"handoff: registered {name} version {mv.version}")
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
    else:
        log(f"handoff: not promoted ({evaluation['outputs']['reason']}); champion unchanged")
    man.outputs = {"bundle": str(bundle), "serve_json": str(bundle / "serve.json"), "registered_model": name,
                   "version": str(mv.version), "aliases": aliases, "model_uri": f"models:/{name}/{mv.version}"}
    man.finish(out)
    return HandoffResult(run_id, str(bundle), name, str(mv.version), aliases,
                         f"cd {bundle} && ./serve.sh")


@task(name="handoff", retries=2, retry_delay_seconds=10)
def handoff_task(cfg: PipelineConfig, run_id: str) -> HandoffResult:
    with tracked_stage(cfg, run_id, "handoff", "serve") as st:
        result = run_handoff(cfg, run_id, stage_run=st.run, log=st.log)
        st.run.tags({"sftflow.version": result.version, "sftflow.serve_command": result.serve_command})
    return result
