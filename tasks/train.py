"""Train stage: starts the ``deepspeed`` launcher (or a lone rank) in its own process group and supervises it.

Reads the format stage's packed ``train/`` dataset and the base model; writes ``<run>/train/``:
``adapter/`` (lora, qlora) or ``model/`` (full), ``checkpoints/``, ``train.log``, ``loss.png``,
the resolved DeepSpeed config and ``ranks/`` (what each rank trained on).

The Prefect task never imports torch for training; the worker processes do the work
(``tasks/training/worker.py``). Rank 0's lines are streamed into the log, the full log is kept
in ``train.log``, and a failure raises with the log's tail. ``train.timeout_s`` bounds the
whole launch, output or not: a hung rank is killed with its process group. A retry resumes
from the newest complete checkpoint.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

from prefect import task

from tasks.config import PipelineConfig
from tasks.config.hostfile import read_hostfile
from tasks.core.errors import InputError, StageTimeout
from tasks.core.files import read_json, write_json
from tasks.core.hashing import file_sha256
from tasks.core.manifest import manifest_path
from tasks.core.orchestration import GPU_TAG
from tasks.core.paths import stage_dir
from tasks.core.results import FormatResult, Lineage, TrainResult
from tasks.core.space import require_free, tree_bytes
from tasks.core.stage import kept_result, open_stage
from tasks.models.loading import resolve_model
from tasks.registry.lineage import fetch_weights
from tasks.training import memory
from tasks.training.deepspeed import deepspeed_config
from tasks.training.hosts import check_master_port
from tasks.training.launcher import free_port, launch_command, supervise_node
from tasks.training.report import loss_curve

SECTIONS = ("model", "data", "train", "eval", "tracking")  # eval: the batch size of eval_steps


def join_training(cfg: PipelineConfig, run_id: str, node_rank: int, log=print) -> None:
    """Node ``node_rank`` of a ``launcher: per_node`` run: waits for node 0's train stage to write
    its spec into the shared run folder, then starts this node's ranks with the same rendezvous."""
    t, out = cfg.train, stage_dir(cfg.output_dir, run_id, "train")
    hosts = read_hostfile(t.hostfile)
    if not 0 < node_rank < len(hosts):
        raise InputError(
            f"--node-rank {node_rank}: {t.hostfile} has node ranks 1 to {len(hosts) - 1} to join"
        )
    deadline = time.monotonic() + t.rendezvous_timeout_s
    log(f"join: {hosts[node_rank][0]} (node rank {node_rank}) waiting for {out / 'spec.json'}")
    while not (out / "spec.json").is_file():
        if time.monotonic() > deadline:
            raise StageTimeout(
                f"no {out / 'spec.json'} after {t.rendezvous_timeout_s} s: start run {run_id} on node 0 "
                f"({hosts[0][0]}) with the same output_dir"
            )
        time.sleep(1)
    port = read_json(out / "spec.json")["master_port"]
    cmd = launch_command(cfg.train, out / "spec.json", port, node_rank)
    log(f"join: {hosts[node_rank][0]} joins {t.master_addr}:{port}: " + " ".join(cmd[2:]))
    supervise_node(cfg.train, cfg.mlflow_uri, cmd, out / f"node{node_rank}.log", node_rank, port, log)


def starting_weights(cfg: PipelineConfig, lineage: Lineage | None, out: Path, log) -> Path | None:
    """The champion's adapter or model folder for ``train.init_from: champion``, else None. An
    adapter of another shape than ``train.lora`` is refused here, before any process starts."""
    if cfg.train.init_from != "champion" or lineage is None:
        return None
    path = fetch_weights(cfg.mlflow_uri, lineage, out / "init")
    log(f"train: starting from {lineage.label}: {path}")
    config = path / "adapter_config.json"
    if cfg.train.method != "full" and config.is_file():
        theirs, ours = read_json(config), cfg.train.lora
        for key, mine in (("r", ours.r), ("lora_alpha", ours.alpha)):
            if theirs.get(key) != mine:
                raise InputError(
                    f"train.init_from: champion: {lineage.label}'s adapter has {key}={theirs.get(key)}, "
                    f"train.lora asks for {mine}; match it, or set train.init_from: base"
                )
    return path


