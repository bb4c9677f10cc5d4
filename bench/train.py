"""Training throughput against what a user would pick instead, side by side in one run.

    python bench/train.py                  # SmolLM2-135M, full fine-tuning, both data sets, 3 repeats
    python bench/train.py --data longtail --repeats 1
    python bench/train.py --quick          # the tiny test model, 2 steps, 1 repeat (a smoke run)
    python bench/train.py --window 256 --data longtail   # SmolLM2 as a Mistral with a 256-token window

Every runner trains the same model on the same records with the same micro batch (4), optimizer
steps (4), fp32 precision, learning rate and linear schedule without warmup, in a fresh process:
- sftflow: the format stage (packing into rows of the max length) and the train stage, through
  the deepspeed launcher as `sftflow run` starts it, with `train.deepspeed: none` (one process);
- trl_packed: TRL's SFTTrainer, packing=True (best-fit decreasing, padding-free rows);
- trl: TRL's SFTTrainer, packing=False (each batch padded to its longest example);
- seed002: the Trainer with DataCollatorForSeq2Seq(padding=True), prompt-masked labels;
- seed001: the Trainer with every example padded to the max length.
Peers load the model as a user does (transformers' default SDPA attention) and run the Trainer
without DeepSpeed. Prompts are masked from the loss in every runner.

Data sets: `demo` is data/demo/train.jsonl (about 120 tokens each, max length 512); `longtail`
is generated here from a seed, total lengths drawn from a lognormal (median 96 tokens) and
clipped to 16..1000, as instruction data is spread (max length 1024).

Figures per runner: real (non-padding) tokens per second from the end of the first optimizer
step (a warm-up, untimed) to the end of the last, counting only the batches the model trained
on (the dataloader collates one batch ahead), and the real-token fraction of all positions
computed. FLOP fraction: 6N FLOPs per real token (N counts the tied embedding once) plus the
causal attention of each example (6 * layers * width * length^2, averaged over the data set),
over the fp32 matmul rate measured in this run (the best of rounds before and after);
flop_fraction_executed counts the LM head only where sftflow runs it (positions with a label).
The last line is JSON, per data set: the speedup over the best of trl, trl_packed and seed002,
the real-token fractions and sftflow's FLOP fractions, each the median [range] of the repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNNERS = ("sftflow", "trl_packed", "trl", "seed002", "seed001")
PEERS = ("trl_packed", "trl", "seed002")
MAX_LEN = {"demo": 512, "longtail": 1024}


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


def longtail_records(tok, n: int = 2000, seed: int = 0) -> list[dict]:
    """Alpaca records whose tokenized lengths (chat template included) follow a lognormal with a
    median of 96 tokens, clipped to 16..1000: most short, a few near the max length."""
    rng = random.Random(seed)
    words = sorted(
        {w.strip('.,:;"{}') for line in (ROOT / "data/demo/train.jsonl").open() for w in line.split()} - {""}
    )
    cost = {w: len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
    records = []
    for i in range(n):
        target = min(max(rng.lognormvariate(math.log(96), 0.9), 16), 1000)
        r = {"instruction": f"Continue note {i}.", "input": " ".join(rng.choices(words, k=4)), "output": ""}
        need, answer = target - len(token_ids(tok, chats_of([r])[0])), []
        while need > 0:
            answer.append(rng.choice(words))
            need -= cost[answer[-1]]
        records.append({**r, "output": " ".join(answer) or "ok"})
    return records


def chats_of(records: list[dict]) -> list[list[dict]]:
    out = []
    for r in records:
        user = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}])
    return out


def chats(path: Path) -> list[list[dict]]:
    return chats_of([json.loads(line) for line in path.read_text().splitlines()])


def token_ids(tok, chat: list[dict], generation_prompt: bool = False) -> list[int]:
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def flops_per_token(tok, records: list[list[dict]], config, n: int) -> tuple[float, float]:
    """FLOPs per real token, forward and backward: the model's (6N, plus the causal attention of
    each example: 6 * layers * width * length^2, over the data set), and what sftflow executes
    (the LM head, 6 * vocab * width of the 6N, only on the share of tokens that have a label)."""
    lengths = [len(token_ids(tok, c)) for c in records]
    labelled = sum(k - len(token_ids(tok, c[:1], generation_prompt=True)) for k, c in zip(lengths, records))
    w = getattr(config, "sliding_window", None) or 0
    squares = sum(x * x if not w or x <= w else w * w + 2 * (x - w) * w for x in lengths)  # twice the pairs
    attention = 6 * config.num_hidden_layers * config.hidden_size * squares / sum(lengths)
    head = 6 * config.vocab_size * config.hidden_size
    model = 6 * n + attention
    return model, model - head * (1 - labelled / sum(lengths))


class Counted:
    """Wraps a collator and counts the batches the model's forward took (real tokens, positions),
    and at each step's end the seconds since training began and the real tokens so far (what
    sftflow's train stage records as step_ends)."""

    def __init__(self, collate):
        self.collate, self.waiting, self.real, self.total = collate, [], 0, 0
        self.t0, self.step_ends = time.monotonic(), []

    def __call__(self, rows):
        batch = self.collate(rows)
        mask = batch.get("attention_mask")
        ids = batch["input_ids"]
        self.waiting.append((int(mask.sum()) if mask is not None else ids.numel(), ids.numel()))
        return batch

    def on_forward(self, module, args, kwargs):
        if module.training and self.waiting:
            real, total = self.waiting.pop(0)
            self.real, self.total = self.real + real, self.total + total

    def callback(self):
        from transformers import TrainerCallback

        counted = self

        class StepEnds(TrainerCallback):
            def on_train_begin(self, *args, **kw):
                counted.t0 = time.monotonic()

            def on_step_end(self, *args, **kw):
                counted.step_ends.append([time.monotonic() - counted.t0, counted.real])

        return StepEnds()


