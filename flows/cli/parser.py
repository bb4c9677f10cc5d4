"""The `sftflow` argument parser: every command and its options, in one place."""

from __future__ import annotations

import argparse
import os

from tasks.core.paths import STAGES


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sftflow", description="SFT as a scheduled, tracked Prefect pipeline")
    sub = top.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("config", help="pipeline YAML (see configs/)")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=2"
        )
        return p

    def with_mlflow(p):
        p.add_argument(
            "--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
        )
        return p

    run = with_config(sub.add_parser("run", help="run the whole pipeline as a Prefect flow"))
    run.add_argument("--run-id", help="reuse/resume this run id (default: <run_name>-<utc time>-<rand>)")
    run.add_argument("--summary-json", help="also write the summary to this file")
    run.add_argument(
        "--force",
        action="store_true",
        help="retrain even when data, config and code are unchanged; with --run-id, also run again the "
        "stages an earlier attempt of that run finished",
    )
    with_config(sub.add_parser("validate", help="check a config; exit 2 naming each bad field"))
    sub.add_parser("schema", help="print the config JSON schema")
    for stage in STAGES:
        p = with_config(sub.add_parser(stage, help=f"run the {stage} stage alone on an existing run"))
        p.add_argument("--run-id", required=True)
        if stage == "train":
            p.add_argument(
                "--resume", action="store_true", help="continue from the newest complete checkpoint"
            )
    join = with_config(
        sub.add_parser("join", help="another node of a train.launcher: per_node run: start its ranks")
    )
    join.add_argument("--run-id", required=True, help="the run node 0 trains (the same output_dir, shared)")
    join.add_argument(
        "--node-rank", type=int, required=True, help="this host's line in train.hostfile, from 0"
    )
    gc = with_config(sub.add_parser("gc", help="apply the retention policy: old runs, versions, caches"))
    gc.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    reg = with_mlflow(sub.add_parser("registry", help="list versions, promote or roll back the champion"))
    reg.add_argument("action", choices=["list", "promote", "rollback"])
    reg.add_argument("name")
    reg.add_argument("version", nargs="?")
    sc = with_mlflow(
        sub.add_parser("serve-command", help="print the vLLM server command for models:/NAME@ALIAS")
    )
    serve = with_mlflow(sub.add_parser("serve", help="serve models:/NAME@ALIAS with vLLM"))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    for p in (sc, serve):
        p.add_argument("ref", metavar="NAME@ALIAS")
        p.add_argument(
            "--download",
            metavar="DIR",
            help="download the bundle here (default: the local bundle if present)",
        )
    return top