def run_train(
    cfg: PipelineConfig,
    run_id: str,
    data: FormatResult,
    lineage: Lineage | None = None,
    log=None,
    track: bool = False,
    resume: bool = True,
    keep: bool = False,
) -> TrainResult:
    """Reads ``data.train_path`` and the base model (with ``train.init_from: champion``, the
    champion's adapter or weights that ``lineage`` names); writes ``<run>/train/`` (see the
    module docstring).

    ``resume``: continue from the newest complete checkpoint (retries); otherwise start over.
    ``keep``: a training an earlier attempt finished on the same inputs is not run again.
    """
    if keep and (kept := kept_training(cfg, run_id, data, lineage, log)):
        return kept
    with open_stage(cfg.scope(SECTIONS), run_id, "train", log, track) as stage:
        out = stage.dir
        if not resume and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")
        stage.manifest.add_input("format_manifest", manifest_path(cfg.output_dir, run_id, "format"))
        model_path = resolve_model(cfg.model.name_or_path)
        estimate = memory.check(cfg.train, cfg.data.max_seq_len, model_path, stage.log)
        written = tree_bytes(out / "checkpoints") if resume and (out / "checkpoints").exists() else 0
        limit = cfg.train.save_total_limit
        what = (
            f"train ({cfg.train.method}: {limit} checkpoint(s) with optimizer state, then the final weights)"
        )
        require_free(out, max(estimate.disk_bytes(cfg.train) - written, 0), what)
        init = starting_weights(cfg, lineage, out, stage.log)
        if init is not None:
            stage.manifest.add_input("init_from", init)
            stage.manifest.notes.append(f"started from {lineage.label}: {lineage.weights_uri}")
        port = cfg.train.master_port or free_port(cfg.train.master_addr)
        if cfg.train.hostfile:
            check_master_port(cfg.train.master_addr, port, read_hostfile(cfg.train.hostfile)[0][0])
        launch(cfg, worker_spec(cfg, data, model_path, init, port, stage), port, stage)
        result = read_json(out / "result.json")
        record_training(cfg, stage, result, model_path, lineage if init else None)
        return stage.finish(
            TrainResult(
                run_id=run_id,
                output=result["output"],
                method=cfg.train.method,
                train_loss=result["train_loss"],
                global_step=result["global_step"],
                started_from=lineage.version if init else None,
                weights_uri=publish_weights(cfg, stage, Path(result["output"])),
            )
        )


def worker_spec(cfg: PipelineConfig, data: FormatResult, model_path: Path, init, port: int, stage) -> Path:
    """``spec.json``, what every rank reads: the train section, DeepSpeed's config and the paths."""
    spec = {
        "master_port": port,
        "model_path": str(model_path),
        "train_path": data.train_path,
        "output_dir": str(stage.dir),
        "train": cfg.train.model_dump(mode="json"),
        "deepspeed": deepspeed_config(cfg.train.deepspeed),
        "mlflow_run_id": stage.run.id if stage.run else None,
        "init_from": str(init) if init else None,
        "eval_path": data.eval_path if cfg.train.eval_steps else None,
        "eval_batch_size": cfg.eval.batch_size,
    }
    write_json(stage.dir / "spec.json", spec)
    write_json(stage.dir / "deepspeed.json", spec["deepspeed"])
    return stage.dir / "spec.json"


