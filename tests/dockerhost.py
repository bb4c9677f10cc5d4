"""A Docker engine and the local images the image tests build on, set up on a fresh machine.

No registry can be reached, so nothing is pulled: the engine comes from Debian's docker.io, the
base from debootstrap (tests/images/cpu_base.sh), and the project's images are built on that base
with the CPU torch wheel pip installs from here. Images are kept between runs and reused; the
engine started here is stopped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT

APT = {"dockerd": "docker.io", "debootstrap": "debootstrap", "docker-compose": "docker-compose"}
CPU_BASE = "sftflow-base:cpu"


def sh(
    *cmd: str, timeout: float = 1800, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {done.returncode}:\n{(done.stderr or done.stdout)[-4000:]}"
        )
    return done


def unavailable(why: str) -> None:
    if os.environ.get("SFTFLOW_REQUIRE_SERVICES") == "1":
        pytest.fail(why + " (SFTFLOW_REQUIRE_SERVICES=1)")
    pytest.skip(why)


def start_engine(log: Path) -> subprocess.Popen | None:
    """The engine's packages installed and ``dockerd`` started, unless one already answers."""
    if shutil.which("docker") and sh("docker", "info", check=False, timeout=30).returncode == 0:
        return None
    if os.geteuid() != 0:
        unavailable("no Docker engine answers, and installing one needs root")
    if missing := [pkg for cmd, pkg in APT.items() if not shutil.which(cmd)]:
        sh("apt-get", "update", "-qq")
        sh("apt-get", "install", "-y", "-qq", *missing)
    proc = subprocess.Popen(
        ["dockerd"], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while sh("docker", "info", check=False, timeout=30).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"dockerd did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return proc


def has_image(tag: str) -> bool:
    return sh("docker", "image", "inspect", tag, check=False).returncode == 0


def cpu_base() -> str:
    if not has_image(CPU_BASE):
        sh("bash", str(ROOT / "tests/images/cpu_base.sh"), CPU_BASE)
    return CPU_BASE


def torch_wheel() -> Path:
    """The CPU torch wheel pip installs here, from the directory its find-links names."""
    links = sh("pip", "config", "get", "global.find-links", check=False).stdout.split()
    for folder in [*links, "/opt/wheels"]:
        if wheels := sorted(Path(folder).glob("torch-2.13.0+cpu-*.whl")):
            return wheels[0]
    unavailable("no CPU torch 2.13.0 wheel in pip's find-links")


def build(dockerfile: str, tag: str, **args: str) -> dict:
    """``docker build`` from the project root with the CPU torch wheel in docker/wheels/;
    returns the build's seconds and the image's size."""
    source = torch_wheel()
    wheel = ROOT / "docker/wheels" / source.name
    if not wheel.exists():
        try:
            os.link(source, wheel)
        except OSError:
            shutil.copy(source, wheel)
    t0 = time.monotonic()
    build_args = [x for k, v in args.items() for x in ("--build-arg", f"{k}={v}")]
    sh("docker", "build", "-q", "-f", str(ROOT / "docker" / dockerfile), *build_args, "-t", tag, str(ROOT))
    seconds = time.monotonic() - t0
    size = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", tag).stdout)
    return {"tag": tag, "build_s": seconds, "size_gb": size / 1e9}


def build_context(folder: Path, tag: str) -> str:
    """A test-only image from its own folder (tests/images/*), on the local Debian base."""
    cpu_base()
    sh("docker", "build", "-q", "-t", tag, str(folder))
    return tag


class WarmUp(threading.Thread):
    """The engine, the CPU base and the train image made while the first tests run: most of it
    waits on downloads (apt, debootstrap, the images' installs), which overlap CPU-bound tests."""

    def __init__(self):
        super().__init__(name="docker-warm-up", daemon=True)
        self.log = Path(tempfile.mkdtemp(prefix="sftflow-dockerd-")) / "dockerd.log"
        self.engine: subprocess.Popen | None = None
        self.train_image: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.engine = start_engine(self.log)
            self.train_image = build("Dockerfile.train", "sftflow-train:test", BASE=cpu_base())
        except BaseException as e:  # pytest's skip and fail too: raised again in the test that waits
            self.error = e


_warm_up: WarmUp | None = None


def warm_up() -> WarmUp:
    """Started once (by conftest when image tests are selected, or by the first that needs it)."""
    global _warm_up
    if _warm_up is None:
        _warm_up = WarmUp()
        _warm_up.start()
    return _warm_up


def ready() -> WarmUp:
    done = warm_up()
    done.join()
    if done.error is not None:
        raise done.error
    return done
