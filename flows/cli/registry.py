"""`sftflow registry list|promote|rollback NAME`: the champion, moved by hand; `sftflow gc`."""

from __future__ import annotations

from tasks.gc import run_gc
from tasks.registry import versions as registry


def registry_command(args, cfg) -> int:
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


def gc(args, cfg) -> int:
    """The retention policy on the config's output_dir and registered model (docs/reliability.md)."""
    run_gc(cfg, args.dry_run)
    return 0
