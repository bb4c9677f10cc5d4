"""Attention over packed rows, one causal block per example.

Packed rows carry position_ids that restart at 0 for every example. transformers turns that
into a dense block-diagonal mask, and SDPA then computes every query against the whole row:
on CPU, rows of 512-1024 tokens holding ~120-token examples spend about a tenth of the step
on scores that the mask throws away. This runs SDPA's causal kernel on each example alone,
so attention costs what the examples need. FlashAttention's varlen kernel does this in one call
on GPU; this is the portable form (one SDPA call per example), and the train stage uses it on
every device. Not measured on a GPU.

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register())
"""

from __future__ import annotations

NAME = "sftflow_packed"


def packed_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """query [batch, heads, seq, dim]; returns [batch, seq, heads, dim] like transformers' SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for b, pos in enumerate(position_ids.expand(query.shape[0], -1)):
        starts = (pos == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        ends = starts[1:] + [pos.shape[0]]
        rows.append(
            torch.cat(
                [
                    sdpa_attention_forward(
                        module,
                        query[b : b + 1, :, s:e],
                        key[b : b + 1, :, s:e],
                        value[b : b + 1, :, s:e],
                        None,
                        is_causal=True,
                        **kwargs,
                    )[0]
                    for s, e in zip(starts, ends)
                ],
                dim=1,
            )
        )
    return torch.cat(rows), None


def register() -> str:
    """Registers the attention with transformers (once per process) and returns its name. Having
    no mask function of its own, transformers builds no mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME
