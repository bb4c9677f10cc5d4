"""End to end: `sftflow run configs/tiny.yaml` through Prefect, DeepSpeed, peft and MLflow."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.rundir import STAGES

pytestmark = pytest.mark.slow
MANIFEST_KEYS = {"stage", "run_id", "config_hash", "inputs", "outputs", "metrics", "started_at", "ended_at", "status",
                 "code_version", "duration_s"}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from conftest import run_cli

    out = tmp_path_factory.mktemp("e2e") / "runs"
    summary = out.parent / "summary.json"
    res = run_cli("run", "configs/tiny.yaml", "--set", f"output_dir={out}", "--summary-json", str(summary))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return out, json.loads(summary.read_text()), res.stdout


def test_every_stage_wrote_a_complete_manifest(first_run):
    out, summary, _ = first_run
    run = Path(summary["run_dir"])
    for stage in STAGES:
        m = json.loads((run / stage / "manifest.json").read_text())
        assert MANIFEST_KEYS <= set(m), stage
        assert m["status"] == "completed" and m["stage"] == stage and m["run_id"] == summary["run_id"]
        assert all(len(i["sha256"]) == 64 for i in m["inputs"].values()), stage
    fmt = json.loads((run / "format/manifest.json").read_text())
    assert fmt["metrics"]["counts"]["records_in"] == 400 and fmt["metrics"]["counts"]["train"] == 360


def test_merged_model_matches_base_plus_adapter(first_run):
    _, summary, _ = first_run
    merge = json.loads((Path(summary["run_dir"]) / "merge/manifest.json").read_text())
    assert 0 <= merge["metrics"]["max_logit_diff"] <= 1e-3
    assert merge["metrics"]["top1_agreement"] == 1.0
    gen = json.loads((Path(merge["outputs"]["model"]) / "generation_config.json").read_text())
    assert 2 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])


def test_mlflow_has_a_parent_run_and_one_child_per_stage(first_run):
    out, summary, _ = first_run
    client = MlflowClient(summary["mlflow_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.method"] == "lora"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["sftflow.stage"] for c in children) == sorted(STAGES)
    for child in children:
        assert child.info.status == "FINISHED"
        names = [a.path for a in client.list_artifacts(child.info.run_id)]
        assert "manifest.json" in names, child.data.tags["sftflow.stage"]
    evaluation = next(c for c in children if c.data.tags["sftflow.stage"] == "evaluate")
    names = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"report.md", "metrics.png", "generations.jsonl", "scores.json"} <= names
    assert evaluation.data.tags["sftflow.promote"] == "True"
    fmt = next(c for c in children if c.data.tags["sftflow.stage"] == "format")
    assert {"token_lengths.png", "stats.json", "quarantine.jsonl"} <= {a.path for a in client.list_artifacts(fmt.info.run_id)}
    train = next(c for c in children if c.data.tags["sftflow.stage"] == "train")
    assert {"loss.png", "deepspeed_resolved.json", "training_args.json"} <= {
        a.path for a in client.list_artifacts(train.info.run_id)}
    losses = client.get_metric_history(train.info.run_id, "loss")
    assert len(losses) == 12 and losses[-1].value < losses[0].value
    assert train.data.params["train.deepspeed"] == "zero2"


def test_registry_version_has_tags_and_aliases(first_run):
    _, summary, stdout = first_run
    client = MlflowClient(summary["mlflow_uri"])
    mv = client.get_model_version_by_alias("tiny", "champion")
    assert str(mv.version) == summary["version"] == "1"
    assert str(client.get_model_version_by_alias("tiny", "candidate").version) == "1"
    assert mv.tags["sftflow.run_id"] == summary["run_id"]
    assert len(mv.tags["sftflow.config_hash"]) == 16 and len(mv.tags["sftflow.data_hash"]) == 16
    assert float(mv.tags["metric.eval_loss"]) == pytest.approx(summary["scores"]["candidate"]["eval_loss"], rel=1e-5)
    serve = json.loads((Path(summary["bundle"]) / "serve.json").read_text())
    assert serve["argv"][:3] == ["vllm", "serve", "model"]
    assert serve["argv"][serve["argv"].index("--max-model-len") + 1] == "256"
    assert (Path(summary["bundle"]) / "model" / "config.json").is_file()
    assert "PROMOTED" in stdout and "mlflow ui --backend-store-uri" in stdout


def test_a_stage_runs_alone_on_an_existing_run(first_run, cli):
    out, summary, _ = first_run
    manifest = Path(summary["run_dir"]) / "merge/manifest.json"
    before = json.loads(manifest.read_text())["started_at"]
    res = cli("merge", "configs/tiny.yaml", "--set", f"output_dir={out}", "--run-id", summary["run_id"])
    assert res.returncode == 0, res.stderr[-4000:]
    after = json.loads(manifest.read_text())
    assert after["started_at"] != before and after["metrics"]["max_logit_diff"] <= 1e-3
