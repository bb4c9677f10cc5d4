"""Each section validates on its own; the root holds only the checks that span sections."""

import pytest
from pydantic import ValidationError

from tasks.config import DataConfig, PipelineConfig, ServeConfig, SourceConfig, TrainConfig


def test_a_source_and_the_data_section_share_the_role_and_column_checks():
    for build in (
        lambda: SourceConfig(path="data/demo/train.jsonl", roles={"bot": "robot"}),
        lambda: DataConfig(path="data/demo/train.jsonl", roles={"bot": "robot"}),
    ):
        with pytest.raises(ValidationError, match="'bot' maps to 'robot'"):
            build()
    with pytest.raises(ValidationError, match="unknown canonical column 'answer'"):
        SourceConfig(path="data/demo/train.jsonl", columns={"answer": "a"})


def test_a_section_refuses_what_is_wrong_inside_it_alone():
    with pytest.raises(ValidationError, match="qlora cannot use ZeRO-3"):
        TrainConfig(method="qlora", deepspeed="zero3")
    with pytest.raises(ValidationError, match="hot_swap needs serve.endpoint"):
        ServeConfig(mode="adapter", hot_swap=True)


def test_the_root_checks_what_two_sections_decide_together():
    data = {"path": "data/demo/train.jsonl"}
    assert TrainConfig(method="full") and ServeConfig(mode="adapter")  # each valid alone
    with pytest.raises(ValidationError, match="full fine-tuning has no adapter"):
        PipelineConfig(run_name="x", data=data, train={"method": "full"}, serve={"mode": "adapter"})
