"""DeepSpeed across two hosts: two network namespaces joined by a veth link, each with its own
address, one process slot each, a real TCP rendezvous and gloo between them. With
`train.launcher: per_node` node 0 runs `sftflow train` and the other host `sftflow join`; with
`train.launcher: ssh` DeepSpeed's runner on node 0 starts both hosts' ranks with pdsh, through an
sshd in each namespace."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from services import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
SUBNET = "10.77.{}.{}"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Hosts h1 (10.77.N.1) and h2 (10.77.N.2): namespaces, a veth pair, and a hostfile."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        if os.environ.get("SFTFLOW_REQUIRE_SERVICES") == "1":  # CI: these hosts must exist
            pytest.fail("network namespaces need root and iproute2")
        pytest.skip("network namespaces need root and iproute2")
    tag = os.getpid() % 10000
    names = [f"sft{tag}a", f"sft{tag}b"]
    addrs = [SUBNET.format(tag % 250, i) for i in (1, 2)]
    steps = [["ip", "netns", "add", n] for n in names]
    steps.append(["ip", "link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b"])
    for ns, end, addr in zip(names, (f"v{tag}a", f"v{tag}b"), addrs):
        steps += [["ip", "link", "set", end, "netns", ns], ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", end],
                  ["ip", "-n", ns, "link", "set", end, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]  # fmt: skip
    for step in steps:
        subprocess.run(step, check=True, capture_output=True)
    hostfile = tmp_path_factory.mktemp("hosts") / "hostfile"
    hostfile.write_text("h1 slots=1\nh2 slots=1\n")
    yield names, addrs, hostfile
    for n in names:
        subprocess.run(["ip", "netns", "delete", n], capture_output=True)


@pytest.fixture(autouse=True)
def no_ranks_left_behind(tmp_path):
    """A failed assertion must not leave a host's launcher waiting (it runs in its own session)."""
    yield
    subprocess.run(["pkill", "-f", str(tmp_path)], capture_output=True)


