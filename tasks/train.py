"""Train stage: starts the ``deepspeed`` launcher in its own process group and supervises it.

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

import base64
import collections
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefect import task

from tasks.config import PipelineConfig
from tasks.config.hostfile import read_hostfile
from tasks.core.errors import InputError, StageFailed, StageTimeout
from tasks.core.files import read_json, write_json
from tasks.core.hashing import file_sha256
from tasks.core.paths import CODE_ROOT, sftflow_home, stage_dir
from tasks.core.results import FormatResult, Lineage, TrainResult
from tasks.core.stage import open_stage
from tasks.models.loading import resolve_model
from tasks.registry.lineage import fetch_weights
from tasks.training import memory
from tasks.training.deepspeed import deepspeed_config
from tasks.training.hosts import (
    SSH_FAILED,
    check_master_port,
    interface_for,
    not_joined,
    not_started,
    remote_env_file,
)

SECTIONS = ("model", "data", "train", "eval", "tracking")  # eval: the batch size of eval_steps
JOINED = "[train] joined"  # the worker's line once its process group is up


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def launch_command(cfg: PipelineConfig, spec_path: Path, port: int, node_rank: int = 0) -> list[str]:
    t = cfg.train
    if t.hostfile:  # DeepSpeed's runner: it reaches the other nodes with pdsh, or (per_node) starts this one
        each = ["--no_ssh", "--node_rank", str(node_rank)] if t.launcher == "per_node" else []
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", t.hostfile, *each,
               "--num_gpus", str(t.num_processes), "--master_addr", t.master_addr,
               "--master_port", str(port)]  # fmt: skip
    else:  # one node: the per-node launcher the runner would start, without the runner's own interpreter (~3 s)
        world = base64.urlsafe_b64encode(
            json.dumps({"localhost": list(range(t.num_processes))}).encode()
        ).decode()
        cmd = [
            sys.executable,
            "-u",
            "-m",
            "deepspeed.launcher.launch",
            f"--world_info={world}",
            f"--master_addr={t.master_addr}",
            f"--master_port={port}",
        ]
    return cmd + ["--module", "tasks.training.worker", "--spec", str(spec_path)]


def rendezvous_env(cfg: PipelineConfig, env: dict, log) -> dict:
    """Across hosts, gloo binds to the address the hostname resolves to, often 127.0.0.1, and the
    other node's connections are refused: pin it to the interface that reaches the master."""
    name = cfg.train.hostfile and "GLOO_SOCKET_IFNAME" not in env and interface_for(cfg.train.master_addr)
    if name:
        env["GLOO_SOCKET_IFNAME"] = name
        log(f"train: gloo talks to {cfg.train.master_addr} over {name} (GLOO_SOCKET_IFNAME)")
    return env


def supervise_node(
    cfg: PipelineConfig, cmd: list[str], log_path: Path, node_rank: int, port: int, log
) -> None:
    """``supervise``, with a multi-node rendezvous failure said in terms of the hostfile's hosts."""
    t = cfg.train
    env = rendezvous_env(cfg, worker_env(cfg.mlflow_uri), log)
    if t.hostfile and t.launcher == "ssh":
        env["DS_ENV_FILE"] = str(remote_env_file(env, log_path.parent / "deepspeed_env", log))
    try:  # across hosts a missing peer blocks the rendezvous without a word: bound the wait
        supervise(cmd, env, log_path, t.timeout_s, log, t.rendezvous_timeout_s if t.hostfile else None)
    except NotJoined:
        hosts = read_hostfile(t.hostfile)
        raise StageFailed(not_joined(hosts, node_rank, t.master_addr, port, t.rendezvous_timeout_s)) from None
    except MasterUnreachable as e:
        raise StageFailed(not_started(*e.args, read_hostfile(t.hostfile)[0][0])) from None


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
    cmd = launch_command(cfg, out / "spec.json", port, node_rank)
    log(f"join: {hosts[node_rank][0]} joins {t.master_addr}:{port}: " + " ".join(cmd[2:]))
    supervise_node(cfg, cmd, out / f"node{node_rank}.log", node_rank, port, log)


