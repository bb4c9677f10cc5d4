"""Library noise off at its source, so what a person reads is the pipeline's own log.

Each line names one message and why it says nothing to an sftflow user; nothing else is
hidden (warnings and errors of every other kind still show).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from tasks.core.errors import SftflowError


class _MessageOnly(logging.Filter):
    """Prefect logs a failed flow's exception with its traceback; an SftflowError's message
    already says what went wrong and where (tasks/core/errors.py), so it is logged as that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SftflowError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_libraries() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        if not any(isinstance(f, _MessageOnly) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_MessageOnly())
    # bitsandbytes looks for the optional `kernels` package (a hub download) for a faster CPU
    # 4-bit matmul and warns at import when it is missing; its own kernel is used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # MLflow's SQL store logs the SQLAlchemy traceback of every database error it then raises as
    # an MlflowException; the raised error is what the run reports (a full disk: one line).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # peft reads transformers' deprecated `is_gradient_checkpointing`; nothing for a user to change.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    # "Loading weights" / "Writing model shards" bars on every model load and save (tiny files
    # here, seconds on a real model); the stages log what they load. Inherited by train workers.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # MLflow's per-file "Downloading artifacts" bar when the champion's model or adapter is
    # fetched; the stages log what they fetch and where.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
