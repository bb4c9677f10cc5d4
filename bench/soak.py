"""A month of nights, simulated: scripted nightly runs in one output_dir and registry, checked night by night.

    python bench/soak.py --nights 30     # about 20 minutes on 2 cores (thirty nights took 18.4)
    python bench/soak.py --nights 6      # what CI runs (tests/test_soak.py)

Every night runs `sftflow run configs/tiny.yaml` as the nightly job does (continue from the
champion, replay 30% of its sources, gate against base and champion) on its own data file, and
the script plays what a month brings, in a cycle of ten nights:

    new       a new data file
    same      the same data, config and code as the night before: "Unchanged"
    kill      the flow SIGKILLed mid-training (its DeepSpeed ranks live on until the next start)
    overlap   an on-demand run started next to the nightly, same output_dir and registry
    full      a full disk: output_dir's filesystem, MLflow's SQLite store on it, has 64 KiB left
    adapter   serve.mode=adapter (the next nights evaluate and continue from an adapter champion)
    bad       a data file of garbage lines

output_dir sits on a size-limited tmpfs (as root; otherwise a plain folder and the full-disk
night is skipped), so "disk used" is that filesystem's. The retention policy keeps
`--keep-runs` runs; its time limits are shrunk to the soak's pace (min_age_hours 0, caches
unused for a minute go). After each night the script asserts:

    disk      used <= (keep_runs + 4) x the largest night + the registry and caches
    champion  moved only to a version whose gate passed, evaluated against the champion it replaced
    history   each version's sftflow.replaced is the champion before it; no promotion left unfinished
    orphans   no process marked for output_dir outlives a night, except a killed night's, reaped next
    state     every night ends in a named state, and a failed one with a message, never a traceback

It prints a table, one row per night, and a JSON last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CYCLE = ["new", "same", "kill", "overlap", "full", "adapter", "bad", "new", "adapter", "new"]
FULL = ("free, and this writes about", "No space left on device", "database or disk is full")
NIGHTLY = [  # configs/nightly.yaml's choices, on the tiny model
    "data.replay=0.3", "train.init_from=champion", "eval.gate.against=both", "eval.past_eval_sets=1",
    "eval.batch_size=64", "retention.min_age_hours=0", "retention.format_cache_days=0.001",
]  # fmt: skip


@dataclass
class Night:
    n: int
    kind: str
    state: str = ""
    champion: str = "-"
    used: int = 0
    freed: int = 0
    left: int = 0  # processes marked for output_dir still alive after the night
    runs: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def codes(n: int, count: int = 40) -> list[dict]:
    return [{"instruction": f"Night {n}: say code word {i}.", "output": f"n{n}w{i}"} for i in range(count)]


class Soak:
    def __init__(self, work: Path, disk: Path, keep_runs: int, env: dict):
        self.work, self.out, self.keep, self.env = work, disk / "runs", keep_runs, env
        self.uri = f"sqlite:///{self.out / 'mlflow.db'}"
        self.growth = 0  # the largest one night added
        self.last_used = 0
        self.history: list[str] = []  # champion versions, in the order they became champion
        self.data: Path | None = None

    def args(self, run_id: str, data: Path, *extra: str) -> list[str]:
        sets = [f"output_dir={self.out}", f"data.path={data}", f"retention.keep_runs={self.keep}", *NIGHTLY]
        cmd = [sys.executable, "-m", "flows.cli", "run", "configs/tiny.yaml", "--run-id", run_id]
        cmd += [x for s in [*sets, *extra] for x in ("--set", s)]
        return cmd + ["--summary-json", str(self.work / f"{run_id}.json")]

    def start(self, run_id: str, data: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
        log, err = open(self.work / f"{run_id}.log", "w"), open(self.work / f"{run_id}.err", "w")
        return subprocess.Popen(
            self.args(run_id, data, *extra), cwd=ROOT, env={**self.env, **(env or {})},
            stdout=log, stderr=err, text=True,
        )  # fmt: skip

    def finish(self, proc: subprocess.Popen, run_id: str) -> tuple[str, dict]:
        """The night's named state and its summary ({} when it did not complete)."""
        rc = proc.wait()
        log = (self.work / f"{run_id}.err").read_text(errors="replace")  # what the person reads
        assert "Traceback" not in log, f"{run_id}: a traceback, not a clear error:\n{log[-3000:]}"
        if rc == -9:
            return "killed", {}
        if rc:
            error = [line for line in log.splitlines() if line.strip()][-1]
            return f"failed: {error.strip()[:150]}", {}
        s = json.loads((self.work / f"{run_id}.json").read_text())
        if s.get("unchanged"):
            return f"Unchanged (v{s['same_as']['version']})", s
        if s["promoted"]:
            return f"promoted v{s['version']}", s
        return f"not promoted v{s['version']}: {s['gate'][:80]}", s

    def night(self, n: int, kind: str) -> Night:
        night, t0 = Night(n, kind), time.monotonic()
        before = self.champion()
        data = self.data if kind == "same" and self.data else self.work / f"night{n}.jsonl"
        if kind != "same":
            rows = codes(n) if kind != "bad" else [f"garbage line {i} {{" for i in range(40)]
            data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        states, filler = [], None
        if kind == "full":
            filler = self.fill()
            if filler is None:
                night.notes.append("skipped: no tmpfs (not root)")
                kind = "new"
        extra = ["serve.mode=adapter"] if kind == "adapter" else []
        fault = {"SFTFLOW_FAULT": "train:running", "SFTFLOW_FAULT_ONCE": str(self.work / f"fired{n}")}
        procs = [(self.start(f"night{n}", data, *extra, env=fault if kind == "kill" else None), f"night{n}")]
        if kind == "overlap":  # an on-demand run a few seconds after the nightly, on other data
            other = self.work / f"night{n}-on-demand.jsonl"
            other.write_text("".join(json.dumps(r) + "\n" for r in codes(n + 1000)))
            time.sleep(5)
            procs.append((self.start(f"night{n}-on-demand", other), f"night{n}-on-demand"))
        summaries = []
        for proc, run_id in procs:
            state, summary = self.finish(proc, run_id)
            states.append(state)
            summaries.append(summary)
        if filler is not None:
            filler.unlink()
        if kind not in ("same", "bad", "full", "kill") and not states[0].startswith("failed"):
            self.data = data
        night.state = " | ".join(states)
        self.check(night, kind, before, summaries)
        night.seconds = round(time.monotonic() - t0, 1)
        return night

    def fill(self) -> Path | None:
        """Fill the tmpfs (output_dir and its SQLite MLflow store) up to its last 64 KiB."""
        if os.geteuid() != 0:
            return None
        filler = self.out.parent / "filler"
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(self.out.parent).free - 64 * 1024)
        return filler

    def champion(self) -> str | None:
        from tasks.registry.versions import alias_version

        if not (self.out / "mlflow.db").exists():
            return None
        mv = alias_version(self.uri, "tiny", "champion")
        return None if mv is None else str(mv.version)

    def check(self, night: Night, kind: str, before: str | None, summaries: list[dict]) -> None:
        from tasks.core.orphans import find_orphans
        from tasks.registry.versions import all_versions

        after = self.champion()
        night.champion = f"v{after}" if after else "-"
        versions = {str(v.version): v.tags for v in all_versions(self.uri, "tiny")}
        self.check_promotions(before, after, versions)
        for version, tags in versions.items():
            from tasks.registry.tags import promotion_unfinished

            assert not promotion_unfinished(tags), f"v{version}: gate passed, never promoted nor refused"
        self.check_state(night, kind, summaries)
        night.left = len(find_orphans(self.out))
        assert night.left == 0 or kind == "kill", f"{night.left} process(es) outlived night {night.n}"
        if kind == "kill":
            assert night.left > 0, "the SIGKILL left no ranks: the next night's reaping is untested"
        self.check_disk(night, summaries)

    def check_promotions(self, before: str | None, after: str | None, versions: dict) -> None:
        """Walk back from the new champion along sftflow.replaced to the old one: each step was a
        promotion whose gate passed against exactly the champion it replaced."""
        chain, v = [], after
        while v != before:
            assert v is not None and v in versions, f"champion {after} does not lead back to {before}"
            tags = versions[v]
            assert tags.get("sftflow.gate_passed") == "True" and tags.get("sftflow.promoted") == "True", v
            compared = self.evaluated_against(tags["sftflow.run_id"])
            replaced = tags.get("sftflow.replaced") or None
            assert compared == replaced, f"v{v} replaced {replaced} but was evaluated against {compared}"
            chain.append(v)
            v = replaced
        self.history += reversed(chain)

    def evaluated_against(self, run_id: str) -> str | None:
        manifest = json.loads((self.out / run_id / "evaluate" / "manifest.json").read_text())
        return manifest["result"]["champion_version"]

    def check_state(self, night: Night, kind: str, summaries: list[dict]) -> None:
        first = night.state.split(" | ")[0]
        expected = {
            "same": "Unchanged", "kill": "killed", "bad": "failed", "full": "failed",
        }.get(kind, ("promoted", "not promoted"))  # fmt: skip
        assert first.startswith(expected), f"night {night.n} ({kind}): {night.state}"
        if kind == "bad":
            assert "night" in first and ".jsonl" in first, f"the error does not name the file: {first}"
        if kind == "full":  # wherever the first write met the full disk, it says so in one line
            assert any(m in first for m in FULL), f"not a named full-disk error: {first}"
            assert not any(s.get("version") for s in summaries)
        if kind == "overlap":
            assert all(s.startswith(("promoted", "not promoted")) for s in night.state.split(" | ")), (
                night.state
            )

    def check_disk(self, night: Night, summaries: list[dict]) -> None:
        from tasks.core.space import tree_bytes
        from tasks.registry.retention import run_folders

        used = tree_bytes(self.out)
        gcs = [s["gc"] for s in summaries if s.get("gc")]
        night.freed = sum(g["used_before"] - g["used_after"] for g in gcs)
        night.used, night.runs = used, len(run_folders(self.out))
        self.growth = max(self.growth, used + night.freed - self.last_used)
        self.last_used = used
        state = sum(tree_bytes(self.out / d) for d in ("mlflow.db", ".cache") if (self.out / d).exists())
        bound = (self.keep + 4) * self.growth + state
        assert used <= bound, f"night {night.n}: {used} bytes used, over the policy's bound {bound}"
        assert night.runs <= self.keep + 4, f"night {night.n}: {night.runs} run folders kept"


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def table(nights: list[Night]) -> str:
    rows = ["| night | kind | state | champion | disk used | freed | processes left | runs kept | s |"]
    rows.append("|---|---|---|---|---|---|---|---|---|")
    for x in nights:
        state = x.state.replace("|", "/") + (f" ({'; '.join(x.notes)})" if x.notes else "")
        cells = [
            x.n,
            x.kind,
            state,
            x.champion,
            mib(x.used),
            mib(x.freed),
            x.left,
            x.runs,
            f"{x.seconds:.0f}",
        ]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows)


