"""Training attention on packed rows, per family: what each exact route costs on this machine.

Routes, on the same packed rows (long-tailed example lengths, most past the sliding window):
- sftflow_packed: the train stage's attention (tasks/training/attention.py), per example, with the
  model's window and softcap;
- sdpa: transformers' SDPA with the dense mask transformers builds from position_ids and the window
  (exact, the usual choice);
- eager: transformers' eager attention with the same mask (the only stock route with a softcap);
- flex_attention: transformers' flex path, which builds block masks from position_ids and windows.
  Recorded as unavailable when torch refuses it (on CPU: no backward).

Each route's loss must equal the eager one (they compute the same attention). Prints a table, then
the figures as a JSON last line: median and range of --repeats forward+backward steps per route.

    python bench/attention.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tasks.models.tiny import family_config
from tasks.training.attention import register

SIZE = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
)  # fmt: skip
WINDOW = 128
LENGTHS = [600, 300, 200, 120, 90, 60]  # 1370 tokens in one row: three examples past the window
LAYERS = {
    "gemma3": ["sliding_attention"] * 5 + ["full_attention"],
    "gemma2": ["sliding_attention", "full_attention"] * 3,
}


def step_times(family: str, attn: str, repeats: int) -> tuple[float, list[float]]:
    from transformers import AutoModelForCausalLM

    extra = {"layer_types": LAYERS[family]} if family in LAYERS else {}
    config = family_config(family, 512, sliding_window=WINDOW, **SIZE, **extra)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (1, sum(LENGTHS)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    times = []
    for _ in range(repeats + 1):  # the first step warms up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
        loss.backward()
        times.append(time.perf_counter() - t0)
    return loss.item(), times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", default="gemma3,gemma2,mistral")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results: dict = {}
    for family in args.families.split(","):
        rows = results[family] = {}
        for attn in (register(), "sdpa", "eager", "flex_attention"):
            try:
                loss, times = step_times(family, attn, args.repeats)
            except (
                NotImplementedError,
                ValueError,
                RuntimeError,
            ) as e:  # a route torch or transformers refuses
                rows[attn] = {"unavailable": str(e).splitlines()[0][:160]}
                print(f"{family:8} {attn:15} unavailable: {rows[attn]['unavailable']}", flush=True)
                continue
            med = statistics.median(times)
            rows[attn] = {
                "loss": round(loss, 6),
                "median_s": round(med, 4),
                "range_s": [round(min(times), 4), round(max(times), 4)],
            }
            print(
                f"{family:8} {attn:15} loss {loss:.6f}  step {med:.3f}s [{min(times):.3f}, {max(times):.3f}]",
                flush=True,
            )
        ours, ref = rows[register()], rows["eager"]
        rows["exact"] = abs(ours["loss"] - ref["loss"]) <= 1e-4 * abs(ref["loss"])
        fastest_other = min(
            r["median_s"]
            for k, r in rows.items()
            if isinstance(r, dict) and k != register() and "median_s" in r
        )
        rows["speedup_vs_best_other"] = round(fastest_other / ours["median_s"], 3)
    print(
        json.dumps(
            {"window": WINDOW, "lengths": LENGTHS, "threads": torch.get_num_threads(), "results": results}
        )
    )


if __name__ == "__main__":
    main()
