"""Throughput of the format stage, side by side with the alternatives, on the same records.

    python bench/format.py                     # 200k Alpaca records, SmolLM2's tokenizer
    python bench/format.py --records 1000000   # the 1M-record scale run (peak RSS reported)
    python bench/format.py --quick             # 20k records
    python bench/format.py --repeats 1         # one round (default 3: median and range)

Measured in one run, on one generated JSONL file and one tokenizer:
- sftflow: the whole format stage (read, validate, dedup, template, tokenize, mask, pack,
  save), in a fresh process whose peak RSS (and its workers') is reported;
- raw: ``tokenizer(list_of_texts)`` on the fully rendered conversations, batched: the
  practical limit, since it does nothing but tokenize;
- naive: the tutorial loop, ``apply_chat_template`` + ``tokenizer()`` per example, on a
  sample, its rate extrapolated;
- trl: ``SFTTrainer``'s dataset preparation (prompt-completion, packing) when TRL is
  installed (``pip install -e .[bench]``).
The last line is JSON: the median and range over the rounds of ``vs_raw_tokenizer``,
``vs_naive`` and ``vs_trl`` (null without TRL), each a time ratio with the stage's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
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

    from tasks.models.loading import load_model, load_tokenizer

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


def one_round(data: Path, tok, model_dir: Path, a, work: Path) -> dict:
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
    return {
        "ours": ours,
        "raw": raw_s,
        "raw_tokens": raw_tokens,
        "naive": naive_s,
        "trl": trl(model_dir, convs, a.max_seq_len, work),
    }


def spread(xs: list[float], digits: int = 2) -> str:
    return f"{statistics.median(xs):,.{digits}f} [{min(xs):,.{digits}f}, {max(xs):,.{digits}f}]"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--quick", action="store_true", help="20k records")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--naive-sample", type=int, default=5_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stage-only", metavar="DATA", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stage_only:
        print(
            "RESULT "
            + json.dumps(stage(Path(a.stage_only), Path(a.stage_only).parent / "runs", a.max_seq_len))
        )
        return
    n = 20_000 if a.quick else a.records
    from tasks.models.loading import load_tokenizer, resolve_model

    model_dir = resolve_model("smollm2-135m")
    tok = load_tokenizer(model_dir)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        make_data(data, n)
        print(f"{n:,} records, {data.stat().st_size / 1e6:.0f} MB of JSONL", flush=True)
        for i in range(a.repeats):
            work = Path(tmp) / f"round{i}"
            work.mkdir()
            rounds.append(one_round(data, tok, model_dir, a, work))
            shutil.rmtree(Path(tmp) / "runs", ignore_errors=True)
    ours = [r["ours"] for r in rounds]
    has_trl = all(r["trl"] for r in rounds)
    print(f"\n{a.repeats} rounds, median [range]\n\n| approach | records/s | seconds |\n|---|---|---|")
    rows = [(f"sftflow format stage ({ours[0]['num_proc']} procs)", [o["seconds"] for o in ours])]
    rows += [("raw tokenizer(list)", [r["raw"] for r in rounds])]
    rows += [(f"naive loop (extrapolated from {a.naive_sample:,})", [r["naive"] for r in rounds])]
    rows += [("TRL SFTTrainer prep", [r["trl"] for r in rounds])] if has_trl else []
    for name, secs in rows:
        print(f"| {name} | {spread([n / s for s in secs], 0)} | {spread(secs, 1)} |")
    last = ours[-1]
    print(
        f"\npeak RSS: stage process {last['peak_rss_mb']:.0f} MB (of it anonymous, not mapped Arrow files: "
        f"{last['peak_anon_mb']:.0f} MB), largest worker {last['peak_worker_rss_mb']:.0f} MB; "
        f"real-token fraction {last['real_token_fraction']}"
    )
    ratios = {
        "vs_raw_tokenizer": [r["raw"] / r["ours"]["seconds"] for r in rounds],
        "vs_naive": [r["naive"] / r["ours"]["seconds"] for r in rounds],
        "vs_trl": [r["trl"] / r["ours"]["seconds"] for r in rounds] if has_trl else None,
    }
    print(
        json.dumps(
            {
                k: {"median": round(statistics.median(v), 3), "range": [round(min(v), 3), round(max(v), 3)]}
                if v
                else None
                for k, v in ratios.items()
            }
        )
    )


if __name__ == "__main__":
    main()
