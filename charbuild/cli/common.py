"""What every verb needs: the cache, and a spec loaded into the recipe's build graph."""

from __future__ import annotations

EXIT_SPEC = 2
EXIT_BUILD = 1


def open_cache(args):
    from charbuild.store.objects import Cache

    return Cache(args.cache)


def load(args):
    from charbuild.recipe.registry import recipe_graph
    from charbuild.spec.model import load_spec

    loaded = load_spec(args.spec, args.sets, args.scale)
    return loaded, recipe_graph(loaded)
