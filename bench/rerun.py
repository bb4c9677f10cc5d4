"""What a nightly run costs when nothing changed, next to the full run it repeats.

    python bench/rerun.py            # the demo config (SmolLM2-135M, LoRA): what `make demo` runs
    python bench/rerun.py --quick    # configs/tiny.yaml (a tiny model: the fixed costs dominate)

Runs `sftflow run CONFIG` twice on one output dir and registry: the first trains and registers,
the second finds the same fingerprint (data, config, code) on the registered version and ends as
"Unchanged". Both runs use one Prefect server (started here, SQLite), so neither pays for a
temporary one. The last line is JSON: {"rerun_fraction": flow time of the rerun over that of
the full run, "rerun_wall_fraction": the same for the whole command}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="configs/tiny.yaml instead of configs/demo.yaml")
    a = p.parse_args()
    config = "configs/tiny.yaml" if a.quick else "configs/demo.yaml"
    sys.path.insert(0, str(ROOT / "tests"))
    from services import free_port, stop, wait_http

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {
            **os.environ,
            "PREFECT_HOME": f"{tmp}/prefect",
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }
        log = Path(tmp, "server.log")
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/api/health", 180, server, log)
            runs = []
            for name in ("full", "rerun"):
                summary = Path(tmp, f"{name}.json")
                t0 = time.monotonic()
                res = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "flows.cli",
                        "run",
                        config,
                        "--set",
                        f"output_dir={tmp}/runs",
                        "--summary-json",
                        str(summary),
                    ],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                wall = time.monotonic() - t0
                if res.returncode:
                    sys.exit(res.stdout[-3000:] + res.stderr[-3000:])
                s = json.loads(summary.read_text())
                runs.append(
                    {"name": name, "wall": wall, "flow": s["seconds"], "unchanged": bool(s.get("unchanged"))}
                )
                print(
                    f"{name}: {wall:.1f}s wall, flow {s['seconds']:.1f}s, unchanged={bool(s.get('unchanged'))}",
                    flush=True,
                )
        finally:
            stop(server)
    full, rerun = runs
    if not rerun["unchanged"] or full["unchanged"]:
        sys.exit("the rerun was expected to find the full run's version unchanged")
    print(f"\n| {config} | wall s | flow s |\n|---|---|---|")
    for r in runs:
        print(f"| {r['name']} | {r['wall']:.1f} | {r['flow']:.1f} |")
    print(
        json.dumps(
            {
                "rerun_fraction": round(rerun["flow"] / full["flow"], 3),
                "rerun_wall_fraction": round(rerun["wall"] / full["wall"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
