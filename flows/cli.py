"""The ``sftflow`` command line.

    sftflow run CONFIG [--set key.sub=value ...]        the whole Prefect flow
    sftflow validate CONFIG                              exit 0, or 2 naming each bad field
    sftflow schema                                       the config's JSON schema
    sftflow {format,train,merge,evaluate,handoff} CONFIG --run-id ID
    sftflow registry {list,promote,rollback} NAME ...    champion management
    sftflow serve NAME@ALIAS [--port 8000]               serve a registry version with vLLM
    sftflow serve-command NAME@ALIAS                     the vLLM server line for a registry version

A stage run alone takes its inputs from the earlier stages' manifests of the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import typing
from pathlib import Path

from tasks.config import ConfigError, PipelineConfig, load_config
from tasks.paths import STAGES


def _quiet_defaults(cfg: PipelineConfig | None) -> None:
    """Set before Prefect or MLflow are imported: state under the output dir, no telemetry.
    HF_HUB_OFFLINE is left to the environment, as for a Prefect deployment (see README)."""
    if cfg is not None:
        os.environ.setdefault("PREFECT_HOME", str((cfg.output_dir / ".prefect").resolve()))
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load(args) -> PipelineConfig:
    cfg = load_config(args.config, getattr(args, "set", None))
    _quiet_defaults(cfg)
    return cfg


def print_summary(s: dict) -> None:
    if s.get("unchanged"):
        same = s["same_as"]
        print(
            f"\nUNCHANGED: same data, config and code as version {same['version']} (run {same['run_id']}); "
            "nothing retrained"
        )
        print(f"bundle:    {same['bundle']}")
        return
    names = list(s["scores"])
    metrics = list(s["scores"][names[0]])
    width = max(len(m) for m in metrics) + 2
    print("\n" + "metric".ljust(width) + "".join(n.rjust(12) for n in names))
    for m in metrics:
        print(m.ljust(width) + "".join(f"{s['scores'][n][m]:12.4f}" for n in names))
    if intervals := s.get("intervals"):
        from tasks.gate import shown

        print("\nimprovement of the candidate, paired-bootstrap interval (+ is better)")
        print("".ljust(width) + "".join(f"vs {ref}".rjust(30) for ref in intervals))
        for m in metrics:
            print(m.ljust(width) + "".join(shown(intervals[ref].get(m)).rjust(30) for ref in intervals))
    if slices := s.get("slices"):
        print(
            "\nper slice"
            + "samples".rjust(width + 3 - len("per slice"))
            + "".join(n.rjust(12) for n in names)
        )
        for label, row in slices.items():
            print(
                label[: width - 1].ljust(width) + f"{row['n']:>7}" + "".join(f"{row[n]:12.4f}" for n in names)
            )
    print(f"\n{'PROMOTED' if s['promoted'] else 'NOT PROMOTED'}: {s['gate']}")
    if s.get("started_from"):
        print(f"lineage:   continued from version {s['started_from']} (train.init_from: champion)")
    if p := s.get("parity"):
        print(
            f"parity:    vLLM served the bundle: template {p['template_match']:.0%}, answers agree "
            f"{round(p['agreement'] * p['prompts'])}/{p['prompts']}, finish {p['finish_reasons']}"
        )
    print(f"registry:  {s['registered_model']} version {s['version']} (aliases: {', '.join(s['aliases'])})")
    print(f"run dir:   {s['run_dir']}")
    print(f"bundle:    {s['bundle']}\nserve:     {s['serve_script']}")
    ui = (
        s["mlflow_uri"]
        if s["mlflow_uri"].startswith("http")
        else f"mlflow ui --backend-store-uri {s['mlflow_uri']}"
    )
    print(f"MLflow:    {ui}  (run {s['mlflow_run_id']})")


def cmd_run(args) -> int:
    cfg = _load(args)  # validate before Prefect starts its server
    from tasks.tracking import check_reachable

    check_reachable(cfg.mlflow_uri)  # and a down MLflow server is one line, not a flow-run traceback
    from flows.sft import sft_pipeline

    summary = sft_pipeline(
        config_path=args.config, overrides=args.set or [], run_id=args.run_id, force=args.force
    )
    print_summary(summary)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0


def stage_tasks() -> dict:
    """Stage name -> its Prefect task, in pipeline order."""
    from tasks.evaluate import evaluate_task
    from tasks.format import format_task
    from tasks.handoff import handoff_task
    from tasks.merge import merge_task
    from tasks.train import train_task

    return dict(zip(STAGES, (format_task, train_task, merge_task, evaluate_task, handoff_task)))


def stage_inputs(fn, cfg: PipelineConfig, run_id: str) -> dict:
    """The results a stage takes (its typed parameters), rebuilt from the earlier stages' manifests."""
    from tasks.lineage import find_lineage

    hints = typing.get_type_hints(fn)
    hints.pop("return", None)
    inputs = {
        name: hint.from_manifest(cfg, run_id)
        for name, hint in hints.items()
        if hasattr(hint, "from_manifest")
    }
    if "lineage" in hints:  # the champion as it is now, as the flow's lineage task reads it
        inputs["lineage"] = find_lineage(cfg)
    return inputs


