"""The retention policy over three real nights in one output_dir: what goes, what stays, and that
the champion still serves its later nights."""

import json
import os
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import run_cli

pytestmark = pytest.mark.slow  # three pipeline runs


def night(out: Path, n: int, *extra: str):
    args = ["run", "configs/tiny.yaml", "--run-id", f"night{n}", "--set", f"output_dir={out}", "--force"]
    res = run_cli(*args, *extra, "--summary-json", str(out.parent / f"night{n}.json"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_gc_keeps_what_later_nights_read_and_deletes_the_rest_through_mlflow(tmp_path):
    out = tmp_path / "runs"
    off = ("--set", "retention.enabled=false")
    for n in (1, 2):
        night(out, n, *off)
    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    stale = out / ".cache/format/stale-entry"
    stale.mkdir(parents=True)
    month_ago = time.time() - 30 * 86400
    os.utime(stale, (month_ago, month_ago))
    stale_scores = out / ".cache/scores/stale-entry.json"  # a model no night scores any more
    stale_scores.write_text("{}")
    os.utime(stale_scores, (month_ago, month_ago))
    leftover = out / "night1/merge/tmpkilled"  # a SIGKILLed merge's scratch folder
    leftover.mkdir()
    os.utime(leftover, (month_ago, month_ago))
    policy = ("--set", "retention.keep_runs=1", "--set", "retention.min_age_hours=0")

    dry = run_cli("gc", "configs/tiny.yaml", "--set", f"output_dir={out}", *policy, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "would delete" in dry.stdout and "(dry run: nothing deleted)" in dry.stdout
    assert (out / "night1").is_dir() and (out / "night2").is_dir() and stale.is_dir() and leftover.is_dir()
    assert stale_scores.is_file()

    ids = {f"night{n}": json.loads((out / f"night{n}/mlflow.json").read_text()) for n in (1, 2)}
    res = night(out, 3, *policy)
    versions = client.search_model_versions("name = 'tiny'")
    aliases = client.get_registered_model("tiny").aliases
    needed = {mv.tags["sftflow.run_id"] for mv in versions if str(mv.version) in map(str, aliases.values())}
    kept = {d.name for d in out.iterdir() if d.name.startswith("night")}
    assert kept == needed | {"night3"} and len(kept) < 3, (kept, aliases)  # at least one night went
    for gone in {"night1", "night2"} - kept:
        assert not [mv for mv in versions if mv.tags["sftflow.run_id"] == gone]  # its version too
        for run in [ids[gone]["parent"], *ids[gone]["stages"].values()]:
            assert not (
                out / "mlartifacts" / run / "artifacts"
            ).exists()  # mlflow gc removed them (the bundle)
    assert not (out / "night3/train/checkpoints").exists() and (out / "night3/train/adapter").is_dir()
    assert not stale.exists() and not leftover.exists() and not stale_scores.exists()
    assert list((out / ".cache/format").iterdir())  # the entry night 3 used stays
    assert "evaluate: base: scores of run night1 reused" in res.stderr  # and the base's scores it read
    assert len(list((out / ".cache/scores").iterdir())) >= 2
    summary = json.loads((tmp_path / "night3.json").read_text())
    assert summary["gc"]["used_before"] > summary["gc"]["used_after"] and "disk:" in res.stdout

    # the champion still serves what later nights read: its bundle (evaluate) and its weights (init_from)
    from mlflow.artifacts import download_artifacts

    champion = client.get_model_version_by_alias("tiny", "champion")
    weights = download_artifacts(
        champion.tags["sftflow.weights_uri"], dst_path=str(tmp_path / "w"), tracking_uri=uri
    )
    assert (Path(weights) / "adapter_model.safetensors").is_file()
