"""The MLflow Model Registry side: versions, the ``candidate`` and ``champion`` aliases.

Each promoted version records the champion it replaced, so ``rollback`` can move the champion
back along that chain. The CLI and the pipeline use the same functions.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from tasks.core.errors import InputError, SftflowError
from tasks.core.faults import fault
from tasks.core.sqlite_store import sqlite_path
from tasks.core.tracking import http_get
from tasks.core.tracking import mlflow_client as _client
from tasks.registry.tags import PROMOTED_TAG, REPLACED_TAG

LEGACY_HISTORY_TAG = "sftflow.champion_history"  # read by rollback only: older sftflow kept history here


def alias_version(uri: str, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def versions_tagged(uri: str, name: str, key: str, value: str) -> list[tuple[str, dict[str, str]]]:
    """(version, tags) of the versions of ``name`` tagged ``key=value``, oldest first.

    The nightly unchanged-check asks this on every run. Importing MLflow and opening its SQL store
    costs about 2 s, most of a run that then does nothing, so a SQLite store is read with sqlite3
    (read-only) and a tracking server through its REST search; other stores, and servers that
    MLflow's environment settings verify (TLS) or authenticate by plugin, go through MLflow's client."""
    query = f"name = '{name}' and tag.`{key}` = '{value}'"
    if (db := sqlite_path(uri)) is not None:
        import sqlite3

        if not db.is_file():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            try:
                rows = con.execute(_TAGGED_SQL, (name, key, value, name)).fetchall()
            except sqlite3.OperationalError:  # no registry tables yet
                return []
        found: dict[str, dict[str, str]] = {}
        for version, k, v in rows:
            found.setdefault(str(version), {})[k] = v
    elif uri.startswith(("http://", "https://")) and not any(os.environ.get(k) for k in _CLIENT_SETTINGS):
        reply = json.loads(http_get(uri, "/api/2.0/mlflow/model-versions/search", filter=query))
        found = {
            str(mv["version"]): {t["key"]: t["value"] for t in mv.get("tags", [])}
            for mv in reply.get("model_versions", [])
        }
    else:
        found = {str(mv.version): dict(mv.tags) for mv in _client(uri).search_model_versions(query)}
    return sorted(found.items(), key=lambda item: int(item[0]))


# what only MLflow's client applies (http_get sends the username, password and token itself)
_CLIENT_SETTINGS = (
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_AUTH",
)
# MLflow's registry tables; a deleted version keeps its row with this stage until it is purged
_TAGGED_SQL = """
SELECT t.version, t.key, t.value FROM model_version_tags t
JOIN model_versions v ON v.name = t.name AND v.version = t.version
WHERE v.current_stage != 'Deleted_Internal' AND t.version IN (
    SELECT version FROM model_version_tags WHERE name = ? AND key = ? AND value = ?
) AND t.name = ?
"""


def version_for_run(uri: str, name: str, run_id: str):
    """The version a pipeline run already registered (a retried handoff must not add a second)."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client(uri).search_model_versions(f"name = '{name}' and tag.`sftflow.run_id` = '{run_id}'")
    except MlflowException:
        return None
    return found[0] if found else None


def register_bundle(uri: str, name: str, source_run_id: str, artifact_path: str, tags: dict):
    """A new version from a run's artifact folder (the registered model is created on first use)."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:  # two runs may register the first version at once: one creates the model, both add a version
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    source = client.get_run(source_run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
    return client.create_model_version(
        name, source, run_id=source_run_id, tags={k: str(v) for k, v in tags.items()}
    )


def set_version_tag(uri: str, name: str, version: str | int, key: str, value: str) -> None:
    _client(uri).set_model_version_tag(name, str(version), key, value)


def set_alias(uri: str, name: str, alias: str, version: str | int) -> None:
    _client(uri).set_registered_model_alias(name, alias, str(version))


class ChampionMoved(SftflowError):
    """``champion`` no longer points at the version this run's gate compared against."""


ANY = "any"  # promote() without an expectation: a person moving the champion by hand


def promote(uri: str, name: str, version: str | int, expected: str | None = ANY) -> None:
    """Point ``champion`` at a version, if it still points at ``expected`` (a version, or None for
    no champion): compare-and-set, so a run that evaluated against vN cannot overwrite the vN+1 that
    another run promoted meanwhile. The version records the one it replaces (REPLACED_TAG) before
    the alias moves, and is tagged promoted after, so a retry at any point repeats the same writes."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    version = str(version)
    try:
        client.get_model_version(name, version)
    except MlflowException as e:
        raise InputError(f"{name} has no version {version}: {e.message}") from None
    current = alias_version(uri, name, "champion")
    now = None if current is None else str(current.version)
    if now != version:
        if expected != ANY and now != expected:
            compared = "no champion" if expected is None else f"version {expected}"
            raise ChampionMoved(
                f"{name}: champion is now version {now}, this run was compared against {compared}; "
                f"version {version} stays candidate (run again to evaluate it against the new champion)"
            )
        client.set_model_version_tag(name, version, REPLACED_TAG, now or "")
        fault("registry:promote")
        client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(name, version, PROMOTED_TAG, "True")


def rollback(uri: str, name: str) -> str:
    """Move ``champion`` back to the version it replaced; returns that version."""
    client = _client(uri)
    current = alias_version(uri, name, "champion")
    previous = current.tags.get(REPLACED_TAG) if current is not None else None
    if previous is None and current is not None:  # promoted before versions recorded it
        history = [
            v for v in client.get_registered_model(name).tags.get(LEGACY_HISTORY_TAG, "").split(",") if v
        ]
        previous = history[-1] if history else None
    if not previous:
        raise InputError(f"{name}: no earlier champion to roll back to")
    client.set_registered_model_alias(name, "champion", previous)
    return previous


def download_bundle(uri: str, name: str, alias: str, dst: Path) -> Path:
    """Fetch ``models:/name@alias`` (a serving bundle) into ``dst``; returns the bundle folder."""
    from mlflow.artifacts import download_artifacts

    client = _client(uri)
    mv = client.get_model_version_by_alias(name, alias)
    source = client.get_model_version_download_uri(name, mv.version)  # resolved here, not by a global URI
    dst.mkdir(parents=True, exist_ok=True)
    return Path(download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri))


def all_versions(uri: str, name: str) -> list:
    """Every version of ``name``, with its tags, in no particular order."""
    return list(_client(uri).search_model_versions(f"name = '{name}'"))


def list_versions(uri: str, name: str) -> list[str]:
    client = _client(uri)
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(all_versions(uri, name), key=lambda v: int(v.version)):
        metrics = {k.removeprefix("metric."): v for k, v in mv.tags.items() if k.startswith("metric.")}
        rows.append(
            f"v{mv.version}  run={mv.tags.get('sftflow.run_id', '?')}  "
            f"aliases={','.join(aliases.get(str(mv.version), [])) or '-'}  "
            + "  ".join(f"{k}={v}" for k, v in sorted(metrics.items()))
        )
    return rows
