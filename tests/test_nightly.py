"""Nightly retraining that compounds: a weighted data mix, night 2 continuing from the
champion with replay, and the retention set. Real runs of `sftflow run` on the tiny model."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import run_cli, write_jsonl

pytestmark = pytest.mark.slow


def codes(word: str, n: int) -> list[dict]:
    return [{"instruction": f"Say code word number {i}.", "output": f"{word} {i}"} for i in range(n)]


def night(out: Path, *overrides: str) -> dict:
    summary = out / f"summary-{len(list(out.glob('summary-*')))}.json"
    args = ["--set", f"output_dir={out}/runs", "--set", "eval.batch_size=64", *overrides]
    res = run_cli("run", "configs/tiny.yaml", *args, "--summary-json", str(summary))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return json.loads(summary.read_text())


def manifest(summary: dict, stage: str) -> dict:
    return json.loads((Path(summary["run_dir"]) / stage / "manifest.json").read_text())


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Night 1: alpha and beta mixed 3:1 from the base. Night 2: new gamma data, 30% replayed
    from the champion's sources, training continued from the champion."""
    out = tmp_path_factory.mktemp("nights")
    a, b, c = (
        write_jsonl(out / f"{w}.jsonl", codes(w, n)) for w, n in (("alpha", 90), ("beta", 90), ("gamma", 40))
    )
    mix = f"data.sources=[{{path: {a}, weight: 3, name: alpha}}, {{path: {b}, weight: 1, name: beta}}]"
    first = night(out, "--set", "data.path=null", "--set", mix, "--set", "train.eval_steps=4")
    second = night(
        out, "--set", f"data.path={c}", "--set", "data.replay=0.3", "--set", "train.init_from=champion",
        "--set", "train.eval_steps=4", "--set", "eval.past_eval_sets=1",
    )  # fmt: skip
    return out, first, second


def test_a_mix_of_two_sources_lands_in_the_recorded_proportions(nights):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from tasks.models.loading import resolve_model

    _, first, _ = nights
    mix = manifest(first, "format")["metrics"]["mix"]
    # weights 3:1, sized by the scarcer source: all 90 alpha records and 30 beta, 10% of each held out
    assert {k: (v["planned"], v["train"], v["eval"]) for k, v in mix.items()} == {
        "alpha": (90, 81, 9),
        "beta": (30, 27, 3),
    }
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
    rows = load_from_disk(str(Path(first["run_dir"]) / "format" / "train"))
    text = "".join(tok.decode(r) for r in rows["input_ids"])
    assert (text.count("alpha "), text.count("beta ")) == (81, 27)  # what training reads, counted
    c = first["counts"]  # the 60 beta records the mix left out are counted, not lost
    assert (c["left_out_by_mix"], c["repeated_by_mix"]) == (60, 0)
    assert c["records_in"] == c["accepted"] + c["duplicates"] + c["quarantined"] + c["too_long"] + 60
    assert first["steps"] == 12 and first["started_from"] is None


def test_night_two_starts_from_the_champion_not_the_base(nights):
    _, first, second = nights
    trained = json.loads((Path(second["run_dir"]) / "train" / "result.json").read_text())
    step0, loss0 = trained["eval_losses"][0]
    scores = second["scores"]
    # the eval split is one batch (eval.batch_size 64), so step 0's eval loss is the token mean
    # the evaluate stage computes; the champion's is of its merged model, read from the registry
    assert step0 == 0 and loss0 == pytest.approx(scores["champion"]["eval_loss"], rel=1e-4)
    assert abs(loss0 - scores["base"]["eval_loss"]) > 0.05
    assert [s for s, _ in trained["eval_losses"]] == [0, 4, 8, 12]
    assert second["started_from"] == first["version"] == "1"
    assert manifest(second, "train")["outputs"]["started_from"].startswith("champion v1 (run ")
    tags = MlflowClient(second["mlflow_uri"]).get_model_version("tiny", second["version"]).tags
    assert tags["sftflow.started_from"] == "1" and tags["sftflow.weights_uri"].endswith("/adapter")


def test_night_two_replays_the_champions_sources_at_the_set_share(nights):
    _, first, second = nights
    mix = manifest(second, "format")["metrics"]["mix"]
    replayed = {k: v for k, v in mix.items() if v["replay"]}
    assert set(replayed) == {"replay alpha", "replay beta"}
    new = mix[next(k for k in mix if not mix[k]["replay"])]
    assert new["planned"] == 40 and sum(v["planned"] for v in replayed.values()) == round(40 * 0.3 / 0.7)
    assert manifest(second, "format")["outputs"]["replayed_from"].startswith("champion v1")
    # the eval split of night 1 (version 1) is scored too, for every model
    assert all("past_v1_loss" in s for s in second["scores"].values())


