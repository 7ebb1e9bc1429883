"""`charbuild export SPEC --to DIR [--push ORG/NAME]`: what a run built, ready to share."""

from __future__ import annotations

import sys
from pathlib import Path

from charbuild.cli.common import EXIT_BUILD, load, open_cache


def cmd_export(args) -> int:
    from charbuild.recipe.export import ExportError, PushError, check_repo_ids, export, hub_token, push

    if args.push:  # before the export: a push that cannot start should not wait for it
        try:
            token, repos = hub_token(), check_repo_ids(args.push)
        except PushError as exc:
            print(f"charbuild: {exc}", file=sys.stderr)
            return EXIT_BUILD
    loaded, graph = load(args)
    cache = open_cache(args)
    try:
        written = export(loaded, graph, cache, Path(args.to))
    except ExportError as exc:
        print(f"charbuild: {exc}", file=sys.stderr)
        return EXIT_BUILD
    finally:
        cache.close()
    print(f"dataset: {written['dataset']} (configs: {', '.join(written['configs']) or 'none'}); "
          f"load it with datasets.load_dataset({written['dataset']!r}, {written['configs'][0]!r})"
          if written["configs"] else f"dataset: {written['dataset']}")
    if written["model"]:
        print(f"model:   {written['model']} (the {written['model_target']} adapter)")
    if args.push:
        folders = {"dataset": written["dataset"], "model": written["model"]}
        for repo_id, repo_type in repos:
            if folders[repo_type] is None:
                continue
            try:
                print(f"pushed:  {push(Path(folders[repo_type]), repo_id, repo_type, token)}", flush=True)
            except PushError as exc:
                print(f"charbuild: {exc}", file=sys.stderr)
                return EXIT_BUILD
    return 0
