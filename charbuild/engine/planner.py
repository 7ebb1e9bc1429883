"""Plans: for each target, cached or build, why, and what building it costs.

`make_plan` is pure given the graph and the cache's answers. `fast_null_plan` is the
shortcut that makes a null `plan` cheap: it trusts a memo of the last full plan of the
same spec bytes (as DVC trusts a digest while size and mtime are unchanged), re-checks
the files it depended on and that every target is still in the cache, and never
imports pydantic, torch or the stages.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from typing import TYPE_CHECKING

from charbuild.store.atomic import write_json_atomic
from charbuild.store.objects import Cache
from charbuild.contract import Estimate, EstimateContext

if TYPE_CHECKING:  # the null plan must not import pydantic or the stages
    from charbuild.contract import Services
    from charbuild.engine.graph import Graph

PLAN_MEMO_SCHEMA = 1


@dataclass
class PlanRow:
    name: str
    key: str
    stage: str
    state: str  # cached | build
    reason: str
    estimate: Estimate = field(default_factory=Estimate)
    may_cut_off: bool = False
    calls: dict | None = None  # {"cached": n, "new": m} for a stale shard whose inputs are built

    def to_json(self) -> dict:
        e = self.estimate
        return {"name": self.name, "key": self.key, "stage": self.stage, "state": self.state, "reason": self.reason,
                "est_tokens": {"in": e.tokens_in, "out": e.tokens_out, "out_p50": e.tokens_out_p50,
                               "out_p90": e.tokens_out_p90},
                "est_usd": round(e.usd, 4), "est_usd_p90": round(e.usd_p90, 4),
                "est_gpu_hours": round(e.gpu_hours, 4), "calibrated": e.calibrated, "may_cut_off": self.may_cut_off,
                "calls": self.calls, "est_gpu_usd": round(e.gpu_usd, 4), "est_api_tokens": e.api_tokens,
                "est_price_unknown": e.price_unknown, "est_usd_online": round(e.usd_online, 4),
                "est_usd_batch": round(e.usd_batch, 4), "batch": e.batch}


@dataclass
class Plan:
    spec_name: str
    run_name: str
    rows: list[PlanRow]
    fast: bool = False
    max_usd: float | None = None  # the spec's budget: caps on API dollars and API tokens
    max_tokens: int | None = None

    @property
    def total(self) -> Estimate:
        t = Estimate(calibrated=True)
        for r in self.rows:
            if r.state == "build":
                t = t + r.estimate
        return t

    @property
    def to_build(self) -> list[PlanRow]:
        return [r for r in self.rows if r.state == "build"]

    @property
    def over_budget(self) -> list[str]:
        """The verdict: why `run` would refuse to start (empty: the estimate fits). Estimated
        API dollars against budget.max_usd and API tokens against budget.max_tokens; GPU
        time counts against neither (see charbuild.ledger)."""
        from charbuild.ledger import over_budget

        t = self.total
        return over_budget(t.usd, t.api_tokens, self.max_usd, self.max_tokens)

    def to_json(self) -> dict:
        t = self.total
        over = self.over_budget
        return {"spec": self.spec_name, "run": self.run_name, "targets": [r.to_json() for r in self.rows],
                "total": {"targets": len(self.rows), "build": len(self.to_build), "cached": len(self.rows) - len(self.to_build),
                          "est_tokens": {"in": t.tokens_in, "out": t.tokens_out, "out_p50": t.tokens_out_p50,
                                         "out_p90": t.tokens_out_p90},
                          "est_usd": round(t.usd, 4), "est_usd_p90": round(t.usd_p90, 4),
                          "est_gpu_hours": round(t.gpu_hours, 4), "est_gpu_usd": round(t.gpu_usd, 4),
                          "est_api_tokens": t.api_tokens, "est_price_unknown": t.price_unknown,
                          "est_usd_online": round(t.usd_online, 4), "est_usd_batch": round(t.usd_batch, 4)},
                "budget": {"max_usd": self.max_usd, "max_tokens": self.max_tokens, "within": not over, "over": over}}


def make_plan(loaded, graph: "Graph", cache: Cache, targets: list[str] | None = None,
              services: "Services | None" = None) -> Plan:
    """Every target: cached or build, why, and its estimate. `services` (from the layer
    above) gives the stages what their estimates need; without it they estimate bare."""
    from charbuild.engine.staleness import why_stale

    names = graph.upstream(targets) if targets else list(graph.nodes)
    contexts: dict[int, EstimateContext] = {}

    def ectx_for(spec_of_node) -> EstimateContext:  # sub-builds estimate with their own counts
        ld = spec_of_node or loaded
        if id(ld) not in contexts:
            contexts[id(ld)] = services.estimate_context(ld) if services is not None else EstimateContext(ld)
        return contexts[id(ld)]

    rows = []
    prefetch = getattr(cache, "prefetch", None)
    if prefetch is not None:  # a cache on a store: one concurrent look-up, not one per target
        prefetch([graph[n].key for n in names])
    for name in names:
        node = graph[name]
        if cache.has(node.key):
            rows.append(PlanRow(name, node.key, node.stage.name, "cached", "cached"))
            continue
        previous = cache.last_build(loaded.spec.name, name)
        reason = str(why_stale(node, previous))
        failed = cache.index.get(("failed", node.key))
        if failed:
            reason = f"FAILED last run: {failed['error'].splitlines()[0][:120]}"
        stale_input = any(not cache.has(graph[i].key) for ins in node.defn.inputs.values() for i in ins)
        # An input will be rebuilt first; if it comes out identical to what this target was
        # built from before, the earlier build is kept. With no earlier build there is
        # nothing to keep: the target is simply new.
        may = stale_input and previous is not None
        est = node.stage.estimate(node.defn, ectx_for(node.defn.spec))
        calls = None
        if not stale_input:
            counted = count_calls(node, graph, node.defn.spec or loaded, cache, services, est)
            if counted is not None:
                est, calls = counted
        rows.append(PlanRow(name, node.key, node.stage.name, "build", reason, est, may, calls))
    b = loaded.spec.budget
    return Plan(loaded.spec.name, loaded.spec.run_name, rows, max_usd=b.max_usd, max_tokens=b.max_tokens)


def count_calls(node, graph, loaded, cache: Cache, services, est: Estimate) -> tuple[Estimate, dict] | None:
    """Ask the stage how many of a stale target's calls are already answered (its inputs
    are all built): the stage renders them exactly as `run` will send them."""
    from charbuild.contract import BuildContext

    inputs = {slot: [cache.path(graph[n].key) for n in names] for slot, names in node.defn.inputs.items()}
    ctx = BuildContext(node.defn, node.key, loaded, cache.root, inputs, services, None, False)
    return node.stage.count_calls(ctx, est)


# -- the memo behind a fast null plan -----------------------------------------------------

def _source_stamp() -> str:
    """Changes whenever charbuild's own code or data changes (stage versions live there)."""
    root = Path(__file__).resolve().parent.parent  # the whole charbuild package
    h = xxhash.xxh3_64()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith((".py", ".yaml", ".jsonl")):
                st = os.stat(os.path.join(dirpath, f))
                h.update(f"{dirpath}/{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def memo_id(spec_path: str | Path, sets: list[str], scale: float | None, targets: list[str] | None) -> str:
    p = Path(spec_path).resolve()
    return xxhash.xxh3_128_hexdigest(json.dumps([str(p), list(sets), scale, targets or [], _source_stamp()]).encode())


def _file_state(path: str) -> str | None:
    """The digest of a file a plan read; None when it is gone or no longer a regular file
    (a FIFO in its place must not block a null plan: the full plan then says what is wrong)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            return xxhash.xxh3_128_hexdigest(f.read())
    except OSError:
        return None


def save_memo(cache: Cache, mid: str, loaded, plan: Plan, extra_files: list[Path]) -> None:
    files = sorted({str(Path(f).resolve()) for f in [*loaded.files, loaded.constitution_path, *extra_files]})
    memo = {"schema": PLAN_MEMO_SCHEMA, "spec": plan.spec_name, "run": plan.run_name,
            "deps": {f: _file_state(f) for f in files},
            "rows": [[r.name, r.key, r.stage] for r in plan.rows]}
    write_json_atomic(cache.root / "plans" / f"{mid}.json", memo)


def fast_null_plan(cache: Cache, mid: str) -> Plan | None:
    """The plan when nothing changed and everything is cached; None means: do a full plan."""
    try:
        with open(cache.root / "plans" / f"{mid}.json", encoding="utf-8") as f:
            memo = json.load(f)
    except (OSError, ValueError):
        return None
    if memo.get("schema") != PLAN_MEMO_SCHEMA:
        return None
    for path, state in memo["deps"].items():
        if _file_state(path) != state:
            return None
    rows = []
    for name, key, stage in memo["rows"]:
        if not cache.has(key):
            return None
        rows.append(PlanRow(name, key, stage, "cached", "cached"))
    return Plan(memo["spec"], memo["run"], rows, fast=True)