def steady(step_ends: list) -> tuple[float, int]:
    """Seconds and real tokens after the first optimizer step (a warm-up: allocations, lazy init)."""
    (t1, n1), (t, n) = step_ends[0], step_ends[-1]
    return t - t1, n - n1


def run_sftflow(data: Path, work: Path, a) -> dict:
    from tasks.config import load_config
    from tasks.format import run_format
    from tasks.train import run_train

    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [
            f"output_dir={work / 'runs'}",
            f"model.name_or_path={a.model}",
            f"data.path={data}",
            f"data.max_seq_len={a.max_len}",
            "data.eval_fraction=0.02",
            "data.cache=false",
            "train.method=full",
            "train.deepspeed=none",  # one process: ZeRO partitions nothing, and its engine costs ~15%
            f"train.learning_rate={a.lr}",
            f"train.max_steps={a.steps}",
            f"train.micro_batch_size={a.micro_batch}",
            "train.gradient_accumulation_steps=1",
            "train.save_steps=100000",
        ],
    )
    run_train(cfg, "bench", run_format(cfg, "bench", log=lambda *_: None), log=lambda *_: None)
    r = json.loads((work / "runs/bench/train/result.json").read_text())
    seconds, real = steady(r["step_ends"])
    return {"seconds": seconds, "real": real, "fraction": r["real_tokens"] / r["total_tokens"]}


def peer_args(work: Path, a, **extra):
    return dict(
        output_dir=str(work / "peer"),
        per_device_train_batch_size=a.micro_batch,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        seed=42,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1000,
        **extra,
    )


def seed_rows(tok, records, max_len: int, pad_to_max: bool) -> list[dict]:
    """The seeds' tokenization: prompt through the chat template, labels -100 on the prompt."""
    rows = []
    for chat in records:
        prompt = token_ids(tok, chat[:1], generation_prompt=True)
        ids = token_ids(tok, chat)[:max_len]
        labels = [-100] * len(prompt) + ids[len(prompt) :]
        pad = max_len - len(ids) if pad_to_max else 0
        rows.append(
            {
                "input_ids": ids + [tok.pad_token_id] * pad,
                "attention_mask": [1] * len(ids) + [0] * pad,
                "labels": labels[: len(ids)] + [-100] * pad,
            }
        )
    return rows


def run_peer(name: str, data: Path, work: Path, a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed

    from tasks.models.loading import load_tokenizer, resolve_model

    set_seed(42)
    path = resolve_model(a.model)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    records = chats(data)
    if name.startswith("trl"):
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_list([{"prompt": c[:1], "completion": c[1:]} for c in records])
        args = SFTConfig(
            **peer_args(work, a), max_length=a.max_len, packing=name == "trl_packed", dataset_num_proc=1
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    else:
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, default_data_collator

        rows = seed_rows(tok, records, a.max_len, pad_to_max=name == "seed001")
        collate = (
            default_data_collator
            if name == "seed001"
            else DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        )
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**peer_args(work, a)),
            train_dataset=Dataset.from_list(rows),
            data_collator=collate,
        )
    counted = Counted(trainer.data_collator)
    trainer.data_collator = counted
    model.register_forward_pre_hook(counted.on_forward, with_kwargs=True)
    trainer.add_callback(counted.callback())
    trainer.train()
    seconds, real = steady(counted.step_ends)
    return {"seconds": seconds, "real": real, "fraction": counted.real / counted.total}


def windowed(path: Path, window: int, out: Path) -> Path:
    """The model at ``path`` (a Llama) as a Mistral with a sliding window: the same weights and
    tokenizer, each layer attending to the last ``window`` tokens only (what Mistral 7B v0.1,
    Phi-3 and Gemma's local layers do)."""
    import shutil

    shutil.copytree(path, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama", f"--window needs a Llama, not {config['model_type']}"
    config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=window)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def run_one(name: str, data: Path, a) -> dict:
    """One runner in a fresh process: no runner inherits another's memory or threads."""
    cmd = [sys.executable, __file__, "--_run", name, "--_file", str(data), "--steps", str(a.steps)]
    cmd += ["--max-len", str(a.max_len), "--model", a.model] + (["--quick"] if a.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])


