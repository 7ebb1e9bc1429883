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
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from typing import TYPE_CHECKING

from .cache import Cache, write_json_atomic
from .estimate import Estimate

if TYPE_CHECKING:  # the null plan must not import pydantic or the stages
    from .graph import Graph
    from .stages.base import EstimateContext

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
                "calls": self.calls}


@dataclass
class Plan:
    spec_name: str
    run_name: str
    rows: list[PlanRow]
    fast: bool = False

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

    def to_json(self) -> dict:
        t = self.total
        return {"spec": self.spec_name, "run": self.run_name, "targets": [r.to_json() for r in self.rows],
                "total": {"targets": len(self.rows), "build": len(self.to_build), "cached": len(self.rows) - len(self.to_build),
                          "est_tokens": {"in": t.tokens_in, "out": t.tokens_out, "out_p50": t.tokens_out_p50,
                                         "out_p90": t.tokens_out_p90},
                          "est_usd": round(t.usd, 4), "est_usd_p90": round(t.usd_p90, 4),
                          "est_gpu_hours": round(t.gpu_hours, 4)}}


def estimate_context(loaded, cache: Cache) -> "EstimateContext":
    from .constitution import load_constitution
    from .cost import Calibration, PriceTable, approx_tokens
    from .stages.base import EstimateContext

    c = load_constitution(loaded.constitution_path)
    return EstimateContext(loaded, PriceTable.load(loaded.spec), Calibration.from_cache(cache), approx_tokens(c.system_prompt()))


def make_plan(loaded, graph: "Graph", cache: Cache, targets: list[str] | None = None) -> Plan:
    from .staleness import why_stale

    names = graph.upstream(targets) if targets else list(graph.nodes)
    contexts: dict[int, "EstimateContext"] = {}

    def ectx_for(spec_of_node) -> "EstimateContext":  # sub-builds estimate with their own counts
        ld = spec_of_node or loaded
        if id(ld) not in contexts:
            contexts[id(ld)] = estimate_context(ld, cache)
        return contexts[id(ld)]

    rows = []
    for name in names:
        node = graph[name]
        if cache.has(node.key):
            rows.append(PlanRow(name, node.key, node.stage.name, "cached", "cached"))
            continue
        reason = str(why_stale(node, cache.last_build(loaded.spec.name, name)))
        failed = cache.index.get(("failed", node.key))
        if failed:
            reason = f"FAILED last run: {failed['error'].splitlines()[0][:120]}"
        # An input will be rebuilt first; if it comes out identical, this one is kept.
        may = any(not cache.has(graph[i].key) for ins in node.defn.inputs.values() for i in ins)
        est = node.stage.estimate(node.defn, ectx_for(node.defn.spec))
        calls = None if may else count_calls(node, graph, node.defn.spec or loaded, cache)
        if calls:
            if calls["cached"]:  # only the new calls cost anything
                est = est.scaled(calls["new"] / max(1, calls["cached"] + calls["new"]))
            # The prompts are known: count their tokens instead of expecting them.
            m = calls.pop("model")
            if m.backend == "openai":
                delta = (calls["tokens_in_new"] - est.tokens_in) * ectx_for(node.defn.spec).prices.price(m)["input"] / 1e6
                est.usd += delta
                est.usd_p90 += delta
            est.tokens_in = calls["tokens_in_new"]
        rows.append(PlanRow(name, node.key, node.stage.name, "build", reason, est, may, calls))
    return Plan(loaded.spec.name, loaded.spec.run_name, rows)


def count_calls(node, graph, loaded, cache: Cache) -> dict | None:
    """How many of a stale shard's generation calls are already in the call cache.

    Only for stages that can list their calls (`planned_calls`) and whose inputs are all
    built: the calls are rendered exactly as `run` will send them and looked up by key."""
    planned = getattr(node.stage, "planned_calls", None)
    if planned is None:
        return None
    from .callcache import CallCache, call_identity, call_key, occurrence_indices
    from .stages.base import BuildContext

    inputs = {slot: [cache.path(graph[n].key) for n in names] for slot, names in node.defn.inputs.items()}
    ctx = BuildContext(node.defn, node.key, loaded, cache.root, inputs, None, None, False)
    try:
        role, m, reqs = planned(ctx)
    except (OSError, ValueError, KeyError):
        return None  # an input is unreadable: `run` will say so
    from .cost import prompt_tokens

    calls = CallCache(cache.root)
    ident = call_identity(ctx, role, m)
    new = [r for r, i in zip(reqs, occurrence_indices(reqs)) if not calls.has(call_key(*ident, r, i))]
    slot = f"model:{role}"
    model_dir = Path(ctx.input(slot)) if slot in inputs else Path(m.model)
    tokens, exact = prompt_tokens(new, model_dir / "tokenizer.json")
    return {"cached": len(reqs) - len(new), "new": len(new), "tokens_in_new": tokens, "tokens_exact": exact,
            "model": m}


# -- the memo behind a fast null plan -----------------------------------------------------

def _source_stamp() -> str:
    """Changes whenever charbuild's own code or data changes (stage versions live there)."""
    root = Path(__file__).parent
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
    try:
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


def render_table(plan: Plan) -> str:
    from .report_text import table

    rows = []
    for r in plan.rows:
        e = r.estimate
        stale = r.state != "cached"
        out = (f"{_si(e.tokens_out_p50)}-{_si(e.tokens_out_p90)}" if e.calibrated and e.tokens_out_p90 > e.tokens_out_p50
               else _si(e.tokens_out))
        tok = f"{_si(e.tokens_in)}/{out}" if stale and (e.tokens_in or e.tokens_out) else ""
        usd = f"${e.usd:,.2f}" if stale and e.usd else ""
        gpu = f"{e.gpu_hours:.2f}" if stale and e.gpu_hours else ""
        reason = r.reason + (f" ({r.calls['cached']} of {r.calls['cached'] + r.calls['new']} calls cached)"
                             if r.calls and r.calls["cached"] else "")
        rows.append([r.name, "build (may cut off)" if r.may_cut_off else r.state, reason, tok, usd, gpu])
    t = plan.total
    rows.append(["TOTAL", f"{len(plan.to_build)} to build", f"{len(plan.rows) - len(plan.to_build)} cached",
                 f"{_si(t.tokens_in)}/{_si(t.tokens_out)}", f"${t.usd:,.2f}", f"{t.gpu_hours:.2f}"])
    return table(["target", "state", "reason", "tokens in/out (p50-p90)", "usd", "gpu-h"], rows)


def _si(n: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))