def cmd_stage(args) -> int:
    cfg = _load(args)
    task = stage_tasks()[args.command]
    extra = {"resume": args.resume} if args.command == "train" else {}
    # the same body as in the flow, without a Prefect run
    result = task.fn(cfg, args.run_id, **stage_inputs(task.fn, cfg, args.run_id), **extra)
    print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    return 0


def cmd_validate(args) -> int:
    cfg = load_config(args.config, args.set)
    print(
        f"{args.config}: valid (run_name={cfg.run_name}, method={cfg.train.method}, "
        f"deepspeed={cfg.train.deepspeed}, config hash {cfg.section_hash()})"
    )
    return 0


def cmd_schema(args) -> int:
    print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
    return 0


def cmd_registry(args) -> int:
    _quiet_defaults(None)
    from tasks import registry

    uri = args.mlflow_uri
    if args.action == "list":
        for v in registry.list_versions(uri, args.name):
            print(v)
    elif args.action == "promote":
        registry.promote(uri, args.name, args.version)
        print(f"{args.name}@champion -> version {args.version}")
    else:
        print(f"{args.name}@champion -> version {registry.rollback(uri, args.name)}")
    return 0


def registry_bundle(args) -> tuple[Path, dict]:
    """``models:/NAME@ALIAS``'s bundle folder (downloaded when not local) and its serve.json."""
    _quiet_defaults(None)
    from tasks.files import read_json
    from tasks.registry import alias_version, download_bundle

    name, _, alias = args.ref.removeprefix("models:/").partition("@")
    if not alias:
        raise ValueError(f"{args.ref!r}: expected NAME@ALIAS, e.g. tiny@champion")
    mv = alias_version(args.mlflow_uri, name, alias)
    if mv is None:
        from tasks.tracking import redact

        raise ValueError(f"{redact(args.mlflow_uri)} has no version {name}@{alias}")
    local = mv.tags.get("sftflow.bundle")
    if args.download or not (local and Path(local).is_dir()):
        dst = Path(args.download or f"bundles/{name}-v{mv.version}")
        local = str(download_bundle(args.mlflow_uri, name, alias, dst))
    print(f"# models:/{name}@{alias} = version {mv.version} (run {mv.tags.get('sftflow.run_id', '?')})")
    return Path(local).resolve(), read_json(Path(local) / "serve.json")


def cmd_serve_command(args) -> int:
    """Print the vLLM server line of models:/NAME@ALIAS, with the bundle downloaded (or found) locally."""
    bundle, info = registry_bundle(args)
    env = "".join(f"{k}={v} " for k, v in info["env"].items())
    print(f"cd {shlex.quote(str(bundle))} && {env}{shlex.join(info['argv'])}")
    return 0


