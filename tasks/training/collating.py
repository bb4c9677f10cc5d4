"""The training collator that counts what the model was given: real tokens, and a fingerprint
of each batch it took."""

from __future__ import annotations

import collections
import hashlib

from tasks.data.batching import TrainingCollator

EVAL_ROW = "sftflow_eval"  # a column only the eval split has, so the collator tells its batches apart


class RecordingCollator(TrainingCollator):
    """The training collator, counting what was trained: the dataloader collates one batch ahead
    of the step, so a batch counts (tokens, and a fingerprint of it in ``seen``) only when the
    model's forward takes it (``on_forward``, a forward pre-hook)."""

    def __init__(self, pad_token_id: int):
        super().__init__(pad_token_id)
        self.waiting: collections.deque = collections.deque()
        self.trained_real = self.trained_total = 0
        self.seen: list[str] = []

    def __call__(self, rows: list[dict]) -> dict:
        if EVAL_ROW in rows[0]:  # an eval batch: not trained, not counted
            return TrainingCollator(self.pad)(rows)
        real, total = self.real_tokens, self.total_tokens
        batch = super().__call__(rows)
        fingerprint = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()[:16]
        self.waiting.append((self.real_tokens - real, self.total_tokens - total, fingerprint))
        return batch

    def on_forward(self, module, args, kwargs) -> None:
        if module.training and self.waiting:
            real, total, fingerprint = self.waiting.popleft()
            self.trained_real += real
            self.trained_total += total
            self.seen.append(fingerprint)

    @property
    def real_fraction(self) -> float:
        return self.trained_real / self.trained_total if self.trained_total else 0.0
