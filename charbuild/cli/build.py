"""plan and run: what is stale and what it costs, then building it."""

from __future__ import annotations

import json
import sys

from charbuild.cli.common import EXIT_BUILD, EXIT_SPEC, load, open_cache
from charbuild.contract import shard_group, shard_of
from charbuild.engine.interrupts import SigintHandler
from charbuild.engine.console import si as _si


def _full_plan(args, cache, targets):
    from charbuild.engine.keys import FILES_READ
    from charbuild.engine.planner import make_plan, memo_id, save_memo

    FILES_READ.clear()
    from charbuild.recipe.services import RecipeServices

    loaded, graph = load(args)
    plan = make_plan(loaded, graph, cache, targets, RecipeServices(cache, loaded))
    try:
        save_memo(cache, memo_id(args.spec, args.sets, args.scale, targets), loaded, plan, list(FILES_READ))
    except OSError:  # a read-only cache, a full disk: the memo only makes the next null plan fast
        pass
    return loaded, graph, plan


def cmd_plan(args) -> int:
    from charbuild.engine.planner import fast_null_plan, memo_id

    cache = open_cache(args)
    targets = args.targets or None
    plan = fast_null_plan(cache, memo_id(args.spec, args.sets, args.scale, targets))
    if plan is None:
        _, _, plan = _full_plan(args, cache, targets)
    per = per_accepted(cache, plan)
    if args.json:
        print(json.dumps({**plan.to_json(), "usd_per_accepted": per}, indent=1))
    else:
        print(render_table(plan, getattr(args, "all", False)))
        if per:
            print(per_accepted_lines(per))
    return 0


def per_accepted(cache, plan) -> dict:
    """Dollars per example kept after the filters, per stage, from the manifests of this
    plan's built targets (charbuild.recipe.estimates.usd_per_accepted)."""
    from charbuild.recipe.accepted import usd_per_accepted

    return usd_per_accepted(cache.manifest(r.key) for r in plan.rows if r.state == "cached")


def per_accepted_lines(per: dict) -> str:
    return "$ per accepted example (built targets that paid, after the filters): " + "; ".join(
        f"{stage} ${g['usd_per_accepted']:,.4f} ({g['accepted']} kept for ${g['usd']:,.2f})"
        for stage, g in sorted(per.items()))


def cmd_run(args) -> int:
    from pathlib import Path

    from charbuild.engine.executor import BuildError, check_outputs, run_build
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
    from charbuild.engine.console import Console

    verbose = getattr(args, "verbose", False)
    # A terminal gets the live view; a pipe or CI log gets plain lines (and the whole plan).
    live = sys.stdout.isatty() and not args.no_progress and not verbose
    if not plan.to_build:
        print(f"nothing to build: {len(plan.rows)} targets cached")
    else:
        print(plan_summary(plan) if live else render_table(plan))
        cache.check_writable()  # a read-only or full cache: one line now, not a failure per target
    services = RecipeServices(cache, loaded)
    if args.jobs > 1 and plan.to_build:
        services.preload()
    try:
        executor = make_executor(args, loaded, verbose)
    except Exception as exc:  # no ray installed, no cluster at that address
        cache.close()
        print(f"charbuild: {exc}", file=sys.stderr)
        return EXIT_BUILD
    console = Console(sys.stdout, live=live, capture=not verbose, log=print)
    try:
        with _CtrlC(services, executor) as ctrl_c:
            try:
                # Library progress bars only with -v: otherwise they would fill the target's log.
                report = run_build(loaded, graph, plan, cache, executor, args.keep_going,
                                   verbose and not args.no_progress, outputs_root=outputs,
                                   force_gates=tuple(args.force_gate), services=services, console=console)
            finally:
                # Under the handler still: a press while Ray lets go of its workers must not
                # raise into the shutdown and skip closing the cache.
                ctrl_c.cleaning = True
                executor.shutdown()  # its threads would otherwise hold the process open at exit
                cache.close()
    except (BuildError, BudgetExceeded) as exc:
        print(f"charbuild: {exc}", file=sys.stderr)
        return EXIT_BUILD
    s = report.spend
    counts = [("cached", len(report.cached) + len(report.waited)), ("kept by cutoff", len(report.cut_off)),
              ("failed", len(report.failed)), ("skipped", len(report.skipped))]
    api_tokens = f" ({_si(s['api_tokens'])} tokens)" if s.get("api_tokens") else ""
    # One line a terminal 80 wide holds: the counts that are not zero, sizes in k/M.
    print(", ".join([f"built {len(report.built) + len(report.rebuilt_corrupt)}"] + [f"{w} {n}" for w, n in counts if n])
          + f" in {report.seconds:.1f}s; spent ${s.get('usd', 0):.4f} on {s.get('api_calls', 0)} API calls{api_tokens}; "
          f"{s.get('calls', 0)} calls, {_si(s.get('tokens_in', 0))}+{_si(s.get('tokens_out', 0))} tokens")
    if report.failed:
        for name, err in report.failed.items():
            print(f"FAILED {name}: {err}", file=sys.stderr)
        return EXIT_BUILD
    print(f"outputs: {report.outputs}")
    if report.outputs and (report.outputs / "report.html").exists():
        print(f"report:  {report.outputs / 'report.html'}")
    return 0


