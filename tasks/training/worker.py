"""The per-rank training program that the ``deepspeed`` launcher starts.

    deepspeed --num_gpus N --module tasks.training.worker --spec <run>/train/spec.json

It reads everything from the spec written by ``tasks.train``, trains with the HF Trainer
and DeepSpeed, resumes from the newest *complete* checkpoint, streams metrics to MLflow
from rank 0, and saves the adapter (or the full model) atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from tasks.core.quiet import quiet_libraries

quiet_libraries()  # before transformers brings in bitsandbytes, which warns on import

from transformers import TrainerCallback  # noqa: E402

from tasks.core.faults import fault  # noqa: E402
from tasks.core.files import write_json  # noqa: E402
from tasks.core.tracking import mlflow_client  # noqa: E402
from tasks.data.batching import Collator  # noqa: E402
from tasks.models.loading import load_tokenizer, pick_dtype, qlora_config  # noqa: E402
from tasks.training.attention import describe, register  # noqa: E402
from tasks.training.collating import EVAL_ROW, RecordingCollator  # noqa: E402
from tasks.training.hosts import interface_for  # noqa: E402
from tasks.training.memory import ADVICE  # noqa: E402
from tasks.training.threads import rank_threads  # noqa: E402

COMPLETE = "sftflow_complete"  # written into a checkpoint folder once every file of it is on disk


def latest_checkpoint(folder: Path) -> Path | None:
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def build_model(spec: dict, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    t, init = spec["train"], spec.get("init_from")
    kwargs: dict = {"dtype": dtype, "attn_implementation": register()}
    if t["method"] == "qlora":
        kwargs["quantization_config"] = qlora_config(dtype, t["quantization_bits"])
    # full fine-tuning continues from the champion's weights; LoRA from its adapter on the base
    weights = init if init and t["method"] == "full" else spec["model_path"]
    model = AutoModelForCausalLM.from_pretrained(weights, **kwargs)
    model.config.use_cache = False  # the packed-sequence mask is only built without a KV cache
    if t["method"] == "full":
        return model
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if t["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if init:
        model = PeftModel.from_pretrained(model, init, is_trainable=True)
    else:
        lora = t["lora"]
        peft_cfg = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_cfg)
    if dtype != torch.float32:  # trainable LoRA weights stay fp32 for stable updates
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model


class Guard(TrainerCallback):
    """Stops on a NaN/inf loss, prints progress, streams metrics, marks complete checkpoints."""

    def __init__(self, spec: dict, collator: Collator):
        self.spec, self.collator = spec, collator
        self.t0 = time.monotonic()
        self.tokens0 = 0
        self.step_ends: list[list] = []
        self.client = None
        self.pending: list = []
        self.tracked = bool(spec.get("mlflow_run_id")) and int(os.environ.get("RANK", "0")) == 0
        # ranks started over ssh have no MLflow URI when it holds credentials (tasks/training/hosts.py):
        # their metrics go to the file the train stage sends at its end
        if self.tracked and "SFTFLOW_MLFLOW_URI" in os.environ:
            self.client = mlflow_client(os.environ["SFTFLOW_MLFLOW_URI"])

    def on_train_begin(self, args, state, control, **kw):
        self.t0, self.tokens0 = time.monotonic(), self.collator.trained_real
        self.step_ends = []  # [seconds since train begin, real tokens trained so far] per step

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss} at step {state.global_step}: stopping "
                "(lower train.learning_rate, or check the data for empty answers)"
            )
        if not state.is_world_process_zero:
            return
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        logs["tokens_per_second"] = (self.collator.trained_real - self.tokens0) * world / elapsed
        logs["real_token_fraction"] = self.collator.real_fraction
        logs["peak_memory_gb"] = _peak_memory_gb()
        shown = " ".join(f"{k}={v:.4g}" for k, v in logs.items() if isinstance(v, (int, float)))
        print(f"[train] step {state.global_step}/{state.max_steps} {shown}", flush=True)
        if self.tracked:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.pending += [
                Metric(k, float(v), now, state.global_step)
                for k, v in logs.items()
                if isinstance(v, (int, float)) and math.isfinite(v)
            ]
            self.flush()

    def flush(self) -> None:
        """Send what MLflow has not got yet. An outage must not stop training: what cannot be sent
        is kept and sent later (at the end, what is still pending goes to a file the train stage
        logs once MLflow is back)."""
        if self.client is None:
            return
        try:
            while self.pending:
                self.client.log_batch(self.spec["mlflow_run_id"], metrics=self.pending[:1000])
                del self.pending[:1000]
        except Exception as e:
            print(
                f"[train] MLflow unreachable ({type(e).__name__}); keeping {len(self.pending)} metric "
                "values to send later",
                flush=True,
            )

    def on_train_end(self, args, state, control, **kw):
        if self.pending:
            self.flush()
            if self.pending:
                write_json(
                    Path(self.spec["output_dir"]) / "pending_metrics.json",
                    [[m.key, m.value, m.timestamp, m.step] for m in self.pending],
                )

    def on_step_end(self, args, state, control, **kw):
        self.step_ends.append([round(time.monotonic() - self.t0, 3), self.collator.trained_real])
        # fault-injection hooks: a delay per step lets tests kill a run mid-way
        if os.environ.get("SFTFLOW_STEP_DELAY_S"):
            time.sleep(float(os.environ["SFTFLOW_STEP_DELAY_S"]))
        if state.global_step > args.save_steps:
            fault("train:step")

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                fault("train:checkpoint")  # written, not yet marked complete
                (ckpt / COMPLETE).write_text(str(state.global_step))


def rank_report(out: Path, collator, model) -> None:
    """What each rank saw and ended with: the data-parallel test reads these."""
    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    rank = int(os.environ.get("RANK", "0"))
    (out / "ranks").mkdir(exist_ok=True)
    write_json(
        out / "ranks" / f"rank{rank}.json",
        {
            "rank": rank,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "first_batches": collator.seen[:8],
            "trainable_sha256": h.hexdigest(),
            "threads": torch.get_num_threads(),
        },
    )


def _peak_memory_gb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def training_args(spec: dict, dtype):
    import torch
    from transformers import TrainingArguments

    t, out = spec["train"], Path(spec["output_dir"])
    evals = {}
    if spec.get("eval_path"):  # eval loss before the first step and every eval_steps
        evals = {
            "eval_strategy": "steps",
            "eval_steps": t["eval_steps"],
            "eval_on_start": True,
            "per_device_eval_batch_size": spec["eval_batch_size"],
            "prediction_loss_only": True,
        }
    return TrainingArguments(
        **evals,
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t["micro_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        learning_rate=t["learning_rate"],
        num_train_epochs=t["epochs"],
        max_steps=t["max_steps"],
        lr_scheduler_type=t["lr_scheduler"],
        warmup_steps=t["warmup_ratio"],
        weight_decay=t["weight_decay"],
        logging_steps=t["logging_steps"],
        save_strategy="steps",
        save_steps=t["save_steps"],
        save_total_limit=t["save_total_limit"],
        seed=t["seed"],
        data_seed=t["seed"],
        report_to=[],
        deepspeed=spec["deepspeed"] or None,
        use_cpu=not torch.cuda.is_available(),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_nan_inf_filter=False,
        ddp_backend=None if torch.cuda.is_available() else "gloo",
        ddp_timeout=t["rendezvous_timeout_s"],  # a host that never joins fails the run, not hangs it
        train_sampling_strategy="group_by_length" if t["group_by_length"] else "random",
        length_column_name="length",
    )


def eval_rows(spec: dict):
    """The format stage's eval split, marked for the collator, when eval loss is asked for."""
    if not spec.get("eval_path"):
        return None
    from datasets import load_from_disk

    rows = load_from_disk(spec["eval_path"])
    return rows.add_column(EVAL_ROW, [1] * len(rows))


