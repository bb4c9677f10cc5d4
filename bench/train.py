"""Training throughput: sftflow's train stage side by side with a padded-to-1024 baseline.

    python bench/train.py            # SmolLM2-135M, full fine-tuning, 4 optimizer steps each
    python bench/train.py --quick    # the tiny test model (well under 5 minutes)
    python bench/train.py --method lora

Same data (data/demo/train.jsonl), same model, same DeepSpeed preset (zero2), same micro
batch and number of optimizer steps, CPU fp32, one process each:
- sftflow: the format stage (packing into rows of max_seq_len) and the train stage through
  the deepspeed launcher, timed by the Trainer's own train_runtime;
- baseline: the tutorial script: every example padded to max_length=1024, no packing,
  labels masking only the padding, the same Trainer + DeepSpeed.
Both are compared on real (non-padding) tokens per second, i.e. on the time to get through
the same data. In the same run a fp32 matmul measures the CPU's FLOP/s, and the fraction of
it reached is 6N FLOPs per real token for full fine-tuning, about 4N for LoRA.
The last line is JSON: {"speedup_vs_baseline": x, "real_token_fraction": y, "flop_fraction": z}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def matmul_gflops(n: int = 2048, repeat: int = 5, rounds: int = 5) -> float:
    """The CPU's fp32 matmul rate: the best of several rounds, so a busy moment does not lower the
    limit the training rate is compared against."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeat):
            a @ b
        best = max(best, 2 * n**3 * repeat / (time.perf_counter() - t0) / 1e9)
    return best


def n_params(model_dir: Path) -> int:
    from tasks.models import load_model

    model = load_model(model_dir)
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def sftflow(work: Path, args) -> dict:
    from tasks.config import load_config
    from tasks.format import run_format
    from tasks.train import run_train

    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [
            f"output_dir={work / 'runs'}",
            f"model.name_or_path={args.model}",
            f"train.method={args.method}",
            f"train.max_steps={args.steps}",
            f"train.micro_batch_size={args.micro_batch}",
            "train.gradient_accumulation_steps=1",
            "train.save_steps=100000",
            "data.max_seq_len=1024",
            "data.eval_fraction=0.1",
            "data.cache=false",
            "train.warmup_ratio=0",
        ],
    )
    run_train(cfg, "bench", run_format(cfg, "bench", log=lambda *_: None), log=lambda *_: None)
    r = json.loads((work / "runs/bench/train/result.json").read_text())
    return {
        "seconds": r["train_runtime_s"],
        "real_tokens": r["real_tokens"],
        "total_tokens": r["total_tokens"],
    }


def baseline(work: Path, args) -> dict:
    """The tutorial script, in a fresh process: pad to 1024, no packing, same Trainer + DeepSpeed."""
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(29500 + os.getpid() % 1000),
        }
    )
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, set_seed

    from tasks.config import deepspeed_config, load_config
    from tasks.models import load_model, load_tokenizer, resolve_model

    set_seed(42)
    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    records = [json.loads(x) for x in (ROOT / "data/demo/train.jsonl").read_text().splitlines()]
    texts = [
        tok.apply_chat_template(
            [
                {"role": "user", "content": r["instruction"] + "\n\n" + r["input"]},
                {"role": "assistant", "content": r["output"]},
            ],
            tokenize=False,
        )
        for r in records
    ]
    enc = tok(texts, padding="max_length", max_length=1024, truncation=True)
    rows = [
        {"input_ids": ids, "attention_mask": m, "labels": [t if k else -100 for t, k in zip(ids, m)]}
        for ids, m in zip(enc["input_ids"], enc["attention_mask"])
    ]
    model = load_model(model_dir)
    model.train()
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    cfg = load_config(ROOT / "configs/demo.yaml")
    targs = TrainingArguments(
        output_dir=str(work / "baseline"),
        per_device_train_batch_size=args.micro_batch,
        max_steps=args.steps,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        deepspeed=deepspeed_config(cfg),
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        logging_steps=1000,
    )
    result = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(rows)).train()
    real = sum(sum(r["attention_mask"]) for r in rows[: args.steps * args.micro_batch])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return {
        "seconds": result.metrics["train_runtime"],
        "real_tokens": real,
        "total_tokens": 1024 * args.steps * args.micro_batch,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny model, 10 steps")
    p.add_argument("--method", choices=["full", "lora"], default="full")
    p.add_argument("--steps", type=int)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--_baseline", metavar="WORK", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = "tiny-llama" if args.quick else "smollm2-135m"
    args.steps = args.steps or (10 if args.quick else 4)
    if args._baseline:
        print("RESULT " + json.dumps(baseline(Path(args._baseline), args)))
        return
    from tasks.models import resolve_model

    gflops = matmul_gflops()
    n = n_params(resolve_model(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        ours = sftflow(Path(tmp), args)
        cmd = [
            sys.executable,
            __file__,
            "--_baseline",
            tmp,
            "--method",
            args.method,
            "--steps",
            str(args.steps),
            "--micro-batch",
            str(args.micro_batch),
        ] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        base = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    gflops = max(gflops, matmul_gflops())  # measured before and after the runs: the higher limit
    flops_per_token = (6 if args.method == "full" else 4) * n
    rate = {k: v["real_tokens"] / v["seconds"] for k, v in (("sftflow", ours), ("baseline", base))}
    print(
        f"\n{args.model}, {args.method}, {args.steps} steps x micro batch {args.micro_batch}, "
        f"N={n / 1e6:.1f}M params; fp32 matmul {gflops:.0f} GFLOP/s\n"
    )
    print(
        "| | seconds | real tokens | real-token fraction | real tokens/s | model GFLOP/s |\n|---|---|---|---|---|---|"
    )
    for name, r in (("sftflow (packed)", ours), ("baseline (pad to 1024)", base)):
        tps = r["real_tokens"] / r["seconds"]
        print(
            f"| {name} | {r['seconds']:.1f} | {r['real_tokens']:,} | {r['real_tokens'] / r['total_tokens']:.3f} | "
            f"{tps:,.0f} | {tps * flops_per_token / 1e9:.1f} |"
        )
    print(
        json.dumps(
            {
                "speedup_vs_baseline": round(rate["sftflow"] / rate["baseline"], 2),
                "real_token_fraction": round(ours["real_tokens"] / ours["total_tokens"], 4),
                "flop_fraction": round(rate["sftflow"] * flops_per_token / (gflops * 1e9), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
