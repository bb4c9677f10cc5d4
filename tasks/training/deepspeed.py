"""The DeepSpeed config the Trainer gets, from a preset name or a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.config.train import DEEPSPEED_PRESETS
from tasks.core.paths import CODE_ROOT

PRESET_DIR = CODE_ROOT / "configs" / "deepspeed"


def deepspeed_config(deepspeed: str) -> dict:
    """``train.deepspeed`` as a dict; empty for ``none``."""
    if deepspeed == "none":
        return {}
    path = PRESET_DIR / f"{deepspeed}.json" if deepspeed in DEEPSPEED_PRESETS else Path(deepspeed)
    return json.loads(path.read_text())
