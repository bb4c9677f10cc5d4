"""Exact match after stripping surrounding whitespace, shipped as a local `evaluate` module."""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference (surrounding whitespace ignored).",
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        hits = [p.strip() == r.strip() for p, r in zip(predictions, references)]
        return {"exact_match": sum(hits) / max(len(hits), 1)}
