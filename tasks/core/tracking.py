"""MLflow helpers: one parent run per pipeline run, one nested run per stage.

Run ids are kept in ``<run>/mlflow.json`` so a retried stage (or a stage run alone from the
CLI) logs into the same MLflow run instead of starting a second one. Everything goes through
an explicit ``MlflowClient``: Prefect may run tasks on other threads, where MLflow's fluent
"active run" is not shared.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.errors import StageFailed, Unauthorized, Unreachable
from tasks.core.files import read_json, write_json
from tasks.core.hashing import code_version
from tasks.core.paths import run_dir
from tasks.core.space import disk_full_named
from tasks.core.sqlite_store import sqlite_init_lock

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
REDACTED = "***@"  # what redact() leaves of user:password@
_METRIC_KEY = re.compile(r"[^\w\-. /]")


def redact(value: Any) -> Any:
    """Drop ``user:password@`` from URLs anywhere in a nested structure."""
    if isinstance(value, str):
        return _USERINFO.sub(REDACTED, value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        else:
            out[key] = str(v)[:500]
    return out


def _quiet_env(uri: str) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if _USERINFO.search(uri):  # MLflow prints "View run at <uri>", credentials included
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def _split(uri: str):
    """The URI without credentials, and the auth header MLflow's client would send: from
    ``user:password@`` in the URI, else from MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN."""
    import base64
    import urllib.parse

    url = urllib.parse.urlsplit(uri)
    headers = {}
    user, password = url.username, url.password
    if user:
        user, password = urllib.parse.unquote(user), urllib.parse.unquote(password or "")
    else:
        user, password = (
            os.environ.get("MLFLOW_TRACKING_USERNAME"),
            os.environ.get("MLFLOW_TRACKING_PASSWORD"),
        )
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode()
    elif token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    netloc = url.hostname + (f":{url.port}" if url.port else "")
    return urllib.parse.urlunsplit((url.scheme, netloc, url.path.rstrip("/"), "", "")), headers


def http_get(uri: str, path: str, timeout_s: float = 10, **query) -> bytes:
    import urllib.parse
    import urllib.request

    base, headers = _split(uri)
    url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s).read()


def check_reachable(uri: str, timeout_s: float = 10) -> None:
    """An HTTP tracking server must answer now, and accept the credentials it is sent: MLflow's
    own retries would wait minutes, and a refusal would otherwise come after training."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error

    try:
        http_get(uri, "/health", timeout_s)
        # /health answers anyone; MLflow's basic-auth app guards the API behind it
        http_get(uri, "/api/2.0/mlflow/experiments/search", timeout_s, max_results=1)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            sent = "the credentials it was sent" if _split(uri)[1] else "a request without credentials"
            raise Unauthorized(
                f"tracking.mlflow_uri: MLflow at {redact(uri)} refused {sent} (HTTP {e.code}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
            ) from None
        raise Unreachable(
            f"tracking.mlflow_uri: MLflow at {redact(uri)} answered HTTP {e.code}: {e.reason}"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        raise Unreachable(f"tracking.mlflow_uri: cannot reach MLflow at {redact(uri)}: {e}") from None


def mlflow_client(uri: str):
    """The one way sftflow talks to MLflow: an explicit client for tracking and registry alike.
    Prefect may run tasks on other threads, where MLflow's fluent "active run" is not shared."""
    _quiet_env(uri)
    from mlflow import MlflowClient

    return MlflowClient(uri, uri)


@dataclass(frozen=True)
class TrackingTarget:
    """Where a pipeline run is tracked, and the config its parent run records."""

    uri: str
    experiment: str
    output_dir: Path  # a local store keeps its artifacts in <output_dir>/mlartifacts
    config: dict  # the whole config (JSON), logged once as the parent run's params
    config_hash: str


class Tracker:
    def __init__(self, target: TrackingTarget, run_id: str):
        self.target, self.run_id, self.uri = target, run_id, target.uri
        check_reachable(self.uri)
        with sqlite_init_lock(self.uri):  # two runs starting at once must not both create the schema
            self.client = mlflow_client(self.uri)
            try:
                exp = self.client.get_experiment_by_name(target.experiment)
            except Exception as e:
                raise Unreachable(
                    f"tracking.mlflow_uri: cannot reach MLflow at {redact(self.uri)}: {e}"
                ) from None
            if exp is None:
                location = None
                if not self.uri.startswith(("http://", "https://", "databricks")):
                    location = (Path(target.output_dir).resolve() / "mlartifacts").as_uri()
                with self._store_writes():
                    self.experiment_id = self.client.create_experiment(
                        target.experiment, artifact_location=location
                    )
            else:
                self.experiment_id = exp.experiment_id
        self._ids_path = run_dir(target.output_dir, run_id) / "mlflow.json"

    def _ids(self) -> dict:
        return read_json(self._ids_path) if self._ids_path.is_file() else {"stages": {}}

    def _store_writes(self):
        """A SQLite store on a full disk: one line naming it, not SQLAlchemy's traceback."""
        return disk_full_named(f"MLflow could not write to {redact(self.uri)}")

    def parent_run_id(self) -> str:
        with self._store_writes():
            return self._parent_run_id()

    def _parent_run_id(self) -> str:
        ids = self._ids()
        if not ids.get("parent"):
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.run_id,
                tags={
                    "sftflow.run_id": self.run_id,
                    "sftflow.config_hash": self.target.config_hash,
                    "sftflow.code_version": code_version(),
                },
            )
            ids["parent"] = run.info.run_id
            write_json(self._ids_path, ids)
            config = redact(self.target.config)
            self.client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in flatten(config).items()])
            self.client.log_dict(run.info.run_id, config, "config.yaml")
        return ids["parent"]

    def stage_run_id(self, stage: str) -> str:
        parent = self.parent_run_id()
        ids = self._ids()
        if not ids["stages"].get(stage):
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{self.run_id}/{stage}",
                tags={"mlflow.parentRunId": parent, "sftflow.run_id": self.run_id, "sftflow.stage": stage},
            )
            ids["stages"][stage] = run.info.run_id
            write_json(self._ids_path, ids)
        else:
            self.client.update_run(ids["stages"][stage], status="RUNNING")
        return ids["stages"][stage]

    @contextlib.contextmanager
    def stage(self, stage: str, params: dict | None = None) -> Iterator[StageRun]:
        run = StageRun(self.client, self.stage_run_id(stage))
        if params:
            run.params(params)
        try:
            yield run
        except BaseException:
            with contextlib.suppress(Exception):  # the stage's own error is the one to report
                self.client.set_terminated(run.id, status="FAILED")
            raise
        self.client.set_terminated(run.id, status="FINISHED")

    def finish(self, status: str = "FINISHED") -> None:
        with self._store_writes():
            self.client.set_terminated(self.parent_run_id(), status=status)

    def fail(self) -> None:
        """Mark the parent run FAILED, if the store takes it: the run's own error is the one to report."""
        with contextlib.suppress(Exception):
            self.finish("FAILED")


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


