"""The champion a run continues from, read from a real (SQLite) MLflow registry."""

from tasks.config import DataConfig, ModelConfig, TrainConfig
from tasks.registry.lineage import find_lineage


def test_no_lineage_is_read_unless_the_run_continues_or_replays(tmp_path):
    data, model = DataConfig(path="data/demo/train.jsonl"), ModelConfig(name_or_path="tiny-llama")
    uri = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    assert find_lineage(model, data, TrainConfig(), uri, "tiny") is None
    assert not (tmp_path / "nowhere").exists()  # the registry was not even opened


def test_a_registry_without_a_champion_means_training_from_the_base(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri, uri).create_registered_model("tiny")
    said = []
    found = find_lineage(
        ModelConfig(name_or_path="tiny-llama"), DataConfig(path="data/demo/train.jsonl", replay=0.1),
        TrainConfig(init_from="champion"), uri, "tiny", said.append,
    )  # fmt: skip
    assert found is None and "tiny has no champion yet" in said[0]
