"""The one scaffold every stage runs in: its folder, its manifest, its MLflow child run, its log.

    with open_stage(cfg.scope(SECTIONS), run_id, "merge", log, track) as stage:
        ...                                   # the stage's own work, in stage.dir
        return stage.finish(MergeResult(...))  # the manifest, written last, carries the result

On entry the stage's old manifest is dropped (a stage that starts again is not complete until
it finishes again). With ``track`` the stage logs into its MLflow child run: the config
sections it declares as params, and on success the manifest's metrics, the manifest and the
artifacts it named. Outside a Prefect run the log goes to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tasks.core.errors import StageFailed
from tasks.core.files import read_json
from tasks.core.hashing import hash_json, package_hash
from tasks.core.manifest import Manifest, manifest_path
from tasks.core.paths import stage_dir
from tasks.core.quiet import quiet_libraries
from tasks.core.space import disk_full_named
from tasks.core.tracking import Tracker, TrackingTarget, redact

R = TypeVar("R")

# Prefect configures the root logger when imported, so the plain logger has a handler of its own.
_plain = logging.getLogger("sftflow")
if not _plain.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    _plain.addHandler(_handler)
    _plain.setLevel(logging.INFO)
    _plain.propagate = False


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (so lines show in the UI), plain logging outside."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return _plain


@dataclass(frozen=True)
class StageScope:
    """What the scaffold reads of the config for one stage: the sections it declared (``SECTIONS``),
    where runs live, and where they are tracked. ``PipelineConfig.scope(SECTIONS)`` builds it."""

    output_dir: Path
    sections: dict[str, dict]  # the declared sections, as JSON
    tracking: TrackingTarget

    @property
    def config_hash(self) -> str:
        return hash_json(self.sections)


@dataclass
class Stage:
    name: str
    dir: Path
    manifest: Manifest
    log: Callable[[str], None]
    run: Any = None  # tasks.core.tracking.StageRun when tracked
    artifacts: list[Path] = field(default_factory=list)

    def artifact(self, *paths: Path) -> None:
        """Logged to MLflow once the stage has finished (files that exist; others are skipped)."""
        self.artifacts += [Path(p) for p in paths]

    def tags(self, tags: dict) -> None:
        if self.run is not None:
            self.run.tags(tags)

    def finish(self, result: R) -> R:
        self.manifest.finish(self.dir, result)
        return result


@contextlib.contextmanager
def open_stage(
    scope: StageScope,
    run_id: str,
    name: str,
    log: Callable[[str], None] | None = None,
    track: bool = False,
    fresh: bool = False,
) -> Iterator[Stage]:
    """``fresh``: start from an empty folder (nothing of a failed attempt is reused)."""
    quiet_libraries()
    folder = stage_dir(scope.output_dir, run_id, name)
    if fresh and folder.exists():
        shutil.rmtree(folder)
    (folder / "manifest.json").unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    stage = Stage(name, folder, Manifest(name, run_id, scope.config_hash), log or stage_logger().info)
    store = redact(scope.tracking.uri)
    with disk_full_named(f"the {name} stage could not write under {folder} (MLflow store: {store})"):
        if not track:
            yield stage
            return
        with Tracker(scope.tracking, run_id).stage(name, scope.sections) as run:
            stage.run = run
            yield stage
            if stage.manifest.status != "completed":
                raise StageFailed(f"the {name} stage ended without finishing its manifest")
            run.metrics(stage.manifest.metrics)
            for path in [folder / "manifest.json", *stage.artifacts]:
                if path.exists():
                    run.artifact(path)


def kept_result(
    scope: StageScope,
    run_id: str,
    result_type: type[R],
    log: Callable[[str], None] | None = None,
    inputs: dict[str, str] | None = None,
    same: dict[str, Any] | None = None,
) -> R | None:
    """What an earlier attempt of this run finished in this stage, kept as it is, so that a retry
    after a crash or a restart does not format, train or merge again what is done. Kept only when
    its manifest completed under the same config sections and code, with the same hash for each of
    ``inputs`` (name -> sha256, as the stage records them), the same values for ``same``'s result
    fields, and every file of its result still in place. Otherwise None: the stage runs."""
    name, log = result_type.stage, log or stage_logger().info
    path = manifest_path(scope.output_dir, run_id, name)
    done = read_json(path) if path.is_file() else {}
    if done.get("status") != "completed":
        return None
    recorded, result = done.get("inputs", {}), done.get("result", {})
    run_folder = str(path.parent.parent) + "/"
    changed = [
        *(["its config sections"] if done.get("config_hash") != scope.config_hash else []),
        *(["the code"] if done.get("code_hash") != package_hash() else []),
        *(k for k, sha in (inputs or {}).items() if recorded.get(k, {}).get("sha256") != sha),
        *(k for k, v in (same or {}).items() if result.get(k) != v),
        *(f"{v} (gone)" for v in result.values() if str(v).startswith(run_folder) and not Path(v).exists()),
    ]
    if changed:
        log(f"{name}: runs again, though an earlier attempt of run {run_id} finished it: changed since: "
            + ", ".join(map(str, changed)))  # fmt: skip
        return None
    log(f"{name}: kept what an earlier attempt of run {run_id} finished at {done['ended_at']} "
        f"(same config sections, code and inputs): {path}")  # fmt: skip
    return result_type(**result)


def prefect_markdown(key: str, markdown: str, description: str) -> None:
    """A Prefect markdown artifact when running inside a flow; nothing outside one."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() or FlowRunContext.get():
        create_markdown_artifact(
            markdown=markdown, key=re.sub(r"[^a-z0-9-]", "-", key.lower()), description=description
        )
