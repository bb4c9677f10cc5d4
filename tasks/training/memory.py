"""Per-device memory estimate for a training run, checked before anything is launched.

Counts come from the model's config on PyTorch's meta device (exact parameter counts, no
weights loaded). Model states follow the ZeRO paper's accounting (weights, gradients, Adam
moments and fp32 master weights, each divided by the world size from the stage that
partitions it, or moved off the device by offload); activations follow Korthikanti et al.'s
per-layer s*b*h*(34 + 5*a*s/h) bytes for 16-bit activations, plus the logits. The attention
scores (the 5*a*s/h term) are counted: packed rows carry a block-diagonal mask, and sdpa with
a mask materializes them (flash-attention's varlen kernels would not). It is an estimate of
the tensors, not of the process: docs/memory.md compares it with measured peaks (within 3% for
full fine-tuning, 78% for LoRA, whose dropout copies it leaves out), and it refuses only runs
that are over budget by that estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.config import TrainConfig
from tasks.core.errors import OutOfMemory
from tasks.models.loading import pick_dtype
from tasks.training.deepspeed import deepspeed_config

GB = 2**30
# Korthikanti et al.'s 34 bytes per token, hidden unit and layer are 17 values of 2 bytes
# (16-bit activations), and the attention scores 2.5*a*s/h values more; in fp32 each value
# takes 4 bytes, not 2 (the old code doubled the width twice).
ACTIVATION_VALUES = 17
SCORE_VALUES = 2.5
ADVICE = (
    "lower train.micro_batch_size (raise gradient_accumulation_steps to keep the batch), a higher ZeRO "
    "stage (zero3), CPU offload (zero2_offload, zero3_offload), or train.method: qlora"
)


@dataclass
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    budget: float
    device: str
    trainable: int = 0  # parameters the run trains (all, or the LoRA factors)
    width: int = 4  # bytes per trained value

    def disk_bytes(self, t: TrainConfig) -> int:
        """What the train stage writes: ``save_total_limit`` checkpoints of the trained weights with
        their Adam moments (and fp32 master weights in 16-bit), then the final weights."""
        saved = self.trainable * self.width
        optimizer = self.trainable * (8 + (4 if self.width == 2 else 0))
        return int(t.save_total_limit * (saved + optimizer) + saved)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def table(self) -> str:
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations),
            ("total per device", self.total),
        ]
        return "\n".join(f"  {name:18s}{value / GB:8.2f} GiB" for name, value in rows) + (
            f"\n  {'budget':18s}{self.budget / GB:8.2f} GiB ({self.device})"
        )


def world_size(t: TrainConfig) -> int:
    nodes = 1
    if t.hostfile:
        lines = Path(t.hostfile).read_text().splitlines()
        nodes = max(1, sum(1 for line in lines if line.strip() and not line.lstrip().startswith("#")))
    return nodes * t.num_processes


def device_budget(t: TrainConfig) -> tuple[float, str]:
    import psutil
    import torch

    if t.memory_budget_gb:
        return t.memory_budget_gb * GB, "train.memory_budget_gb"
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory), torch.cuda.get_device_name(0)
    return psutil.virtual_memory().available / t.num_processes, "CPU RAM per process"


def estimate(t: TrainConfig, max_seq_len: int, model_path: Path) -> Estimate:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mcfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg)
    out_emb = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not out_emb]
    n_all = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for m in linears)
    lora_params = sum(t.lora.r * (m.in_features + m.out_features) for m in linears)
    width = torch.finfo(pick_dtype(t.precision, model_path, "train.precision")).bits // 8
    zero = deepspeed_config(t.deepspeed).get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    offload_param = zero.get("offload_param", {}).get("device", "none") == "cpu"
    world = world_size(t)

    if t.method == "qlora":
        weights = n_linear * t.quantization_bits / 8 + (n_all - n_linear) * width
    else:
        weights = n_all * width
    trainable = n_all if t.method == "full" else lora_params
    if stage == 3:
        weights = 0.0 if offload_param else weights / world
    gradients = trainable * width / (world if stage >= 2 else 1)
    # Adam: two fp32 moments, plus fp32 master weights when training in 16-bit
    optimizer = trainable * (8 + (4 if width == 2 else 0)) / (world if stage >= 1 else 1)
    if offload_opt:
        optimizer = 0.0
    tokens = t.micro_batch_size * max_seq_len
    per_value = ACTIVATION_VALUES + SCORE_VALUES * mcfg.num_attention_heads * max_seq_len / mcfg.hidden_size
    activations = tokens * mcfg.hidden_size * mcfg.num_hidden_layers * per_value * width
    activations += tokens * mcfg.vocab_size * 4 * 2  # fp32 logits and their gradient
    budget, device = device_budget(t)
    return Estimate(weights, gradients, optimizer, activations, budget, device, trainable, width)


def check(t: TrainConfig, max_seq_len: int, model_path: Path, log=print) -> Estimate:
    est = estimate(t, max_seq_len, model_path)
    log(
        f"train: memory estimate for {t.method}, DeepSpeed {t.deepspeed}, "
        f"micro batch {t.micro_batch_size} x {max_seq_len} tokens:\n{est.table()}"
    )
    if est.total > est.budget:
        raise OutOfMemory(
            f"the estimated {est.total / GB:.1f} GiB per device exceeds the {est.budget / GB:.1f} GiB "
            f"available ({est.device}); try {ADVICE}"
        )
    return est
