"""Train stage on CPU: every method and ZeRO preset, 2 data-parallel processes, kill and resume."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tasks.core.results import FormatResult
from tasks.format import run_format
from tasks.train import run_train
from tasks.training.worker import COMPLETE, latest_checkpoint

from conftest import llama_on_tiny_tokenizer, make_config

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parent.parent / "data/demo/train.jsonl"
quiet = lambda *_: None


@pytest.fixture(scope="module")
def formatted(tmp_path_factory):
    """One formatted data set; each test trains in a run dir of its own that points at it."""
    root = tmp_path_factory.mktemp("train")
    cfg = make_config(root, DATA)
    run_format(cfg, "base", log=quiet)
    return root


def new_run(root: Path, run_id: str, **train):
    cfg = make_config(
        root,
        DATA,
        train={
            "max_steps": 4,
            "learning_rate": 3e-3,
            "save_steps": 2,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            **train,
        },
    )
    shutil.copytree(root / "runs/base/format", root / f"runs/{run_id}/format")
    return cfg


@pytest.mark.parametrize(
    "preset,method",
    [
        ("zero0", "lora"),
        ("zero1", "full"),
        ("zero2", "qlora"),
        ("zero3", "lora"),
        ("zero2_offload", "lora"),
        ("zero3_offload", "full"),
    ],
)
def test_every_preset_and_method_trains(formatted, preset, method):
    run_id = f"{preset}-{method}"
    cfg = new_run(formatted, run_id, deepspeed=preset, method=method)
    res = run_train(cfg, run_id, FormatResult.from_manifest(cfg.output_dir, run_id), log=quiet)
    out = formatted / f"runs/{run_id}/train"
    result = json.loads((out / "result.json").read_text())
    assert res.global_step == 4 and result["world_size"] == 1 and len(result["losses"]) == 4
    resolved = json.loads((out / "deepspeed_resolved.json").read_text())
    assert resolved["zero_optimization"]["stage"] == int(preset[4])
    assert resolved["train_micro_batch_size_per_gpu"] == 4  # HF "auto" values were filled in
    if method == "full":
        assert (out / "model" / "config.json").is_file()
        return
    # ZeRO-3 must still save real, trained LoRA weights (an empty adapter is a known failure elsewhere)
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = [t for k, t in tensors.items() if "lora_B" in k]
    assert len(b) == 14 and all(t.numel() > 0 for t in b)
    assert any(t.abs().sum() > 0 for t in b), "lora_B is still all zeros: nothing was trained"


def test_without_deepspeed_the_trainer_takes_the_same_steps_as_zero0(formatted):
    """deepspeed: none runs the Trainer without DeepSpeed's engine (one process: ZeRO partitions
    nothing there, and the engine costs time): the same launcher, data and losses as zero0."""
    losses = {}
    for preset in ("zero0", "none"):
        run_id = f"engine-{preset}"
        cfg = new_run(formatted, run_id, deepspeed=preset, method="full")
        run_train(cfg, run_id, FormatResult.from_manifest(cfg.output_dir, run_id), log=quiet)
        out = formatted / f"runs/{run_id}/train"
        result = json.loads((out / "result.json").read_text())
        losses[preset] = result["losses"]
        assert (out / "deepspeed_resolved.json").is_file() == (preset == "zero0")
        # tokens count when the model takes a batch, not when the dataloader collates one ahead
        (rank,) = [json.loads(p.read_text()) for p in (out / "ranks").glob("rank*.json")]
        assert len(rank["first_batches"]) == len(result["step_ends"]) == 4
        assert result["step_ends"][-1][1] == result["real_tokens"] <= result["total_tokens"]
        assert (out / "model/config.json").is_file()
    assert len(losses["none"]) == 4
    assert losses["none"] == pytest.approx(losses["zero0"], rel=1e-4)


def test_two_processes_split_the_data_and_agree_on_the_weights(formatted, monkeypatch):
    """Each rank takes its share of the cores: with two threads each on two cores, these 4 steps
    took 2.9 s instead of 0.38 s (OpenMP's threads wait for cores the other rank holds)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the rule, not the suite's setting
    cfg = new_run(formatted, "ddp", num_processes=2, deepspeed="zero2")
    run_train(cfg, "ddp", FormatResult.from_manifest(cfg.output_dir, "ddp"), log=quiet)
    ranks = [
        json.loads(p.read_text()) for p in sorted((formatted / "runs/ddp/train/ranks").glob("rank*.json"))
    ]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert not set(ranks[0]["first_batches"]) & set(ranks[1]["first_batches"]), (
        "both ranks saw the same batches"
    )
    assert ranks[0]["trainable_sha256"] == ranks[1]["trainable_sha256"]
    assert [r["threads"] for r in ranks] == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2


def test_nan_loss_stops_the_run_naming_the_step(formatted):
    cfg = new_run(formatted, "nan", method="full", learning_rate=float("inf"), max_steps=8)
    with pytest.raises(RuntimeError, match=r"training loss is (nan|inf) at step \d+"):
        run_train(cfg, "nan", FormatResult.from_manifest(cfg.output_dir, "nan"), log=quiet)


def test_memory_estimate_refuses_before_launching(formatted):
    cfg = new_run(formatted, "oom", method="full", memory_budget_gb=0.001)
    with pytest.raises(MemoryError, match="lower train.micro_batch_size.*zero3.*offload.*qlora"):
        run_train(cfg, "oom", FormatResult.from_manifest(cfg.output_dir, "oom"), log=quiet)
    assert not (formatted / "runs/oom/train/train.log").exists()


def wide_vocab_model(target: Path) -> Path:
    """A 1-layer model with a 2M-word output layer (64 MB of weights): one micro batch of
    1024-token rows needs logits of tens of GB, more than the machine has."""
    return llama_on_tiny_tokenizer(target, vocab_size=1 << 21, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   tie_word_embeddings=True)  # fmt: skip


def test_out_of_memory_in_a_step_is_reported_with_advice(tmp_path):
    """A real allocation failure in a training step. The budget override gets past the estimate's
    refusal; an 8 GB address-space limit on the command makes the failure the same on any machine."""
    import resource
    import subprocess
    import sys

    import yaml

    cfg = make_config(
        tmp_path,
        DATA,
        model={"name_or_path": str(wide_vocab_model(tmp_path / "wide"))},
        data={"max_seq_len": 1024},
        train={"max_steps": 1, "memory_budget_gb": 10000},
    )
    run_format(cfg, "oom", log=quiet)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    limit = 8 << 30
    res = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", str(config), "--run-id", "oom"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )
    assert res.returncode == 1, res.stderr[-3000:]
    assert "out of memory at step 0" in res.stderr and "can't allocate memory" in res.stderr
    assert "lower train.micro_batch_size" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs/oom/train/manifest.json").exists()


def test_incomplete_checkpoints_are_ignored(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / COMPLETE).write_text(str(step))
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"


def kill_workers_after(marker: Path, spec: Path, killed: list) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "tasks.training.worker" in cmd and str(spec) in cmd and "deepspeed.launcher" not in cmd:
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)


def test_killed_training_resumes_exactly_on_retry(formatted, monkeypatch):
    """SIGKILL the ranks after the step-3 checkpoint; the task's retry finishes from it, and every
    loss equals that of an unbroken run with the same seed. MLflow keeps one train run."""
    from mlflow import MlflowClient
    from prefect import flow

    from tasks.train import train_task

    monkeypatch.setenv("SFTFLOW_STEP_DELAY_S", "0.4")
    steps = {"max_steps": 8, "save_steps": 3}
    unbroken_cfg = new_run(formatted, "unbroken", **steps)
    run_train(
        unbroken_cfg, "unbroken", FormatResult.from_manifest(unbroken_cfg.output_dir, "unbroken"), log=quiet
    )
    expected = json.loads((formatted / "runs/unbroken/train/result.json").read_text())["losses"]

    cfg = new_run(formatted, "killed", **steps)
    out = formatted / "runs/killed/train"
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_workers_after,
        args=(out / "checkpoints/checkpoint-3" / COMPLETE, out / "spec.json", killed),
    )
    killer.start()

    @flow
    def train_only():
        return train_task.with_options(retries=1, retry_delay_seconds=1)(
            cfg, "killed", FormatResult.from_manifest(cfg.output_dir, "killed")
        )

    result = train_only()
    killer.join()
    assert killed, "the workers finished before they could be killed"
    final = json.loads((out / "result.json").read_text())
    assert final["resumed_from"].endswith("checkpoint-3")
    assert final["losses"] == expected and result.global_step == 8
    client = MlflowClient(cfg.mlflow_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs(
        [exp.experiment_id], "tags.`sftflow.stage` = 'train' and tags.`sftflow.run_id` = 'killed'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_a_silent_hang_is_killed_at_the_timeout_and_the_retry_resumes(formatted, tmp_path, monkeypatch):
    """A rank that stops without printing anything (a fault hook) is killed with the launcher's
    whole process group at train.timeout_s; the Prefect retry resumes from the last checkpoint."""
    from prefect import flow

    from tasks.train import train_task

    monkeypatch.setenv("SFTFLOW_FAULT", "hang@train:step")  # after step 3, once the step-2 checkpoint is done
    monkeypatch.setenv("SFTFLOW_FAULT_ONCE", str(tmp_path / "hung"))
    cfg = new_run(formatted, "hung", max_steps=6, save_steps=2, timeout_s=50)
    out = formatted / "runs/hung/train"

    @flow
    def train_only():
        return train_task.with_options(retries=1, retry_delay_seconds=1)(
            cfg, "hung", FormatResult.from_manifest(cfg.output_dir, "hung")
        )

    t0 = time.monotonic()
    result = train_only()
    assert (tmp_path / "hung").exists(), "the hang never happened"
    assert (
        "training exceeded train.timeout_s=50s; killed the launcher and every rank"
        in (out / "train.log").read_text()
    )
    final = json.loads((out / "result.json").read_text())
    assert final["resumed_from"].endswith("checkpoint-2") and result.global_step == 6
    assert time.monotonic() - t0 < 50 + 120
    orphans = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if str(out / "spec.json") in " ".join(p.info["cmdline"] or [])
    ]
    assert not orphans, orphans


def test_activation_estimate_is_korthikanti_in_16bit_and_twice_that_in_fp32(formatted):
    """Korthikanti et al.: s*b*h*(34 + 5*a*s/h) bytes per layer with 16-bit activations."""
    from transformers import AutoConfig

    from tasks.models.loading import resolve_model
    from tasks.training.memory import estimate

    model = resolve_model("tiny-llama")
    mcfg = AutoConfig.from_pretrained(model)
    per_value = {}
    for precision in ("bf16", "fp32"):
        cfg = new_run(formatted, f"estimate-{precision}", precision=precision)
        tokens = cfg.train.micro_batch_size * cfg.data.max_seq_len
        logits = tokens * mcfg.vocab_size * 4 * 2
        per_value[precision] = (estimate(cfg.train, cfg.data.max_seq_len, model).activations - logits) / (
            tokens * mcfg.hidden_size * mcfg.num_hidden_layers
        )
    bf16 = 34 + 5 * mcfg.num_attention_heads * 256 / mcfg.hidden_size  # max_seq_len 256
    assert per_value == {"bf16": pytest.approx(bf16), "fp32": pytest.approx(2 * bf16)}


def test_group_by_length_lowers_padding(tmp_path):
    """Unpacked rows of mixed length: batching rows of similar length pads less than random batches."""
    from conftest import write_jsonl

    records = [{"instruction": "Repeat the words.", "input": "", "output": " ".join(["word"] * (2 + (i * 7) % 90))}
               for i in range(160)]  # fmt: skip
    data = write_jsonl(tmp_path / "mixed.jsonl", records)
    fractions = {}
    for grouped in (True, False):
        cfg = make_config(tmp_path / str(grouped), data, data={"packing": False},
                          train={"max_steps": 8, "group_by_length": grouped, "save_steps": 100})  # fmt: skip
        run_train(cfg, "g", run_format(cfg, "g", log=quiet), log=quiet)
        fractions[grouped] = json.loads((tmp_path / str(grouped) / "runs/g/train/result.json").read_text())[
            "real_token_fraction"
        ]
    assert fractions[True] > fractions[False] + 0.1, fractions
