"""The ``sftflow`` command line.

    sftflow run CONFIG [--set key.sub=value ...]        the whole Prefect flow
    sftflow validate CONFIG                              exit 0, or 2 naming each bad field
    sftflow schema                                       the config's JSON schema
    sftflow {format,train,merge,evaluate,handoff} CONFIG --run-id ID
    sftflow registry {list,promote,rollback} NAME ...    champion management
    sftflow gc CONFIG [--dry-run]                        old runs, versions, caches (retention)
    sftflow serve NAME@ALIAS [--port 8000]               serve a registry version with vLLM
    sftflow serve-command NAME@ALIAS                     the vLLM server line for a registry version

A stage run alone takes its inputs from the earlier stages' manifests of the same run. Each
command group is a module of its own, imported only when its command runs: `sftflow validate`
loads no Prefect, MLflow or torch.
"""

from __future__ import annotations

import importlib
import sys

from flows.cli.common import quiet_defaults
from flows.cli.parser import parser
from tasks.config import load_config
from tasks.core.errors import ConfigError, SftflowError
from tasks.core.paths import STAGES

# command -> (module of flows.cli, function)
COMMANDS = {
    "run": ("run", "run"),
    "join": ("stage", "join"),
    "validate": ("config", "validate"),
    "schema": ("config", "schema"),
    "registry": ("registry", "registry_command"),
    "gc": ("registry", "gc"),
    "serve-command": ("serve", "serve_command"),
    "serve": ("serve", "serve"),
    **{stage: ("stage", "stage") for stage in STAGES},
}


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.command == "registry" and args.action == "promote" and not args.version:
        cli.error("registry promote needs NAME VERSION")
    module, name = COMMANDS[args.command]
    try:
        # the config validated, and the environment set before Prefect or MLflow are imported;
        # validate and schema only read, and leave no state behind
        cfg = load_config(args.config, args.set) if hasattr(args, "config") else None
        if args.command not in ("validate", "schema"):
            quiet_defaults(cfg)
        command = getattr(importlib.import_module(f"flows.cli.{module}"), name)
        return command(args, cfg)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    except SftflowError as e:
        # bad input, a refused or failed stage, a server that is down: the message says what and
        # where. Anything else is a bug and shows its traceback.
        print(f"sftflow: error: {e}", file=sys.stderr)
        return 1
