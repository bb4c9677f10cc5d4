"""The MLflow Model Registry side: versions, the ``candidate`` and ``champion`` aliases.

Promotion history is kept as a registered-model tag so ``rollback`` can move the champion
back to the version it replaced. The CLI and the pipeline use the same functions.
"""

from __future__ import annotations

from pathlib import Path

HISTORY_TAG = "sftflow.champion_history"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri, uri)


def alias_version(uri: str, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_for_run(uri: str, name: str, run_id: str):
    """The version a pipeline run already registered (a retried handoff must not add a second)."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client(uri).search_model_versions(f"name = '{name}' and tag.`sftflow.run_id` = '{run_id}'")
    except MlflowException:
        return None
    return found[0] if found else None


def register_bundle(uri: str, name: str, source_run_id: str, artifact_path: str, tags: dict):
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mv = mlflow.register_model(f"runs:/{source_run_id}/{artifact_path}", name,
                               tags={k: str(v) for k, v in tags.items()})
    return mv


def promote(uri: str, name: str, version: str | int) -> None:
    """Point ``champion`` at a version, remembering the one it replaces."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException as e:
        raise ValueError(f"{name} has no version {version}: {e.message}") from None
    current = alias_version(uri, name, "champion")
    if current is not None and str(current.version) == str(version):
        return
    history = _history(client, name)
    if current is not None:
        history.append(str(current.version))
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[-50:]))
    client.set_registered_model_alias(name, "champion", str(version))


def rollback(uri: str, name: str) -> str:
    """Move ``champion`` back to the version it replaced; returns that version."""
    client = _client(uri)
    history = _history(client, name)
    if not history:
        raise ValueError(f"{name}: no earlier champion to roll back to")
    previous = history.pop()
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    client.set_registered_model_alias(name, "champion", previous)
    return previous


def _history(client, name: str) -> list[str]:
    tag = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    return [v for v in tag.split(",") if v]


def download_bundle(uri: str, name: str, alias: str, dst: Path) -> Path:
    """Fetch ``models:/name@alias`` (a serving bundle) into ``dst``; returns the bundle folder."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@{alias}", dst_path=str(dst)))


def list_versions(uri: str, name: str) -> list[str]:
    client = _client(uri)
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        metrics = {k.removeprefix("metric."): v for k, v in mv.tags.items() if k.startswith("metric.")}
        rows.append(f"v{mv.version}  run={mv.tags.get('sftflow.run_id', '?')}  "
                    f"aliases={','.join(aliases.get(str(mv.version), [])) or '-'}  "
                    + "  ".join(f"{k}={v}" for k, v in sorted(metrics.items())))
    return rows
