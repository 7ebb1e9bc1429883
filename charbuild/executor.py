"""Running a plan: build what is stale, in dependency order, shard by shard.

The scheduler here knows targets and keys, not DPO. Execution goes through an
`Executor` (submit a task, get a future), so a Ray executor can replace the local one;
each task needs only the cache root and the target, the cache being the shared state.
"""

from __future__ import annotations

import concurrent.futures as cf
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from . import __version__
from .cache import Cache, write_json_atomic
from .graph import Graph, Node
from .planner import Plan
from .stages.base import BuildContext
from .staleness import build_record


class BuildError(Exception):
    pass


class BudgetExceeded(BuildError):
    pass


def _stops_the_build(exc: BaseException) -> bool:
    """A budget cap or Ctrl-C ends the whole run at a call boundary; other errors fail one target."""
    from .governor import BudgetExceeded as CallBudgetExceeded

    return isinstance(exc, (KeyboardInterrupt, BudgetExceeded, CallBudgetExceeded))


class Executor(Protocol):
    def submit(self, fn: Callable, *args) -> cf.Future: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """Threads in this process: enough for API-bound shards. With one job, tasks run in
    the calling thread (torch's CPU thread pools are fastest from the main thread)."""

    def __init__(self, jobs: int = 1):
        self._pool = cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="charbuild") if jobs > 1 else None

    def submit(self, fn: Callable, *args) -> cf.Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # Ctrl-C included: the scheduler re-raises it
            fut.set_exception(exc)
        return fut

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Spend:
    """Actual usage as it happens; stops the build when the budget is crossed."""

    prices: object
    max_usd: float | None = None
    max_tokens: int | None = None
    usd: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    calls: int = 0
    outs: list = field(default_factory=list)

    def add_usage(self, m, tokens_in: int, tokens_out: int) -> None:
        self.outs.append(tokens_out)  # per-call lengths: the distribution plans quote p50-p90 from
        self.calls += 1
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        if m.backend == "openai":
            p = self.prices.price(m)
            self.usd += (tokens_in * p["input"] + tokens_out * p["output"]) / 1e6
        if self.max_usd is not None and self.usd > self.max_usd:
            raise BudgetExceeded(f"spent ${self.usd:.2f}, over budget.max_usd ${self.max_usd:.2f}; finished targets are kept, "
                                 f"raise the budget and run again to continue")
        if self.max_tokens is not None and self.tokens_in + self.tokens_out > self.max_tokens:
            raise BudgetExceeded(f"used {self.tokens_in + self.tokens_out} tokens, over budget.max_tokens {self.max_tokens}")

    def snapshot(self) -> dict:
        return {"usd": self.usd, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "calls": self.calls}


@dataclass
class BuildReport:
    built: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    cut_off: list[str] = field(default_factory=list)  # stale by key, kept because inputs' content was unchanged
    rebuilt_corrupt: list[str] = field(default_factory=list)
    waited: list[str] = field(default_factory=list)  # built by another run while we waited
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    spend: dict = field(default_factory=dict)
    seconds: float = 0.0
    outputs: Path | None = None


