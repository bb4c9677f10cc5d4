"""Peak memory of the merge stage, side by side with the usual in-memory merge.

    python bench/merge.py            # SmolLM2-135M-Instruct (fp32, ~540 MB)
    python bench/merge.py --quick    # the tiny test model

Each approach runs in a fresh process on the same base and the same random LoRA adapter
(r=16 on every linear layer), and reports its peak RSS above the RSS it had before loading
any weights (Python, torch and transformers alone take a few hundred MB), divided by the
size of the model's weights. sftflow: reference logits from base+adapter, shard-wise merge,
reload from disk, compare. Naive, as a careful user writes it: PeftModel -> merge_and_unload ->
save_pretrained, free the in-memory model, reload for the same check. Each approach runs
``--repeats`` times (default 3); the figures are the median and the range. The last line is JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc: VmRSS (now) or VmHWM (peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_run(work: Path, model: str) -> None:
    """A run directory whose format and train stages are done: eval prompts and a random adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tasks.config import load_config
    from tasks.core.manifest import Manifest
    from tasks.core.results import FormatResult, TrainResult
    from tasks.data.templating import CHATML_TEMPLATE
    from tasks.models.loading import load_model, resolve_model

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={work}", f"model.name_or_path={model}"])
    fmt_dir, train_dir = work / "b/format", work / "b/train"
    fmt_dir.mkdir(parents=True)
    records = [json.loads(x) for x in (ROOT / "data/demo/train.jsonl").read_text().splitlines()[:4]]
    with open(fmt_dir / "eval_records.jsonl", "w") as f:
        for r in records:
            f.write(
                json.dumps(
                    {
                        "messages": [{"role": "user", "content": r["instruction"] + "\n\n" + r["input"]}],
                        "reference": r["output"],
                    }
                )
                + "\n"
            )
    (fmt_dir / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    Manifest("format", "b", "x").finish(
        fmt_dir,
        FormatResult(
            "b", "", "", str(fmt_dir / "eval_records.jsonl"), str(fmt_dir / "chat_template.jinja"), "", "", {}
        ),
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_model(resolve_model(model)),
        LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        ),
    )
    peft_model.save_pretrained(train_dir / "adapter")
    Manifest("train", "b", "x").finish(
        train_dir, TrainResult("b", str(train_dir / "adapter"), "lora", 0.0, 0)
    )
    return cfg


def child(approach: str, work: Path, model: str) -> None:
    import torch  # noqa: F401  (imports count toward the baseline, not the merge)
    import transformers  # noqa: F401
    from peft import PeftModel

    from tasks.config import load_config
    from tasks.merge import compare_logits, iter_logits, run_merge, verification_inputs
    from tasks.models.loading import load_model, load_tokenizer, resolve_model

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={work}", f"model.name_or_path={model}"])
    base = resolve_model(model)
    baseline = status_mb("VmRSS")
    if approach == "sftflow":
        from tasks.core.results import FormatResult, TrainResult

        data, trained = (
            FormatResult.from_manifest(cfg.output_dir, "b"),
            TrainResult.from_manifest(cfg.output_dir, "b"),
        )
        res = run_merge(cfg, "b", data, trained, log=lambda *_: None)
        diff = res.max_logit_diff
    else:
        tok = load_tokenizer(base)
        inputs = verification_inputs(tok, work / "b/format/eval_records.jsonl", 4)
        peft_model = PeftModel.from_pretrained(load_model(base), work / "b/train/adapter")
        reference = list(iter_logits(peft_model, inputs))
        merged = peft_model.merge_and_unload()
        out = work / "naive"
        merged.save_pretrained(out)
        del peft_model, merged  # one copy at a time: the reload below is the only model alive
        gc.collect()
        diff = compare_logits(reference, iter_logits(load_model(out), inputs))[0]
    print(json.dumps({"baseline_mb": baseline, "peak_mb": status_mb("VmHWM"), "max_logit_diff": diff}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("APPROACH", "WORK", "MODEL"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.child[2])
        return
    model = "tiny-llama" if args.quick else "smollm2-135m"
    from tasks.models.loading import resolve_model

    weights = sum(p.stat().st_size for p in resolve_model(model).glob("*.safetensors")) / 2**20
    ratios: dict[str, list[float]] = {"sftflow": [], "naive": []}
    peaks: dict[str, list[float]] = {"sftflow": [], "naive": []}
    with tempfile.TemporaryDirectory() as tmp:
        make_run(Path(tmp), model)
        for _ in range(args.repeats):
            for approach in ("sftflow", "naive"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", approach, tmp, model],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    check=True,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                ratio = (r["peak_mb"] - r["baseline_mb"]) / weights
                ratios[approach].append(ratio)
                peaks[approach].append(r["peak_mb"])
                print(
                    f"{approach:8s} peak RSS {r['peak_mb']:8.0f} MB, {r['baseline_mb']:6.0f} MB before loading "
                    f"weights, model {weights:6.0f} MB -> (peak - baseline) / model = {ratio:.2f} "
                    f"(max |logit diff| {r['max_logit_diff']:.1e})"
                )
    summary = {"model": model, "model_mb": round(weights, 1), "repeats": args.repeats}
    for approach in ("sftflow", "naive"):
        summary[f"{approach}_peak_over_model"] = round(statistics.median(ratios[approach]), 3)
        summary[f"{approach}_range"] = [round(min(ratios[approach]), 3), round(max(ratios[approach]), 3)]
        summary[f"{approach}_peak_mb"] = round(statistics.median(peaks[approach]))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
