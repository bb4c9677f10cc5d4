"""Where one training step's time goes: data, forward, backward, optimizer, and the top ops.

    python bench/step_profile.py            # SmolLM2-135M, full fine-tuning, 4 packed rows of 512
    python bench/step_profile.py --quick    # the tiny test model
    python bench/step_profile.py --compile  # and the sftflow set-up under torch.compile (inductor)

The rows are the format stage's packed rows of data/demo/train.jsonl. Two set-ups of the same
model, step for step:
- default: what transformers does with packed rows (position_ids restarting, no mask): SDPA
  over each whole row under a block-diagonal mask, the LM head on every position;
- sftflow: the train stage's set-up: attention per example (tasks/training/attention.py) and the
  LM head only where a label is (TrainingCollator's logits_to_keep).
Each phase is the median of --steps steps after one warm-up step; the loss and the gradients of
both set-ups are compared, and torch.profiler lists the ops of one sftflow step. With --compile,
a third set-up is the sftflow one with the model under torch.compile; its warm-up step (where
inductor compiles) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def packed_rows(model: str, rows: int, tmp: Path) -> list[dict]:
    from datasets import load_from_disk

    from tasks.config import load_config
    from tasks.format import run_format

    cfg = load_config(
        ROOT / "configs/demo.yaml", [f"output_dir={tmp}", f"model.name_or_path={model}", "data.cache=false"]
    )
    data = run_format(cfg, "profile", log=lambda *_: None)
    ds = load_from_disk(data.train_path)
    return [ds[i] for i in range(rows)]


def step(model, opt, collate, rows) -> dict:
    t = [time.perf_counter()]
    batch = collate(rows)
    t.append(time.perf_counter())
    loss = model(**batch).loss
    t.append(time.perf_counter())
    loss.backward()
    t.append(time.perf_counter())
    opt.step()
    opt.zero_grad()
    t.append(time.perf_counter())
    return dict(zip(("data", "forward", "backward", "optimizer"), (b - a for a, b in zip(t, t[1:]))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also the sftflow set-up under torch.compile")
    a = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.data.batching import Collator, TrainingCollator
    from tasks.models.loading import load_tokenizer, resolve_model
    from tasks.training.attention import register

    name = "tiny-llama" if a.quick else "smollm2-135m"
    path = resolve_model(name)
    pad = load_tokenizer(path).pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        rows = packed_rows(name, a.rows, Path(tmp))
    setups = {"default": ("sdpa", Collator(pad)), "sftflow": (register(), TrainingCollator(pad))}
    if a.compile:
        setups["compiled"] = setups["sftflow"]
    results, grads, warmup = {}, {}, {}
    for label, (attn, collate) in setups.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
        model.config.use_cache = False
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
        weights = model.model.layers[0].self_attn.q_proj.weight
        if label == "compiled":
            model = torch.compile(model)
        t0 = time.perf_counter()
        loss = model(**collate(rows)).loss
        loss.backward()
        warmup[label] = time.perf_counter() - t0
        grads[label] = (loss.item(), weights.grad.clone())
        opt.zero_grad()
        runs = [step(model, opt, collate, rows) for _ in range(a.steps)]
        results[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        if label == "sftflow":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(model, opt, collate, rows)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    tokens = sum(len(r["input_ids"]) for r in rows)
    print(f"\n{name}, {a.rows} packed rows, {tokens} real tokens; median of {a.steps} steps, seconds\n")
    print("| phase | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for k in results["default"]:
        print(f"| {k} | " + " | ".join(f"{r[k]:.3f}" for r in results.values()) + " |")
    total = {k: sum(v.values()) for k, v in results.items()}
    print("| step | " + " | ".join(f"{t:.3f}" for t in total.values()) + " |")
    print("| warm-up step | " + " | ".join(f"{w:.3f}" for w in warmup.values()) + " |\n")
    diff = (grads["default"][1] - grads["sftflow"][1]).abs().max().item()
    print(f"loss {grads['default'][0]:.6f} vs {grads['sftflow'][0]:.6f}; max gradient difference {diff:.2e}")
    figures = {"step_speedup": round(total["default"] / total["sftflow"], 2), "max_grad_diff": f"{diff:.2e}"}
    if a.compile:
        figures |= {
            "compiled_speedup": round(total["sftflow"] / total["compiled"], 3),
            "compile_warmup_s": round(warmup["compiled"], 1),
            "compiled_max_grad_diff": f"{(grads['compiled'][1] - grads['sftflow'][1]).abs().max().item():.2e}",
        }
    print(table)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