def library_versions() -> dict:
    out = {"charbuild": __version__, "python": platform.python_version()}
    for mod in ("torch", "transformers", "trl", "peft", "pydantic", "vllm"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def build_one(node: Node, graph: Graph, loaded, cache: Cache, backends, spend: Spend, progress: bool,
              log: Callable[[str], None], force_gates: tuple[str, ...] = (), estimate: dict | None = None,
              call_cache=None) -> str:
    """Build one target if needed; returns cached | built | waited | rebuilt-corrupt."""
    state = "built"
    if cache.has(node.key):
        problems = cache.verify(node.key)
        if not problems:
            return "cached"
        moved = cache.quarantine(node.key)
        log(f"! {node.name}: cached object is corrupt ({'; '.join(problems[:3])}); moved to {moved}, rebuilding")
        state = "rebuilt-corrupt"
    with cache.lock(node.key):
        if cache.has(node.key) and not cache.verify(node.key):
            return "waited"  # another run built it while we waited for the lock
        inputs = {slot: [cache.path(graph[n].key) for n in names] for slot, names in node.defn.inputs.items()}
        for slot, paths in inputs.items():
            for p, n in zip(paths, node.defn.inputs[slot]):
                problems = cache.verify(graph[n].key)
                if problems:
                    raise BuildError(f"{node.name}: input {n} is corrupt ({'; '.join(problems[:2])}); run again to rebuild it")
        ckey = cutoff_key(node, graph, cache)
        same = cache.index.get(("cutoff", ckey)) if ckey else None
        if same and same != node.key and cache.has(same) and not cache.verify(same):
            # Early cutoff: the inputs' content is what an existing build consumed, so its
            # output is ours: point at it instead of rebuilding.
            cache.alias(node.key, cache.resolve(same))
            cache.record_build(loaded.spec.name, node.name, build_record(node))
            cache.index.set(("kept-by-cutoff", node.key), {"from": same, "target": node.name})
            return "cut-off"
        t0 = time.time()
        before = spend.snapshot()
        first_out = len(spend.outs)
        with cache.staging(node.key) as out_dir:
            ctx = BuildContext(node.defn, node.key, node.defn.spec or loaded, out_dir, inputs, backends, spend, progress,
                               force_gates, call_cache)
            result = node.stage.run(ctx) or {}
            if result.get("warning"):
                log(f"! {node.name}: {result['warning']}")
            after = spend.snapshot()
            usage = {k: after[k] - before[k] for k in after}
            manifest = {
                "target": node.name, "stage": node.stage.name, "stage_version": node.stage.version,
                "spec": loaded.spec.name, "fields": node.defn.fields, "params": node.defn.params,
                "inputs": {slot: [{"target": n, "key": graph[n].key} for n in names] for slot, names in node.defn.inputs.items()},
                "result": result, "usage": usage, "estimate": estimate or {}, "seconds": round(time.time() - t0, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "versions": library_versions(),
            }
            cache.commit(node.key, out_dir, manifest)
        cache.record_build(loaded.spec.name, node.name, build_record(node))
        cache.index.delete(("failed", node.key))
        if ckey:
            cache.index.set(("cutoff", ckey), node.key)
        _calibrate(cache, node, loaded, usage, spend.outs[first_out:])
    return state


def cutoff_key(node: Node, graph: Graph, cache: Cache) -> str | None:
    """The node's key with its inputs' *content* digests in place of their keys (Bazel's
    early cutoff): equal when an upstream rebuild produced byte-identical files."""
    from .keys import digest

    contents = {}
    for slot, names in sorted(node.defn.inputs.items()):
        contents[slot] = []
        for n in names:
            m = cache.manifest(graph[n].key)
            if not m or "content_digest" not in m:
                return None
            contents[slot].append(m["content_digest"])
    return digest("Cutoff", node.stage.name, node.stage.version, node.defn.fields, node.defn.params, contents)


def _calibrate(cache: Cache, node: Node, loaded, usage: dict, outs: list[int]) -> None:
    from .cost import Calibration

    models = [k.split(".", 1)[1] for k in node.defn.fields if k.startswith("models.")]
    if usage.get("calls") and models:
        m = loaded.spec.models[models[0]]
        Calibration.record(cache, node.stage.name, m.model, usage["calls"], usage["tokens_in"], usage["tokens_out"], outs)


def run_build(loaded, graph: Graph, plan: Plan, cache: Cache, executor: Executor | None = None,
              keep_going: bool = False, progress: bool = True, log: Callable[[str], None] = print,
              outputs_root: Path | None = Path("outputs"), force_gates: tuple[str, ...] = ()) -> BuildReport:
    from .backends.pool import BackendPool, missing_keys
    from .callcache import CallCache
    from .cost import PriceTable

    spec = loaded.spec
    report = BuildReport()
    t0 = time.time()
    todo = [r.name for r in plan.rows]
    roles = {k.split(".", 1)[1] for r in plan.to_build for k in graph[r.name].defn.fields if k.startswith("models.")}
    missing = missing_keys({r: spec.models[r] for r in roles if r in spec.models})
    if missing:
        raise BuildError("missing API keys, nothing was started:\n  " + "\n  ".join(missing))
    total = plan.total
    if spec.budget.max_usd is not None and total.usd > spec.budget.max_usd:
        raise BudgetExceeded(f"the plan is estimated at ${total.usd:,.2f}, over budget.max_usd ${spec.budget.max_usd:,.2f}; "
                             f"nothing was started (see `charbuild plan`)")
    prices = PriceTable.load(spec)
    spend = Spend(prices, spec.budget.max_usd, spec.budget.max_tokens)
    backends = BackendPool(_call_budget(spec, prices))
    call_cache = CallCache(cache.root)
    own = executor is None
    executor = executor or LocalExecutor(1)
    estimates = {r.name: r.estimate.to_dict() for r in plan.rows}
    done: set[str] = set()
    failed: set[str] = set()
    pending: dict[cf.Future, str] = {}
    remaining = list(todo)
    try:
        while remaining or pending:
            for name in list(remaining):
                deps = {i for ins in graph[name].defn.inputs.values() for i in ins} | set(graph[name].defn.after)
                if deps & failed:
                    remaining.remove(name)
                    failed.add(name)
                    report.skipped.append(name)
                elif deps <= done:
                    remaining.remove(name)
                    fut = executor.submit(build_one, graph[name], graph, loaded, cache, backends, spend, progress, log,
                                          tuple(force_gates), estimates.get(name), call_cache)
                    pending[fut] = name
                    if fut.done() and fut.exception() is not None:
                        break  # an inline executor failed: handle it before starting more
            if not pending:
                break
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                name = pending.pop(fut)
                try:
                    state = fut.result()
                except BaseException as exc:
                    if _stops_the_build(exc) or not isinstance(exc, Exception):
                        raise
                    # a failed target stops its dependents, not the report
                    report.failed[name] = f"{type(exc).__name__}: {exc}"
                    # Remembered so `plan` shows it until the target builds.
                    cache.index.set(("failed", graph[name].key), {"error": report.failed[name][:2000], "time": time.time()})
                    failed.add(name)
                    log(f"✗ {name}: {type(exc).__name__}: {exc}")
                    if not keep_going:
                        report.skipped += remaining
                        remaining.clear()
                        for other, oname in list(pending.items()):
                            if other.cancel():  # queued, not started: skip it too
                                del pending[other]
                                report.skipped.append(oname)
                    continue
                done.add(name)
                {"cached": report.cached, "built": report.built, "waited": report.waited,
                 "rebuilt-corrupt": report.rebuilt_corrupt, "cut-off": report.cut_off}[state].append(name)
                if state != "cached":
                    log(f"✓ {name} ({state})")
    finally:
        for fut in pending:
            fut.cancel()
        if own:
            executor.shutdown()
        backends.close()
        report.spend = spend.snapshot()
        report.seconds = time.time() - t0
    if not report.failed and outputs_root is not None:
        report.outputs = publish_outputs(loaded, graph, cache, [r.name for r in plan.rows], outputs_root)
    return report


def _call_budget(spec, prices):
    """The run's cap, reserved call by call before each API request (governor.Budget)."""
    if spec.budget.max_usd is None and spec.budget.max_tokens is None:
        return None
    from .governor import Budget

    table = {m.model: prices.price(m) for m in spec.models.values() if m.backend == "openai"}
    return Budget(spec.budget.max_usd, spec.budget.max_tokens, table)


FINAL = {"dpo-pairs": "dpo_pairs.jsonl", "sft-data": "sft_data.jsonl", "dpo-adapter": "adapter", "sft-adapter": "adapter",
         "report": "."}


def publish_outputs(loaded, graph: Graph, cache: Cache, names: list[str], root: Path = Path("outputs")) -> Path:
    """outputs/<run>/: the final artifacts (copied) and provenance: which key made each."""
    out = root / loaded.spec.run_name
    out.mkdir(parents=True, exist_ok=True)
    for name, rel in FINAL.items():
        if name in names and name in graph.nodes:
            src = cache.path(graph[name].key) / rel
            dst = out / f"{name}{'' if src.is_dir() else Path(rel).suffix}"
            if rel == ".":  # the report's files go to the top of outputs/<run>/
                for f in src.iterdir():
                    if f.is_file() and f.name != "MANIFEST.json":
                        shutil.copy2(f, out / f.name)
            elif src.is_dir():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
            elif src.exists():
                shutil.copy2(src, dst)
    prov = {"spec": loaded.spec.name, "run": loaded.spec.run_name, "spec_files": [str(f) for f in loaded.files],
            "constitution": str(loaded.constitution_path), "charbuild": __version__,
            "targets": {n: {"key": graph[n].key, "stage": graph[n].stage.name, "version": graph[n].stage.version}
                        for n in names}}
    write_json_atomic(out / "provenance.json", prov)
    return out
