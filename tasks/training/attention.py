"""Attention over packed rows, one causal block per example, exactly as the model defines it.

Packed rows carry position_ids that restart at 0 for every example. transformers turns that
into a dense block-diagonal mask, and SDPA then computes every query against the whole row:
on CPU, rows of 512-1024 tokens holding ~120-token examples spend about a tenth of the step
on scores that the mask throws away. This runs attention on each example alone, so it costs
what the examples need. FlashAttention's varlen kernel does this in one call on GPU; this is
the portable form, and the train stage uses it on every device. Not measured on a GPU.

Each layer's own attention is kept (the model passes it in as keyword arguments):
- ``scaling`` (Gemma's ``query_pre_attn_scalar``) goes to the kernel as is;
- ``sliding_window`` (Gemma 2/3, Mistral, Phi-3, Qwen2 with windows): an example longer than
  the window gets transformers' band (a key ``k`` is seen from query ``q`` when
  ``q - window < k <= q``) as a boolean mask; a shorter one needs no mask;
- ``softcap`` (Gemma 2's ``attn_logit_softcapping``), which SDPA cannot apply: the example
  runs through the model's own eager attention, the same function transformers uses.

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register())
"""

from __future__ import annotations

import sys

NAME = "sftflow_packed"


def packed_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """query [batch, heads, seq, dim]; returns [batch, seq, heads, dim] like transformers' SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    window = kwargs.pop("sliding_window", None)
    softcap = kwargs.pop("softcap", None)
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        if softcap is not None:
            return own_eager(module)(module, query, key, value, attention_mask, softcap=softcap, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for b, pos in enumerate(position_ids.expand(query.shape[0], -1)):
        starts = (pos == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        ends = starts[1:] + [pos.shape[0]]
        parts = [
            one_example(
                module,
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                window,
                softcap,
                kwargs,
            )
            for s, e in zip(starts, ends)
        ]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows), None


def one_example(module, query, key, value, window, softcap, kwargs):
    """One example's attention [1, seq, heads, dim]: SDPA's causal kernel when nothing else applies."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    banded = window is not None and length > window
    if softcap is None and not banded:
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)[0]
    q = torch.arange(length, device=query.device)
    allowed = q[None, :] <= q[:, None]
    if banded:
        allowed &= q[None, :] > q[:, None] - window
    allowed = allowed[None, None]
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, allowed, **kwargs)[0]
    additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
    additive.masked_fill_(~allowed, torch.finfo(query.dtype).min)
    return own_eager(module)(module, query, key, value, additive, softcap=softcap, **kwargs)[0]


def own_eager(module):
    """The eager attention in the model's own modeling file: the one that applies its softcap."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise NotImplementedError(
            f"{type(module).__name__} caps its attention logits, and its modeling file has no "
            "eager_attention_forward to apply the cap with"
        )
    return function


def describe(config) -> str:
    """What the train log says about the attention a model trains with, per kind of layer."""
    text = getattr(config, "text_config", None) or config
    window = getattr(text, "sliding_window", None)
    types = list(getattr(text, "layer_types", None) or [])
    if window and getattr(text, "use_sliding_window", True) is not False:
        local = types.count("sliding_attention") if types else text.num_hidden_layers
        kind = f"sliding window {window} on {local} of {text.num_hidden_layers} layers"
    else:
        kind = "full causal attention on every layer"
    cap = getattr(text, "attn_logit_softcapping", None)
    capped = f"; logit softcap {cap} through the model's own eager attention" if cap else ""
    return f"per-example attention ({kind}{capped})"


def register() -> str:
    """Registers the attention with transformers (once per process) and returns its name. Having
    no mask function of its own, transformers builds no mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME
