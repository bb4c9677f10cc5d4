"""`sftflow registry list|promote|rollback NAME`: the champion, moved by hand."""

from __future__ import annotations

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