def settings(out: Path, hostfile: Path, master: str, port: int, **extra) -> list[str]:
    pairs = {"output_dir": out, "train.hostfile": hostfile, "train.launcher": "per_node", "train.master_addr": master,
             "train.master_port": port, "train.max_steps": 4, **extra}  # fmt: skip
    return [arg for k, v in pairs.items() for arg in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def ssh_hosts(hosts, tmp_path_factory):
    """An sshd on each host that lets this user in with a key, and `ssh` on PATH configured to
    reach h1 and h2 with it: what a cluster's ~/.ssh/config does. pdsh and sshd from Debian's packages."""
    (names, addrs, _), tmp = hosts, tmp_path_factory.mktemp("ssh")
    if missing := [
        pkg for cmd, pkg in (("sshd", "openssh-server"), ("pdsh", "pdsh")) if not shutil.which(cmd)
    ]:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, capture_output=True)
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / key)], check=True)
    shutil.copy(tmp / "id.pub", tmp / "authorized_keys")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    options = {"HostKey": tmp / "host_key", "AuthorizedKeysFile": tmp / "authorized_keys", "StrictModes": "no",
               "PidFile": "none", "UsePAM": "no"}  # fmt: skip
    daemons = [
        subprocess.Popen(["ip", "netns", "exec", ns, shutil.which("sshd"), "-D", "-e", "-f", "/dev/null",
                          "-o", f"ListenAddress={addr}", *[f"-o{k}={v}" for k, v in options.items()]],
                         stdout=(tmp / f"sshd-{ns}.log").open("w"), stderr=subprocess.STDOUT)
        for ns, addr in zip(names, addrs)
    ]  # fmt: skip
    hosts_config = "".join(f"Host h{i}\n  HostName {a}\n" for i, a in enumerate(addrs, 1))
    (tmp / "ssh_config").write_text(
        hosts_config + f"Host h9\n  HostName {addrs[0].rsplit('.', 1)[0]}.9\nHost *\n  IdentityFile {tmp / 'id'}\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  ConnectTimeout 5\n"
        "  LogLevel ERROR\n"
    )  # fmt: skip
    (tmp / "bin").mkdir()
    (tmp / "bin/ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {tmp / "ssh_config"} "$@"\n')
    (tmp / "bin/ssh").chmod(0o755)
    yield {"PATH": f"{tmp / 'bin'}:{os.environ['PATH']}"}
    for daemon in daemons:
        daemon.kill()


def on_host(ns: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


def ranks(train_dir: Path) -> list[dict]:
    return [json.loads((train_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_hosts_train_as_one_world_with_the_losses_of_one_host_with_two_processes(
    hosts, one_host, tmp_path
):
    (h1, h2), (a1, _), hostfile = hosts
    args = settings(tmp_path / "runs", hostfile, a1, free_port())
    assert run_cli("format", "configs/tiny.yaml", "--run-id", "two-hosts", *args).returncode == 0
    node0 = on_host(h1, "train", "configs/tiny.yaml", "--run-id", "two-hosts", *args)
    node1 = on_host(h2, "join", "configs/tiny.yaml", "--run-id", "two-hosts", "--node-rank", "1", *args)
    out0, out1 = node0.communicate(timeout=600)[0], node1.communicate(timeout=600)[0]
    assert node0.returncode == 0 and node1.returncode == 0, out0[-3000:] + out1[-3000:]
    assert f"gloo talks to {a1} over" in out0 and f"join: h2 joins {a1}:" in out1
    two_hosts = tmp_path / "runs" / "two-hosts" / "train"
    assert_like_one_host(two_hosts, one_host, hostfile, "per_node")


@pytest.fixture(scope="module")
def one_host(tmp_path_factory) -> Path:
    """The same 4 steps on one host with 2 processes: what the two-host runs must reproduce."""
    out = tmp_path_factory.mktemp("one-host")
    one = ["--set", f"output_dir={out}", "--set", "train.num_processes=2", "--set", "train.max_steps=4"]
    assert run_cli("format", "configs/tiny.yaml", "--run-id", "one-host", *one).returncode == 0
    res = run_cli("train", "configs/tiny.yaml", "--run-id", "one-host", *one)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "one-host" / "train"


def assert_like_one_host(two_hosts: Path, one_host: Path, hostfile: Path, launcher: str) -> None:
    """World size 2, disjoint batches, one set of weights, and the one-host run's batches and losses."""
    r0, r1 = ranks(two_hosts)
    assert r0["world_size"] == r1["world_size"] == 2 and (r0["rank"], r1["rank"]) == (0, 1)
    assert not set(r0["first_batches"]) & set(r1["first_batches"])  # each host its own batches
    assert r0["trainable_sha256"] == r1["trainable_sha256"]  # the same weights on both hosts
    losses = [json.loads((d / "result.json").read_text())["losses"] for d in (two_hosts, one_host)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert [r["first_batches"] for r in ranks(one_host)] == [r0["first_batches"], r1["first_batches"]]
    print(f"\n{launcher}: world size 2 over {hostfile.read_text().split()}; batches h1 {r0['first_batches'][:2]} "
          f"h2 {r1['first_batches'][:2]}; weights sha256 h1 {r0['trainable_sha256'][:16]} h2 "
          f"{r1['trainable_sha256'][:16]}; losses two hosts {losses[0]} one host {losses[1]}")  # fmt: skip


def test_a_host_that_never_joins_fails_in_bounded_time_naming_it(hosts, tmp_path):
    (h1, _), (a1, _), hostfile = hosts
    args = settings(tmp_path / "runs", hostfile, a1, free_port(), **{"train.rendezvous_timeout_s": 20})
    assert run_cli("format", "configs/tiny.yaml", "--run-id", "alone", *args).returncode == 0
    t0 = time.monotonic()
    node0 = on_host(h1, "train", "configs/tiny.yaml", "--run-id", "alone", *args)
    out = node0.communicate(timeout=300)[0]
    assert node0.returncode == 1 and time.monotonic() - t0 < 150, out[-3000:]
    assert f"rendezvous at {a1}:" in out and "timed out after 20 s: h2 (node rank 1) did not join" in out


def test_a_taken_master_port_fails_at_once_naming_the_host(hosts, tmp_path):
    (h1, _), (a1, _), hostfile = hosts
    port = free_port()
    hold = f"import socket, time; s = socket.socket(); s.bind(('{a1}', {port})); s.listen(); print('held', flush=True)"
    holder = subprocess.Popen(
        ["ip", "netns", "exec", h1, sys.executable, "-c", hold + "; time.sleep(300)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        args = settings(tmp_path / "runs", hostfile, a1, port)
        assert run_cli("format", "configs/tiny.yaml", "--run-id", "taken", *args).returncode == 0
        t0 = time.monotonic()
        node0 = on_host(h1, "train", "configs/tiny.yaml", "--run-id", "taken", *args)
        out = node0.communicate(timeout=120)[0]
        assert node0.returncode == 1 and time.monotonic() - t0 < 60, out[-3000:]
        assert f"train.master_port {port} is already taken on h1 ({a1}), node 0 of train.hostfile" in out
    finally:
        holder.kill()


def test_a_joining_host_that_cannot_reach_the_master_fails_naming_it(hosts, tmp_path):
    (_, h2), (a1, _), hostfile = hosts
    args = settings(tmp_path / "runs", hostfile, a1, free_port(), **{"train.rendezvous_timeout_s": 20})
    spec = tmp_path / "runs" / "orphan" / "train" / "spec.json"  # as if node 0 had started, then died
    assert run_cli("format", "configs/tiny.yaml", "--run-id", "orphan", *args).returncode == 0
    res = run_cli("train", "configs/tiny.yaml", "--run-id", "orphan", "--set", f"output_dir={tmp_path / 'runs'}",
                  "--set", "train.max_steps=1")  # fmt: skip
    assert res.returncode == 0 and spec.is_file()
    t0 = time.monotonic()
    node1 = on_host(h2, "join", "configs/tiny.yaml", "--run-id", "orphan", "--node-rank", "1", *args)
    out = node1.communicate(timeout=300)[0]
    assert node1.returncode == 1 and time.monotonic() - t0 < 150, out[-3000:]
    assert "h2 (node rank 1) could not reach the master h1 at" in out


def test_the_ssh_launcher_starts_both_hosts_ranks_over_pdsh(hosts, ssh_hosts, one_host, tmp_path):
    """`train.launcher: ssh`: the train stage on h1 runs DeepSpeed's runner, which starts one rank
    on each host with pdsh over ssh; the ranks find their own gloo interface. MLflow's password
    in the environment reaches no file of the run (the runner logs its pdsh command line)."""
    (h1, _), (a1, _), hostfile = hosts
    args = settings(tmp_path / "runs", hostfile, a1, free_port(), **{"train.launcher": "ssh"})
    assert run_cli("format", "configs/tiny.yaml", "--run-id", "ssh", *args).returncode == 0
    secret = {"MLFLOW_TRACKING_PASSWORD": "mlflowSECRETpw42"}  # the runner exports MLFLOW_* over pdsh
    threads = {"OMP_NUM_THREADS": "1"}  # the user's setting reaches the ranks pdsh starts (sshd's env)
    node0 = on_host(
        h1, "train", "configs/tiny.yaml", "--run-id", "ssh", *args, env=ssh_hosts | secret | threads
    )
    out = node0.communicate(timeout=600)[0]
    assert node0.returncode == 0, out[-3000:]
    train = tmp_path / "runs" / "ssh" / "train"
    log = (train / "train.log").read_text()
    assert "h1: [train] joined: rank 0 of 2" in log and "h2: [train] joined: rank 1 of 2" in log  # pdsh's
    assert re.search(r"h2: \[train\] joined: rank 1 of 2 on \S+, 1 CPU thread", log), log[-3000:]
    assert "cmd = pdsh" in log and "SFTFLOW_HOME=" in (train / "deepspeed_env").read_text()
    leaked = [
        f for f in (tmp_path / "runs").rglob("*") if f.is_file() and b"mlflowSECRETpw42" in f.read_bytes()
    ]
    assert leaked == [] and "mlflowSECRETpw42" not in out, leaked
    assert_like_one_host(train, one_host, hostfile, "ssh")


def test_the_ssh_launcher_names_a_host_it_cannot_reach(hosts, ssh_hosts, tmp_path):
    (h1, _), (a1, _), _ = hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("h1 slots=1\nh9 slots=1\n")  # h9: an address no host has
    args = settings(tmp_path / "runs", hostfile, a1, free_port(), **{"train.launcher": "ssh"})
    assert run_cli("format", "configs/tiny.yaml", "--run-id", "ssh-down", *args).returncode == 0
    t0 = time.monotonic()
    node0 = on_host(h1, "train", "configs/tiny.yaml", "--run-id", "ssh-down", *args, env=ssh_hosts)
    out = node0.communicate(timeout=300)[0]
    assert node0.returncode == 1 and time.monotonic() - t0 < 120, out[-3000:]
    assert "pdsh could not start the ranks of h9: h9: ssh: connect to host" in out


def test_the_ssh_runner_and_its_ranks_environment_file_leave_credentials_out(tmp_path):
    """What DeepSpeed's runner would log on its pdsh command line: the MLFLOW_* variables it
    exports and the environment file's lines. Credentials are in neither."""
    from tasks.training.hosts import ssh_env

    said = []
    env = {"HF_HOME": "/h", "SFTFLOW_MLFLOW_URI": "sqlite:////runs/mlflow.db", "SECRET_TOKEN": "x",
           "MLFLOW_TRACKING_PASSWORD": "pw1", "MLFLOW_EXPERIMENT_NAME": "e"}  # fmt: skip
    runner = ssh_env(env, tmp_path / "plain", said.append)
    lines = (tmp_path / "plain").read_text().splitlines()
    assert "HF_HOME=/h" in lines and "SFTFLOW_MLFLOW_URI=sqlite:////runs/mlflow.db" in lines
    assert not any(line.startswith("SECRET_TOKEN") for line in lines) and said == []  # a local store
    assert "MLFLOW_TRACKING_PASSWORD" not in runner and runner["MLFLOW_EXPERIMENT_NAME"] == "e"
    assert runner["DS_ENV_FILE"] == str((tmp_path / "plain").resolve())
    env["SFTFLOW_MLFLOW_URI"] = "https://mlflow.example.com"  # a server the password is for
    ssh_env(env, tmp_path / "by-env", said.append)
    assert "SFTFLOW_MLFLOW_URI" not in (tmp_path / "by-env").read_text() and "credentials" in said[-1]
    env |= {
        "SFTFLOW_MLFLOW_URI": "https://user:pass@mlflow.example.com",
        "MLFLOW_TRACKING_URI": "https://user:pass@m",
    }
    runner = ssh_env(env, tmp_path / "secret", said.append)
    text = (tmp_path / "secret").read_text()
    assert "pass" not in text and "SFTFLOW_HOME=" in text and "MLFLOW_TRACKING_URI" not in runner
