"""plan and run: what is stale and what it costs, then building it."""

from __future__ import annotations

import json
import sys

from charbuild.cli.common import EXIT_BUILD, EXIT_SPEC, load, open_cache


def _full_plan(args, cache, targets):
    from charbuild.engine.keys import FILES_READ
    from charbuild.engine.planner import make_plan, memo_id, save_memo

    FILES_READ.clear()
    from charbuild.recipe.services import RecipeServices

    loaded, graph = load(args)
    plan = make_plan(loaded, graph, cache, targets, RecipeServices(cache, loaded))
    save_memo(cache, memo_id(args.spec, args.sets, args.scale, targets), loaded, plan, list(FILES_READ))
    return loaded, graph, plan


def cmd_plan(args) -> int:
    from charbuild.engine.planner import fast_null_plan, memo_id

    cache = open_cache(args)
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
    from pathlib import Path

    from charbuild.engine.executor import BuildError, LocalExecutor, check_outputs, run_build
    from charbuild.ledger import BudgetExceeded
    from charbuild.recipe.services import RecipeServices

    cache = open_cache(args)
    loaded, graph, plan = _full_plan(args, cache, args.targets or None)
    outputs = Path("outputs")
    # `loaded` carries --set and --scale: a build with overrides publishes to its own folder
    # (LoadedSpec.output_name) and provenance.json records them. Where it would publish is
    # checked now, not after hours of building.
    problems = check_outputs(loaded, graph, cache, [r.name for r in plan.rows], outputs)
    if problems:
        cache.close()
        print(f"charbuild: cannot publish to {outputs / loaded.output_name}/; nothing was built:\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return EXIT_SPEC
    if not plan.to_build:
        print(f"nothing to build: {len(plan.rows)} targets cached")
    else:
        print(render_table(plan))
    try:
        report = run_build(loaded, graph, plan, cache, LocalExecutor(args.jobs), args.keep_going, not args.no_progress,
                           outputs_root=outputs, force_gates=tuple(args.force_gate), services=RecipeServices(cache, loaded))
    except (BuildError, BudgetExceeded) as exc:
        print(f"charbuild: {exc}", file=sys.stderr)
        return EXIT_BUILD
    finally:
        cache.close()
    s = report.spend
    print(f"built {len(report.built) + len(report.rebuilt_corrupt)}, cached {len(report.cached) + len(report.waited)}, "
          f"kept by cutoff {len(report.cut_off)}, "
          f"failed {len(report.failed)}, skipped {len(report.skipped)} in {report.seconds:.1f}s; "
          f"spent ${s.get('usd', 0):.4f} on {s.get('api_calls', 0)} API calls ({s.get('api_tokens', 0)} tokens); "
          f"{s.get('calls', 0)} calls in all, {s.get('tokens_in', 0)}+{s.get('tokens_out', 0)} tokens")
    if report.failed:
        for name, err in report.failed.items():
            print(f"FAILED {name}: {err}", file=sys.stderr)
        return EXIT_BUILD
    print(f"outputs: {report.outputs}")
    if report.outputs and (report.outputs / "report.html").exists():
        print(f"report:  {report.outputs / 'report.html'}")
    return 0


def render_table(plan) -> str:
    from charbuild.cli.table import table

    rows = []
    for r in plan.rows:
        e = r.estimate
        stale = r.state != "cached"
        out = (f"{_si(e.tokens_out_p50)}-{_si(e.tokens_out_p90)}" if e.calibrated and e.tokens_out_p90 > e.tokens_out_p50
               else _si(e.tokens_out))
        tok = f"{_si(e.tokens_in)}/{out}" if stale and (e.tokens_in or e.tokens_out) else ""
        usd = f"${e.usd:,.2f}" if stale and e.usd else ""
        gpu = f"{e.gpu_hours:.2f}" if stale and e.gpu_hours else ""
        gpu_usd = f"${e.gpu_usd:,.2f}" if stale and e.gpu_usd else ""
        reason = r.reason + (f" ({r.calls['cached']} of {r.calls['cached'] + r.calls['new']} calls cached)"
                             if r.calls and r.calls["cached"] else "")
        rows.append([r.name, "build (may cut off)" if r.may_cut_off else r.state, reason, tok, usd, gpu, gpu_usd])
    t = plan.total
    rows.append(["TOTAL", f"{len(plan.to_build)} to build", f"{len(plan.rows) - len(plan.to_build)} cached",
                 f"{_si(t.tokens_in)}/{_si(t.tokens_out)}", f"${t.usd:,.2f}", f"{t.gpu_hours:.2f}", f"${t.gpu_usd:,.2f}"])
    out = table(["target", "state", "reason", "tokens in/out (p50-p90)", "api usd", "gpu-h", "gpu usd (info)"], rows)
    return out + "\n" + budget_line(plan)


def budget_line(plan) -> str:
    """The plan's verdict on `budget:`: API dollars and tokens against the caps; GPU time
    is shown, never counted (see charbuild.ledger)."""
    if not plan.to_build:
        return "budget: nothing to build, nothing to spend"
    t = plan.total
    caps = []
    if plan.max_usd is not None:
        caps.append(f"API ${t.usd:,.2f} of budget.max_usd ${plan.max_usd:,.2f}")
    if plan.max_tokens is not None:
        caps.append(f"API {t.api_tokens:,} tokens of budget.max_tokens {plan.max_tokens:,}")
    over = plan.over_budget
    if over:
        return "budget: OVER: " + "; ".join(over) + ": `run` will refuse to start"
    return "budget: " + ("; ".join(caps) + ": within" if caps else "no caps") + \
        " (GPU time is not counted against the budget)"


def _si(n: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))