def test_init_from_changes_the_fingerprint_and_replayed_sources_do_not(tmp_path):
    from tasks.core.results import Lineage
    from tasks.data.plan import plan_data
    from tasks.models.loading import resolve_model
    from tasks.registry.fingerprint import pipeline_fingerprint

    from conftest import make_config

    cfg = make_config(tmp_path, "data/demo/train.jsonl", data={"replay": 0.2})
    cont = make_config(
        tmp_path, "data/demo/train.jsonl", data={"replay": 0.2}, train={"init_from": "champion"}
    )
    key = plan_data(cfg.data, resolve_model(cfg.model.name_or_path)).declared_key
    assert pipeline_fingerprint(cfg, key) != pipeline_fingerprint(cont, key)
    old = write_jsonl(tmp_path / "old.jsonl", codes("old", 5))
    champion = Lineage("3", "r", "lora", "runs:/x/adapter", [{"path": [str(old)], "name": "replay old"}])
    with_replay = plan_data(cfg.data, resolve_model(cfg.model.name_or_path), champion)
    assert with_replay.key != key and with_replay.declared_key == key
    old.unlink()
    with pytest.raises(FileNotFoundError, match=r"champion version 3 was trained on .*old\.jsonl"):
        plan_data(cfg.data, resolve_model(cfg.model.name_or_path), champion)


def test_the_retention_set_catches_a_candidate_that_forgot_it(tmp_path):
    """Night 1 learns the shipped retention set; night 2 trains from the base on other data.
    Its eval loss beats the champion's, but it has lost what the champion knew: refused."""
    retention = "data/retention/general.jsonl"
    keep = ("--set", "eval.retention.enabled=true", "--set", "train.max_steps=30")
    first = night(tmp_path, "--set", f"data.path={retention}", *keep)
    second = night(tmp_path, *keep)
    assert first["promoted"] and not second["promoted"]
    scores = second["scores"]
    assert scores["candidate"]["eval_loss"] < scores["champion"]["eval_loss"]
    assert scores["candidate"]["retention_loss"] > 1.05 * scores["champion"]["retention_loss"]
    assert "retention set general.jsonl: loss" in second["gate"] and "vs champion" in second["gate"]
    assert "the candidate forgot" in second["gate"]


@pytest.fixture(scope="module")
def alpha_champion(tmp_path_factory):
    """Night 1 of the slice and the tie cases: the champion learns alpha, codes 13 to 89 (30
    steps), gated on the tie's eval file. Each case's night 2 trains beta from the base in the
    same registry, against this champion (neither night 2 is promoted)."""
    out = tmp_path_factory.mktemp("alpha")
    evals = write_jsonl(out / "tie-eval.jsonl", codes("alpha", 13) + codes("beta", 17))
    alpha = write_jsonl(out / "alpha.jsonl", codes("alpha", 90)[13:])
    tie = (
        "--set",
        f"data.eval_path={evals}",
        "--set",
        "train.max_steps=30",
        "--set",
        "eval.gate.against=champion",
    )
    first = night(out, "--set", f"data.path={alpha}", *tie)
    assert first["promoted"]
    return out, tie


def test_a_candidate_that_improves_the_mean_but_breaks_a_slice_is_refused_naming_it(alpha_champion):
    """One eval file, slices alpha (10) and beta (30). The champion learned alpha; the candidate,
    from the base, learns beta: its eval loss beats the champion's, but alpha regresses."""
    out, _ = alpha_champion
    label = lambda word, rows: [{**r, "category": word} for r in rows]
    evals = write_jsonl(
        out / "slice-eval.jsonl", label("alpha", codes("alpha", 10)) + label("beta", codes("beta", 30))
    )
    beta = write_jsonl(out / "slice-beta.jsonl", label("beta", codes("beta", 120)[30:]))
    keep = ("--set", f"data.eval_path={evals}", "--set", "data.slice_column=category",
            "--set", "train.max_steps=30", "--set", "eval.gate.slice_min_samples=5")  # fmt: skip
    second = night(out, "--set", f"data.path={beta}", *keep)
    assert not second["promoted"]
    assert second["intervals"]["champion"]["eval_loss"]["low"] > 0  # the mean alone would promote it
    alpha_row, beta_row = second["slices"]["alpha"], second["slices"]["beta"]
    assert (alpha_row["n"], beta_row["n"]) == (10, 30)
    assert (
        alpha_row["candidate"] > alpha_row["champion"] + 0.05 and beta_row["candidate"] < beta_row["champion"]
    )
    assert "slice category='alpha' (10 samples): eval_loss" in second["gate"]
    assert "slice category='beta'" not in second["gate"]


def test_a_noisy_tie_is_refused_by_the_bootstrap_where_a_point_comparison_promotes(alpha_champion):
    """A tie: the champion learned alpha, the candidate (from the base) beta, and the eval file
    holds 13 alpha and 17 beta samples. Each model is far better on its own half, so the mean
    edges up by the two-sample imbalance while the paired resamples swing both ways: min_delta 0
    on the point would promote it, the bootstrap's lower bound does not clear 0."""
    from tasks.config import load_config
    from tasks.evaluation.gate import gate

    out, tie = alpha_champion
    beta = write_jsonl(out / "tie-beta.jsonl", codes("beta", 120)[17:])
    second = night(out, "--set", f"data.path={beta}", *tie)
    assert not second["promoted"]
    interval = second["intervals"]["champion"]["eval_loss"]
    assert interval["point"] > 0 and interval["low"] <= 0 < interval["high"]
    assert "lower bound <= min_delta 0.0" in second["gate"]
    point_only = load_config(
        "configs/tiny.yaml", ["eval.gate.bootstrap_samples=0", "eval.gate.against=champion"]
    )
    assert gate(point_only.eval.gate, second["scores"])[0] is True
    print(f"\nnoisy tie: eval_loss improvement vs champion {interval}")