def make_executor(args, loaded, verbose: bool = False):
    """The command line's --executor and --address, else the spec's `execution:`."""
    from charbuild.engine.executor import LocalExecutor

    ex = loaded.spec.execution
    if (getattr(args, "executor", None) or ex.executor) != "ray":
        return LocalExecutor(args.jobs)
    import os

    from charbuild.backends.pool import api_key_names
    from charbuild.engine.ray_executor import RayExecutor

    # The keys this command was checked with are the keys its workers use, whatever (if
    # anything) their own environment holds.
    keys = {n: os.environ[n] for n in api_key_names(loaded.spec.models) if os.environ.get(n)}
    return RayExecutor(getattr(args, "address", None) or ex.address, max_retries=ex.max_retries,
                       straggler_factor=ex.straggler_factor, log_to_driver=verbose, env=keys)


class _CtrlC(SigintHandler):
    """SIGINT while `run` builds and cleans up. The first press raises KeyboardInterrupt as
    usual: the build stops, and the calls in flight may still answer (and be stored) for a
    few seconds. Later presses, and any once the build has ended (`cleaning`: the executor
    shutting down, the cache closing), never raise, since a KeyboardInterrupt in the middle
    of cleaning up is what leaves staging folders and unstored answers behind: the next
    drops the calls in flight at once, the one after exits at once (the next run sweeps the
    staging folders it leaves)."""

    only_over_default = True

    def __init__(self, services, executor=None):
        self.services = services
        self.executor = executor  # a remote one's tasks run elsewhere: they are told too
        self.presses = 0
        self.cleaning = False
        self.dropped = False

    def __call__(self, signum, frame) -> None:
        import os

        self.presses += 1
        if self.presses == 1 and not self.cleaning:
            _say("\ncharbuild: interrupted; calls in flight may still answer for a few seconds "
                 "(Ctrl-C again to drop them)")
            raise KeyboardInterrupt
        if not self.dropped:
            self.dropped = True
            _say("charbuild: dropping the calls in flight (Ctrl-C again to exit at once)")
            self.services.interrupt(now=True)
            if hasattr(self.executor, "interrupt"):
                self.executor.interrupt(now=True)
            return
        _say("charbuild: exiting at once; the next run removes what this one left half-built")
        os._exit(130)


def _say(line: str) -> None:
    """To stderr from a signal handler: print() could be in the middle of a write already."""
    import os

    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


def stage_groups(rows) -> list[list]:
    """Plan rows in plan order, the shards of one target (`name/shard-NNNN`) gathered into
    one group where the first of them stands: a paper-scale plan has hundreds of shards."""
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(shard_group(r.name), []).append(r)
    return list(groups.values())


