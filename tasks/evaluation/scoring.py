"""Scoring one model: per-row losses, batched greedy generation, and each metric's per-sample statistics."""

from __future__ import annotations

from tasks.config import SHIPPED_METRICS
from tasks.data.batching import IGNORE, Collator
from tasks.data.templating import prompt_text


def spread(items: list, n: int) -> list:
    """``n`` of ``items``, evenly spaced and in order (all of them when there are no more). A mix's
    eval split holds its sources one after another: the first ``n`` would ask the first only."""
    if n >= len(items):
        return items
    return [items[k * len(items) // n] for k in range(n)]


def row_losses(model, dataset, pad_id: int, batch_size: int):
    """Per eval row: the summed loss of its trained tokens and their count (eval loss is the
    sum over rows divided by the count, as a token-weighted mean)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    collate = Collator(pad_id)
    rows = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
            rows += zip(losses.sum(1).tolist(), (labels != IGNORE).sum(1).tolist())
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


def generate(
    model,
    tokenizer,
    prompts: list[dict],
    eos_ids: list[int],
    max_new_tokens: int,
    batch_size: int,
    template_kwargs: dict | None = None,
) -> tuple[list[str], list[bool]]:
    """Greedy answers to eval records' prompts (``messages``, and ``tools`` when they have them),
    and whether each ended on a stop token (else it ran to ``max_new_tokens``); ``template_kwargs``:
    the date the format stage pinned, for a template that reads the clock."""
    import torch

    tokenizer.padding_side = "left"
    texts, stopped = [], []
    for start in range(0, len(prompts), batch_size):
        chats = [
            prompt_text(tokenizer, p["messages"], p.get("tools"), template_kwargs)
            for p in prompts[start : start + batch_size]
        ]
        enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers = gen[:, enc["input_ids"].shape[1] :]
        texts += [t.strip() for t in tokenizer.batch_decode(answers, skip_special_tokens=True)]
        stopped += [bool(set(row.tolist()) & set(eos_ids)) for row in answers]
    return texts, stopped


def metric_stats(name: str, module, preds: list[str], refs: list[str], corpus: dict) -> dict:
    """Per-sample statistics for each value a metric module returns, where the corpus value can
    be rebuilt from them: a mean of per-sample values, or sacrebleu's n-gram counts for BLEU."""
    import numpy as np

    if name == "bleu" and name in SHIPPED_METRICS:
        from sacrebleu.metrics import BLEU

        return {
            "bleu": ("bleu", np.array(BLEU()._extract_corpus_statistics(preds, [refs]), dtype=np.float64))
        }
    singles = [module.compute(predictions=[p], references=[r]) for p, r in zip(preds, refs)]
    out = {}
    for key, value in corpus.items():
        per = np.array([s[key] for s in singles], dtype=np.float64)
        if abs(per.mean() - value) < 1e-9:  # decomposable: a resample's value is its mean
            out[key] = ("mean", per)
    return out
