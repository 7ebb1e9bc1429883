"""Looking at the graph and the cache: explain, dag, show, status, gc."""

from __future__ import annotations

import json
import sys

from charbuild.cli.common import EXIT_BUILD, load, open_cache


def cmd_explain(args) -> int:
    from charbuild.engine.staleness import why_stale

    cache = open_cache(args)
    loaded, graph = load(args)
    node = graph[args.target]
    print(f"target  {node.name}\nstage   {node.stage.name} v{node.stage.version}\nkey     {node.key}")
    if cache.has(node.key):
        kept = cache.index.get(("kept-by-cutoff", node.key))
        print("state   cached" + (f" (kept by early cutoff: its inputs' content matched the build {kept['from'][:12]})"
                                  if kept else ""))
    else:
        print(f"state   build\nreason  {why_stale(node, cache.last_build(loaded.spec.name, node.name))}")
    print("reads:")
    for path, value in node.defn.fields.items():
        shown = json.dumps(value, default=str)
        print(f"  {path} = {shown if len(shown) < 100 else shown[:97] + '...'}  ({_set_where(loaded, path)})")
    if node.defn.params:
        print(f"params: {json.dumps(node.defn.params)}")
    print("inputs:")
    for slot, names in node.defn.inputs.items():
        for n in names:
            print(f"  {slot}: {n} [{'cached' if cache.has(graph[n].key) else 'build'}]")
    down = graph.downstream(node.name)
    print(f"downstream: {len(down)} targets" + (f" ({', '.join(down[:5])}{', ...' if len(down) > 5 else ''})" if down else ""))
    return 0


def _set_where(loaded, path: str) -> str:
    """What set a field a target reads: a file line, command-line overrides, or its default.
    `data:<file>` is the digest of a data file shipped with charbuild, which no spec sets."""
    from charbuild.spec.loader import origin

    if path.startswith("data:"):
        return f"charbuild data file {path[len('data:'):]}"
    return origin(loaded.locs, tuple(path.split(".")))


def cmd_dag(args) -> int:
    from charbuild.engine.dag import render

    _, graph = load(args)
    print(render(graph, args.format))
    return 0


def cmd_show(args) -> int:
    cache = open_cache(args)
    _, graph = load(args)
    node = graph[args.target]
    m = cache.manifest(node.key)
    if m is None:
        print(f"{node.name} is not built (key {node.key})", file=sys.stderr)
        return EXIT_BUILD
    print(json.dumps(m, indent=1, default=str))
    print(f"path: {cache.path(node.key)}")
    return 0


def cmd_status(args) -> int:
    """What the cache holds (on a store: what the store holds whole, not this machine's
    working copy), and what building it spent: per spec and per model, the API
    dollars and tokens the run's ledger charged to each built target (its manifest's
    usage; `budget.max_usd` and `budget.max_tokens` count these), next to the plan's
    estimates; and what every run of a spec spent, targets it never finished included."""
    from charbuild.cli.table import table

    cache = open_cache(args)
    per_spec: dict = {}
    per_model: dict = {}
    n = size = 0
    if cache.remote is not None:  # the store's targets, not this machine's copies of some
        from charbuild.cli.bucket import stored_targets

        held, debris = stored_targets(cache)
    else:
        held = ((key, cache.manifest(key) or {}, cache.size(key)) for key in cache.keys())
        debris = list(cache.debris())
    for key, m, bytes_ in held:
        n += 1
        size += bytes_
        u = m.get("usage") or {}
        e = m.get("estimate") or {}
        tokens = u.get("tokens_in", 0) + u.get("tokens_out", 0)
        s = per_spec.setdefault(m.get("spec", "?"), {"targets": 0, "usd": 0.0, "tokens": 0, "est_usd": 0.0,
                                                     "est_tokens": 0, "seconds": 0.0, "api_tokens": 0, "gpu_hours": 0.0})
        s["targets"] += 1
        s["usd"] += u.get("usd", 0)
        s["tokens"] += tokens
        s["api_tokens"] += u.get("api_tokens", 0)
        s["est_usd"] += e.get("usd", 0)
        s["est_tokens"] += e.get("tokens_in", 0) + e.get("tokens_out", 0)
        s["gpu_hours"] += e.get("gpu_hours", 0)
        s["seconds"] += m.get("seconds", 0)
        # The model a target generated with is among the fields it read.
        models = [v.get("model") for k, v in (m.get("fields") or {}).items() if k.startswith("models.") and isinstance(v, dict)]
        if models and (tokens or u.get("usd")):
            pm = per_model.setdefault(models[0], {"calls": 0, "usd": 0.0, "tokens": 0, "batch_calls": 0,
                                                  "tokens_in_cached": 0})
            pm["calls"] += u.get("calls", 0)
            pm["usd"] += u.get("usd", 0)
            pm["tokens"] += tokens
            pm["batch_calls"] += u.get("batch_calls", 0)
            pm["tokens_in_cached"] += u.get("tokens_in_cached", 0)
    print(f"cache {cache.location}: {n} targets, {size / 1e6:.1f} MB")
    if debris and cache.remote is not None:
        print(f"{len(debris)} folders in objects/ have no valid manifest, or lack files it names (a killed upload "
              "or removal?): not objects; a build sets them aside, `charbuild gc --yes` removes them")
    elif debris:
        print(f"{len(debris)} folders in objects/ have no valid manifest (an interrupted removal?): not objects; "
              "a build sets them aside, `charbuild gc --yes` removes them")
    runs = {k: cache.index.get(("spend", k), {}) or {} for k in per_spec}
    print(table(["spec", "targets", "spent usd", "est. usd", "tokens", "est. tokens", "build seconds", "api tokens",
                 "est. gpu-h", "all runs usd"],
                [[k, v["targets"], f"{v['usd']:.4f}", f"{v['est_usd']:.4f}", v["tokens"], v["est_tokens"],
                  f"{v['seconds']:.1f}", v["api_tokens"], f"{v['gpu_hours']:.2f}", f"{runs[k].get('usd', 0.0):.4f}"]
                 for k, v in sorted(per_spec.items())]))
    print("usd: API dollars (what budget.max_usd caps); api tokens: what budget.max_tokens caps; GPU time is "
          "estimated, never counted; all runs: every run of the spec on this cache, unfinished targets included"
          + (f" (runs from this machine: its working copy {cache.root} keeps the count)" if cache.remote else ""))
    if per_model:
        print()
        print(table(["model", "calls", "spent usd", "tokens", "batch calls", "cached input tokens"],
                    [[k, v["calls"], f"{v['usd']:.4f}", v["tokens"], v["batch_calls"], v["tokens_in_cached"]]
                     for k, v in sorted(per_model.items())]))
        print("batch calls: made through a batch API, at its batch rate; cached input tokens: served from the "
              "provider's prompt cache, at its cached rate")
    return 0


