"""Evaluate stage: base vs candidate (vs the current champion) on the same held-out samples.

Reads the format stage's eval split and eval prompts, the merged model, the base and the
registry's champion; writes ``<run>/evaluate/``: ``scores.json``, ``report.md``,
``metrics.png`` and ``generations.jsonl`` (every model's answer to every prompt).

Eval loss and perplexity come from the tokenized eval split; generation metrics (ROUGE-L,
exact match, BLEU) from greedy, batched, left-padded generation with the training chat
template, scored by `evaluate` modules that ship with sftflow and load offline. The gate
decides whether the candidate may become the champion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from prefect import task

from tasks.config import SHIPPED_METRICS, EvalConfig, PipelineConfig
from tasks.core.errors import MissingError
from tasks.core.faults import fault
from tasks.core.files import read_json, read_jsonl
from tasks.core.hashing import hash_json, imports_hash, tree_sha256
from tasks.core.orchestration import GPU_TAG
from tasks.core.paths import CODE_ROOT, stage_dir
from tasks.core.results import EvalResult, FormatResult, MergeResult
from tasks.core.stage import Stage, open_stage, prefect_markdown
from tasks.data.templating import stop_token_ids, template_sha
from tasks.evaluation.gate import Decision, SampleStats, decide, resampled, spreads
from tasks.evaluation.losssets import past_eval_sets, retention_rows
from tasks.evaluation.report import report_markdown, write_outputs
from tasks.evaluation.scorecache import load_scores, score_key, store_scores
from tasks.evaluation.scoring import generate, metric_stats, row_losses, spread
from tasks.models.loading import dtype_name, load_model, load_tokenizer, pick_dtype, resolve_model
from tasks.registry.tags import BASE_TAG
from tasks.registry.versions import alias_version, all_versions, download_bundle

SECTIONS = ("model", "data", "merge", "eval", "tracking")
METRICS_DIR = CODE_ROOT / "tasks/evaluation/metrics"


class ModelRef(NamedTuple):
    """A model to score: its folder, or (an adapter bundle) the base it was trained on plus the adapter."""

    path: Path
    adapter: Path | None = None
    version: str | None = None  # the registry version, for the champion


class EvalSet(NamedTuple):
    """What every model is scored on."""

    template: str
    records: list[dict]  # the prompts and references
    rows: Any  # the tokenized eval split, for the loss
    eos_ids: list[int]
    loss_sets: dict  # metric name -> rows, loss only
    template_kwargs: dict  # the date the format stage pinned


def score_model(
    ref: ModelRef, e: EvalConfig, dtype: str, s: EvalSet, log=print
) -> tuple[dict[str, float], list[str], list[bool], SampleStats]:
    """Loss, perplexity and the generation metrics of one model (``ref``: its folder, plus an
    adapter champion's adapter), with per-sample statistics, its answers and whether each stopped."""
    import evaluate as hf_evaluate  # the Hugging Face library, not this stage

    tokenizer = load_tokenizer(ref.path)
    tokenizer.chat_template = s.template
    model = load_model(ref.path, pick_dtype(dtype, ref.path, "merge.dtype"), ref.adapter)
    losses = row_losses(model, s.rows, tokenizer.pad_token_id, e.batch_size)
    preds, stopped = generate(
        model, tokenizer, s.records, s.eos_ids, e.max_new_tokens, e.batch_size, s.template_kwargs
    )
    refs = [r["reference"] for r in s.records]
    stats = SampleStats({"eval_loss": ("ratio", losses), "perplexity": ("exp", losses)})
    for name, rows in s.loss_sets.items():
        stats.stats[name] = ("ratio", row_losses(model, rows, tokenizer.pad_token_id, e.batch_size))
    scores = {name: stats.value(name) for name in stats.stats}
    for name in e.metrics:
        module = hf_evaluate.load(str(METRICS_DIR / name) if name in SHIPPED_METRICS else name)
        corpus = module.compute(predictions=preds, references=refs)
        scores |= corpus
        stats.stats |= metric_stats(name, module, preds, refs, corpus)
    log(f"evaluate: {ref.path}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    return scores, preds, stopped, stats


def run_evaluate(
    cfg: PipelineConfig,
    run_id: str,
    data: FormatResult,
    merged: MergeResult,
    champion: ModelRef | None = None,
    log=None,
    track: bool = False,
) -> EvalResult:
    """Reads ``data`` (eval split and prompts), the merged model, the base and the ``champion``;
    writes ``<run>/evaluate/`` (see the module docstring)."""
    from datasets import load_from_disk

    with open_stage(cfg.scope(SECTIONS), run_id, "evaluate", log, track) as stage:
        out = stage.dir
        stage.manifest.add_input("eval_records", Path(data.eval_records))
        template = data.template()
        records = spread(read_jsonl(Path(data.eval_records)), cfg.eval.max_samples)
        eval_ds = load_from_disk(data.eval_path)
        tokenizer = load_tokenizer(merged.model_path)
        eos_ids = stop_token_ids(tokenizer, template)
        loss_sets = extra_loss_sets(cfg, run_id, tokenizer, template, stage.log, data.template_kwargs)
        models = {
            "base": ModelRef(resolve_model(cfg.model.name_or_path)),
            "candidate": ModelRef(Path(merged.model_path)),
        }
        if champion is not None:
            models["champion"] = champion
        for name, ref in models.items():  # what was scored, by content (and the score cache's key)
            stage.manifest.add_input(name, ref.path)
            if ref.adapter is not None:
                stage.manifest.add_input(f"{name}_adapter", ref.adapter)
        scored_on = EvalSet(template, records, eval_ds, eos_ids, loss_sets, data.template_kwargs)
        cache = Path(cfg.output_dir) / ".cache" / "scores" if cfg.eval.cache else None
        inputs = score_inputs(cfg.eval, scored_on)
        scores, preds, stopped, stats = score_models(
            models,
            cfg.eval,
            cfg.merge.dtype,
            scored_on,
            stage.manifest.inputs,
            (cache, inputs, run_id),
            stage.log,
        )
        fault("evaluate:scored")
        row_slices = read_json(Path(data.eval_slices)) if data.eval_slices else None
        values = resampled(cfg.eval.gate, stats)  # once, for the gate's intervals and the chart's error bars
        slices = [r.get("slice") for r in records]
        d = decide(cfg.eval, cfg.data.slice_column, scores, stats, slices, row_slices, values)
        stage.log(f"evaluate: gate {'PASSED' if d.passed else 'NOT PASSED'}: {d.reason}")
        verdict = (d.passed, d.reason, d.intervals, d.slices)
        report = report_markdown(
            run_id, scores, records, preds, *verdict, cfg.eval.gate.confidence, cfg.data.slice_column
        )
        write_outputs(out, report, scores, records, preds, stopped, spreads(cfg.eval.gate, values))
        record_evaluation(stage, scores, d)
        prefect_markdown(f"evaluation-{cfg.run_name}", report, f"evaluation of {run_id}")
        dtype = dtype_name(cfg.merge.dtype, merged.model_path)
        return stage.finish(
            EvalResult(
                run_id=run_id,
                scores=scores,
                gate_passed=d.passed,
                reason=d.reason,
                report=report,
                intervals=d.intervals,
                slices=d.slices,
                generations=str(out / "generations.jsonl"),
                dtype=dtype,
                champion_version=champion.version if champion else None,
            )
        )


def record_evaluation(stage: Stage, scores: dict, d: Decision) -> None:
    """The manifest's outputs and metrics, the artifacts MLflow gets, and the gate's tags."""
    out = stage.dir
    stage.manifest.outputs = {
        "report": str(out / "report.md"),
        "chart": str(out / "metrics.png"),
        "generations": str(out / "generations.jsonl"),
        "gate_passed": d.passed,
        "reason": d.reason,
    }
    stage.manifest.metrics = {**scores, "improvement": d.intervals, "slices": d.slices}
    stage.artifact(*(out / n for n in ("report.md", "metrics.png", "generations.jsonl", "scores.json")))
    stage.tags({"sftflow.promote": d.passed, "sftflow.gate": d.reason[:4000]})


def score_models(
    models: dict, e: EvalConfig, dtype: str, s: EvalSet, hashes: dict, cache: tuple, log
) -> tuple:
    """Each model's (scores, answers, whether each answer stopped, per-sample statistics), by name.
    ``cache``: (folder or None, inputs, run id). A model whose weights (``hashes``: the manifest's
    inputs) were scored on the same inputs before gets those scores back; others are scored and
    stored."""
    folder, inputs, run_id = cache
    scores, preds, stopped, stats = {}, {}, {}, {}
    for name, ref in models.items():
        adapter = hashes.get(f"{name}_adapter", {}).get("sha256")
        key = score_key([hashes[name]["sha256"], adapter, dtype_name(dtype, ref.path)], inputs)
        entry = load_scores(folder, key) if folder else None
        if entry is not None:
            log(
                f"evaluate: {name}: scores of run {entry['run_id']} reused (score cache {key}: the same "
                "weights, eval data, template, settings, code and libraries)"
            )
            scored = (entry["scores"], entry["answers"], entry["stopped"], SampleStats(entry["stats"]))
        else:
            log(f"evaluate: scoring {name} on {len(s.records)} samples ...")
            scored = score_model(ref, e, dtype, s, log)
            if folder:
                store_scores(folder, key, run_id, scored, log)
        scores[name], preds[name], stopped[name], stats[name] = scored
    return scores, preds, stopped, stats


def score_inputs(e: EvalConfig, s: EvalSet) -> dict:
    """What a model's scores depend on besides its weights (and tokenizer), by content: the eval
    rows and prompts (not the training data: a night with new data and a fixed ``data.eval_path``
    scores the base as the night before), the template with its pinned date, the eval settings,
    the metric modules, the loss sets and the scoring code."""
    modules = [METRICS_DIR / m if m in SHIPPED_METRICS else Path(m) for m in e.metrics]
    return {
        "rows": hash_json(s.rows[:]),
        "prompts": hash_json(s.records),
        "template": [template_sha(s.template), s.template_kwargs, s.eos_ids],
        "eval": e.model_dump(include={"max_new_tokens", "batch_size"}),
        "metrics": [tree_sha256(m) if m.exists() else str(m) for m in modules],  # or a hub name
        "loss_sets": {
            name: hash_json(rows if isinstance(rows, list) else rows[:]) for name, rows in s.loss_sets.items()
        },
        "code": imports_hash(__name__),
    }


def extra_loss_sets(
    cfg: PipelineConfig, run_id: str, tokenizer, template: str, log, template_kwargs: dict
) -> dict:
    """retention_loss and past_<version>_loss: the sets tasks/evaluation/losssets.py describes."""
    sets = {}
    if cfg.eval.retention.enabled:
        sets["retention_loss"] = retention_rows(
            cfg.eval.retention, cfg.data.max_seq_len, tokenizer, template, template_kwargs
        )
        log(f"evaluate: retention set {cfg.eval.retention.file}: {len(sets['retention_loss'])} conversations")
    if cfg.eval.past_eval_sets:
        versions = all_versions(cfg.mlflow_uri, cfg.registered_model)
        past = past_eval_sets(
            cfg.eval.past_eval_sets,
            versions,
            cfg.output_dir,
            cfg.model.name_or_path,
            run_id,
            template_sha(template),
            log,
        )
        sets |= {f"past_{version}_loss": rows for version, rows in past.items()}
    return sets


def current_champion(cfg: PipelineConfig, run_id: str) -> ModelRef | None:
    """The champion, downloaded from the registry, if there is one from another run. A merged bundle
    holds ``model/``; an adapter bundle (serve.mode: adapter) holds ``adapter/`` for the base it
    records, which may not be this run's."""
    mv = alias_version(cfg.mlflow_uri, cfg.registered_model, "champion")
    if mv is None or mv.tags.get("sftflow.run_id") == run_id:
        return None
    dst = stage_dir(cfg.output_dir, run_id, "evaluate") / f"champion-v{mv.version}"
    bundle = download_bundle(cfg.mlflow_uri, cfg.registered_model, "champion", dst)
    version = str(mv.version)
    if (bundle / "model").is_dir():
        return ModelRef(bundle / "model", version=version)
    if (bundle / "adapter").is_dir():
        base = resolve_model(mv.tags.get(BASE_TAG, cfg.model.name_or_path))
        return ModelRef(base, bundle / "adapter", version)
    raise MissingError(
        f"{cfg.registered_model}@champion (version {mv.version}): its bundle holds neither model/ nor "
        f"adapter/ ({bundle}); promote another version or set eval.gate.against: base"
    )


@task(name="evaluate", retries=1, retry_delay_seconds=5, tags=[GPU_TAG])  # models on the accelerator
def evaluate_task(cfg: PipelineConfig, run_id: str, data: FormatResult, merged: MergeResult) -> EvalResult:
    return run_evaluate(cfg, run_id, data, merged, champion=current_champion(cfg, run_id), track=True)