def worker_env(mlflow_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH")]))
    # DeepSpeed JIT-builds its CPU ops once (~40 s); keep them across runs.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(sftflow_home() / "torch_extensions"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["SFTFLOW_MLFLOW_URI"] = mlflow_uri  # may hold credentials: by environment, never in a file
    # an outage costs a step seconds, not minutes of MLflow's own retries
    env |= {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    return env


def _clean_shm(before: set[str]) -> None:
    """DeepSpeed's CPU comm leaves shared-memory buffers behind when a rank is killed."""
    for path in set(glob.glob("/dev/shm/*deepspeed*")) - before:
        try:
            os.unlink(path)
        except OSError:
            pass


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


def loss_curve(losses: list[float], eval_losses: list, every: int, path: Path) -> None:
    """Training loss per logged step, and eval loss at the steps it was measured (step 0 too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([every * (i + 1) for i in range(len(losses))], losses, label="training loss")
    if eval_losses:
        steps, values = zip(*eval_losses)
        ax.plot(steps, values, "o-", color="#e08a3c", label="eval loss")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class NotJoined(StageFailed):
    """Not every rank joined the rendezvous in time."""


class MasterUnreachable(StageFailed):
    """pdsh could not start a host's ranks; the others would wait for them until the deadline."""


def wait(
    proc: subprocess.Popen,
    timeout_s: float,
    joined: threading.Event,
    join_timeout_s: float | None,
    unreachable: list[tuple[str, str]],
) -> int:
    """The launcher's exit code; TimeoutExpired past ``timeout_s``, NotJoined when no rank said it
    joined within ``join_timeout_s`` (None: no such deadline), Unreachable once pdsh says so."""
    start = time.monotonic()
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if unreachable:
                raise MasterUnreachable(*unreachable[0]) from None
            waited = time.monotonic() - start
            if join_timeout_s is not None and not joined.is_set() and waited > join_timeout_s:
                raise NotJoined(f"no rank joined within {join_timeout_s:g} s") from None
            if waited > timeout_s:
                raise


def supervise(
    cmd: list[str], env: dict, log_path: Path, timeout_s: float, log, join_timeout_s: float | None = None
) -> None:
    """Run the launcher in its own process group, streaming its output into ``log_path`` (rank 0's
    ``[train]`` lines also into the stage log). The deadline counts whether or not anything is
    printed; past it, past ``join_timeout_s`` without the rank's ``[train] joined`` line, or on
    any error here, the whole group is killed."""
    tail: collections.deque[str] = collections.deque(maxlen=60)
    joined, unreachable = threading.Event(), []
    shm_before = set(glob.glob("/dev/shm/*deepspeed*"))
    with open(log_path, "a", encoding="utf-8", buffering=1) as logfile:  # line-buffered: tail -f works
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=CODE_ROOT,
            env=env,
            start_new_session=True,
            bufsize=1,
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                logfile.write(line)
                tail.append(line.rstrip())
                if JOINED in line:
                    joined.set()
                elif m := SSH_FAILED.match(line):  # ssh's own reason is the host's line before it
                    why = [x for x in tail if x.startswith(f"{m['host']}: ssh")] or [line.strip()]
                    unreachable.append((m["host"], why[-1]))
                # the launcher prefixes rank output; our worker tags its own lines
                if "[train]" in line or "Error" in line:
                    log(line.rstrip()[-400:])

        reader = threading.Thread(target=pump, name="train-log", daemon=True)
        reader.start()
        try:
            code = wait(proc, timeout_s, joined, join_timeout_s, unreachable)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(10)
            message = (
                f"training exceeded train.timeout_s={timeout_s:g}s; killed the launcher and every rank "
                f"(process group {proc.pid}). Last lines of {log_path}:\n" + "\n".join(list(tail)[-15:])
            )
            logfile.write(f"[sftflow] {message.splitlines()[0]}\n")
            raise StageTimeout(message) from None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # never leave orphaned ranks behind
            proc.wait()
            raise
        finally:
            _clean_shm(shm_before)
        reader.join()
    if code != 0:
        raise StageFailed(f"training failed (exit {code}); last lines of {log_path}:\n" + "\n".join(tail))


def run_train(
    cfg: PipelineConfig,
    run_id: str,
    data: FormatResult,
    lineage: Lineage | None = None,
    log=None,
    track: bool = False,
    resume: bool = True,
) -> TrainResult:
    """Reads ``data.train_path`` and the base model (with ``train.init_from: champion``, the
    champion's adapter or weights that ``lineage`` names); writes ``<run>/train/`` (see the
    module docstring).

    ``resume``: continue from the newest complete checkpoint (retries); otherwise start over.
    """
    with open_stage(cfg.scope(SECTIONS), run_id, "train", log, track) as stage:
        out = stage.dir
        if not resume and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")
        stage.manifest.add_input("format_manifest", Path(data.train_path).parent / "manifest.json")
        model_path = resolve_model(cfg.model.name_or_path)
        memory.check(cfg.train, cfg.data.max_seq_len, model_path, stage.log)
        init = starting_weights(cfg, lineage, out, stage.log)
        if init is not None:
            stage.manifest.add_input("init_from", init)
            stage.manifest.notes.append(f"started from {lineage.label}: {lineage.weights_uri}")
        port = cfg.train.master_port or free_port(cfg.train.master_addr)
        if cfg.train.hostfile:
            check_master_port(cfg.train.master_addr, port, read_hostfile(cfg.train.hostfile)[0][0])
        spec = {
            "master_port": port,
            "model_path": str(model_path),
            "train_path": data.train_path,
            "output_dir": str(out),
            "train": cfg.train.model_dump(mode="json"),
            "deepspeed": deepspeed_config(cfg.train.deepspeed),
            "mlflow_run_id": stage.run.id if stage.run else None,
            "init_from": str(init) if init else None,
            "eval_path": data.eval_path if cfg.train.eval_steps else None,
            "eval_batch_size": cfg.eval.batch_size,
        }
        write_json(out / "spec.json", spec)
        write_json(out / "deepspeed.json", spec["deepspeed"])
        cmd = launch_command(cfg, out / "spec.json", port)
        engine = (
            "without DeepSpeed" if cfg.train.deepspeed == "none" else f"with DeepSpeed {cfg.train.deepspeed}"
        )
        stage.log(
            f"train: {cfg.train.method} {engine}, {cfg.train.num_processes} process(es): " + " ".join(cmd[2:])
        )
        supervise_node(cfg, cmd, out / "train.log", 0, port, stage.log)

        result = read_json(out / "result.json")
        if result["losses"]:
            loss_curve(result["losses"], result["eval_losses"], cfg.train.logging_steps, out / "loss.png")
        stage.manifest.outputs = {
            "model": result["output"],
            "checkpoints": str(out / "checkpoints"),
            "deepspeed_config": str(out / "deepspeed.json"),
            "log": str(out / "train.log"),
        }
        stage.manifest.add_input("model", model_path, sha256=_model_id(model_path))
        stage.manifest.metrics = {
            k: result[k]
            for k in ("train_loss", "global_step", "world_size", "real_token_fraction", "train_runtime_s")
        }
        stage.manifest.metrics["resumed_from"] = result["resumed_from"]
        stage.manifest.outputs["started_from"] = lineage.label if init else None
        weights_uri = ""
        if stage.run is not None:
            send_pending_metrics(stage)
            if cfg.train.method != "full":  # the next night may continue from it (full: the bundle's model)
                stage.run.artifact(Path(result["output"]), "adapter")
                weights_uri = f"runs:/{stage.run.id}/adapter"
        stage.artifact(
            *(out / n for n in ("deepspeed_resolved.json", "training_args.json", "train.log", "loss.png"))
        )
        return stage.finish(
            TrainResult(
                run_id,
                result["output"],
                cfg.train.method,
                result["train_loss"],
                result["global_step"],
                lineage.version if init else None,
                weights_uri,
            )  # fmt: skip
        )


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


@task(name="train", retries=1, retry_delay_seconds=10, tags=["gpu"])
def train_task(
    cfg: PipelineConfig, run_id: str, data: FormatResult, lineage: Lineage | None = None, resume: bool = True
) -> TrainResult:
    """A retry resumes from the newest complete checkpoint, into the same MLflow run."""
    return run_train(cfg, run_id, data, lineage, track=True, resume=resume)
