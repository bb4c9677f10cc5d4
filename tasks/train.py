"""Train stage: starts the ``deepspeed`` launcher in its own process group and supervises it.

The Prefect task never imports torch for training; the worker processes do the work
(``tasks/train_worker.py``). Rank 0's lines are streamed into the log, the full log is kept
in ``<run>/train/train.log``, and a failure raises with the log's tail. A retry resumes from
the newest complete checkpoint.
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
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from tasks import memory
from tasks.config import PipelineConfig, deepspeed_config
from tasks.models import resolve_model, sftflow_home
from tasks.rundir import CODE_ROOT, Manifest, file_sha256, load_manifest, read_json, stage_dir, start_stage, write_json
from tasks.stage import tracked_stage


@dataclass
class TrainResult:
    run_id: str
    output: str
    method: str
    train_loss: float
    global_step: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(cfg: PipelineConfig, spec_path: Path) -> list[str]:
    t = cfg.train
    port = str(t.master_port or free_port())
    if t.hostfile:  # the `deepspeed` runner reaches the other nodes (pdsh) and starts launch.py on each
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", t.hostfile,
               "--num_gpus", str(t.num_processes), "--master_addr", t.master_addr, "--master_port", port]
    else:  # one node: the per-node launcher the runner would start, without the runner's own interpreter (~3 s)
        world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(t.num_processes))}).encode()).decode()
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
               f"--master_addr={t.master_addr}", f"--master_port={port}"]
    return cmd + ["--module", "tasks.train_worker", "--spec", str(spec_path)]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH")]))
    # DeepSpeed JIT-builds its CPU ops once (~40 s); keep them across runs.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(sftflow_home() / "torch_extensions"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _clean_shm(before: set[str]) -> None:
    """DeepSpeed's CPU comm leaves shared-memory buffers behind when a rank is killed."""
    for path in set(glob.glob("/dev/shm/*deepspeed*")) - before:
        try:
            os.unlink(path)
        except OSError:
            pass


def loss_curve(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("logged step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_train(cfg: PipelineConfig, run_id: str, log=print, mlflow_run_id: str | None = None,
              resume: bool = True) -> TrainResult:
    """``resume``: continue from the newest complete checkpoint (retries); otherwise start over."""
    fmt = load_manifest(cfg.output_dir, run_id, "format")
    out = stage_dir(cfg.output_dir, run_id, "train")
    if not resume and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    start_stage(out)
    out.mkdir(parents=True, exist_ok=True)
    man = Manifest("train", run_id, cfg.section_hash("model", "train"))
    man.add_input("format_manifest", out.parent / "format" / "manifest.json")
    model_path = resolve_model(cfg.model.name_or_path)
    memory.check(cfg, model_path, log)
    spec = {"model_path": str(model_path), "train_path": fmt["outputs"]["train"], "output_dir": str(out),
            "train": cfg.train.model_dump(mode="json"), "deepspeed": deepspeed_config(cfg),
            "mlflow_run_id": mlflow_run_id}  # the URI may hold credentials: it goes by environment, not file
    spec_path = out / "spec.json"
    write_json(spec_path, spec)
    write_json(out / "deepspeed.json", spec["deepspeed"])
    cmd = launch_command(cfg, spec_path)
    log(f"train: {cfg.train.method} with DeepSpeed {cfg.train.deepspeed}, {cfg.train.num_processes} process(es): "
        + " ".join(cmd[2:]))

    shm_before = set(glob.glob("/dev/shm/*deepspeed*"))
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with open(out / "train.log", "a", encoding="utf-8", buffering=1) as logfile:  # line-buffered: tail -f works
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=CODE_ROOT,
                                env={**worker_env(), "SFTFLOW_MLFLOW_URI": cfg.mlflow_uri,
                                     # an outage costs a step seconds, not minutes of MLflow's own retries
                                     "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"},
                                start_new_session=True,
                                bufsize=1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                logfile.write(line)
                tail.append(line.rstrip())
                # the launcher prefixes rank output with "[rank]"/timestamps; our worker tags its own lines
                if "[train]" in line or "Error" in line:
                    log(line.rstrip()[-400:])
            code = proc.wait(timeout=cfg.train.timeout_s)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # never leave orphaned ranks behind
            proc.wait()
            raise
        finally:
            _clean_shm(shm_before)
    if code != 0:
        raise RuntimeError(f"training failed (exit {code}); last lines of {out / 'train.log'}:\n" + "\n".join(tail))

    result = read_json(out / "result.json")
    if result["losses"]:
        loss_curve(result["losses"], out / "loss.png")
    man.outputs = {"model": result["output"], "checkpoints": str(out / "checkpoints"),
                   "deepspeed_config": str(out / "deepspeed.json"), "log": str(out / "train.log")}
    man.add_input("model", model_path, sha256=_model_id(model_path))
    man.metrics = {k: result[k] for k in ("train_loss", "global_step", "world_size", "real_token_fraction",
                                          "train_runtime_s")}
    man.metrics["resumed_from"] = result["resumed_from"]
    man.finish(out)
    return TrainResult(run_id, result["output"], cfg.train.method, result["train_loss"], result["global_step"])


def _model_id(path: Path) -> str:
    """Base models are large: hash their config and index, not every weight."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json"):
        if (path / name).is_file():
            h.update(file_sha256(path / name).encode())
    return h.hexdigest()


@task(name="train", retries=1, retry_delay_seconds=10, tags=["gpu"])
def train_task(cfg: PipelineConfig, run_id: str, resume: bool = True) -> TrainResult:
    """A retry resumes from the newest complete checkpoint, into the same MLflow run."""
    with tracked_stage(cfg, run_id, "train", "train") as st:
        result = run_train(cfg, run_id, log=st.log, mlflow_run_id=st.run.id, resume=resume)
        for name in ("deepspeed_resolved.json", "training_args.json", "train.log", "loss.png"):
            if (st.dir / name).is_file():
                st.run.artifact(st.dir / name)
        if (pending := st.dir / "pending_metrics.json").is_file():  # kept through an MLflow outage
            from mlflow.entities import Metric

            values = [Metric(*m) for m in read_json(pending)]
            for i in range(0, len(values), 1000):
                st.run.client.log_batch(st.run.id, metrics=values[i:i + 1000])
            pending.unlink()
            st.log(f"train: logged {len(values)} metric values kept while MLflow was unreachable")
    return result