def _group_row(group: list):
    """One plan row standing for a group of shards: counts, the stale shards' estimates summed."""
    from charbuild.contract import Estimate
    from charbuild.engine.planner import PlanRow

    stale = [r for r in group if r.state != "cached"]
    est = Estimate(calibrated=all(r.estimate.calibrated for r in stale))
    for r in stale:
        est = est + r.estimate
    reasons = sorted({r.reason for r in stale}, key=[r.reason for r in stale].index)
    reason = (reasons[0] + (f" (+{len(reasons) - 1} other reasons)" if len(reasons) > 1 else "")) if stale else "cached"
    calls = None
    if any(r.calls for r in stale):
        calls = {k: sum((r.calls or {}).get(k, 0) for r in stale) for k in ("cached", "new")}
    head = shard_of(group[0].name)
    state = "cached" if not stale else "build"
    name = f"{head}/shard-* ({len(group)} shards" + (f", {len(stale)} to build)" if stale and len(stale) < len(group)
                                                     else ")")
    return PlanRow(name, "", group[0].stage, state, reason, est, any(r.may_cut_off for r in stale), calls)


def render_table(plan, every_shard: bool = False) -> str:
    from charbuild.cli.table import table

    shown = plan.rows if every_shard else [g[0] if len(g) == 1 else _group_row(g) for g in stage_groups(plan.rows)]
    rows = []
    for r in shown:
        e = r.estimate
        stale = r.state != "cached"
        out = (f"{_si(e.tokens_out_p50)}-{_si(e.tokens_out_p90)}" if e.calibrated and e.tokens_out_p90 > e.tokens_out_p50
               else _si(e.tokens_out))
        tok = f"{_si(e.tokens_in)}/{out}" if stale and (e.tokens_in or e.tokens_out) else ""
        usd = (f"${e.usd:,.2f}" + ("?" if e.price_unknown else "") + (" (batch)" if e.batch else "")
               if stale and e.usd else "")
        both = _online_batch(e) if stale else ""
        gpu = f"{e.gpu_hours:.2f}" if stale and e.gpu_hours else ""
        gpu_usd = f"${e.gpu_usd:,.2f}" if stale and e.gpu_usd else ""
        reason = r.reason + (f" ({r.calls['cached']} of {r.calls['cached'] + r.calls['new']} calls cached)"
                             if r.calls and r.calls["cached"] else "")
        rows.append([r.name, "build (may cut off)" if r.may_cut_off else r.state, reason, tok, usd, both, gpu,
                     gpu_usd])
    t = plan.total
    unknown = any(r.estimate.price_unknown and r.estimate.usd for r in plan.rows if r.state != "cached")
    rows.append(["TOTAL", f"{len(plan.to_build)} to build", f"{len(plan.rows) - len(plan.to_build)} cached",
                 f"{_si(t.tokens_in)}/{_si(t.tokens_out)}", f"${t.usd:,.2f}" + ("?" if unknown else ""),
                 _online_batch(t), f"{t.gpu_hours:.2f}", f"${t.gpu_usd:,.2f}"])
    out = table(["target", "state", "reason", "tokens in/out (p50-p90)", "api usd", "online / batch usd", "gpu-h",
                 "gpu usd (info)"], rows)
    if t.usd_online or t.usd_batch:
        out += ("\napi usd: what the run pays, each role at its mode (models.<role>.mode: online, batch, or auto: "
                "batch when budget.deadline_hours >= 24); online / batch: the same calls at either rate.")
    if unknown:
        out += ("\n? price unknown: no price table has this model; it is estimated and budgeted at the table's "
                "default rate. Set models.<role>.price (or prices:) for a real figure.")
    return out + "\n" + budget_line(plan)


def _online_batch(e) -> str:
    """The same calls' API dollars online and through the batch API, when either is priced."""
    if not (e.usd_online or e.usd_batch):
        return ""
    return f"${e.usd_online:,.2f} / ${e.usd_batch:,.2f}"


def plan_summary(plan) -> str:
    """The plan in two lines, for the live view (one where nothing is paid for and nothing
    capped): `charbuild plan` has the table."""
    t = plan.total
    unknown = "?" if any(r.estimate.price_unknown and r.estimate.usd for r in plan.to_build) else ""
    head = (f"plan: {len(plan.to_build)} to build, {len(plan.rows) - len(plan.to_build)} cached; "
            f"{_si(t.tokens_in)}/{_si(t.tokens_out)} tokens, API ${t.usd:,.2f}{unknown}, {t.gpu_hours:.2f} GPU-h")
    free = plan.max_usd is None and plan.max_tokens is None and not t.usd and not unknown and plan.to_build
    return head if free else head + "\n" + budget_line(plan)


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
