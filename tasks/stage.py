"""What every stage's @task wrapper shares: a logger, its MLflow child run, its manifest upload."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tasks.config import PipelineConfig
from tasks.rundir import read_json, stage_dir
from tasks.tracking import StageRun, Tracker

# Outside a Prefect run (`sftflow format`, `sftflow train`, ...) stage lines go to stderr; Prefect
# configures the root logger when imported, so this logger gets a handler of its own.
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


@dataclass
class StageContext:
    run: StageRun
    log: Callable[[str], None]
    dir: Path


@contextlib.contextmanager
def tracked_stage(cfg: PipelineConfig, run_id: str, stage: str, *sections: str) -> Iterator[StageContext]:
    """Open the stage's MLflow child run; on success log the manifest's metrics and the manifest itself."""
    logger = stage_logger()
    tracker = Tracker(cfg, run_id)
    params = {s: getattr(cfg, s).model_dump(mode="json") for s in sections}
    folder = stage_dir(cfg.output_dir, run_id, stage)
    with tracker.stage(stage, params) as run:
        yield StageContext(run, logger.info, folder)
        manifest = folder / "manifest.json"
        run.metrics(read_json(manifest).get("metrics", {}))
        run.artifact(manifest)


def prefect_markdown(key: str, markdown: str, description: str) -> None:
    """A Prefect markdown artifact when running inside a flow; nothing outside one."""
    import re

    from prefect.artifacts import create_markdown_artifact
    from prefect.context import TaskRunContext, FlowRunContext

    if TaskRunContext.get() or FlowRunContext.get():
        create_markdown_artifact(markdown=markdown, key=re.sub(r"[^a-z0-9-]", "-", key.lower()),
                                 description=description)
