"""Batches of tokenized rows, shared by training and evaluation.

Rows are padded on the right to the longest in the batch (a multiple of 8). No attention
mask is passed: position_ids restart at 0 for every example (and for the padding), so the
model's packed-sequence path gives each example its own causal block, and right padding is
causally invisible to real tokens.
"""

from __future__ import annotations

IGNORE = -100


class Collator:
    def __init__(self, pad_token_id: int, multiple_of: int = 8):
        self.pad, self.multiple_of = pad_token_id, multiple_of
        self.real_tokens = 0
        self.total_tokens = 0

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        width = -(-longest // self.multiple_of) * self.multiple_of
        ids, labels, pos = [], [], []
        for r in rows:
            n, extra = len(r["input_ids"]), width - len(r["input_ids"])
            ids.append(list(r["input_ids"]) + [self.pad] * extra)
            labels.append(list(r["labels"]) + [IGNORE] * extra)
            pos.append(list(r.get("position_ids") or range(n)) + list(range(extra)))
            self.real_tokens += n
        self.total_tokens += width * len(rows)
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(pos),
        }

    @property
    def real_fraction(self) -> float:
        return self.real_tokens / self.total_tokens if self.total_tokens else 0.0


class TrainingCollator(Collator):
    """Also names the positions the loss reads: the model's LM head (576 x 49k for SmolLM2, a
    fifth of a step's FLOPs) then runs only where the next token is trained, not on prompts and
    padding. ``logits_to_keep`` and ``shift_labels`` are transformers' own arguments, and the
    Trainer counts ``shift_labels`` for its loss normalisation."""

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        batch = super().__call__(rows)
        targets = batch["labels"][:, 1:]
        keep = torch.nn.functional.pad(targets != IGNORE, (0, 1), value=False)
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = targets[keep[:, :-1]]
        return batch