def median_range(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.1f} [{min(xs):,.1f}, {max(xs):,.1f}]"


def bench(name: str, a, tmp: Path, n: int, tok, config) -> dict:
    data = tmp / f"{name}.jsonl"
    if name == "longtail":
        data.write_text("".join(json.dumps(r) + "\n" for r in longtail_records(tok)))
    else:
        data.write_text((ROOT / "data/demo/train.jsonl").read_text())
    a.max_len = MAX_LEN[name]
    model_flops, executed_flops = flops_per_token(tok, chats(data), config, n)
    runs = {r: [] for r in RUNNERS}
    for i in range(a.repeats):
        for r in RUNNERS:
            runs[r].append(run_one(r, data, a))
            print(f"[{name} {i + 1}/{a.repeats}] {r}: {runs[r][-1]}", file=sys.stderr, flush=True)
    rate = {r: [x["real"] / x["seconds"] for x in xs] for r, xs in runs.items()}
    fill = {r: statistics.median(x["fraction"] for x in xs) for r, xs in runs.items()}
    best = max(PEERS, key=lambda r: statistics.median(rate[r]))
    print(
        f"\n{name}: max length {a.max_len}; per real token {model_flops / 1e6:.0f} MFLOP "
        f"(attention {model_flops / (6 * n) - 1:.1%} of 6N), sftflow executes {executed_flops / 1e6:.0f}\n"
    )
    print("| runner | real tokens/s, median [range] | real-token fraction | sftflow is |\n|---|---|---|---|")
    for r in RUNNERS:
        ratio = statistics.median(rate["sftflow"]) / statistics.median(rate[r])
        print(f"| {r} | {median_range(rate[r])} | {fill[r]:.3f} | {ratio:.2f}x |")
    speedups = [s / p for s, p in zip(rate["sftflow"], rate[best])]
    return {
        "speedup_vs_best_peer": round(statistics.median(speedups), 2),
        "speedup_range": [round(min(speedups), 2), round(max(speedups), 2)],
        "best_peer": best,
        "real_token_fraction": {r: round(f, 4) for r, f in fill.items()},
        "flops": {
            k: [t * f for t in rate["sftflow"]]
            for k, f in (("model", model_flops), ("executed", executed_flops))
        },
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny model, 2 steps, 1 repeat")
    p.add_argument("--data", choices=["demo", "longtail", "both"], default="both")
    p.add_argument("--steps", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--window", type=int, help="the model as a Mistral with this sliding window")
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--max-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_run", choices=RUNNERS, help=argparse.SUPPRESS)
    p.add_argument("--_file", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.model = a.model or ("tiny-llama" if a.quick else "smollm2-135m")
    a.micro_batch, a.lr = 4, 1e-5
    a.steps = a.steps or (2 if a.quick else 4)
    a.repeats = a.repeats or (1 if a.quick else 3)
    if a._run:
        with tempfile.TemporaryDirectory() as tmp:
            run = run_sftflow if a._run == "sftflow" else lambda *x: run_peer(a._run, *x)
            print("RESULT " + json.dumps(run(Path(a._file), Path(tmp), a)))
        os._exit(0)  # skip torch's and gloo's teardown
    from transformers import AutoConfig

    from tasks.core.paths import sftflow_home
    from tasks.models.loading import load_model, load_tokenizer, resolve_model

    path = resolve_model(a.model)
    if a.window:
        path = windowed(path, a.window, sftflow_home() / "models" / f"{path.name}-window{a.window}")
        a.model = str(path)
    n = sum(x.numel() for x in load_model(path).parameters())
    tok, config = load_tokenizer(path), AutoConfig.from_pretrained(path)
    limit = matmul_gflops()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("demo", "longtail") if a.data == "both" else (a.data,):
            out[name] = bench(name, a, Path(tmp), n, tok, config)
    limit = max(limit, matmul_gflops())
    for r in out.values():
        for kind, flops in r.pop("flops").items():
            fractions = [f / (limit * 1e9) for f in flops]
            suffix = "" if kind == "model" else "_executed"
            r["flop_fraction" + suffix] = round(statistics.median(fractions), 3)
            r["flop_fraction" + suffix + "_range"] = [round(min(fractions), 3), round(max(fractions), 3)]
    window = f" (sliding window {a.window})" if a.window else ""
    print(
        f"\n{a.model}{window}, full fine-tuning, micro batch {a.micro_batch}, {a.steps} steps, {a.repeats} repeats"
    )
    print(f"N={n / 1e6:.1f}M; fp32 matmul {limit:.0f} GFLOP/s (best of rounds before and after)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
