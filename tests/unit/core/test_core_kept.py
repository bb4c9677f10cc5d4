"""A retry keeps a stage an earlier attempt finished only while nothing it depends on changed."""

import json
from pathlib import Path

from tasks.core.hashing import file_sha256
from tasks.core.results import TrainResult
from tasks.core.stage import StageScope, kept_result, open_stage
from tasks.core.tracking import TrackingTarget


def scope(out: Path, lr: float = 1e-3) -> StageScope:
    return StageScope(out, {"train": {"lr": lr}}, TrackingTarget("", "", out, {}, ""))


def finished_attempt(out: Path, upstream: Path) -> TrainResult:
    """The stage as an earlier attempt ran it: its output written, its input recorded, finished."""
    with open_stage(scope(out), "r1", "train", log=print) as stage:
        (stage.dir / "adapter").write_bytes(b"weights")
        stage.manifest.add_input("upstream", upstream)
        return stage.finish(TrainResult("r1", str(stage.dir / "adapter"), "lora", 1.5, 12, started_from="1"))


def test_kept_only_while_config_code_inputs_and_outputs_are_the_same(tmp_path):
    out, upstream, said = tmp_path / "runs", tmp_path / "upstream.json", []
    upstream.write_text("{}")
    first = finished_attempt(out, upstream)
    inputs = {"upstream": file_sha256(upstream)}

    def kept(lr=1e-3, **changes):
        return kept_result(scope(out, lr), "r1", TrainResult, said.append, changes.get("inputs", inputs),
                           {"started_from": changes.get("started_from", "1")})  # fmt: skip

    assert kept() == first and "train: kept what an earlier attempt of run r1 finished" in said[-1]
    assert kept(lr=2e-3) is None and "its config sections" in said[-1]
    assert kept(started_from="2") is None and said[-1].endswith("started_from")  # the champion moved
    assert kept(inputs={"upstream": "0" * 64}) is None and said[-1].endswith("upstream")
    manifest = out / "r1" / "train" / "manifest.json"
    recorded = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(recorded | {"code_hash": "another"}))
    assert kept() is None and "the code" in said[-1]
    manifest.write_text(json.dumps(recorded))
    Path(first.output).unlink()
    assert kept() is None and f"{first.output} (gone)" in said[-1]


def test_an_unfinished_or_missing_stage_is_never_kept(tmp_path):
    out, said = tmp_path / "runs", []
    assert kept_result(scope(out), "r1", TrainResult, said.append) is None
    with open_stage(scope(out), "r1", "train", log=print) as stage:  # killed before it finished
        (stage.dir / "manifest.json").write_text(json.dumps({"status": "running", "result": {}}))
    assert kept_result(scope(out), "r1", TrainResult, said.append) is None
    assert said == []  # nothing finished before: nothing to say
