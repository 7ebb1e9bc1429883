"""`charbuild export SPEC --to DIR [--push ORG/NAME]`: what a run built, ready to share."""

from __future__ import annotations

import sys
from pathlib import Path

from charbuild.cli.common import EXIT_BUILD, load, open_cache


def cmd_export(args) -> int:
    from charbuild.recipe.export import ExportError, export, push

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
        print(f"pushed:  {push(Path(written['dataset']), args.push + '-data', 'dataset')}")
        if written["model"]:
            print(f"pushed:  {push(Path(written['model']), args.push, 'model')}")
    return 0
