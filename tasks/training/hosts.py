"""The hosts of a multi-node launch, and what can be checked about them before anyone waits.

Multi-node runs fail in ways that look like hangs: a worker that binds gloo to 127.0.0.1
because the hostname resolves to loopback, a master port another process holds, a node that
never joins. These are the checks and the messages that name the host instead.
"""

from __future__ import annotations

import errno
import re
import socket
from pathlib import Path

from tasks.core.errors import StageFailed
from tasks.core.paths import sftflow_home
from tasks.core.tracking import redact


def interface_for(addr: str) -> str | None:
    """The network interface this machine reaches ``addr`` through (a UDP connect sends nothing;
    the kernel picks the route and its source address)."""
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, 9))
        except OSError:
            return None
        local = s.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    return None


def check_master_port(addr: str, port: int, host: str) -> None:
    """The rendezvous port must be free on node 0 before the launcher starts waiting on it."""
    with socket.socket() as s:
        try:
            s.bind((addr, port))
        except OSError as e:
            reason = "is already taken" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise StageFailed(
                f"train.master_port {port} {reason} on {host} ({addr}), node 0 of train.hostfile: "
                "pick another port, or 0 for a free one"
            ) from None


def not_joined(hosts: list[tuple[str, int]], node_rank: int, addr: str, port: int, waited: int) -> str:
    """What a rendezvous that never completed means, from where it was waited for."""
    if node_rank == 0:
        others = ", ".join(f"{h} (node rank {i})" for i, (h, _) in enumerate(hosts) if i)
        return (
            f"rendezvous at {addr}:{port} timed out after {waited} s: {others} did not join (run `sftflow "
            f"join` there; check that it reaches {addr}:{port}); killed this node's ranks"
        )
    return (
        f"{hosts[node_rank][0]} (node rank {node_rank}) could not reach the master {hosts[0][0]} at "
        f"{addr}:{port} within {waited} s (is node 0 training? does this host reach {addr}?)"
    )


# pdsh's line when ssh could not connect to a host or log in there
SSH_FAILED = re.compile(r"^pdsh@\S+: (?P<host>\S+): ssh exited with exit code 255")


def not_started(host: str, why: str, node0: str) -> str:
    return (
        f"pdsh could not start the ranks of {host}: {why} (does `ssh {host}` log in without a password "
        f"from {node0}?); killed the other hosts' ranks"
    )


# What ranks started over ssh need from the train stage's environment: pdsh gives them sshd's.
# DeepSpeed's runner forwards PYTHON* and MLFLOW* variables itself, and a DS_ENV_FILE's lines.
# OMP_NUM_THREADS: where it is set, every host's ranks take it (else each its share of its cores).
REMOTE_ENV = (
    "SFTFLOW_HOME",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TORCH_EXTENSIONS_DIR",
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
)


def ssh_env(env: dict[str, str], path: Path, log) -> dict[str, str]:
    """The environment for DeepSpeed's runner on the ssh launcher, and the ranks' environment
    file (its ``.deepspeed_env`` format) at ``path``, named in it as ``DS_ENV_FILE``.

    The runner writes every ``MLFLOW_*`` variable and every line of that file into the pdsh
    command line it logs (``train.log``, uploaded to MLflow). So MLflow's credentials (a
    password or token variable, or a URI with ``user:password@``) stay with this process; the
    ranks then cannot reach an MLflow server that needs them, and their metrics are logged when
    the stage ends, not live."""
    secrets = sorted(k for k, v in env.items() if k.startswith("MLFLOW_") and _is_secret(k, v))
    runner = {k: v for k, v in env.items() if k not in secrets}
    keep = {k: env[k] for k in REMOTE_ENV if k in env} | {"SFTFLOW_HOME": str(sftflow_home())}
    uri = env.get("SFTFLOW_MLFLOW_URI", "")
    needs_secrets = uri.startswith(("http://", "https://")) and (secrets or redact(uri) != uri)
    if uri and not needs_secrets:
        keep["SFTFLOW_MLFLOW_URI"] = uri
    elif uri:
        log(
            "train: MLflow's credentials are not sent to the ssh-started ranks (DeepSpeed's runner "
            "logs their command line): training metrics are logged when the stage ends, not live"
        )
    path.write_text("".join(f"{k}={v}\n" for k, v in keep.items()))
    return runner | {"DS_ENV_FILE": str(path.resolve())}


def _is_secret(name: str, value: str) -> bool:
    return any(word in name for word in ("PASSWORD", "TOKEN", "SECRET")) or redact(value) != value
