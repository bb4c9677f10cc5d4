"""Handoff stage: a vLLM serving bundle, served and checked, registered in the MLflow Model Registry.

Reads the merged model (or, in adapter mode, the trained adapter and the base), the training
chat template, the evaluate stage's answers and the gate's decision; writes ``<run>/handoff/``.

``<run>/handoff/bundle/`` holds the model folder (or the adapter, in adapter mode), ``serve.json``
with the exact vLLM argv and the chat template's name, hash and pinned date, ``serve.sh``, and an
``MLmodel`` file with the ``python_function`` flavor. Before registering, the parity gate serves
the bundle with the real vLLM, exactly as serve.json says, and compares it with the evaluated model
(``parity.json``/``parity.md``, ``vllm.log``); a bundle that fails is not registered. The version
gets ``candidate``; ``champion`` moves to it only when the evaluate gate passed.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from prefect import task

from tasks.config import SECTION_NAMES, PipelineConfig
from tasks.core.errors import StageFailed
from tasks.core.faults import fault
from tasks.core.files import atomic_dir, copy_tree, read_json, write_json
from tasks.core.hashing import code_version
from tasks.core.orchestration import GPU_TAG
from tasks.core.paths import stage_dir
from tasks.core.results import EvalResult, FormatResult, HandoffResult, MergeResult, TrainResult
from tasks.core.space import require_free, tree_bytes
from tasks.core.stage import Stage, open_stage, prefect_markdown, stage_logger
from tasks.core.tracking import StageRun
from tasks.models.loading import dtype_name, load_tokenizer, max_positions, resolve_model
from tasks.registry.fingerprint import pipeline_fingerprint
from tasks.registry.inputs import dataset_inputs
from tasks.registry.tags import (
    BASE_TAG,
    GATE_TAG,
    METHOD_TAG,
    NOT_PROMOTED_TAG,
    PROMOTED_TAG,
    SOURCES_TAG,
    WEIGHTS_TAG,
)
from tasks.registry.versions import (
    ChampionMoved,
    promote,
    register_bundle,
    set_alias,
    set_version_tag,
    version_for_run,
)
from tasks.serving.bundle import (
    serve_argv,
    served_length,
    template_label,
    template_record,
    tool_parser,
    write_launchers,
    write_mlmodel,
)
from tasks.serving.parity import ParityError, parity_gate, parity_table, start_server
from tasks.serving.server import Server, hot_swap, preflight, smoke_check, smoke_markdown
from tasks.serving.venv import has_cuda

SECTIONS = SECTION_NAMES  # the version is tagged with the fingerprint of every section


def build_bundle(
    cfg: PipelineConfig,
    run_id: str,
    folder: Path,
    data: FormatResult,
    merged: MergeResult,
    trained: TrainResult,
    dtype: str,
) -> dict:
    """The bundle folder, checked by the vLLM pre-flight (which may fix it, with notes)."""
    adapter, template, pins = cfg.serve.mode == "adapter", data.template(), data.template_kwargs
    if not adapter:
        copy_tree(Path(merged.model_path), folder / "model")
        notes, extra = preflight(folder, folder / "model", template, cfg.serve.max_lora_rank)
        model = "model"
    else:
        copy_tree(Path(trained.output), folder / "adapter")
        model = str(resolve_model(cfg.model.name_or_path))
        notes, extra = preflight(
            folder, Path(model), template, cfg.serve.max_lora_rank, adapter_dir=folder / "adapter"
        )
    length = served_length(cfg.data.max_seq_len, cfg.eval.max_new_tokens, max_positions(folder / model))
    parser = tool_parser(cfg.serve.tool_call_parser, cfg.data.template)
    ref = "adapter" if adapter else None
    argv = (
        serve_argv(cfg.served_model_name, length, cfg.serve.max_lora_rank, model, dtype, ref, parser, pins)
        + extra
    )
    info = {
        "served_model_name": cfg.served_model_name,
        "mode": cfg.serve.mode,
        "run_id": run_id,
        "model": model,
        "dtype": dtype,
        "max_tokens": cfg.eval.max_new_tokens,
        "chat_template": template_record(cfg.data.template, template, pins),
        "argv": argv,
        "env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if adapter else {},
        "preflight_notes": notes,
        "note": "paths are relative to this bundle folder; serve.sh runs from anywhere",
    }
    write_json(folder / "serve.json", info)
    write_launchers(folder, cfg.served_model_name, argv, info["env"])
    write_mlmodel(folder, cfg.serve.mode, cfg.eval.max_new_tokens)
    return info


def make_bundle(
    cfg: PipelineConfig,
    run_id: str,
    bundle: Path,
    data: FormatResult,
    trained: TrainResult,
    merged: MergeResult,
) -> dict:
    """``bundle`` built whole or not at all, after a check that the disk holds it; its serve.json."""
    weights = tree_bytes(Path(trained.output) if cfg.serve.mode == "adapter" else Path(merged.model_path))
    local_store = not cfg.mlflow_uri.startswith(("http://", "https://", "databricks"))
    copies = 2 if local_store else 1  # the bundle, and its upload into <output_dir>/mlartifacts
    bundle.parent.mkdir(parents=True, exist_ok=True)
    require_free(
        bundle.parent, copies * weights, f"handoff (the bundle{' and its MLflow copy' * local_store})"
    )
    # served as evaluated: in the dtype the evaluate stage ran in
    dtype = cfg.serve.dtype or dtype_name(cfg.merge.dtype, merged.model_path)
    with atomic_dir(bundle) as tmp:
        info = build_bundle(cfg, run_id, tmp, data, merged, trained, dtype)
    fault("handoff:bundle")
    return info


def run_serve(
    cfg: PipelineConfig, run_id: str, data: FormatResult, trained: TrainResult, merged: MergeResult, log=None
) -> Server | None:
    """The bundle, built into ``<run>/handoff/bundle``, and the parity gate's vLLM started on it
    without waiting, so it loads and compiles while evaluate scores; None when the gate is off or
    starts its server itself (``serve.parity.start_early``)."""
    p = cfg.serve.parity
    if not p.enabled or not (p.start_early if p.start_early is not None else not has_cuda()):
        return None
    log = log or stage_logger().info
    handoff = stage_dir(cfg.output_dir, run_id, "handoff")
    info = make_bundle(cfg, run_id, handoff / "bundle", data, trained, merged)
    log("handoff: the parity server starts now, while evaluate runs (serve.parity.start_early)")
    return start_server(handoff / "bundle", info, handoff, cfg.serve.health_timeout_s, log)


def served_like_evaluated(
    cfg: PipelineConfig,
    stage: Stage,
    bundle: Path,
    info: dict,
    data: FormatResult,
    merged: MergeResult,
    scores: EvalResult,
    server: Server | None = None,
) -> dict | None:
    """The parity gate with its report published (Prefect, MLflow) before it can refuse the bundle;
    ``server``: the one ``run_serve`` started on this bundle, else the gate starts its own."""
    if not cfg.serve.parity.enabled:
        stage.log(
            "handoff: serve.parity.enabled is off: this version was never served by vLLM before registry"
        )
        return None
    tokenizer = load_tokenizer(merged.model_path)  # what evaluate generated with
    tokenizer.chat_template = data.template()
    result = parity_gate(
        cfg.serve,
        cfg.served_model_name,
        cfg.eval.max_new_tokens,
        bundle,
        info,
        tokenizer,
        scores,
        stage.dir,
        stage.log,
        server,
        data.template_kwargs,
    )
    markdown = (stage.dir / "parity.md").read_text(encoding="utf-8")
    prefect_markdown(f"parity-{cfg.run_name}", markdown, "train/serve parity: vLLM vs the evaluated model")
    if stage.run is not None:
        stage.run.artifact(stage.dir / "parity.md")
        stage.run.table(parity_table(result), "parity.json")
    if not result["passed"]:
        raise ParityError(
            "parity gate: the vLLM-served bundle does not answer like the evaluated model, so it is not "
            f"registered: {'; '.join(result['failures'])} (diffs: {stage.dir / 'parity.md'})"
        )
    return result


def register(
    cfg: PipelineConfig,
    run_id: str,
    stage: Stage,
    bundle: Path,
    info: dict,
    data: FormatResult,
    trained: TrainResult,
    scores: EvalResult,
    parity: dict | None,
):
    """One registry version per pipeline run: a retried handoff finds the one it made."""
    name, uri = cfg.registered_model, cfg.mlflow_uri
    mv = version_for_run(uri, name, run_id)
    if mv is not None:
        stage.log(f"handoff: {name} version {mv.version} already holds run {run_id}; not registering again")
        return mv
    if stage.run is None:
        raise StageFailed("handoff needs an MLflow stage run to upload the bundle to")
    inputs = dataset_inputs(cfg.run_name, cfg.data, data)
    parent = read_json(stage.dir.parent / "mlflow.json")["parent"]
    for run in (stage.run, StageRun(stage.run.client, parent)):  # the version's run and the pipeline's
        run.datasets(inputs)
    stage.run.artifact(bundle, "bundle")
    fault("handoff:upload")
    tags = {
        "sftflow.run_id": run_id,
        "sftflow.config_hash": cfg.section_hash(),
        "sftflow.data_hash": data.data_hash,
        "sftflow.git_sha": code_version(),
        "sftflow.fingerprint": pipeline_fingerprint(cfg, data.declared_key or data.cache_key),
        # what a later night continues from (train.init_from) and replays (data.replay)
        METHOD_TAG: cfg.train.method,
        BASE_TAG: cfg.model.name_or_path,
        SOURCES_TAG: json.dumps(data.sources),
        WEIGHTS_TAG: trained.weights_uri
        or (f"runs:/{stage.run.id}/bundle/model" if cfg.train.method == "full" else ""),
        "sftflow.started_from": trained.started_from or "base",
        GATE_TAG: scores.gate_passed,
        PROMOTED_TAG: False,  # True once champion has moved to it (move_aliases)
        "sftflow.gate": scores.reason[:4000],
        "sftflow.serve_argv": json.dumps(info["argv"]),
        "sftflow.chat_template": template_label(info["chat_template"]),
        "sftflow.parity": f"agreement {parity['agreement']:.3f}, template {parity['template_match']:.3f}"
        if parity
        else "off",
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
    server: Server | None = None,
    log=None,
    track: bool = False,
) -> HandoffResult:
    """Reads the merged model (or adapter), ``data``'s template and prompts and the gate's decision;
    writes ``<run>/handoff/bundle`` (unless ``server`` already serves it) and registers it:
    ``candidate`` always, ``champion`` if the gate passed."""
    with open_stage(cfg.scope(SECTIONS), run_id, "handoff", log, track) as stage:
        out, bundle = stage.dir, stage.dir / "bundle"
        stage.manifest.add_input("evaluate_manifest", stage.dir.parent / "evaluate" / "manifest.json")
        if server is None or not (bundle / "serve.json").is_file():
            info = make_bundle(cfg, run_id, bundle, data, trained, merged)
        else:  # built by run_serve, and being served from
            info = read_json(bundle / "serve.json")
        stage.manifest.notes += info["preflight_notes"]
        for note in info["preflight_notes"]:
            stage.log(f"handoff: pre-flight fixed: {note}")
        stage.log(f"handoff: bundle at {bundle}; serve with: {shlex.join(info['argv'])}")
        # a bundle that does not answer as evaluated, or at all, is never registered
        parity = served_like_evaluated(cfg, stage, bundle, info, data, merged, scores, server)
        smoke_result = (
            smoke_check(cfg.serve, cfg.served_model_name, Path(data.eval_records), out, stage.log)
            if cfg.serve.endpoint
            else None
        )
        mv = register(cfg, run_id, stage, bundle, info, data, trained, scores, parity)
        aliases, not_promoted = move_aliases(cfg, stage, mv.version, bundle, scores)
        record_handoff(stage, bundle, cfg.registered_model, str(mv.version), aliases, parity, smoke_result)
        serve_script = f"cd {shlex.quote(str(bundle))} && ./serve.sh"
        stage.tags({"sftflow.version": mv.version, "sftflow.serve_script": serve_script})
        if smoke_result:
            markdown = smoke_markdown(cfg.serve.endpoint, smoke_result)
            prefect_markdown(f"smoke-{cfg.run_name}", markdown, "OpenAI-compatible smoke test")
        return stage.finish(
            HandoffResult(
                run_id=run_id,
                bundle=str(bundle),
                registered_model=cfg.registered_model,
                version=str(mv.version),
                aliases=aliases,
                serve_script=serve_script,
                parity={k: v for k, v in (parity or {}).items() if k not in ("items", "failures")},
                not_promoted=not_promoted,
            )
        )


def move_aliases(
    cfg: PipelineConfig, stage: Stage, version, bundle: Path, scores: EvalResult
) -> tuple[list[str], str]:
    """``candidate`` always; ``champion`` (and a hot swap into the endpoint) when the gate passed
    against the champion that is still current. Returns the aliases and why it was not promoted."""
    name, uri = cfg.registered_model, cfg.mlflow_uri
    set_alias(uri, name, "candidate", version)
    if not scores.gate_passed:
        stage.log(f"handoff: not promoted ({scores.reason}); champion unchanged")
        return ["candidate"], ""
    try:
        promote(uri, name, version, expected=scores.champion_version)
    except ChampionMoved as e:
        set_version_tag(uri, name, version, NOT_PROMOTED_TAG, str(e))
        stage.log(f"handoff: not promoted: {e}")
        return ["candidate"], str(e)
    stage.log(f"handoff: {name}@champion -> version {version}")
    if cfg.serve.hot_swap:
        adapter = str((bundle / "adapter").resolve())
        key = os.environ.get(cfg.serve.api_key_env, "EMPTY")
        hot_swap(cfg.serve.endpoint, cfg.served_model_name, adapter, key)
        stage.log(f"handoff: hot-swapped adapter {cfg.served_model_name} into {cfg.serve.endpoint}")
    return ["candidate", "champion"], ""


def record_handoff(
    stage: Stage,
    bundle: Path,
    name: str,
    version: str,
    aliases: list[str],
    parity: dict | None,
    smoke: dict | None,
) -> None:
    """The manifest's outputs and metrics: the bundle, its version and aliases, parity and smoke figures."""
    out = stage.dir
    stage.manifest.outputs = {
        "bundle": str(bundle),
        "serve_json": str(bundle / "serve.json"),
        "registered_model": name,
        "version": version,
        "aliases": aliases,
        "model_uri": f"models:/{name}/{version}",
        "smoke": str(out / "smoke.json") if smoke else None,
    }
    stage.manifest.metrics = {"smoke_passed": int(smoke["passed"])} if smoke else {}
    if parity:
        stage.manifest.outputs["parity"] = str(out / "parity.json")
        figures = ("template_match", "agreement", "stop_mismatches", "tool_calls_parsed", "server_start_s")
        stage.manifest.metrics |= {f"parity.{k}": parity[k] for k in figures}
    if smoke:
        stage.artifact(out / "smoke.json")


def worth_retrying(task, task_run, state) -> bool:
    """A parity failure is the bundle's, not the weather's: it would fail again."""
    try:
        state.result()
    except ParityError:
        return False
    except BaseException:
        return True
    return True


@task(name="serve", tags=[GPU_TAG])
def serve_task(
    cfg: PipelineConfig, run_id: str, data: FormatResult, trained: TrainResult, merged: MergeResult
) -> Server | None:
    return run_serve(cfg, run_id, data, trained, merged)


# the vLLM parity server takes the accelerator, as training does: under the same limit
@task(name="handoff", retries=2, retry_delay_seconds=10, retry_condition_fn=worth_retrying, tags=[GPU_TAG])
def handoff_task(
    cfg: PipelineConfig,
    run_id: str,
    data: FormatResult,
    trained: TrainResult,
    merged: MergeResult,
    scores: EvalResult,
    server: Server | None = None,
) -> HandoffResult:
    return run_handoff(cfg, run_id, data, trained, merged, scores, server, track=True)