def train(trainer, resume: Path | None):
    """``trainer.train``, with an out-of-memory step reported as one line plus the estimate's advice."""
    import torch

    try:
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (RuntimeError, MemoryError) as e:
        # CUDA raises OutOfMemoryError; the CPU allocator a plain RuntimeError that only its text marks
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in str(e):
            raise

        raise SystemExit(
            f"[train] out of memory at step {trainer.state.global_step}: {e}\n[train] try {ADVICE}"
        ) from None


def save_final(trainer, tok, out: Path, method: str, result, resume: Path | None, guard: Guard) -> None:
    """The adapter (or model) renamed into place once complete, and result.json beside it."""
    final = out / ("adapter" if method != "full" else "model")
    tmp = out / f".{final.name}.tmp"
    trainer.save_model(str(tmp))  # every rank takes part (ZeRO-3 gathers the weights)
    fault("train:final")
    if not trainer.is_world_process_zero():
        return
    tok.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_losses = [[h["step"], h["eval_loss"]] for h in trainer.state.log_history if "eval_loss" in h]
    write_json(
        out / "result.json",
        {
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "losses": losses,
            "eval_losses": eval_losses,
            "resumed_from": str(resume) if resume else None,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "real_token_fraction": guard.collator.real_fraction,
            "real_tokens": guard.collator.trained_real,
            "total_tokens": guard.collator.trained_total,
            "step_ends": guard.step_ends,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "output": str(final),
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    spec = json.loads(Path(parser.parse_args(argv).spec).read_text())

    import torch.distributed as dist
    from datasets import load_from_disk
    from transformers import Trainer, set_seed

    t, out = spec["train"], Path(spec["output_dir"])
    # ranks started over ssh don't inherit the train stage's choice, and each host has its own
    needs_interface = t["hostfile"] and "GLOO_SOCKET_IFNAME" not in os.environ
    if needs_interface and (name := interface_for(os.environ["MASTER_ADDR"])):
        os.environ["GLOO_SOCKET_IFNAME"] = name
    set_seed(t["seed"])
    dtype = pick_dtype(t["precision"], spec["model_path"], "train.precision")
    tok = load_tokenizer(spec["model_path"])
    collator = RecordingCollator(tok.pad_token_id)
    args = training_args(spec, dtype)
    # the process group comes up with the device (every rank has joined); the train stage waits for this
    threads = rank_threads(int(os.environ.get("LOCAL_SIZE", "1")))
    print(
        f"[train] joined: rank {args.process_index} of {args.world_size} on {args.device}, {threads} CPU thread(s)",
        flush=True,
    )
    model = build_model(spec, dtype)
    if args.process_index == 0:
        print(f"[train] attention: {describe(model.config)}", flush=True)
    model.register_forward_pre_hook(collator.on_forward, with_kwargs=True)
    guard = Guard(spec, collator)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=load_from_disk(spec["train_path"]),
        eval_dataset=eval_rows(spec),
        data_collator=collator,
        processing_class=tok,
        callbacks=[guard],
    )
    resume = latest_checkpoint(out / "checkpoints")
    if trainer.is_world_process_zero():
        if resume:
            print(f"[train] resuming from {resume}", flush=True)
        write_json(out / "training_args.json", args.to_dict())
    result = train(trainer, resume)
    if trainer.is_world_process_zero() and spec["deepspeed"]:
        write_json(
            out / "deepspeed_resolved.json", trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config
        )
    rank_report(out, collator, model)
    save_final(trainer, tok, out, t["method"], result, resume, guard)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_now() -> None:
    """Skip the interpreter's teardown of torch, gloo and DeepSpeed (about 2 s per run, after
    every file is written and closed); the atexit hooks still run."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_now()
