"""Gate and registry against a real `mlflow server` whose backend store is PostgreSQL."""

import json

import pytest
from mlflow import MlflowClient

from services import mlflow_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as info:
        yield info


@pytest.fixture(scope="module")
def two_runs(server, tmp_path_factory):
    """A trained candidate (promoted), then one trained with learning rate 0 (no better: refused)."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("registry") / "runs"
    summaries = []
    for i, extra in enumerate([[], ["--set", "train.learning_rate=0"]]):
        path = out.parent / f"summary{i}.json"
        res = run_cli(
            "run",
            "configs/tiny.yaml",
            "--set",
            f"output_dir={out}",
            "--set",
            f"tracking.mlflow_uri={server['uri']}",
            *extra,
            "--summary-json",
            str(path),
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
        summaries.append((json.loads(path.read_text()), res.stdout + res.stderr))
    return summaries


def test_better_candidate_becomes_champion(server, two_runs):
    (first, stdout), _ = two_runs
    assert first["promoted"] is True and "PROMOTED" in stdout
    client = MlflowClient(server["uri"], server["uri"])
    mv = client.get_model_version("tiny", "1")
    assert mv.tags["sftflow.run_id"] == first["run_id"] and mv.tags["sftflow.promoted"] == "True"
    assert {"sftflow.config_hash", "sftflow.data_hash", "sftflow.git_sha", "metric.eval_loss"} <= set(mv.tags)
    # the bundle went through the server's artifact store and comes back from the registry
    names = [a.path for a in client.list_artifacts(mv.run_id, "bundle")]
    assert "bundle/serve.json" in names and "bundle/MLmodel" in names


def test_worse_candidate_is_refused_with_the_numbers(server, two_runs):
    _, (second, stdout) = two_runs
    assert second["promoted"] is False and "NOT PROMOTED" in stdout
    assert set(second["scores"]) == {"base", "candidate", "champion"}
    client = MlflowClient(server["uri"], server["uri"])
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    v2 = client.get_model_version_by_alias("tiny", "candidate")
    assert str(v2.version) == "2" and v2.tags["sftflow.promoted"] == "False"
    assert "vs base" in v2.tags["sftflow.gate"] and "vs champion" in v2.tags["sftflow.gate"]
    report = second["run_dir"] + "/evaluate/report.md"
    text = open(report).read()
    assert (
        "NOT PROMOTED" in text
        and "vs champion" in text
        and "| metric | base | candidate | champion |" in text
    )


def test_the_base_and_the_champion_are_not_scored_again(two_runs):
    """The second night's base is the first's, and its champion is the first's candidate, downloaded
    from the registry: both come back from the score cache with the numbers they had. The new
    candidate (learning rate 0: the base's numbers, other bytes) is scored."""
    (first, _), (second, logs) = two_runs
    for name in ("base", "champion"):
        assert f"evaluate: {name}: scores of run {first['run_id']} reused (score cache " in logs, logs[-3000:]
    assert "evaluate: scoring candidate" in logs and "evaluate: scoring base" not in logs
    assert second["scores"]["base"] == first["scores"]["base"]
    assert second["scores"]["champion"] == first["scores"]["candidate"]


def test_promote_and_rollback_through_the_cli(server, two_runs, cli):
    client = MlflowClient(server["uri"], server["uri"])
    res = cli("registry", "promote", "tiny", "2", "--mlflow-uri", server["uri"])
    assert res.returncode == 0, res.stderr
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "2"
    res = cli("registry", "rollback", "tiny", "--mlflow-uri", server["uri"])
    assert res.returncode == 0, res.stderr
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    listing = cli("registry", "list", "tiny", "--mlflow-uri", server["uri"]).stdout
    assert "v1" in listing and "champion" in listing and "v2" in listing and "candidate" in listing
    res = cli("registry", "rollback", "tiny", "--mlflow-uri", server["uri"])
    assert res.returncode != 0 and "no earlier champion" in res.stderr


def tagged_versions(uri: str) -> list:
    """Five versions of `lookup`: 1, 3 and 4 share a fingerprint, 4 is then deleted."""
    client = MlflowClient(uri, uri)
    client.create_registered_model("lookup")
    for i in range(1, 6):
        fingerprint = "aaa" if i in (1, 3, 4) else f"other{i}"
        tags = {"sftflow.fingerprint": fingerprint, "sftflow.run_id": f"run{i}"}
        client.create_model_version("lookup", f"s3://nowhere/{i}", tags=tags)  # never read
    client.delete_model_version("lookup", "4")
    found = client.search_model_versions("name = 'lookup' and tag.`sftflow.fingerprint` = 'aaa'")
    return sorted((str(mv.version), dict(mv.tags)) for mv in found)


def test_the_unchanged_lookup_reads_sqlite_as_mlflow_does_without_importing_it(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    expected = tagged_versions(uri)
    assert [v for v, _ in expected] == ["1", "3"] and expected[1][1]["sftflow.run_id"] == "run3"
    code = (
        "import json, sys; from tasks.registry.versions import versions_tagged; "
        f"print(json.dumps(versions_tagged({uri!r}, 'lookup', 'sftflow.fingerprint', 'aaa'))); "
        "print('mlflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    found, imported = out.stdout.splitlines()
    assert [tuple(x) for x in json.loads(found)] == expected
    assert imported == "False"


def test_the_unchanged_lookup_reads_a_tracking_server_as_mlflow_does(server):
    from tasks.registry.versions import versions_tagged

    expected = tagged_versions(server["uri"])
    assert versions_tagged(server["uri"], "lookup", "sftflow.fingerprint", "aaa") == expected
    assert versions_tagged(server["uri"], "lookup", "sftflow.fingerprint", "none") == []


def test_the_server_starts_no_job_consumers(server):
    """MLflow 3's server starts huey consumers for its GenAI jobs (about 7 processes, each importing
    MLflow and polling) unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION is false; sftflow sends no jobs."""
    import psutil

    commands = [" ".join(p.cmdline()) for p in psutil.Process(server["proc"].pid).children(recursive=True)]
    assert any("uvicorn" in c for c in commands) and not [
        c for c in commands if "huey" in c or "_job_runner" in c
    ], commands


def test_a_server_behind_basic_auth_is_checked_before_any_work(tmp_path, monkeypatch):
    """MLflow's basic-auth app answers /health to anyone, so a check of /health alone let a run
    without credentials start, train, and fail at its first MLflow write. The check asks the API
    too: no credentials, or wrong ones, stop the run at once with the variables to set; the ones
    MLflow's client reads (environment or URI) work for the unchanged lookup's REST path."""
    from tasks.core import Unauthorized, check_reachable
    from tasks.registry.versions import versions_tagged

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with mlflow_server(tmp_path, admin_password="s3cret-at-least-12") as info:
        uri = info["uri"]
        with pytest.raises(
            Unauthorized, match="refused a request without credentials .HTTP 401.; set MLFLOW_TR"
        ):
            check_reachable(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(Unauthorized, match="refused the credentials it was sent"):
            check_reachable(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-at-least-12")
        check_reachable(uri)
        expected = tagged_versions(uri)
        assert versions_tagged(uri, "lookup", "sftflow.fingerprint", "aaa") == expected
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        in_uri = uri.replace("://", "://admin:s3cret-at-least-12@")
        check_reachable(in_uri)
        assert versions_tagged(in_uri, "lookup", "sftflow.fingerprint", "aaa") == expected
