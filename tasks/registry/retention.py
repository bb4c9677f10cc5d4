"""Garbage collection that knows the pipeline: runs, registry versions, MLflow artifacts, caches.

A night leaves its run folder (checkpoints, the merged model, the bundle), a registry version
and MLflow's copy of the bundle; nothing else ever deletes them. `collect` keeps the newest
``retention.keep_runs`` runs, and always what later nights still read: the runs of the versions
``champion`` and ``candidate`` point at (evaluate downloads the champion; ``train.init_from:
champion`` starts from its weights) and of the ``eval.past_eval_sets`` newest versions (their
eval splits). Every other run folder is deleted, with its registry versions and its MLflow runs
deleted through MLflow's API; ``mlflow gc`` then removes their artifacts, so no file MLflow owns
is deleted by hand. Kept runs that finished lose their training checkpoints; format and score
cache entries unused for ``retention.format_cache_days`` and ``score_cache_days``, and stale
temporary folders, go too.
Replayed data files live outside ``output_dir`` and are never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks.config import RetentionPolicy
from tasks.core.files import read_json
from tasks.core.space import human, tree_bytes
from tasks.core.tracking import mlflow_client
from tasks.registry.versions import all_versions

STATE_DIRS = {".cache", ".prefect", "mlartifacts"}
TEMP_GLOBS = (".*.tmp-*", "merge/tmp*", "*/.*.tmp-*")


@dataclass
class GcReport:
    used_before: int = 0
    used_after: int = 0
    deleted: list[str] = field(default_factory=list)  # what went (or would go, in a dry run)
    kept: dict[str, str] = field(default_factory=dict)  # run id -> why it stays

    def summary(self) -> str:
        freed = self.used_before - self.used_after
        return (
            f"gc: {human(self.used_before)} used, {human(freed)} freed, {len(self.deleted)} item(s) deleted"
        )


def last_touched(run: Path) -> float:
    """When a run last changed: its folder or a stage folder in it (each stage writes there)."""
    return max(p.stat().st_mtime for p in [run, *run.iterdir()])


def run_folders(output_dir: Path) -> list[Path]:
    """The pipeline's run folders, newest first."""
    runs = [d for d in Path(output_dir).iterdir() if d.is_dir() and d.name not in STATE_DIRS]
    runs = [d for d in runs if (d / "mlflow.json").is_file() or any(d.glob("*/manifest.json"))]
    return sorted(runs, key=last_touched, reverse=True)


def needed_runs(versions: list, aliases: dict[str, str], past_eval_sets: int) -> dict[str, str]:
    """Run id -> why a later night still reads it. ``aliases``: alias -> version."""
    newest = sorted(versions, key=lambda v: -int(v.version))
    run_of = {str(mv.version): mv.tags.get("sftflow.run_id") for mv in newest}
    needed = {run_of[str(v)]: f"v{v} is {alias}" for alias, v in aliases.items() if str(v) in run_of}
    for mv in newest[:past_eval_sets]:
        needed.setdefault(run_of[str(mv.version)], f"v{mv.version}'s eval set (eval.past_eval_sets)")
    return needed


def collect(
    r: RetentionPolicy,
    output_dir: Path,
    uri: str,
    name: str,
    past_eval_sets: int = 0,
    dry_run: bool = False,
    log=print,
) -> GcReport:
    """Apply the retention policy to ``output_dir`` and the registry ``name`` at ``uri``."""
    output_dir = Path(output_dir)
    report = GcReport(used_before=tree_bytes(output_dir))
    aliases = registry_aliases(uri, name)
    versions = all_versions(uri, name) if aliases is not None else []
    needed = needed_runs(versions, aliases or {}, past_eval_sets)
    young = time.time() - r.min_age_hours * 3600
    gone = []
    for i, run in enumerate(run_folders(output_dir)):
        why = needed.get(run.name) or (f"one of the newest {r.keep_runs}" if i < r.keep_runs else None)
        if why is None and last_touched(run) > young:
            why = f"younger than retention.min_age_hours={r.min_age_hours:g}"
        if why is not None:
            report.kept[run.name] = why
            if not r.checkpoints and (run / "train/manifest.json").is_file():
                _delete(run / "train/checkpoints", report, dry_run)  # the run trained to the end
        else:
            gone.append(run)
    for run in gone:
        drop_run(run, uri, name, versions, report, dry_run)
    for cache, days in (("format", r.format_cache_days), ("scores", r.score_cache_days)):
        for entry in sorted((output_dir / ".cache" / cache).glob("*")):
            if entry.stat().st_mtime < time.time() - days * 86400:
                _delete(entry, report, dry_run)
    for run in [d for d in run_folders(output_dir) if d not in gone]:
        for tmp in [t for pattern in TEMP_GLOBS for t in run.glob(pattern)]:
            if tmp.stat().st_mtime < young:  # a killed merge's or copy's leftovers
                _delete(tmp, report, dry_run)
    if gone and not dry_run:
        purge_deleted_runs(uri, output_dir, log)
    report.used_after = tree_bytes(output_dir)
    for item in report.deleted:
        log(f"gc: {'would delete' if dry_run else 'deleted'} {item}")
    log(report.summary() + (" (dry run: nothing deleted)" if dry_run else ""))
    return report


def drop_run(run: Path, uri: str, name: str, versions: list, report: GcReport, dry_run: bool) -> None:
    """A run's registry versions and MLflow runs (deleted through MLflow), then its folder."""
    client = mlflow_client(uri)
    for mv in versions:
        if mv.tags.get("sftflow.run_id") == run.name:
            report.deleted.append(f"{name} version {mv.version} (run {run.name})")
            if not dry_run:
                client.delete_model_version(name, str(mv.version))
    ids = read_json(run / "mlflow.json") if (run / "mlflow.json").is_file() else {}
    for run_id in [ids.get("parent"), *ids.get("stages", {}).values()]:
        if run_id and not dry_run:
            client.delete_run(run_id)
    _delete(run, report, dry_run)


def purge_deleted_runs(uri: str, output_dir: Path, log) -> None:
    """``mlflow gc``: deleted runs and their artifacts, permanently. A tracking server purges its
    own store; its operator runs ``mlflow gc`` there."""
    if uri.startswith(("http://", "https://", "databricks")):
        log(
            f"gc: runs deleted on {uri.split('@')[-1]}; run `mlflow gc` on the server to free their artifacts"
        )
        return
    cmd = [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}  # mlflow gc refuses to start without it
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=output_dir, env=env)
    if done.returncode != 0:
        log(f"gc: mlflow gc failed ({done.returncode}): {done.stderr.strip()[-500:]}")


def registry_aliases(uri: str, name: str) -> dict[str, str] | None:
    """Alias -> version of the registered model, or None when there is no such model yet."""
    from mlflow.exceptions import MlflowException

    try:
        return {a: str(v) for a, v in mlflow_client(uri).get_registered_model(name).aliases.items()}
    except MlflowException:
        return None


def _delete(path: Path, report: GcReport, dry_run: bool) -> None:
    if not path.exists():
        return
    report.deleted.append(f"{path} ({human(tree_bytes(path))})")
    if not dry_run:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
