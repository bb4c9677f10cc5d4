"""`sftflow <stage> CONFIG --run-id ID`: one stage alone, its inputs rebuilt from the earlier
manifests; and `sftflow join`, another node's ranks of a per_node launch."""

from __future__ import annotations

import dataclasses
import json
import typing

from flows.cli.common import claim_output_dir
from tasks.config import PipelineConfig
from tasks.core.errors import InputError
from tasks.core.paths import STAGES
from tasks.evaluate import evaluate_task
from tasks.format import format_task
from tasks.handoff import handoff_task
from tasks.lineage import run_lineage
from tasks.merge import merge_task
from tasks.train import join_training, train_task

TASKS = dict(zip(STAGES, (format_task, train_task, merge_task, evaluate_task, handoff_task)))


def stage_inputs(fn, cfg: PipelineConfig, run_id: str) -> dict:
    """The results a stage takes (its typed parameters), rebuilt from the earlier stages' manifests."""
    hints = typing.get_type_hints(fn)
    hints.pop("return", None)
    inputs = {
        name: hint.from_manifest(cfg.output_dir, run_id)
        for name, hint in hints.items()
        if hasattr(hint, "from_manifest")
    }
    if "lineage" in hints:  # the champion as it is now, as the flow's lineage task reads it
        inputs["lineage"] = run_lineage(cfg)
    return inputs


def stage(args, cfg) -> int:
    claim_output_dir(cfg)
    task = TASKS[args.command]
    extra = {"resume": args.resume} if args.command == "train" else {}
    # the same body as in the flow, without a Prefect run
    result = task.fn(cfg, args.run_id, **stage_inputs(task.fn, cfg, args.run_id), **extra)
    print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    return 0


def join(args, cfg) -> int:
    if not cfg.train.hostfile or cfg.train.launcher != "per_node":
        raise InputError(f"{args.config}: join needs train.hostfile and train.launcher: per_node")
    claim_output_dir(cfg)
    join_training(cfg, args.run_id, args.node_rank)
    return 0
