"""`sftflow validate` and `sftflow schema`: the config alone, without Prefect, MLflow or torch."""

from __future__ import annotations

import json

from tasks.config import PipelineConfig


def validate(args, cfg) -> int:
    print(
        f"{args.config}: valid (run_name={cfg.run_name}, method={cfg.train.method}, "
        f"deepspeed={cfg.train.deepspeed}, config hash {cfg.section_hash()})"
    )
    return 0


def schema(args, cfg) -> int:
    print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
    return 0
