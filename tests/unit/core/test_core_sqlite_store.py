"""A new local MLflow store made from the schema MLflow migrated once equals one MLflow makes itself."""

import contextlib
import sqlite3
import time

import pytest

from tasks.core.sqlite_store import migrated_schema, sqlite_init_lock
from tasks.core.tracking import mlflow_client

from conftest import fill_disk, small_disk


def contents(db) -> dict:
    """Every table's and index's columns and constraints, and its rows without the columns that hold times.
    The order of a table's constraints varies from one migration run to the next: not compared."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        schema = list(con.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL"))
        tables = {
            name: sorted(line.strip().rstrip(",") for line in sql.splitlines()) for _, name, sql in schema
        }
        rows = {}
        for name in (name for kind, name, _ in schema if kind == "table"):
            columns = [c[1] for c in con.execute(f"PRAGMA table_info('{name}')") if "time" not in c[1]]
            rows[name] = sorted(map(repr, con.execute(f"SELECT {', '.join(columns)} FROM '{name}'")))
        return {"tables": tables, "rows": rows}


def test_a_store_copied_from_the_migrated_schema_is_the_store_mlflow_makes(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # MLflow's Default experiment points at ./mlruns
    theirs, ours = f"sqlite:///{tmp_path / 'theirs.db'}", f"sqlite:///{tmp_path / 'runs/mlflow.db'}"
    t0 = time.monotonic()
    mlflow_client(theirs).search_experiments()  # MLflow creates and migrates it
    t1 = time.monotonic()
    migrated_schema()
    t2 = time.monotonic()
    with sqlite_init_lock(ours):
        mlflow_client(ours).search_experiments()
    t3 = time.monotonic()
    print(
        f"\nMLflow's new store {t1 - t0:.2f}s; the schema once {t2 - t1:.2f}s; a copied store {t3 - t2:.2f}s"
    )
    mine, expected = contents(tmp_path / "runs/mlflow.db"), contents(tmp_path / "theirs.db")
    assert mine["tables"] == expected["tables"] and len(mine["tables"]) > 40
    assert mine["rows"] == expected["rows"] and any("Default" in r for r in mine["rows"]["experiments"])
    experiment = mlflow_client(ours).get_experiment("0")
    assert experiment.artifact_location == mlflow_client(theirs).get_experiment("0").artifact_location
    assert experiment.artifact_location.endswith(f"{tmp_path}/mlruns/0")


def test_an_existing_store_is_left_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with sqlite_init_lock(uri):
        mlflow_client(uri).create_experiment("kept")
    with sqlite_init_lock(uri):
        assert mlflow_client(uri).get_experiment_by_name("kept") is not None


def test_a_full_disk_where_the_store_is_created_is_one_named_line_and_leaves_no_part(tmp_path, monkeypatch):
    from tasks.core.errors import DiskFull

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "home"))
    with small_disk(tmp_path / "disk", 1) as disk:
        fill_disk(disk)
        uri = f"sqlite:///{disk / 'mlflow.db'}"
        with (
            pytest.raises(
                DiskFull, match=r"No space left on device: could not create the MLflow store sqlite:///"
            ),
            sqlite_init_lock(uri),
        ):
            pass
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "mlflow.db.lock"]


def test_where_sftflow_home_cannot_hold_the_schema_mlflow_makes_the_store_itself(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "a-file" / "home"))  # no folder can be made there
    uri = f"sqlite:///{tmp_path / 'runs/mlflow.db'}"
    with sqlite_init_lock(uri):
        assert not (tmp_path / "runs/mlflow.db").exists()
        mlflow_client(uri).create_experiment("made by MLflow")
    assert mlflow_client(uri).get_experiment_by_name("made by MLflow") is not None
