"""`sftflow run`: the whole pipeline as a Prefect flow, then its summary."""

from __future__ import annotations

import json
from pathlib import Path

from flows.cli.common import claim_output_dir
from flows.cli.summary import print_summary
from flows.sft import sft_pipeline
from tasks.core.tracking import check_reachable


def run(args, cfg) -> int:
    check_reachable(cfg.mlflow_uri)  # and a down MLflow server is one line, not a flow-run traceback
    # before Prefect's temporary server starts: it is this run's too, and a killed run's is reaped
    claim_output_dir(cfg)
    summary = sft_pipeline(
        config_path=args.config, overrides=args.set or [], run_id=args.run_id, force=args.force
    )
    print_summary(summary)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0
