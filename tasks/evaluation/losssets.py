"""Extra sets the evaluate stage measures loss on, besides tonight's eval split.

    retention   a fixed set unrelated to the task (``eval.retention``): the candidate must not
                get worse on it than a reference by more than ``max_loss_increase``
    past nights the eval splits of earlier registered versions (``eval.past_eval_sets``), read
                from their runs, so a regression on old data shows

Each comes back as rows of input_ids, labels and position_ids, tokenized with the training
chat template, ready for the same per-row loss as the eval split.
"""

from __future__ import annotations

from pathlib import Path

from tasks.config import RetentionConfig
from tasks.core.errors import InputError
from tasks.core.manifest import load_manifest
from tasks.data.records import SHAREGPT_ROLES, BadRecord, detect_format, iter_source, to_messages
from tasks.data.templating import Renderer, tokenize_conversations
from tasks.registry.tags import BASE_TAG


def retention_conversations(r: RetentionConfig) -> list[list[dict]]:
    """The retention file's conversations. A bad record is an error naming its line (a silently
    shrunk reference set would gate on something else); the format stage asks first, so it
    shows before training."""
    path = r.file
    convs = []
    for line, rec in iter_source(str(path)):
        try:
            if isinstance(rec, BadRecord):
                raise rec
            shape = r.format if r.format != "auto" else detect_format(rec, {})
            convs.append(to_messages(rec, shape, {}, SHAREGPT_ROLES))
        except BadRecord as e:
            raise InputError(f"eval.retention: {path}:{line}: {e}") from None
    if not convs:
        raise InputError(f"eval.retention: {path} has no records")
    return convs


def retention_rows(
    r: RetentionConfig, max_seq_len: int, tokenizer, template: str, template_kwargs: dict | None = None
) -> list[dict]:
    """The retention conversations, each one row (cut at data.max_seq_len)."""
    convs = retention_conversations(r)
    renderer = Renderer(tokenizer, template, template_kwargs)
    ids, labels, lengths = tokenize_conversations(convs, renderer, train_on_inputs=False)
    rows, start = [], 0
    for n in lengths.tolist():
        m = min(n, max_seq_len)
        rows.append(
            {
                "input_ids": ids[start : start + m].tolist(),
                "labels": labels[start : start + m].tolist(),
                "position_ids": list(range(m)),
            }
        )
        start += n
    return rows


def past_eval_sets(
    count: int, versions: list, output_dir: Path, base_model: str, run_id: str, template_sha: str, log
) -> dict[str, object]:
    """'v<N>' -> the eval split of each of the last ``eval.past_eval_sets`` registered versions
    whose run is in ``output_dir`` and was tokenized with the same template and base model
    (``versions``: the registry's, in any order)."""
    from datasets import load_from_disk

    found = {}
    for mv in sorted(versions, key=lambda v: -int(v.version)):
        version, tags = mv.version, mv.tags
        past = tags.get("sftflow.run_id")
        if len(found) == count:
            break
        if past == run_id:
            continue
        try:
            outputs = load_manifest(output_dir, past, "format")["outputs"]
        except (FileNotFoundError, RuntimeError, KeyError):
            log(f"evaluate: v{version}'s run {past} is not in {output_dir}: its eval set is skipped")
            continue
        if outputs.get("template_sha256") != template_sha or tags.get(BASE_TAG) != base_model:
            log(f"evaluate: v{version} used another template or base model: its eval set is skipped")
            continue
        found[f"v{version}"] = load_from_disk(outputs["eval"])
    return found
