"""Where a newcomer's `make demo` spends its time: installs, the pipeline's phases, the parity gate.

    python bench/pipeline.py                 # a fresh clone's make demo, then 3 warm reruns
    python bench/pipeline.py --warm-runs 1   # one warm rerun
    python bench/pipeline.py --rev <commit>  # another commit (the same figures, to compare)
    python bench/pipeline.py --reuse /tmp/sftflow-bench-X/sftflow --set serve.parity.concurrency=1
                                             # warm runs only, in a kept clone, with overrides

A fresh clone of ``--rev`` in a temporary folder, with empty pip and uv caches and its own
``.cache/`` (models, vLLM's venv and compile cache), as on a new machine: ``make install``,
``make vllm`` and ``make demo`` are timed one by one. Then ``sftflow run configs/demo.yaml
--force`` runs ``--warm-runs`` times in the same clone: everything installed, vLLM's compile
cache present, and (as on a night with new data) a new candidate from another ``train.seed``
each time, so evaluate scores the candidate and reads the base's and the champion's scores
from the score cache (``--same-candidate``: the config's seed, every score from the cache).
Each run's phases come from its stage manifests and its parity.json:

- before the first stage: Prefect's temporary server, the model's first build, the unchanged check;
- format, train, merge, evaluate, handoff (each stage's own duration);
- the parity gate: what handoff waited for the vLLM server, plus the checks;
- overhead: the command's wall time outside the train stage.

The last line is JSON: the fresh clone's figures, and the warm runs' median [range] of the
overhead ratio (overhead / train) and the parity share (parity gate / the command's wall time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("format", "train", "merge", "evaluate", "handoff")
# the Makefile's exports, for the warm runs started without make
MAKE_DIRS = {
    "SFTFLOW_HOME": ".cache/sftflow",
    "HF_HOME": ".cache/huggingface",
    "TORCH_EXTENSIONS_DIR": ".cache/torch_extensions",
}
MAKE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    t0 = time.monotonic()
    with log.open("a") as out:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return time.monotonic() - t0


def phases(run_dir: Path, wall: float, started: float) -> dict:
    """The phases of one pipeline run, from its manifests (UTC timestamps) and the command's start."""
    manifests = {s: json.loads((run_dir / s / "manifest.json").read_text()) for s in STAGES}
    at = lambda s, key: dt.datetime.fromisoformat(manifests[s][key]).timestamp()
    gate = run_dir / "handoff/parity.json"  # absent with serve.parity.enabled=false
    parity = (
        json.loads(gate.read_text())
        if gate.is_file()
        else {"server_start_s": 0, "seconds": 0, "agreement": 0}
    )
    figures = {f"{s}_s": manifests[s]["duration_s"] for s in STAGES}
    figures["before_first_stage_s"] = at("format", "started_at") - started
    figures["after_last_stage_s"] = started + wall - at("handoff", "ended_at")
    figures["wall_s"] = wall
    figures["server_start_s"] = parity["server_start_s"]
    figures["server_wait_s"] = parity.get("server_wait_s", parity["server_start_s"])
    figures["parity_checks_s"] = parity["seconds"]
    figures["parity_s"] = figures["server_wait_s"] + parity["seconds"]
    figures["agreement"] = parity["agreement"]
    figures["overhead_ratio"] = (wall - figures["train_s"]) / figures["train_s"]
    figures["parity_share"] = figures["parity_s"] / wall
    return {k: round(v, 3) for k, v in figures.items()}


def demo_run(clone: Path, env: dict, log: Path, cmd: list[str]) -> dict:
    """One pipeline run of the demo config (``make demo``, or the command behind it); its phases."""
    started = time.time()
    wall = timed(cmd, clone, env, log)
    runs = [d for d in (clone / "runs").iterdir() if (d / "handoff/manifest.json").is_file()]
    run = max(runs, key=lambda d: (d / "handoff/manifest.json").stat().st_mtime)
    return phases(run, wall, started)