class StageRun:
    def __init__(self, client, run_id: str):
        self.client, self.id = client, run_id

    def params(self, params: dict) -> None:
        from mlflow.exceptions import MlflowException

        flat = flatten(redact(params))
        existing = self.client.get_run(self.id).data.params
        new = {k: v for k, v in flat.items() if k not in existing}  # a retry re-logs the same params
        try:
            self.client.log_batch(self.id, params=[_param(k, v) for k, v in new.items()])
        except MlflowException as e:
            raise StageFailed(f"MLflow refused params for run {self.id}: {e}") from None

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # names built from data (a slice label) may hold characters MLflow refuses in a metric key
        batch = [
            Metric(_METRIC_KEY.sub("_", k), float(v), now, step or 0)
            for k, v in flatten_numbers(metrics).items()
        ]
        if batch:
            self.client.log_batch(self.id, metrics=batch)

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.id, str(path), artifact_path)

    def datasets(self, inputs: list[tuple[str, str, str, str]]) -> None:
        """MLflow dataset inputs, one per (name, source, digest, context): the run page's "Datasets"."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": all local sources
            warnings.simplefilter("ignore", UserWarning)
            sources = {source: resolve_dataset_source(source) for _, source, _, _ in inputs}
        logged = {
            (d.dataset.name, d.dataset.digest) for d in self.client.get_run(self.id).inputs.dataset_inputs
        }
        entities = [
            DatasetInput(
                MetaDataset(sources[source], name=name, digest=digest)._to_mlflow_entity(),
                [InputTag("mlflow.data.context", context)],
            )
            for name, source, digest, context in inputs
            if (name, digest) not in logged  # a retried handoff logs nothing twice
        ]
        if entities:
            self.client.log_inputs(self.id, datasets=entities)

    def table(self, data: dict[str, list], artifact_file: str) -> None:
        """An MLflow table artifact (the run page shows it as a table)."""
        self.client.log_table(self.id, data, artifact_file)

    def tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.id, k, str(v))


def flatten_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten_numbers(v, key + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out
