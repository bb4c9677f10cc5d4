"""The DeepSpeed config each preset gives the Trainer."""

import pytest

from tasks.config import DEEPSPEED_PRESETS
from tasks.training.deepspeed import deepspeed_config


@pytest.mark.parametrize("preset", DEEPSPEED_PRESETS)
def test_every_preset_is_a_zero_stage_with_auto_batch_sizes(preset):
    ds = deepspeed_config(preset)
    assert ds["zero_optimization"]["stage"] == int(preset[4])
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert ("offload" in preset) == ("offload_optimizer" in ds["zero_optimization"])


def test_none_is_no_deepspeed_and_a_path_is_read(tmp_path):
    assert deepspeed_config("none") == {}
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 1}}')
    assert deepspeed_config(str(path)) == {"zero_optimization": {"stage": 1}}
