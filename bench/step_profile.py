"""Where one training step's time goes: data, forward, backward, optimizer, and the top ops.

    python bench/step_profile.py            # SmolLM2-135M, full fine-tuning, 4 packed rows of 512
    python bench/step_profile.py --quick    # the tiny test model

The rows are the format stage's packed rows of data/demo/train.jsonl. Two set-ups of the same
model, step for step:
- default: what transformers does with packed rows (position_ids restarting, no mask): SDPA
  over each whole row under a block-diagonal mask, the LM head on every position;
- sftflow: the train stage's set-up: attention per example (tasks/training/attention.py) and the
  LM head only where a label is (TrainingCollator's logits_to_keep).
Each phase is the median of --steps steps after one warm-up step; the loss and the gradients of
both set-ups are compared, and torch.profiler lists the ops of one sftflow step.
"""

from __future__ import annotations

import argparse
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
    results, grads = {}, {}
    for label, (attn, collate) in setups.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
        model.config.use_cache = False
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
        loss = model(**collate(rows)).loss
        loss.backward()
        grads[label] = (loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
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
    print("| phase | default | sftflow |\n|---|---|---|")
    for k in results["default"]:
        print(f"| {k} | {results['default'][k]:.3f} | {results['sftflow'][k]:.3f} |")
    total = {k: sum(v.values()) for k, v in results.items()}
    print(f"| step | {total['default']:.3f} | {total['sftflow']:.3f} |\n")
    diff = (grads["default"][1] - grads["sftflow"][1]).abs().max().item()
    print(f"loss {grads['default'][0]:.6f} vs {grads['sftflow'][0]:.6f}; max gradient difference {diff:.2e}")
    print(table)
    print(f'{{"step_speedup": {total["default"] / total["sftflow"]:.2f}, "max_grad_diff": {diff:.2e}}}')


if __name__ == "__main__":
    main()
