"""Throughput of the format stage, side by side with the alternatives, on the same records.

    python bench/format.py                     # 200k Alpaca records, SmolLM2's tokenizer
    python bench/format.py --records 1000000   # the 1M-record scale run (peak RSS reported)
    python bench/format.py --quick             # 20k records

Measured in one run, on one generated JSONL file and one tokenizer:
- sftflow: the whole format stage (read, validate, dedup, template, tokenize, mask, pack,
  save), in a fresh process whose peak RSS (and its workers') is reported;
- raw: ``tokenizer(list_of_texts)`` on the fully rendered conversations, batched: the
  practical limit, since it does nothing but tokenize;
- naive: the tutorial loop, ``apply_chat_template`` + ``tokenizer()`` per example, on a
  sample, its rate extrapolated;
- trl: ``SFTTrainer``'s dataset preparation (prompt-completion, packing) when TRL is
  installed (``pip install -e .[bench]``).
The last line is JSON: ``{"vs_raw_tokenizer": x, "vs_naive": y, "vs_trl": z|null}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORDS = (
    "the model data train token answer question country capital river city number value list json "
    "format small large first last north south east west code read write energy plant water"
).split()


def make_data(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            words = lambda k: " ".join(rng.choices(WORDS, k=k))
            f.write(
                json.dumps(
                    {
                        "instruction": f"{i}: " + words(rng.randint(5, 40)),
                        "input": words(rng.randint(0, 30)),
                        "output": words(rng.randint(5, 80)),
                    }
                )
                + "\n"
            )


def conversations(path: Path, limit: int | None = None) -> list[list[dict]]:
    out = []
    with path.open() as f:
        for line in f:
            r = json.loads(line)
            user = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
            out.append([{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}])
            if limit and len(out) >= limit:
                break
    return out


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def stage(data: Path, work: Path, max_len: int) -> dict:
    """The format stage in this (fresh) process."""
    import transformers.models.auto.tokenization_auto  # noqa: F401  imports are not part of either measurement

    from tasks.config import PipelineConfig
    from tasks.format import run_format

    cfg = PipelineConfig.model_validate(
        {
            "run_name": "bench",
            "output_dir": str(work),
            "model": {"name_or_path": "smollm2-135m"},
            "data": {"path": str(data), "max_seq_len": max_len, "cache": False, "eval_fraction": 0.01},
        }
    )
    import threading

    peak_anon = [0.0]
    done = threading.Event()

    def sample():  # anonymous memory only: memory-mapped Arrow pages are file cache, not heap
        while not done.wait(0.2):
            peak_anon[0] = max(peak_anon[0], proc_status_mb("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    res = run_format(cfg, "bench", log=lambda m: print(m, flush=True))
    seconds = time.perf_counter() - t0
    done.set()
    stats = json.loads((work / "bench/format/stats.json").read_text())
    kb = 1024  # ru_maxrss is in KiB on Linux
    return {
        "seconds": seconds,
        "records": res.counts["records_in"],
        "train_tokens": stats["train_tokens"],
        "real_token_fraction": stats["real_token_fraction"],
        "num_proc": stats["num_proc"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb,
        "peak_anon_mb": peak_anon[0],
        "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kb,
    }


def raw(tok, convs) -> tuple[float, int]:
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    t0 = time.perf_counter()
    tokens = sum(
        len(x)
        for i in range(0, len(texts), 1000)
        for x in tok(texts[i : i + 1000], add_special_tokens=False)["input_ids"]
    )
    return time.perf_counter() - t0, tokens


def naive(tok, convs) -> float:
    t0 = time.perf_counter()
    for c in convs:
        prompt = tok.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(tok.apply_chat_template(c, tokenize=False))["input_ids"]
        n_prompt = len(tok(prompt)["input_ids"])
        _labels = [-100] * n_prompt + ids[n_prompt:]
    return time.perf_counter() - t0


def trl(model_dir: Path, convs, max_len: int, work: Path) -> float | None:
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return None
    from datasets import Dataset

    from tasks.models import load_model, load_tokenizer

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    ds = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
    args = SFTConfig(
        output_dir=str(work / "trl"),
        packing=True,
        max_length=max_len,
        use_cpu=True,
        report_to=[],
        dataset_num_proc=os.cpu_count(),
    )
    t0 = time.perf_counter()
    SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--quick", action="store_true", help="20k records")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--naive-sample", type=int, default=5_000)
    p.add_argument("--stage-only", metavar="DATA", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stage_only:
        print(
            "RESULT "
            + json.dumps(stage(Path(a.stage_only), Path(a.stage_only).parent / "runs", a.max_seq_len))
        )
        return
    n = 20_000 if a.quick else a.records
    from tasks.models import load_tokenizer, resolve_model

    model_dir = resolve_model("smollm2-135m")
    tok = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        make_data(data, n)
        print(f"{n:,} records, {data.stat().st_size / 1e6:.0f} MB of JSONL", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--stage-only", str(data), "--max-seq-len", str(a.max_seq_len)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        ours = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
        convs = conversations(data)
        raw_s, raw_tokens = raw(tok, convs)
        sample = convs[: a.naive_sample]
        naive_s = naive(tok, sample) * len(convs) / len(sample)
        trl_s = trl(model_dir, convs, a.max_seq_len, Path(tmp))
    rate = lambda s: n / s
    print("\n| approach | records/s | tokens/s | seconds |\n|---|---|---|---|")
    print(
        f"| sftflow format stage ({ours['num_proc']} procs) | {rate(ours['seconds']):,.0f} | "
        f"{ours['train_tokens'] / ours['seconds']:,.0f} | {ours['seconds']:.1f} |"
    )
    print(f"| raw tokenizer(list) | {rate(raw_s):,.0f} | {raw_tokens / raw_s:,.0f} | {raw_s:.1f} |")
    print(f"| naive loop (extrapolated from {len(sample):,}) | {rate(naive_s):,.0f} | - | {naive_s:.1f} |")
    print(
        "| TRL SFTTrainer prep | "
        + (f"{rate(trl_s):,.0f} | - | {trl_s:.1f} |" if trl_s else "not installed | | |")
    )
    print(
        f"\npeak RSS: stage process {ours['peak_rss_mb']:.0f} MB (of it anonymous, not mapped Arrow files: "
        f"{ours['peak_anon_mb']:.0f} MB), largest worker {ours['peak_worker_rss_mb']:.0f} MB; "
        f"real-token fraction {ours['real_token_fraction']}"
    )
    print(
        json.dumps(
            {
                "vs_raw_tokenizer": round(raw_s / ours["seconds"], 3),
                "vs_naive": round(naive_s / ours["seconds"], 2),
                "vs_trl": round(trl_s / ours["seconds"], 2) if trl_s else None,
            }
        )
    )


if __name__ == "__main__":
    main()
