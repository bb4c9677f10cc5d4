"""Promotions on a real (SQLite) MLflow registry: compare-and-set, a kill mid-promotion, a lost promotion."""

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tasks.registry.fingerprint import registered_with
from tasks.registry.versions import ChampionMoved, promote, rollback

from conftest import ROOT


def registry(tmp_path, versions: int = 3, **tags) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    client.create_registered_model("m")
    for i in range(1, versions + 1):
        client.create_model_version("m", f"s3://nowhere/{i}", tags={"sftflow.fingerprint": f"f{i}", **tags})
    return uri, client


def champion(client) -> str:
    return str(client.get_model_version_by_alias("m", "champion").version)


def test_champion_moves_only_from_the_version_the_gate_compared_against(tmp_path):
    uri, client = registry(tmp_path)
    promote(uri, "m", "1", expected=None)
    promote(uri, "m", "3", expected="1")  # run B, evaluated against v1, promotes first
    with pytest.raises(
        ChampionMoved, match="champion is now version 3, this run was compared against version 1"
    ):
        promote(uri, "m", "2", expected="1")  # run A, also evaluated against v1, is too late
    assert (
        champion(client) == "3" and client.get_model_version("m", "2").tags.get("sftflow.promoted") != "True"
    )
    with pytest.raises(ChampionMoved, match="this run was compared against no champion"):
        promote(uri, "m", "2", expected=None)  # a first night racing another first night
    promote(uri, "m", "2")  # by hand (`sftflow registry promote`): no expectation
    assert champion(client) == "2" and client.get_model_version("m", "2").tags["sftflow.promoted"] == "True"


def test_a_promotion_killed_midway_and_retried_leaves_a_history_rollback_walks_once(tmp_path):
    uri, client = registry(tmp_path)
    promote(uri, "m", "1")
    code = f"from tasks.registry.versions import promote; promote({uri!r}, 'm', '2')"
    env = {**os.environ, "SFTFLOW_FAULT": "registry:promote"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == -9, res.stderr[-2000:]  # killed between recording the history and the alias
    assert champion(client) == "1"
    promote(uri, "m", "2")  # the retry
    promote(uri, "m", "2")  # and another: a no-op
    assert champion(client) == "2"
    assert rollback(uri, "m") == "1" and champion(client) == "1"
    with pytest.raises(ValueError, match="no earlier champion"):
        rollback(uri, "m")  # the old champion was recorded once, however often the promotion ran


def test_a_version_whose_promotion_never_completed_is_not_unchanged(tmp_path):
    """A run that passed its gate and registered, then died before the alias moved: the next night
    must not call its fingerprint "unchanged" (it would never become champion)."""
    uri, client = registry(
        tmp_path, versions=2, **{"sftflow.gate_passed": "True", "sftflow.promoted": "False"}
    )
    assert registered_with(uri, "m", "f1") is None
    promote(uri, "m", "1")
    assert registered_with(uri, "m", "f1")[0] == "1"
    client.set_model_version_tag("m", "2", "sftflow.gate_passed", "False")  # refused by its gate: done
    assert registered_with(uri, "m", "f2")[0] == "2"