def launch(cfg: PipelineConfig, spec_path: Path, port: int, stage) -> None:
    """DeepSpeed's launcher on this node, supervised until the ranks end."""
    cmd = launch_command(cfg.train, spec_path, port)
    engine = "without DeepSpeed" if cfg.train.deepspeed == "none" else f"with DeepSpeed {cfg.train.deepspeed}"
    stage.log(
        f"train: {cfg.train.method} {engine}, {cfg.train.num_processes} process(es): " + " ".join(cmd[2:])
    )
    supervise_node(cfg.train, cfg.mlflow_uri, cmd, stage.dir / "train.log", 0, port, stage.log)


def record_training(
    cfg: PipelineConfig, stage, result: dict, model_path: Path, lineage: Lineage | None
) -> None:
    """The manifest's outputs and metrics, the loss curve, and the artifacts MLflow gets."""
    out = stage.dir
    if result["losses"]:
        loss_curve(result["losses"], result["eval_losses"], cfg.train.logging_steps, out / "loss.png")
    stage.manifest.outputs = {
        "model": result["output"],
        "checkpoints": str(out / "checkpoints"),
        "deepspeed_config": str(out / "deepspeed.json"),
        "log": str(out / "train.log"),
        "started_from": lineage.label if lineage else None,
    }
    stage.manifest.add_input("model", model_path, sha256=_model_id(model_path))
    keys = (
        "train_loss",
        "global_step",
        "world_size",
        "real_token_fraction",
        "train_runtime_s",
        "resumed_from",
    )
    stage.manifest.metrics = {k: result[k] for k in keys}
    stage.artifact(
        *(out / n for n in ("deepspeed_resolved.json", "training_args.json", "train.log", "loss.png"))
    )


def publish_weights(cfg: PipelineConfig, stage, output: Path) -> str:
    """The adapter logged to MLflow, where the next night may continue from it; its URI, or ""
    (untracked, or full fine-tuning, whose weights travel in the bundle's model)."""
    if stage.run is None:
        return ""
    send_pending_metrics(stage)
    if cfg.train.method == "full":
        return ""
    stage.run.artifact(output, "adapter")
    return f"runs:/{stage.run.id}/adapter"


def send_pending_metrics(stage) -> None:
    """Metric values the workers kept through an MLflow outage, sent now that it answers."""
    pending = stage.dir / "pending_metrics.json"
    if not pending.is_file():
        return
    from mlflow.entities import Metric

    values = [Metric(*m) for m in read_json(pending)]
    for i in range(0, len(values), 1000):
        stage.run.client.log_batch(stage.run.id, metrics=values[i : i + 1000])
    pending.unlink()
    stage.log(f"train: logged {len(values)} metric values kept while MLflow was unreachable")


def _model_id(path: Path) -> str:
    """Base models are large: hash their config and index, not every weight."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json"):
        if (path / name).is_file():
            h.update(file_sha256(path / name).encode())
    return h.hexdigest()


def kept_training(
    cfg: PipelineConfig, run_id: str, data: FormatResult, lineage: Lineage | None, log=None
) -> TrainResult | None:
    """An earlier attempt's finished training, kept when it read this same format stage and base
    model and started from the same champion."""
    inputs = {
        "format_manifest": file_sha256(manifest_path(cfg.output_dir, run_id, "format")),
        "model": _model_id(resolve_model(cfg.model.name_or_path)),
    }
    same = {"started_from": lineage.version if cfg.train.init_from == "champion" and lineage else None}
    return kept_result(cfg.scope(SECTIONS), run_id, TrainResult, log, inputs, same)


@task(name="train", retries=1, retry_delay_seconds=10, tags=[GPU_TAG])
def train_task(
    cfg: PipelineConfig,
    run_id: str,
    data: FormatResult,
    lineage: Lineage | None = None,
    resume: bool = True,
    keep: bool = False,
) -> TrainResult:
    """A retry resumes from the newest complete checkpoint, into the same MLflow run; with
    ``keep``, a training an earlier attempt finished is not run again."""
    return run_train(cfg, run_id, data, lineage, track=True, resume=resume, keep=keep)
