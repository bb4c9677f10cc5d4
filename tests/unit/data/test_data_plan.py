"""The data plan: what the format stage will read, and a cache key that moves only with its inputs."""

import json

import pytest

from tasks.config import DataConfig
from tasks.core.errors import MissingError
from tasks.core.results import Lineage
from tasks.data.plan import plan_data


def write(path, n, tag="x"):
    rows = [{"instruction": f"{tag} {i}", "output": str(i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_key_follows_contents_and_settings_not_unrelated_paths(tmp_path, tiny_model):
    data = write(tmp_path / "a.jsonl", 5)
    key = plan_data(DataConfig(path=str(data)), tiny_model).key
    assert plan_data(DataConfig(path=str(data), num_proc=2, cache=False), tiny_model).key == key
    assert plan_data(DataConfig(path=str(data), max_seq_len=128), tiny_model).key != key
    write(data, 6)
    assert plan_data(DataConfig(path=str(data)), tiny_model).key != key


def test_replayed_sources_join_the_mix_but_not_the_declared_key(tmp_path, tiny_model):
    data, old = write(tmp_path / "a.jsonl", 5), write(tmp_path / "old.jsonl", 3, "old")
    d = DataConfig(path=str(data), replay=0.2)
    champion = Lineage("2", "r", "lora", "runs:/x/adapter", [{"path": [str(old)], "name": "old"}])
    plain, replayed = plan_data(d, tiny_model), plan_data(d, tiny_model, champion)
    assert [s.replay for s in replayed.shares] == [False, True]
    assert replayed.declared_key == plain.declared_key and replayed.key != plain.key
    old.unlink()
    with pytest.raises(MissingError, match="champion version 2 was trained on .*old.jsonl"):
        plan_data(d, tiny_model, champion)


def test_a_month_of_replays_reads_each_file_once_and_keeps_the_newest_sources(tmp_path, tiny_model):
    """Night N's champion recorded its own source and every replay before it; replaying all of them
    every night would grow without end. Each file is read once, and at most data.replay_sources
    replayed sources (the champion's newest first) join the mix."""
    data = write(tmp_path / "today.jsonl", 5)
    nights = [write(tmp_path / f"night{i}.jsonl", 3, f"n{i}") for i in range(40)]
    recorded = [{"path": [str(nights[i])], "name": f"replay night{i}"} for i in reversed(range(40))]
    recorded.insert(3, {"path": [str(nights[39]), str(data)], "name": "replay both"})  # files already in
    recorded.append({"path": [str(nights[39])], "name": "replay night39 again"})
    champion = Lineage("40", "r", "lora", "runs:/x/adapter", recorded)
    plan = plan_data(DataConfig(path=str(data), replay=0.2, replay_sources=10), tiny_model, champion)
    files = [f for _, f, _ in plan.sources]
    assert len(files) == len(set(files)) == 11  # today's file and ten replayed ones, each once
    assert files[1:] == [str(nights[i]) for i in range(39, 29, -1)]  # the newest nights
    assert [s.source.label for s in plan.shares[1:]] == [f"replay night{i}" for i in range(39, 29, -1)]