def cmd_gc(args) -> int:
    """Remove the objects no listed spec reaches, and the aliases (early cutoff) that are
    unreachable or point at nothing; then what led to them: index entries, lock files, and
    staging dirs a killed build left. Folders in objects/ without a valid manifest (an
    interrupted removal) are not objects, and go too. What a running build holds (its
    lease: every target it plans, every input it has checked) is kept, whatever the specs
    say. Counts and bytes are of what was really deleted; what could not be is named.
    On a store the store is collected, with its leases (cli/bucket.py)."""
    from charbuild.recipe.registry import recipe_graph
    from charbuild.spec.model import load_spec

    cache = open_cache(args)
    live = set()
    for s in args.specs:
        live |= {node.key for node in recipe_graph(load_spec(s))}
    if cache.remote is not None:  # the store, with its own aliases, leases and gc lease
        from charbuild.cli.bucket import gc_store

        try:
            return gc_store(args, cache, live)
        finally:
            cache.close()
    # An object is live while a live key resolves to it (early cutoff aliases).
    live |= {cache.resolve(k) for k in list(live)}
    verb = "removed" if args.yes else "would remove"
    removed: set[str] = set()
    failed = freed = kept = n_debris = 0
    # Builds add to their leases only outside this lock: what one reads is either in a lease
    # read here, or looked at after gc is done (and found gone, then rebuilt).
    with cache.gc_lock():
        held = cache.leases(remove_stale=args.yes)
        in_use = {**held, **{cache.resolve(k): who for k, who in held.items()}}
        objects = set(cache.keys())
        dead = sorted(k for k in objects if k not in live)
        stale = sorted((a, t) for a, t in cache.aliases() if a not in live or t not in objects)
        for a, t in stale:  # aliases first: none is ever left pointing at a removed object
            m = cache.manifest(t) or {}
            what = f"alias {a[:12]} -> {t[:12]} {m.get('target', '(nothing)')}"
            if a in in_use and t in objects:
                kept += 1
                print(f"kept {what}: in use by {in_use[a]}")
                continue
            try:
                if args.yes:
                    cache.remove_alias(a)
                removed.add(a)
                print(f"{verb} {what}")
            except OSError as exc:
                failed += 1
                print(f"could not remove {what}: {exc.strerror or exc}; kept")
        for k in dead:
            m = cache.manifest(k) or {}
            what = f"{k[:12]} {m.get('target', '?')} ({m.get('spec', '?')})"
            if k in in_use:
                kept += 1
                print(f"kept {what}: in use by {in_use[k]}")
                continue
            try:
                size = cache.remove_object(k) if args.yes else cache.object_size(k)
            except OSError as exc:
                failed += 1
                print(f"could not remove {what}: {exc.strerror or exc}; kept")
                continue
            if size is None:
                print(f"{what} was gone already (another gc?)")
                continue
            freed += size
            removed.add(k)
            print(f"{verb} {what}")
        for d in cache.debris():
            if d.name in dead:
                continue  # a truncated manifest no listed spec reaches: dealt with above
            what = f"{d} (no valid manifest: what an interrupted removal left, not an object)"
            try:
                size = cache.remove_debris(d) if args.yes else 0
            except OSError as exc:
                failed += 1
                print(f"could not remove {what}: {exc.strerror or exc}; kept")
                continue
            if size is not None:
                n_debris += 1
                print(f"{verb} {what}")
        n_alias = sum(a in removed for a, _ in stale)
        summary = f"{len(removed) - n_alias} unreachable targets ({freed / 1e6:.1f} MB), {n_alias} stale aliases"
        summary += f", {n_debris} folders without a manifest" if n_debris else ""
        summary += f" ({kept} kept: in use by a running build)" if kept else ""
        for d in cache.clean_staging(dry_run=not args.yes):
            print(f"{verb} {d} (a staging dir untouched for an hour that no build holds)")
    if not args.yes:
        print(f"{summary} (dry run: --yes to remove)")
        return 0
    pruned = cache.prune_index(removed) if removed else 0
    locks = sum(cache.remove_lock(k) for k in removed)
    cleaned = []
    cleaned += [f"{pruned} index entries"] if pruned else []
    cleaned += [f"{locks} lock files"] if locks else []
    print(f"removed {summary}" + (f"; cleaned {', '.join(cleaned)}" if cleaned else "")
          + (f"; {failed} could not be removed (kept)" if failed else ""))
    return EXIT_BUILD if failed else 0
