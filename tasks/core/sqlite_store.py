"""A local MLflow store (``sqlite:///...``): created under a lock, from a schema migrated once.

MLflow creates a new SQLite store by running every one of its schema migrations, 2-3 s of CPU
on 2 cores (and more beside other work). Every new ``output_dir`` gets a store, so every first
run, and every test run in a temp folder, paid it. Here MLflow migrates one empty schema per
MLflow version, kept under ``SFTFLOW_HOME``; a new store is a copy of it. The copy has no
experiment, so MLflow's first open of it adds its Default experiment, with that store's own
artifact location, as it does for any new store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from tasks.core.paths import sftflow_home
from tasks.core.space import disk_full_named


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def sqlite_init_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock beside a SQLite store while it is created or first opened; a store
    that does not exist yet is made from the migrated schema (see the module docstring)."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.exists() and (schema := _schema_or_none()) is not None:
            tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
            try:
                with disk_full_named(f"could not create the MLflow store {uri}"):
                    shutil.copyfile(schema, tmp)
                os.replace(tmp, db)
            finally:
                tmp.unlink(missing_ok=True)
        yield


def _schema_or_none() -> Path | None:
    """The migrated schema; None where SFTFLOW_HOME cannot hold it (read-only, say): then MLflow
    creates the store itself, as it always did, only slower."""
    try:
        return migrated_schema()
    except OSError:
        return None


def migrated_schema() -> Path:
    """An empty store with MLflow's whole schema, made once per MLflow version by MLflow itself."""
    import mlflow
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine_with_retry

    path = sftflow_home() / "mlflow" / f"schema-{mlflow.__version__}.db"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    engine = create_sqlalchemy_engine_with_retry(f"sqlite:///{tmp}")
    try:
        _initialize_tables(engine)  # what MLflow runs on an empty database: the tables, then every migration
    finally:
        engine.dispose()
    with contextlib.closing(sqlite3.connect(tmp)) as con:  # a sound file, not a half-written one
        if con.execute("SELECT count(*) FROM alembic_version").fetchone()[0] != 1:
            raise RuntimeError(f"{tmp}: MLflow's migrations left no schema version")
    os.replace(tmp, path)
    return path
