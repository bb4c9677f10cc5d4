"""DeepSpeed's launcher on this node, and its supervision: the ranks' environment, the log,
the deadlines, and what a failed rendezvous means."""

from __future__ import annotations

import base64
import collections
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tasks.config import TrainConfig
from tasks.config.hostfile import read_hostfile
from tasks.core.errors import StageFailed, StageTimeout
from tasks.core.faults import fault
from tasks.core.paths import CODE_ROOT, sftflow_home
from tasks.training.hosts import SSH_FAILED, interface_for, not_joined, not_started, ssh_env

JOINED = "[train] joined"  # the worker's line once its process group is up


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def launch_command(t: TrainConfig, spec_path: Path, port: int, node_rank: int = 0) -> list[str]:
    worker = ["tasks.training.worker", "--spec", str(spec_path)]
    if t.hostfile:  # DeepSpeed's runner: it reaches the other nodes with pdsh, or (per_node) starts this one
        each = ["--no_ssh", "--node_rank", str(node_rank)] if t.launcher == "per_node" else []
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            t.hostfile,
            *each,
            "--num_gpus",
            str(t.num_processes),
            "--master_addr",
            t.master_addr,
            "--master_port",
            str(port),
        ]
        return [*cmd, "--module", *worker]
    if t.num_processes == 1:  # one rank: started as the launcher would start it, in single_rank_env
        return [sys.executable, "-u", "-m", *worker]
    # one node: the per-node launcher the runner would start, without the runner's own interpreter (~3 s)
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
    return [*cmd, "--module", *worker]


def single_rank_env(t: TrainConfig, port: int) -> dict[str, str]:
    """What DeepSpeed's per-node launcher gives its one rank (transformers' documented way to run
    DeepSpeed in one process): the launcher's interpreter importing DeepSpeed costs ~5 s of CPU,
    as much as a short training. Empty where the launcher starts the ranks."""
    if t.hostfile or t.num_processes != 1:
        return {}
    one = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_SIZE": "1",
        "CROSS_RANK": "0",
        "CROSS_SIZE": "1",
    }
    return one | {"MASTER_ADDR": t.master_addr, "MASTER_PORT": str(port)}


def rendezvous_env(t: TrainConfig, env: dict, log) -> dict:
    """Across hosts, gloo binds to the address the hostname resolves to, often 127.0.0.1, and the
    other node's connections are refused: pin it to the interface that reaches the master."""
    name = t.hostfile and "GLOO_SOCKET_IFNAME" not in env and interface_for(t.master_addr)
    if name:
        env["GLOO_SOCKET_IFNAME"] = name
        log(f"train: gloo talks to {t.master_addr} over {name} (GLOO_SOCKET_IFNAME)")
    return env


def supervise_node(
    t: TrainConfig, mlflow_uri: str, cmd: list[str], log_path: Path, node_rank: int, port: int, log
) -> None:
    """``supervise``, with a multi-node rendezvous failure said in terms of the hostfile's hosts."""
    env = rendezvous_env(t, worker_env(mlflow_uri) | single_rank_env(t, port), log)
    if t.hostfile and t.launcher == "ssh":
        env = ssh_env(env, log_path.parent / "deepspeed_env", log)
    try:  # across hosts a missing peer blocks the rendezvous without a word: bound the wait
        join_timeout_s = t.rendezvous_timeout_s if t.hostfile else None
        supervise(cmd, env, log_path, t.timeout_s, log, join_timeout_s, shm=(t.master_addr, port))
    except NotJoined:
        hosts = read_hostfile(t.hostfile)
        raise StageFailed(not_joined(hosts, node_rank, t.master_addr, port, t.rendezvous_timeout_s)) from None
    except MasterUnreachable as e:
        raise StageFailed(not_started(*e.args, read_hostfile(t.hostfile)[0][0])) from None


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


def _clean_shm(addr: str, port: int) -> None:
    """DeepSpeed's CPU comm leaves shared-memory buffers behind when a rank is killed. They are
    named by the master address and port: a training that runs beside this one on the same host
    has its own port, and its rank 0 would wait forever for a buffer removed under it."""
    for path in glob.glob(f"/dev/shm/deepspeed_*_{addr}_{port}_*"):
        try:
            os.unlink(path)
        except OSError:
            pass


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
            if joined.is_set():
                fault("train:running")
            waited = time.monotonic() - start
            if join_timeout_s is not None and not joined.is_set() and waited > join_timeout_s:
                raise NotJoined(f"no rank joined within {join_timeout_s:g} s") from None
            if waited > timeout_s:
                raise


def supervise(
    cmd: list[str],
    env: dict,
    log_path: Path,
    timeout_s: float,
    log,
    join_timeout_s: float | None = None,
    shm: tuple[str, int] | None = None,
) -> None:
    """Run the launcher in its own process group, streaming its output into ``log_path`` (rank 0's
    ``[train]`` lines also into the stage log). The deadline counts whether or not anything is
    printed; past it, past ``join_timeout_s`` without the rank's ``[train] joined`` line, or on
    any error here, the whole group is killed. ``shm``: the master address and port, whose
    DeepSpeed shared-memory buffers are removed after the launch."""
    tail: collections.deque[str] = collections.deque(maxlen=60)
    joined, unreachable = threading.Event(), []
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
            if shm:
                _clean_shm(*shm)
        reader.join()
    if code != 0:
        raise StageFailed(f"training failed (exit {code}); last lines of {log_path}:\n" + "\n".join(tail))
