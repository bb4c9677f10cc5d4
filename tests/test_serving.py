"""Handoff to serving: vLLM pre-flight checks, the OpenAI-compatible smoke test against a real
`transformers serve` on CPU, `serve-command`, and the unchanged nightly rerun."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.serving import preflight, smoke_test

from conftest import ROOT, run_cli
from services import free_port, stop, wait_http

SERVE = ["transformers", "serve", "model", "--host", "{host}", "--port", "{port}", "--device", "cpu"]


def _template():
    from tasks.models import CHATML_TEMPLATE

    return CHATML_TEMPLATE


# ---------------------------------------------------------------- pre-flight (no server needed)


@pytest.fixture
def bundle(tmp_path, tiny_model):
    """A bundle folder whose model/ is hard-linked to a copy of the tiny model, as handoff builds it."""
    from tasks.files import copy_tree

    source = tmp_path / "merged"
    shutil.copytree(tiny_model, source)
    (tmp_path / "bundle").mkdir()
    copy_tree(source, tmp_path / "bundle/model")
    return tmp_path / "bundle", source


def test_preflight_accepts_the_tiny_model_unchanged(bundle):
    folder, _ = bundle
    notes, extra = preflight(folder, folder / "model", _template(), 64)
    assert notes == [] and extra == [] and (folder / "chat_template.jinja").read_text() == _template()


def test_preflight_adds_the_end_of_turn_token_to_eos_without_touching_the_merge_output(bundle):
    folder, source = bundle
    gen = json.loads((source / "generation_config.json").read_text())
    gen["eos_token_id"] = 0  # <|endoftext|>: the template ends turns with <|im_end|> (id 2)
    (source / "generation_config.json").write_text(json.dumps(gen))  # hard link: the bundle sees it too
    notes, _ = preflight(folder, folder / "model", _template(), 64)
    assert "end-of-turn token '<|im_end|>' (2)" in notes[0]
    assert json.loads((folder / "model/generation_config.json").read_text())["eos_token_id"] == [0, 2]
    assert json.loads((source / "generation_config.json").read_text())["eos_token_id"] == 0


def test_preflight_refuses_what_vllm_cannot_serve(bundle):
    folder, source = bundle
    adapter = folder / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 128}))
    with pytest.raises(ValueError, match="r=128 exceeds serve.max_lora_rank=64"):
        preflight(folder, source, _template(), 64, adapter_dir=adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        preflight(folder, source, _template(), 64, adapter_dir=adapter)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").unlink()
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["MyOwnForCausalLM"]}))
    with pytest.raises(ValueError, match="MyOwnForCausalLM.*not served by vLLM"):
        preflight(folder, source, _template(), 64)


def test_preflight_gives_vllm_the_training_template_when_the_tokenizer_has_none(bundle):
    folder, source = bundle
    other = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
    notes, extra = preflight(folder, folder / "model", other, 64)
    assert extra == ["--chat-template", "chat_template.jinja"] and "chat template" in notes[0]


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """One pipeline run (full fine-tuning long enough to learn to end its turns) whose handoff
    launches `transformers serve` on the bundle and smoke-tests it."""
    tmp = tmp_path_factory.mktemp("serve")
    data = tmp / "train.jsonl"
    shutil.copy(ROOT / "data/demo/train.jsonl", data)
    # `transformers serve` lists this cache
    Path(os.environ["HF_HOME"], "hub").mkdir(parents=True, exist_ok=True)
    args = [
        "--set",
        f"output_dir={tmp / 'runs'}",
        "--set",
        f"data.path={data}",
        "--set",
        "train.method=full",
        "--set",
        "train.max_steps=80",
        "--set",
        "train.learning_rate=1e-2",
        "--set",
        "train.save_steps=100",
        "--set",
        f"serve.endpoint=http://127.0.0.1:{free_port()}/v1",
        "--set",
        "serve.launch=true",
        "--set",
        "serve.served_model_name=model",
        "--set",
        f"serve.command={json.dumps(SERVE)}",
    ]
    t0 = time.monotonic()
    res = run_cli("run", "configs/tiny.yaml", *args, "--summary-json", str(tmp / "summary.json"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return {
        "tmp": tmp,
        "args": args,
        "data": data,
        "seconds": time.monotonic() - t0,
        "summary": json.loads((tmp / "summary.json").read_text()),
    }


@pytest.mark.slow
def test_handoff_launched_the_server_and_every_answer_stopped(served_run):
    run = Path(served_run["summary"]["run_dir"])
    smoke = json.loads((run / "handoff/smoke.json").read_text())
    assert smoke["passed"] and len(smoke["answers"]) == 3
    assert all(a["answer"].strip() and a["finish_reason"] == "stop" for a in smoke["answers"])
    manifest = json.loads((run / "handoff/manifest.json").read_text())
    assert manifest["metrics"]["smoke_passed"] == 1 and manifest["outputs"]["version"] == "1"
    assert (run / "handoff/bundle/compose.yaml").is_file() and (run / "handoff/server.log").is_file()


@pytest.mark.slow
def test_smoke_test_against_a_server_the_test_started(served_run):
    bundle = Path(served_run["summary"]["bundle"])
    port = free_port()
    log = bundle.parent / "test-server.log"
    exe = str(Path(sys.executable).parent / "transformers")
    proc = subprocess.Popen(
        [exe, "serve", "model", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        cwd=bundle,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, proc, log)
        prompts = [
            json.loads(x)["messages"]
            for x in open(Path(served_run["summary"]["run_dir"]) / "format/eval_records.jsonl")
        ][:3]
        ok = smoke_test(f"http://127.0.0.1:{port}/v1", "model", prompts, max_tokens=128)
        assert ok["passed"] and [a["finish_reason"] for a in ok["answers"]] == ["stop"] * 3
        cut = smoke_test(f"http://127.0.0.1:{port}/v1", "model", prompts, max_tokens=2)
        assert not cut["passed"] and "finish_reason 'length'" in cut["failures"][0]
    finally:
        stop(proc)


@pytest.mark.slow
def test_serve_command_prints_the_vllm_line(served_run):
    uri = served_run["summary"]["mlflow_uri"]
    res = run_cli("serve-command", "tiny@champion", "--mlflow-uri", uri)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"cd {served_run['summary']['bundle']} && vllm serve model --served-model-name model" in res.stdout
    assert run_cli("serve-command", "tiny@nope", "--mlflow-uri", uri).returncode == 1


@pytest.mark.slow
def test_unchanged_nightly_rerun_is_a_no_op_and_new_data_is_not(served_run):
    from mlflow import MlflowClient

    from tasks.config import load_config
    from tasks.fingerprint import find_unchanged

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
    assert len(list((served_run["tmp"] / "runs").glob("tiny-*"))) == 1
    with open(served_run["data"], "a") as f:  # new data: the fingerprint no longer matches, so it retrains
        f.write(json.dumps({"instruction": "A new question?", "input": "", "output": "A new answer."}) + "\n")
    overrides = [a for a in served_run["args"] if a != "--set"]
    assert find_unchanged(load_config(ROOT / "configs/tiny.yaml", overrides), log=lambda *_: None) is None


def test_smoke_test_fails_clearly_when_the_endpoint_serves_another_name():
    """vLLM's /v1/models lists its --served-model-name; a stdlib HTTP server stands in for that one
    answer (transformers serve lists none). No completion is attempted against the wrong name."""
    import http.server
    import threading

    from tasks.serving import smoke_test

    paths = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            paths.append(self.path)
            body = json.dumps(
                {
                    "object": "list",
                    "data": [{"id": "other", "object": "model", "created": 0, "owned_by": "vllm"}],
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = smoke_test(
            f"http://127.0.0.1:{server.server_port}/v1",
            "tiny",
            [[{"role": "user", "content": "hi"}]],
            max_tokens=8,
        )
    finally:
        server.shutdown()
    assert not result["passed"] and result["models"] == ["other"]
    assert result["failures"] == ["the endpoint serves ['other'], not 'tiny' (check serve.served_model_name)"]
    assert paths == ["/v1/models"]


def test_hot_swap_unloads_then_loads_the_adapter_by_name():
    """vLLM cannot run here, so a stdlib HTTP server stands in for its two LoRA endpoints: this
    checks the requests hot swap sends and that a first load (nothing to unload) is fine."""
    import http.server
    import threading

    from tasks.serving import hot_swap

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers["Authorization"]))
            self.send_response(404 if self.path.endswith("unload_lora_adapter") and len(seen) == 1 else 200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/v1"
        hot_swap(base, "tiny", "/bundles/v2/adapter", api_key="k")  # first time: nothing loaded yet
        hot_swap(base, "tiny", "/bundles/v3/adapter", api_key="k")
    finally:
        server.shutdown()
    assert [(p, b) for p, b, _ in seen] == [
        ("/v1/unload_lora_adapter", {"lora_name": "tiny"}),
        ("/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": "/bundles/v2/adapter"}),
        ("/v1/unload_lora_adapter", {"lora_name": "tiny"}),
        ("/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": "/bundles/v3/adapter"}),
    ]
    assert all(auth == "Bearer k" for _, _, auth in seen)


def test_adapter_mode_serves_the_adapter_on_the_base():
    from tasks.handoff import serve_argv

    from conftest import make_config

    cfg = make_config(
        Path("/tmp"), ROOT / "data/demo/train.jsonl", serve={"mode": "adapter", "max_lora_rank": 16}
    )
    argv = serve_argv(cfg, "/models/base", "adapter")
    assert argv[:3] == ["vllm", "serve", "/models/base"]
    assert (
        argv[argv.index("--lora-modules") + 1] == "t=adapter"
        and argv[argv.index("--max-lora-rank") + 1] == "16"
    )
    assert "--enable-lora" in argv and argv[argv.index("--max-model-len") + 1] == "256"


@pytest.mark.slow
def test_a_failed_smoke_test_registers_nothing_and_keeps_the_champion(served_run):
    """The served run copied under a new run id, handed off again with serve.max_tokens=1: no answer
    can end its turn, so the smoke test fails and the handoff stops before the registry."""
    from mlflow import MlflowClient

    first = Path(served_run["summary"]["run_dir"])
    copy = first.parent / "tiny-smoke-fails"
    shutil.copytree(first, copy, ignore=shutil.ignore_patterns("handoff", "mlflow.json"))
    res = run_cli("handoff", "configs/tiny.yaml", *served_run["args"], "--set", "serve.max_tokens=1",
                  "--run-id", copy.name)  # fmt: skip
    assert res.returncode == 1 and "smoke test on" in res.stderr and "finish_reason 'length'" in res.stderr, (
        res.stderr
    )
    assert not (copy / "handoff/manifest.json").exists()
    uri = served_run["summary"]["mlflow_uri"]
    client = MlflowClient(uri, uri)
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny'")] == ["1"]
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