def fresh_clone(rev: str, tmp: Path, clone: Path, env: dict, log: Path) -> tuple[dict, dict]:
    """``make install``, ``make vllm`` and ``make demo`` on a fresh clone with empty package caches:
    their times, and the demo run's phases."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=clone, check=True)
    # a new machine: no package caches; the clone's own .cache/ (the Makefile's defaults)
    env = env | {"PIP_CACHE_DIR": str(tmp / "pip-cache"), "UV_CACHE_DIR": str(tmp / "uv-cache")}
    print(f"bench: {rev} cloned into {clone}; log {log}", flush=True)
    fresh = {
        "make install": timed(["make", "install"], clone, env, log),
        "make vllm": timed(["make", "vllm"], clone, env, log),
    }
    first = demo_run(clone, env, log, ["make", "demo"])
    fresh["make demo (pipeline)"] = first["wall_s"]
    fresh["make demo in all"] = sum(fresh.values())
    print("fresh clone: " + ", ".join(f"{k} {v:.0f}s" for k, v in fresh.items()), flush=True)
    return fresh, first


def spread(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "range": [round(min(xs), 3), round(max(xs), 3)]}


def table(rows: dict[str, dict]) -> str:
    keys = [
        "before_first_stage_s",
        *[f"{s}_s" for s in STAGES],
        "server_start_s",
        "server_wait_s",
        "parity_checks_s",
        "wall_s",
        "overhead_ratio",
        "parity_share",
        "agreement",
    ]
    lines = [f"| phase | {' | '.join(rows)} |", "|---" * (len(rows) + 1) + "|"]
    lines += [f"| {k} | {' | '.join(str(r.get(k, '')) for r in rows.values())} |" for k in keys]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rev", default="HEAD", help="the commit to clone (default: HEAD)")
    p.add_argument("--warm-runs", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    p.add_argument("--reuse", type=Path, help="a clone kept by --keep: only the warm runs, in it")
    p.add_argument("--set", action="append", default=[], help="an override for the warm runs (repeatable)")
    p.add_argument(
        "--same-candidate",
        dest="new_candidate",
        action="store_false",
        help="warm runs train with the config's seed: the same weights, every score from the cache",
    )
    a = p.parse_args()
    tmp = a.reuse.parent if a.reuse else Path(tempfile.mkdtemp(prefix="sftflow-bench-"))
    clone, log = tmp / "sftflow", tmp / "bench.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFTFLOW_", "PREFECT_API_URL"))}
    for k in ("HF_HOME", "TORCH_EXTENSIONS_DIR", "VLLM_CACHE_ROOT"):
        env.pop(k, None)
    rows, fresh = {}, {}
    if not a.reuse:
        fresh, rows["fresh"] = fresh_clone(a.rev, tmp, clone, env, log)
    # what `make demo` runs, again: the Makefile's environment, --force past the unchanged check
    make_env = env | {k: str(clone / v) for k, v in MAKE_DIRS.items()} | MAKE_ENV
    overrides = [x for o in a.set for x in ("--set", o)]
    for i in range(a.warm_runs):
        # a night trains a new candidate: another seed here (the same seed gives the same bytes,
        # whose scores come back from the score cache); the base and the champion come back
        seed = ["--set", f"train.seed={1000 + i}"] if a.new_candidate else []
        cmd = [".venv/bin/sftflow", "run", "configs/demo.yaml", "--force", *seed, *overrides]
        rows[f"warm {i + 1}"] = demo_run(clone, make_env, log, cmd)
        print(f"warm {i + 1}: {rows[f'warm {i + 1}']}", flush=True)
    print(table(rows))
    warm = [r for name, r in rows.items() if name.startswith("warm")] or [rows["fresh"]]
    result = {
        "rev": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True
        ).stdout.strip(),
        "fresh_s": {k: round(v, 1) for k, v in fresh.items()},
        "fresh_phases": rows.get("fresh"),
        "overrides": a.set,
        "warm_runs": len(warm),
        "overhead_ratio": spread([r["overhead_ratio"] for r in warm]),
        "parity_share": spread([r["parity_share"] for r in warm]),
        "wall_s": spread([r["wall_s"] for r in warm]),
        "train_s": spread([r["train_s"] for r in warm]),
        "parity_s": spread([r["parity_s"] for r in warm]),
        "agreement": spread([r["agreement"] for r in warm]),
    }
    if not (a.keep or a.reuse):
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
