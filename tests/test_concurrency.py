"""What a run asks of its Prefect server (the limits that keep runs apart, parameters without
credentials) and a full disk under MLflow's SQLite store, on real servers."""

import os

import pytest

from conftest import ROOT, fill_disk, small_disk
from services import free_port


def test_a_run_records_no_password_and_holds_the_pipeline_slot_only_while_it_runs(prefect_server):
    """An override with a password in a URL is redacted in the flow run's recorded parameters; the
    run creates the `sftflow-pipeline` limit and the `gpu` tag limit (1 slot each) on a server no
    `make prefect-setup` saw, and gives its slot back when it fails. A retry of the redacted
    record is refused with the reason."""
    from prefect.client.orchestration import get_client

    from flows.sft import sft_pipeline

    if prefect_server is None:
        pytest.skip("needs the tests' Prefect server (PostgreSQL)")
    secret = f"http://sftflow:hunter2@127.0.0.1:{free_port()}"  # nothing listens there
    overrides = [f"tracking.mlflow_uri={secret}", f"output_dir={ROOT / '.cache/test-concurrency'}"]
    state = sft_pipeline(str(ROOT / "configs/tiny.yaml"), overrides, return_state=True)
    assert state.is_failed() and "cannot reach MLflow at http://***@127.0.0.1" in str(state.message)
    with get_client(sync_client=True) as client:
        recorded = client.read_flow_run(state.state_details.flow_run_id).parameters
        limit = client.read_global_concurrency_limit_by_name("sftflow-pipeline")
        gpu = client.read_concurrency_limit_by_tag("gpu")
    assert (
        "hunter2" not in str(recorded)
        and recorded["overrides"][0] == "tracking.mlflow_uri=http://***@" + secret.split("@")[1]
    )
    assert (limit.limit, limit.active_slots) == (1, 0) and gpu.concurrency_limit >= 1
    # a retry gets the recorded values back: refused with the reason, not sent to MLflow as ***@
    retry = sft_pipeline(str(ROOT / "configs/tiny.yaml"), recorded["overrides"], return_state=True)
    assert retry.is_failed() and "credentials were redacted" in str(retry.message), retry.message
    assert "MLFLOW_TRACKING_PASSWORD" in str(retry.message)


def test_a_full_disk_under_the_sqlite_store_is_one_named_line(tmp_path):
    """MLflow's SQLite store on a full filesystem: the run's first write raises DiskFull naming
    the store (one line for the CLI), not MLflow's wrapped SQLAlchemy error."""
    from tasks.core.errors import DiskFull
    from tasks.core.tracking import Tracker, TrackingTarget

    with small_disk(tmp_path / "disk", 4) as disk:
        uri = f"sqlite:///{disk / 'mlflow.db'}"
        target = TrackingTarget(uri, "full", disk / "runs", {f"key{i}": "b" * 400 for i in range(100)}, "h")
        Tracker(target, "first")  # the schema fits; 100 params of 400 bytes then need new pages
        fill_disk(disk)
        with pytest.raises(DiskFull, match=r"database or disk is full: MLflow could not write to sqlite:///"):
            Tracker(target, "second").parent_run_id()


def test_deployments_share_one_pipeline_limit():
    """Every deployment in prefect.yaml names the same pipeline limit for its runs."""
    import yaml

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    limits = {
        d["name"]: d["work_pool"]["job_variables"]["env"].get("SFTFLOW_PIPELINE_LIMIT")
        for d in spec["deployments"]
    }
    assert set(limits.values()) == {"sftflow-pipeline"}, limits


HOLDER = """import sys, time
from pathlib import Path
from tasks.core.orchestration import pipeline_slot
from tasks.core.orphans import mark_owner
mark_owner(Path(sys.argv[1]))
with pipeline_slot(print, Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_killed_runs_slot_is_freed_at_once_by_the_next_run_in_its_output_dir(
    prefect_server, tmp_path, monkeypatch
):
    """A SIGKILLed holder never releases its slot, and its lease lapses only after a minute or
    more. The next run in the same output_dir frees it at once; while the holder lives, or from
    another output_dir, nothing is freed."""
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from prefect.client.orchestration import get_client

    from tasks.core.orchestration import SLOT_RECORD, pipeline_slot, release_dead_holder

    if prefect_server is None:
        pytest.skip("needs the tests' Prefect server (PostgreSQL)")
    name = f"sftflow-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("SFTFLOW_PIPELINE_LIMIT", name)
    out, other = tmp_path / "runs", tmp_path / "other"
    out.mkdir(), other.mkdir()

    def active() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(name).active_slots

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        for line in holder.stdout:  # "created the ... limit", then "held"
            if line.strip() == "held":
                break
        assert line.strip() == "held" and active() == 1
        said = []
        release_dead_holder(out / SLOT_RECORD, out, prefect_server, said.append)  # it lives
        assert said == [] and (out / SLOT_RECORD).is_file() and active() == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    release_dead_holder(out / SLOT_RECORD, other, prefect_server, said.append)  # not that folder's
    assert said == [] and active() == 1
    t0 = time.monotonic()
    with pipeline_slot(said.append, out):
        waited = time.monotonic() - t0
        assert active() == 1 and str(os.getpid()) in (out / SLOT_RECORD).read_text()
    assert waited < 10 and not [s for s in said if "waited" in s], (waited, said)
    assert said[0].startswith("released the pipeline slot a killed run held"), said
    assert active() == 0 and not (out / SLOT_RECORD).exists()
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(name)