def cmd_serve(args) -> int:
    """models:/NAME@ALIAS served by vLLM (its own venv, built on first use) until interrupted."""
    bundle, info = registry_bundle(args)
    from tasks.vllm_env import server_env, vllm_python

    python = str(vllm_python())
    argv = [python, *info["argv"][1:], "--host", args.host, "--port", str(args.port)]
    url = f"http://{args.host}:{args.port}/v1"
    body = json.dumps(
        {"model": info["served_model_name"], "messages": [{"role": "user", "content": "Hello!"}]}
    )
    print(f"# serving {bundle} at {url} (vLLM log below; Ctrl-C stops it)")
    print(
        f"curl {url}/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}", flush=True
    )
    os.chdir(bundle)
    os.execve(python, argv, server_env(info["env"]))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sftflow", description="SFT as a scheduled, tracked Prefect pipeline")
    sub = top.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("config", help="pipeline YAML (see configs/)")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=2"
        )
        return p

    def with_mlflow(p):
        p.add_argument(
            "--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
        )
        return p

    run = with_config(sub.add_parser("run", help="run the whole pipeline as a Prefect flow"))
    run.add_argument("--run-id", help="reuse/resume this run id (default: <run_name>-<utc time>-<rand>)")
    run.add_argument("--summary-json", help="also write the summary to this file")
    run.add_argument(
        "--force", action="store_true", help="retrain even when data, config and code are unchanged"
    )
    with_config(sub.add_parser("validate", help="check a config; exit 2 naming each bad field"))
    sub.add_parser("schema", help="print the config JSON schema")
    for stage in STAGES:
        p = with_config(sub.add_parser(stage, help=f"run the {stage} stage alone on an existing run"))
        p.add_argument("--run-id", required=True)
        if stage == "train":
            p.add_argument(
                "--resume", action="store_true", help="continue from the newest complete checkpoint"
            )
    join = with_config(
        sub.add_parser("join", help="another node of a train.launcher: per_node run: start its ranks")
    )
    join.add_argument("--run-id", required=True, help="the run node 0 trains (the same output_dir, shared)")
    join.add_argument(
        "--node-rank", type=int, required=True, help="this host's line in train.hostfile, from 0"
    )
    reg = with_mlflow(sub.add_parser("registry", help="list versions, promote or roll back the champion"))
    reg.add_argument("action", choices=["list", "promote", "rollback"])
    reg.add_argument("name")
    reg.add_argument("version", nargs="?")
    sc = with_mlflow(
        sub.add_parser("serve-command", help="print the vLLM server command for models:/NAME@ALIAS")
    )
    serve = with_mlflow(sub.add_parser("serve", help="serve models:/NAME@ALIAS with vLLM"))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    for p in (sc, serve):
        p.add_argument("ref", metavar="NAME@ALIAS")
        p.add_argument(
            "--download",
            metavar="DIR",
            help="download the bundle here (default: the local bundle if present)",
        )
    return top


def cmd_join(args) -> int:
    from tasks.train import join_training

    cfg = _load(args)
    if not cfg.train.hostfile or cfg.train.launcher != "per_node":
        raise ValueError(f"{args.config}: join needs train.hostfile and train.launcher: per_node")
    join_training(cfg, args.run_id, args.node_rank)
    return 0


COMMANDS = {
    "run": cmd_run,
    "join": cmd_join,
    "validate": cmd_validate,
    "schema": cmd_schema,
    "registry": cmd_registry,
    "serve-command": cmd_serve_command,
    "serve": cmd_serve,
    **{stage: cmd_stage for stage in STAGES},
}


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.command == "registry" and args.action == "promote" and not args.version:
        cli.error("registry promote needs NAME VERSION")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    except (OSError, ValueError, ConnectionError, MemoryError, RuntimeError) as e:
        # bad paths, data, a full disk, a failed stage or registry state: the message says what and
        # where; no traceback
        print(f"sftflow: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
