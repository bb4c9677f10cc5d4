"""What a nightly run costs when nothing changed, next to the full run it repeats.

    python bench/rerun.py            # the demo config (SmolLM2-135M, LoRA): what `make demo` runs
    python bench/rerun.py --quick    # configs/tiny.yaml (a tiny model: the fixed costs dominate)

Runs `sftflow run CONFIG` twice on one output dir and registry: the first trains and registers,
the second finds the same fingerprint (data, config, code) on the registered version and ends as
"Unchanged". Both runs use one Prefect server (started here, SQLite), so neither pays for a
temporary one. The pair is repeated --repeats times (default 3, each in a fresh output dir and
registry). The last line is JSON: the median [range] of "rerun_fraction" (flow time of the
rerun over that of the full run) and "rerun_wall_fraction" (the same for the whole command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(config: str, out: Path, name: str, env: dict) -> dict:
    summary = out / f"{name}.json"
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "flows.cli", "run", config, "--set", f"output_dir={out}/runs"]
    res = subprocess.run(
        cmd + ["--summary-json", str(summary)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.monotonic() - t0
    if res.returncode:
        sys.exit(res.stdout[-3000:] + res.stderr[-3000:])
    s = json.loads(summary.read_text())
    print(
        f"{name}: {wall:.1f}s wall, flow {s['seconds']:.1f}s, unchanged={bool(s.get('unchanged'))}",
        flush=True,
    )
    return {"wall": wall, "flow": s["seconds"], "unchanged": bool(s.get("unchanged"))}


def spread(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "range": [round(min(xs), 3), round(max(xs), 3)]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="configs/tiny.yaml instead of configs/demo.yaml")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    config = "configs/tiny.yaml" if a.quick else "configs/demo.yaml"
    sys.path.insert(0, str(ROOT / "tests"))
    from services import free_port, start_prefect, stop

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {
            **os.environ,
            "PREFECT_HOME": f"{tmp}/prefect",
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }
        server = start_prefect(env, port, Path(tmp, "server.log"))
        pairs = []
        try:
            for i in range(a.repeats):
                out = Path(tmp, f"pair{i}")
                pairs.append([run(config, out, name, env) for name in ("full", "rerun")])
        finally:
            stop(server)
    if any(not rerun["unchanged"] or full["unchanged"] for full, rerun in pairs):
        sys.exit("each rerun was expected to find its full run's version unchanged")
    print(
        f"\n| {config} | full: wall s | full: flow s | rerun: wall s | rerun: flow s |\n|---|---|---|---|---|"
    )
    for i, (full, rerun) in enumerate(pairs):
        print(
            f"| {i + 1} | {full['wall']:.1f} | {full['flow']:.1f} | {rerun['wall']:.1f} | {rerun['flow']:.2f} |"
        )
    print(
        json.dumps(
            {
                "rerun_fraction": spread([r["flow"] / f["flow"] for f, r in pairs]),
                "rerun_wall_fraction": spread([r["wall"] / f["wall"] for f, r in pairs]),
            }
        )
    )


if __name__ == "__main__":
    main()