def mount_disk(disk: Path, size_mb: int) -> bool:
    disk.mkdir(parents=True)
    if os.geteuid() != 0:
        return False
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(disk)], check=True)
    return True


def prefect_server(work: Path, env: dict) -> subprocess.Popen:
    from services import free_port, start_prefect

    port = free_port()
    env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    return start_prefect(env, port, work / "prefect-server.log")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nights", type=int, default=30)
    p.add_argument("--keep-runs", type=int, default=3)
    p.add_argument("--disk-mb", type=int, default=400, help="the tmpfs output_dir lives on")
    p.add_argument("--workdir", type=Path, help="default: a temporary folder, deleted after")
    a = p.parse_args()
    from services import stop

    work = Path(a.workdir or tempfile.mkdtemp(prefix="sftflow-soak-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    mounted = mount_disk(work / "disk", a.disk_mb)
    server = prefect_server(work, env)
    nights: list[Night] = []
    soak = Soak(work, work / "disk", a.keep_runs, env)
    try:
        for n in range(1, a.nights + 1):
            nights.append(soak.night(n, CYCLE[(n - 1) % len(CYCLE)]))
            x = nights[-1]
            print(f"night {n} ({x.kind}): {x.state}; champion {x.champion}, {x.used / 2**20:.1f} MiB used, "
                  f"{x.freed / 2**20:.1f} MiB freed, {x.left} left, {x.seconds:.0f} s", flush=True)  # fmt: skip
    finally:
        stop(server)
        print("\n" + table(nights))
        if mounted:
            subprocess.run(["umount", "-l", str(work / "disk")], check=False)
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    used = [x.used for x in nights]
    print(json.dumps({
        "nights": len(nights), "states": [x.state.split(":")[0] for x in nights],
        "champions": soak.history, "max_used_mib": round(max(used) / 2**20, 1),
        "last_used_mib": round(used[-1] / 2**20, 1), "freed_mib": round(sum(x.freed for x in nights) / 2**20, 1),
        "seconds_per_night": {"median": sorted(x.seconds for x in nights)[len(nights) // 2],
                              "range": [min(x.seconds for x in nights), max(x.seconds for x in nights)]},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
