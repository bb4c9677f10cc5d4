"""The pipeline, read top to bottom: format -> train -> merge -> (evaluate | serve) -> handoff.

Each stage is a retriable Prefect task (``tasks/<stage>.py``). What one stage hands the next
is passed along here, so the data flow reads off this file and Prefect draws it as edges:

    start    Lineage        the champion this run continues from or replays (train.init_from,
                            data.replay), or None: from the base
    data     FormatResult   the data mix, packed: train/eval datasets, eval prompts, the chat template
    trained  TrainResult    the adapter (or full model), its final loss and the version it started from
    merged   MergeResult    the standalone model, verified against base+adapter
    server   Server         vLLM started on the bundle, loading while evaluate scores (or None:
                            the parity gate is off, or starts its own server)
    scores   EvalResult     base vs candidate (vs champion) and the gate's decision
    bundle   HandoffResult  the vLLM bundle, served and checked for parity, its registry version
                            and aliases

Each run holds the pipeline's concurrency slot (``sftflow-pipeline``) from the unchanged check
to the clean-up, so a nightly and an on-demand run never evaluate against the same champion
at once. After a completed run the retention policy (``retention``) deletes what no later night needs:
old runs with their registry versions and MLflow artifacts, checkpoints, stale caches.

The results are small (paths and figures); each stage's manifest is the durable record, and
any result can be rebuilt from it (``sftflow <stage> --run-id`` runs one stage alone). So a
retried flow run (or ``sftflow run --run-id`` of an unfinished run) keeps the format, train and
merge stages its earlier attempt finished with the same config sections, code and inputs;
evaluate and handoff always run again, since the champion may have moved. ``--force`` runs all.
"""

from __future__ import annotations

import dataclasses
import time

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Completed

from tasks.config import PipelineConfig, load_config
from tasks.core.orchestration import pipeline_slot, recorded_run_id, redact_parameters
from tasks.core.orphans import claim
from tasks.core.paths import new_run_id, run_dir
from tasks.core.quiet import quiet_libraries
from tasks.core.results import EvalResult, FormatResult, HandoffResult, MergeResult, TrainResult
from tasks.core.stage import stage_logger
from tasks.core.tracking import Tracker, redact
from tasks.evaluate import evaluate_task
from tasks.format import format_task
from tasks.gc import gc_task
from tasks.handoff import handoff_task, serve_task
from tasks.lineage import lineage_task
from tasks.merge import merge_task
from tasks.train import train_task
from tasks.unchanged import unchanged_task


@flow(name="sft-pipeline")
def sft_pipeline(
    config_path: str, overrides: list[str] | None = None, run_id: str | None = None, force: bool = False
) -> dict:
    t0 = time.monotonic()
    quiet_libraries()
    log = stage_logger().info
    redact_parameters(flow_run.id, flow_run.parameters)  # no password stays in Prefect's record
    cfg = load_config(config_path, overrides)
    claim(cfg.output_dir, log)  # what a killed run left here, before this one starts anything
    # A retried flow run (after a crash, a host or server restart) resumes the run its first
    # attempt started: the run id is kept in the flow run's recorded parameters.
    run_id = run_id or recorded_run_id(flow_run.id, lambda: new_run_id(cfg.run_name))
    if flow_run.run_count > 1:
        log(f"flow run attempt {flow_run.run_count}: resuming run {run_id}")
    with pipeline_slot(log, cfg.output_dir):  # one pipeline run at a time, whichever deployment started it
        return run_pipeline(cfg, run_id, force, t0)


def run_pipeline(cfg: PipelineConfig, run_id: str, force: bool, t0: float) -> State:
    # A nightly run with the same data, config and code has nothing to train: say so and stop
    # (Prefect records it as "Unchanged"; MLflow gets no empty run).
    if not force and (same := unchanged_task(cfg)):
        summary = {
            "run_id": run_id,
            "unchanged": True,
            "same_as": dataclasses.asdict(same),
            "seconds": round(time.monotonic() - t0, 2),
        }
        message = f"unchanged since version {same.version} (run {same.run_id})"
        return Completed(name="Unchanged", message=message, data=summary)
    tracker = Tracker(cfg.tracking_target, run_id)  # fails fast when MLflow cannot be reached
    parent = tracker.parent_run_id()
    stage_logger().info(f"run {run_id}: {run_dir(cfg.output_dir, run_id)} (MLflow run {parent})")
    server, keep = None, not force  # a retry keeps the format, train and merge its earlier attempt finished
    try:
        start = lineage_task(cfg)
        data = format_task(cfg, run_id, start, keep=keep)
        trained = train_task(cfg, run_id, data, start, keep=keep)
        merged = merge_task(cfg, run_id, data, trained, keep=keep)
        server = serve_task(cfg, run_id, data, trained, merged)  # vLLM warms up while evaluate scores
        scores = evaluate_task(cfg, run_id, data, merged)
        bundle = handoff_task(cfg, run_id, data, trained, merged, scores, server)
    except BaseException:
        tracker.fail()
        raise
    finally:
        if server is not None:
            server.stop()  # the parity gate has stopped it, unless a stage before it failed
    tracker.finish()
    summary = run_summary(cfg, run_id, parent, t0, data, trained, merged, scores, bundle)
    if cfg.retention.enabled:  # every night cleans up after the ones before it
        summary["gc"] = gc_task(cfg)
    # A refused candidate is an outcome, not a crash: the run completes in a state that says so.
    if summary["promoted"]:
        return Completed(
            message=f"promoted: {bundle.registered_model}@champion = v{bundle.version}", data=summary
        )
    return Completed(name="Not promoted", message=f"not promoted: {summary['gate']}", data=summary)


def run_summary(
    cfg,
    run_id: str,
    mlflow_run_id: str,
    t0: float,
    data: FormatResult,
    trained: TrainResult,
    merged: MergeResult,
    scores: EvalResult,
    bundle: HandoffResult,
) -> dict:
    """What `sftflow run` prints and `--summary-json` writes."""
    return {
        "run_id": run_id,
        "run_dir": str(run_dir(cfg.output_dir, run_id).resolve()),
        "counts": data.counts,
        "train_loss": trained.train_loss,
        "steps": trained.global_step,
        "started_from": trained.started_from,
        "merge_max_logit_diff": merged.max_logit_diff,
        "scores": scores.scores,
        "intervals": scores.intervals,
        "slices": scores.slices,
        "promoted": "champion" in bundle.aliases,  # the gate passed and the champion had not moved
        "gate": bundle.not_promoted or scores.reason,
        "registered_model": bundle.registered_model,
        "version": bundle.version,
        "aliases": bundle.aliases,
        "bundle": bundle.bundle,
        "serve_script": bundle.serve_script,
        "parity": bundle.parity,
        "mlflow_uri": redact(cfg.mlflow_uri),
        "mlflow_run_id": mlflow_run_id,
        "prefect_flow_run_id": flow_run.id,
        "seconds": round(time.monotonic() - t0, 2),
    }
