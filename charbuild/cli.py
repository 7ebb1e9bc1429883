"""The command line: thin verbs over spec -> graph -> plan -> build.

Imports are inside the verbs so a null `plan` loads only what it needs.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_SPEC = 2
EXIT_BUILD = 1


def _common(p: argparse.ArgumentParser, targets: bool = True) -> None:
    p.add_argument("spec", help="spec YAML file")
    if targets:
        p.add_argument("targets", nargs="*", help="only these targets and what they need")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE",
                   help="override a spec field, e.g. --set data.dpo_pairs=300 (repeatable)")
    p.add_argument("--scale", type=float, default=None, help="scale every data size (0.25 for a 25%% ablation)")
    p.add_argument("--cache", default=None, help="cache root (default: $CHARBUILD_CACHE or ./cache)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="charbuild", description="Declarative, cached builds for character training.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="dry run: every target, cached or to build, why, and what it costs")
    _common(p)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("run", help="build what is stale, reuse the rest")
    _common(p)
    p.add_argument("--keep-going", action="store_true", help="build what does not depend on a failed target")
    p.add_argument("--jobs", type=int, default=1, help="targets built at once (API-bound shards)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--force-gate", action="append", default=[], metavar="NAME",
                   help="go on past this failed gate, knowingly (repeatable)")
    p = sub.add_parser("explain", help="why a target is (not) stale")
    _common(p, targets=False)
    p.add_argument("target")
    p = sub.add_parser("dag", help="the build graph")
    _common(p, targets=False)
    p.add_argument("--format", choices=["text", "mermaid", "dot"], default="text")
    p = sub.add_parser("show", help="a built target's manifest and files")
    _common(p, targets=False)
    p.add_argument("target")
    p = sub.add_parser("status", help="what the cache holds, spend per spec")
    p.add_argument("--cache", default=None)
    p = sub.add_parser("gc", help="remove cached targets no listed spec reaches (dry run unless --yes)")
    p.add_argument("specs", nargs="+")
    p.add_argument("--cache", default=None)
    p.add_argument("--yes", action="store_true")
    p = sub.add_parser("sample", help="sample replies from a built model")
    _common(p, targets=False)
    p.add_argument("prompt")
    p.add_argument("--target", default="sft-adapter", help="sft-adapter (default), dpo-adapter or base")
    p.add_argument("--system", action="store_true", help="with the constitution as system prompt")
    p.add_argument("-n", type=int, default=1, help="how many samples")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("chat", help="talk to a built model")
    _common(p, targets=False)
    p.add_argument("--target", default="sft-adapter")
    p.add_argument("--system", action="store_true")
    p = sub.add_parser("check", help="run the quality filters on a JSONL file")
    p.add_argument("file")
    p.add_argument("--spec", default=None, help="take filter settings and the constitution from this spec")
    p.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .errors import SpecError

    try:
        return VERBS[args.cmd](args)
    except SpecError as exc:
        print(f"charbuild: invalid spec\n{exc.format()}", file=sys.stderr)
        return EXIT_SPEC
    except BrokenPipeError:  # `charbuild plan ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\ncharbuild: interrupted; every finished target is kept in the cache", file=sys.stderr)
        return 130
    except Exception as exc:
        from .graph import GraphError
        from .constitution import ConstitutionError

        if isinstance(exc, (GraphError, ConstitutionError, FileNotFoundError, ValueError)):
            print(f"charbuild: {exc}", file=sys.stderr)
            return EXIT_SPEC
        raise


def _cache(args):
    from .cache import Cache

    return Cache(args.cache)


def _load(args):
    from .graph import build_graph
    from .spec import load_spec

    loaded = load_spec(args.spec, args.sets, args.scale)
    return loaded, build_graph(loaded)


def _full_plan(args, cache, targets):
    from .keys import FILES_READ
    from .planner import make_plan, memo_id, save_memo

    FILES_READ.clear()
    loaded, graph = _load(args)
    plan = make_plan(loaded, graph, cache, targets)
    save_memo(cache, memo_id(args.spec, args.sets, args.scale, targets), loaded, plan, list(FILES_READ))
    return loaded, graph, plan


def cmd_plan(args) -> int:
    from .planner import fast_null_plan, memo_id, render_table

    cache = _cache(args)
    targets = args.targets or None
    plan = fast_null_plan(cache, memo_id(args.spec, args.sets, args.scale, targets))
    if plan is None:
        _, _, plan = _full_plan(args, cache, targets)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print(render_table(plan))
    return 0


def cmd_run(args) -> int:
    from .executor import BuildError, LocalExecutor, run_build
    from .governor import BudgetExceeded as CallBudgetExceeded
    from .planner import render_table

    cache = _cache(args)
    loaded, graph, plan = _full_plan(args, cache, args.targets or None)
    if not plan.to_build:
        print(f"nothing to build: {len(plan.rows)} targets cached")
    else:
        print(render_table(plan))
    try:
        report = run_build(loaded, graph, plan, cache, LocalExecutor(args.jobs), args.keep_going, not args.no_progress,
                           force_gates=tuple(args.force_gate))
    except (BuildError, CallBudgetExceeded) as exc:
        print(f"charbuild: {exc}", file=sys.stderr)
        return EXIT_BUILD
    finally:
        cache.close()
    s = report.spend
    print(f"built {len(report.built) + len(report.rebuilt_corrupt)}, cached {len(report.cached) + len(report.waited)}, "
          f"kept by cutoff {len(report.cut_off)}, "
          f"failed {len(report.failed)}, skipped {len(report.skipped)} in {report.seconds:.1f}s; "
          f"spent ${s.get('usd', 0):.4f}, {s.get('tokens_in', 0)}+{s.get('tokens_out', 0)} tokens")
    if report.failed:
        for name, err in report.failed.items():
            print(f"FAILED {name}: {err}", file=sys.stderr)
        return EXIT_BUILD
    print(f"outputs: {report.outputs}")
    if report.outputs and (report.outputs / "report.html").exists():
        print(f"report:  {report.outputs / 'report.html'}")
    return 0


def cmd_explain(args) -> int:
    from .staleness import why_stale

    cache = _cache(args)
    loaded, graph = _load(args)
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
        w = loaded.where(tuple(path.split(".")))
        shown = json.dumps(value, default=str)
        print(f"  {path} = {shown if len(shown) < 100 else shown[:97] + '...'}  ({w or 'default'})")
    if node.defn.params:
        print(f"params: {json.dumps(node.defn.params)}")
    print("inputs:")
    for slot, names in node.defn.inputs.items():
        for n in names:
            print(f"  {slot}: {n} [{'cached' if cache.has(graph[n].key) else 'build'}]")
    down = graph.downstream(node.name)
    print(f"downstream: {len(down)} targets" + (f" ({', '.join(down[:5])}{', ...' if len(down) > 5 else ''})" if down else ""))
    return 0


def cmd_dag(args) -> int:
    from .dag import render

    _, graph = _load(args)
    print(render(graph, args.format))
    return 0


def cmd_show(args) -> int:
    cache = _cache(args)
    _, graph = _load(args)
    node = graph[args.target]
    m = cache.manifest(node.key)
    if m is None:
        print(f"{node.name} is not built (key {node.key})", file=sys.stderr)
        return EXIT_BUILD
    print(json.dumps(m, indent=1, default=str))
    print(f"path: {cache.path(node.key)}")
    return 0


def cmd_status(args) -> int:
    from .report_text import table

    cache = _cache(args)
    per_spec: dict = {}
    per_model: dict = {}
    n = size = 0
    for key in cache.keys():
        m = cache.manifest(key) or {}
        n += 1
        size += cache.size(key)
        u = m.get("usage") or {}
        e = m.get("estimate") or {}
        tokens = u.get("tokens_in", 0) + u.get("tokens_out", 0)
        s = per_spec.setdefault(m.get("spec", "?"), {"targets": 0, "usd": 0.0, "tokens": 0, "est_usd": 0.0,
                                                     "est_tokens": 0, "seconds": 0.0})
        s["targets"] += 1
        s["usd"] += u.get("usd", 0)
        s["tokens"] += tokens
        s["est_usd"] += e.get("usd", 0)
        s["est_tokens"] += e.get("tokens_in", 0) + e.get("tokens_out", 0)
        s["seconds"] += m.get("seconds", 0)
        # The model a target generated with is among the fields it read.
        models = [v.get("model") for k, v in (m.get("fields") or {}).items() if k.startswith("models.") and isinstance(v, dict)]
        if models and (tokens or u.get("usd")):
            pm = per_model.setdefault(models[0], {"calls": 0, "usd": 0.0, "tokens": 0})
            pm["calls"] += u.get("calls", 0)
            pm["usd"] += u.get("usd", 0)
            pm["tokens"] += tokens
    print(f"cache {cache.root}: {n} targets, {size / 1e6:.1f} MB")
    print(table(["spec", "targets", "spent usd", "est. usd", "tokens", "est. tokens", "build seconds"],
                [[k, v["targets"], f"{v['usd']:.4f}", f"{v['est_usd']:.4f}", v["tokens"], v["est_tokens"],
                  f"{v['seconds']:.1f}"] for k, v in sorted(per_spec.items())]))
    if per_model:
        print()
        print(table(["model", "calls", "spent usd", "tokens"],
                    [[k, v["calls"], f"{v['usd']:.4f}", v["tokens"]] for k, v in sorted(per_model.items())]))
    return 0


def cmd_gc(args) -> int:
    from .graph import build_graph
    from .spec import load_spec

    cache = _cache(args)
    live = set()
    for s in args.specs:
        live |= {node.key for node in build_graph(load_spec(s))}
    # An object is live while a live key resolves to it (early cutoff aliases).
    live |= {cache.resolve(k) for k in list(live)}
    dead = [k for k in cache.keys() if k not in live] + [a for a, _ in cache.aliases() if a not in live]
    freed = sum(cache.size(k) for k in dead)
    for k in dead:
        m = cache.manifest(k) or {}
        print(f"{'remove' if args.yes else 'would remove'} {k[:12]} {m.get('target', '?')} ({m.get('spec', '?')})")
        if args.yes:
            cache.remove(k)
    print(f"{len(dead)} unreachable targets, {freed / 1e6:.1f} MB{'' if args.yes else ' (dry run: --yes to remove)'}")
    return 0


def cmd_sample(args) -> int:
    from .talk import sample

    loaded, graph = _load(args)
    for i, text in enumerate(sample(loaded, graph, _cache(args), args.prompt, args.target, args.system, args.n, args.seed)):
        print(f"--- {args.target} sample {i + 1}\n{text}")
    return 0


def cmd_chat(args) -> int:
    from .talk import chat

    loaded, graph = _load(args)
    chat(loaded, graph, _cache(args), args.target, args.system)
    return 0


def cmd_check(args) -> int:
    from .checkcmd import check_file

    return check_file(args.file, args.spec, args.json)


VERBS = {"plan": cmd_plan, "run": cmd_run, "explain": cmd_explain, "dag": cmd_dag, "show": cmd_show,
         "status": cmd_status, "gc": cmd_gc, "check": cmd_check, "sample": cmd_sample, "chat": cmd_chat}


if __name__ == "__main__":
    sys.exit(main())
