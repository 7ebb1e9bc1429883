"""Running a plan: build what is stale, in dependency order, shard by shard.

The scheduler here knows targets and keys, not DPO. Execution goes through an
`Executor` (submit a task, get a future). The local one runs `build_one` in this process;
a remote one (charbuild.engine.ray_executor) runs each target in another process, maybe
on another machine, and gets `RemoteBuild` tasks instead: everything they carry is
picklable (the spec, the graph, the cache's root, a *factory* of the services, the run's
shared ledger), and each worker opens the cache and makes the services itself.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from charbuild import __version__
from charbuild.store.atomic import write_json_atomic
from charbuild.store.objects import Cache
from charbuild.engine.console import Console
from charbuild.engine.graph import Graph, Node
from charbuild.engine.keys import cutoff_key
from charbuild.engine.planner import Plan
from charbuild.contract import BuildContext, Services, Shared, SpecView
from charbuild.engine.staleness import build_record
from charbuild.ledger import BudgetExceeded, Ledger, over_budget

__all__ = ["BudgetExceeded", "BuildError", "BuildReport", "Executor", "LocalExecutor", "RemoteBuild",
           "RemoteExecutor", "run_build"]


class BuildError(Exception):
    pass


def _stops_the_build(exc: BaseException) -> bool:
    """A budget cap or Ctrl-C ends the whole run at a call boundary; other errors fail one target."""
    return isinstance(exc, (KeyboardInterrupt, BudgetExceeded))


class Executor(Protocol):
    def submit(self, fn: Callable, *args) -> cf.Future: ...

    def shutdown(self) -> None: ...


class RemoteExecutor(Executor, Protocol):
    """An executor whose tasks run in other processes (Ray workers). The engine submits it
    `RemoteBuild` tasks, and keeps the run's ledger (and what the backends share: rate
    limits) in the state `shared` makes, once per run, where every worker reaches it."""

    def shared(self, max_usd: float | None, max_tokens: int | None) -> Shared:
        """The run's shared state (contract.Shared), its ledger capped at `budget:`."""
        ...

    def interrupt(self, now: bool = False) -> None:
        """Ctrl-C: the running tasks are told, as `RemoteBuild.interrupt` (`now`: Ctrl-C again,
        their calls in flight are dropped)."""
        ...

    # What the executor decides by itself while a run goes (a straggler retried): the run
    # sets it to its console's `line`, None once it ends.
    say: Callable[[str], None] | None


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
class BuildReport:
    built: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    cut_off: list[str] = field(default_factory=list)  # stale by key, kept because inputs' content was unchanged
    rebuilt_corrupt: list[str] = field(default_factory=list)
    waited: list[str] = field(default_factory=list)  # built by another run while we waited
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    spend: dict = field(default_factory=dict)  # the run's ledger: Ledger.snapshot()
    workers: dict[str, dict] = field(default_factory=dict)  # target -> the worker that built it (remote executors)
    seconds: float = 0.0
    outputs: Path | None = None


def library_versions(services=None) -> dict:
    out = {"charbuild": __version__, "python": platform.python_version()}
    if services is not None:
        out.update(services.versions())
    return out


def build_one(node: Node, graph: Graph, loaded, cache: Cache, services, ledger: Ledger, progress: bool,
              console: Console, force_gates: tuple[str, ...] = (), estimate: dict | None = None) -> str:
    """Build one target if needed; returns cached | built | waited | rebuilt-corrupt."""
    log = console.line
    state = "built"
    if cache.has(node.key):
        problems = cache.verify(node.key)
        if not problems:
            return "cached"
        moved = cache.quarantine(node.key)
        log(f"! {node.name}: cached object {_damage(problems, 3)}" + (f"; moved to {moved}" if moved else "") + ", rebuilding")
        state = "rebuilt-corrupt"
    with cache.lock(node.key):
        if cache.has(node.key) and not cache.verify(node.key):
            return "waited"  # another run built it while we waited for the lock
        inputs = {slot: [cache.path(graph[n].key) for n in names] for slot, names in node.defn.inputs.items()}
        for slot, paths in inputs.items():
            for p, n in zip(paths, node.defn.inputs[slot]):
                problems = cache.verify(graph[n].key)
                if problems:
                    raise BuildError(f"{node.name}: input {n} {_damage(problems)}; run again to rebuild it")
        ckey = content_cutoff_key(node, graph, cache)
        same = cache.index.get(("cutoff", ckey)) if ckey else None
        if same and same != node.key and cache.has(same) and not cache.verify(same):
            # Early cutoff: the inputs' content is what an existing build consumed, so its
            # output is ours: point at it instead of rebuilding.
            cache.alias(node.key, cache.resolve(same))
            cache.record_build(loaded.spec.name, node.name, build_record(node))
            cache.index.set(("kept-by-cutoff", node.key), {"from": same, "target": node.name})
            return "cut-off"
        t0 = time.time()
        account = ledger.account()  # this target's usage, exact when targets build concurrently
        with console.target(node.name, cache.log_path(node.key, node.name)), cache.staging(node.key) as out_dir:
            ctx = BuildContext(node.defn, node.key, node.defn.spec or loaded, out_dir, inputs, services, account,
                               progress, force_gates)
            result = node.stage.run(ctx) or {}
            if result.get("warning"):
                log(f"! {node.name}: {result['warning']}")
            usage = account.snapshot()
            manifest = {
                "target": node.name, "stage": node.stage.name, "stage_version": node.stage.version,
                "spec": loaded.spec.name, "fields": node.defn.fields, "params": node.defn.params,
                "inputs": {slot: [{"target": n, "key": graph[n].key} for n in names] for slot, names in node.defn.inputs.items()},
                "result": result, "touched": list(ctx.touched), "usage": usage, "estimate": estimate or {}, "seconds": round(time.time() - t0, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "versions": library_versions(services),
                "worker": worker_identity(),
            }
            cache.commit(node.key, out_dir, manifest)
        cache.record_build(loaded.spec.name, node.name, build_record(node))
        cache.index.delete(("failed", node.key))
        if ckey:
            cache.index.set(("cutoff", ckey), node.key)
    return state


def target_resources(node: Node, loaded) -> dict:
    """What `node`'s stage asks of a cluster to build it (contract.Stage.resources), read
    from the spec the target belongs to (a sub-build's own, or the run's)."""
    view = SpecView(node.defn.spec or loaded, node.stage.reads, node.stage.name, "resources")
    return dict(node.stage.resources(node.defn, view))


_WORKER: dict = {}  # what a remote executor says of this worker process (its node id)


def note_worker(**info) -> None:
    """A remote executor's task wrapper names the worker this process is (e.g. its node)."""
    _WORKER.update(info)


def worker_identity() -> dict:
    """Which worker built a target, for its manifest: host and process, plus what the
    executor noted (a Ray node id)."""
    return {"host": platform.node(), "pid": os.getpid(), **_WORKER}


# run id -> (cache, services) of this worker process: opened on a run's first target here,
# kept for its next ones (backends hold loaded models and open connections).
_RUNS: dict[str, tuple] = {}
_STOPPED: set[str] = set()  # runs whose services here were told to stop (RemoteBuild.interrupt)
_AT_EXIT: list = []


def _close_runs(keep: str | None = None) -> None:
    for run_id in [r for r in _RUNS if r != keep]:
        cache, services = _RUNS.pop(run_id)
        try:
            if services is not None:
                services.close()
        finally:
            cache.close()


class RemoteBuild:
    """One run's targets as tasks for a remote executor. Picklable, and the same object for
    every target of the run (an executor ships it once): the spec, the graph, how to open
    the cache, the services' factory and the run's shared state. Called in a worker as
    `task(name, estimate)`, it builds one target with `build_one` and returns what the
    driver shows: {"state", "lines" (its console lines), "worker"}."""

    def __init__(self, run_id: str, loaded, graph: Graph, cache: Cache, services_factory, shared: Shared,
                 progress: bool, capture: bool, force_gates: tuple[str, ...]):
        self.run_id = run_id
        self.loaded = loaded
        self.graph = graph
        self.cache_type = type(cache)
        # The URL for a cache on a store: a worker elsewhere opens the bucket with its own
        # local working cache, never the driver's directory.
        self.cache_root = getattr(cache, "location", cache.root)
        self.services_factory = services_factory
        self.shared = shared
        self.progress = progress
        self.capture = capture
        self.force_gates = tuple(force_gates)

    def resources(self, name: str, estimate: dict | None = None) -> dict:
        """What the target's stage asks of the cluster (contract.Stage.resources)."""
        return target_resources(self.graph[name], self.loaded)

    def interrupt(self, now: bool = False) -> None:
        """Ctrl-C reached this worker (RemoteExecutor.interrupt): the run's services here are
        told, as the driver's are in a local build."""
        opened = _RUNS.get(self.run_id)
        if opened is not None:
            _STOPPED.add(self.run_id)
            _interrupt(opened[1], now)

    def _open(self) -> tuple:
        if self.run_id in _STOPPED:
            # Stopped services send nothing more, and the run may go on: one target was
            # cancelled (a straggler, retried elsewhere), and the next one here needs its own.
            _STOPPED.discard(self.run_id)
            _close_runs()
        if self.run_id not in _RUNS:
            if not _AT_EXIT:
                import atexit

                atexit.register(_close_runs)  # a worker that exits closes its backends
                _AT_EXIT.append(True)
            _close_runs()  # a worker serves one run at a time: the last one's models go
            cache = self.cache_type(self.cache_root)
            services = self.services_factory(cache, self.shared) if self.services_factory is not None else None
            _RUNS[self.run_id] = (cache, services)
        return _RUNS[self.run_id]

    def __call__(self, name: str, estimate: dict | None) -> dict:
        cache, services = self._open()
        lines: list[str] = []
        console = Console(capture=self.capture, log=lines.append)
        console.start([])
        try:
            state = build_one(self.graph[name], self.graph, self.loaded, cache, services, self.shared.ledger,
                              self.progress, console, self.force_gates, estimate)
        except BaseException as exc:
            exc = _shippable(exc)
            try:
                exc.charbuild_lines = lines  # type: ignore[attr-defined]  # the driver shows them
            except AttributeError:
                pass
            raise exc
        finally:
            console.stop()
            if self.resources(name).get("num_gpus"):
                _close_runs(keep=None)  # the GPU's memory is freed with the model, not kept idle
        return {"state": state, "lines": lines, "worker": worker_identity()}


def _shippable(exc: BaseException) -> BaseException:
    """`exc`, or one the driver can unpickle that reads the same (`Type: message`): an
    exception whose __init__ wants more than its message does not survive pickling."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        base = Exception if isinstance(exc, Exception) else BaseException
        # A class of the same name, made here: pickled by value, so no import is needed there.
        same_name = type(type(exc).__name__, (base,), {"__module__": __name__, "__qualname__": type(exc).__name__})
        return same_name(str(exc))


def _damage(problems: list[str], n: int = 2) -> str:
    """What `verify` found, for the log: an object gc removed is gone, not corrupt."""
    if problems[0].startswith("removed by gc"):
        return f"was {problems[0]}"
    return f"is corrupt ({'; '.join(problems[:n])})"


def content_cutoff_key(node: Node, graph: Graph, cache: Cache) -> str | None:
    """The node's key with its inputs' *content* digests in place of their keys (Bazel's
    early cutoff): equal when an upstream rebuild produced byte-identical files."""
    contents = {}
    for slot, names in sorted(node.defn.inputs.items()):
        contents[slot] = []
        for n in names:
            m = cache.manifest(graph[n].key)
            if not m or "content_digest" not in m:
                return None
            contents[slot].append(m["content_digest"])
    return cutoff_key(node.stage.name, node.stage.version, node.defn.fields, node.defn.params, contents)


def run_build(loaded, graph: Graph, plan: Plan, cache: Cache, executor: Executor | None = None,
              keep_going: bool = False, progress: bool = True, log: Callable[[str], None] = print,
              outputs_root: Path | None = Path("outputs"), force_gates: tuple[str, ...] = (),
              services: Services | None = None, console: Console | None = None) -> BuildReport:
    """Build the plan's stale targets. `services` (made by the layer above) is what the
    stages need from outside the engine; the build closes it when it ends. `console`: what
    people see (default: `log` gets one line per finished target; library output stays
    where it goes). `progress`: stages may draw their own progress bars.

    The run's one `Ledger` is made here from `budget:` and each target gets an account of
    it (`ctx.budget`). The run refuses to start when the plan's estimate of the API calls
    is over a cap (`over_budget`, the verdict `plan` shows); while it runs, the ledger
    stops it at a call boundary (BudgetExceeded). With a `RemoteExecutor` the ledger is the
    run's shared one, wherever its targets build, and a budget stop stops every worker at
    its next call boundary."""
    spec = loaded.spec
    report = BuildReport()
    t0 = time.time()
    todo = [r.name for r in plan.rows]
    if services is not None:
        problems = services.preflight(loaded, [graph[r.name].defn for r in plan.to_build])
        if problems:
            raise BuildError("nothing was started:\n  " + "\n  ".join(problems))
    total = plan.total
    over = over_budget(total.usd, total.api_tokens, spec.budget.max_usd, spec.budget.max_tokens)
    if over:
        raise BudgetExceeded("; ".join(over) + "; nothing was started (see `charbuild plan`)")
    console = console or Console(live=False, capture=False, log=log)
    own = executor is None
    executor = executor or LocalExecutor(1)
    task: RemoteBuild | None = None
    if hasattr(executor, "shared"):
        task = _remote_build(executor, loaded, graph, cache, services, progress, console.capture, force_gates)
        ledger = task.shared.ledger
        if hasattr(executor, "say"):
            executor.say = console.line
    else:
        ledger = Ledger(spec.budget.max_usd, spec.budget.max_tokens)
    console.start(todo, ledger, sum(r.estimate.calls for r in plan.to_build))
    estimates = {r.name: r.estimate.to_dict() for r in plan.rows}
    cache.hold([r.key for r in plan.rows], f"charbuild run of {spec.name}")  # `gc` leaves what this run reads
    done: set[str] = set()
    failed: set[str] = set()
    pending: dict[cf.Future, str] = {}
    remaining = list(todo)
    try:
        cache.sweep_dead_staging()  # what a killed run left: it would otherwise wait for `gc`
    except OSError:
        pass
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
                    if task is not None and cache.has(graph[name].key) and not cache.verify(graph[name].key):
                        # Built and intact: nothing for a worker to do (a run that finds everything
                        # built asks nothing of the cluster).
                        fut = cf.Future()
                        fut.set_result({"state": "cached", "lines": [], "worker": None})
                    elif task is not None:
                        fut = executor.submit(task, name, estimates.get(name))
                        console.started(name)
                    else:
                        fut = executor.submit(build_one, graph[name], graph, loaded, cache, services, ledger, progress,
                                              console, tuple(force_gates), estimates.get(name))
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
                    for line in getattr(exc, "charbuild_lines", ()):  # what a remote worker said first
                        console.line(line)
                    if _stops_the_build(exc) or not isinstance(exc, Exception):
                        if isinstance(exc, BudgetExceeded) and hasattr(ledger, "stop"):
                            ledger.stop(str(exc))  # every other worker stops at its next call
                        raise
                    # a failed target stops its dependents, not the report
                    report.failed[name] = f"{type(exc).__name__}: {exc}"
                    # Remembered so `plan` shows it until the target builds.
                    cache.index.set(("failed", graph[name].key), {"error": report.failed[name][:2000], "time": time.time()})
                    failed.add(name)
                    console.failed(name, f"{type(exc).__name__}: {exc}", cache.log_path(graph[name].key, name))
                    if not keep_going:
                        report.skipped += remaining
                        remaining.clear()
                        for other, oname in list(pending.items()):
                            if other.cancel():  # queued, not started: skip it too
                                del pending[other]
                                report.skipped.append(oname)
                    continue
                if task is not None:
                    for line in state["lines"]:
                        console.line(line)
                    if state["worker"] is not None:
                        report.workers[name] = state["worker"]
                    state = state["state"]
                done.add(name)
                {"cached": report.cached, "built": report.built, "waited": report.waited,
                 "rebuilt-corrupt": report.rebuilt_corrupt, "cut-off": report.cut_off}[state].append(name)
                console.finished(name, state)
    except KeyboardInterrupt:
        # Ctrl-C reaches this (the main) thread only: the targets running in workers are told
        # so their calls end soon, keeping every answer that arrives.
        _interrupt(services, executor=executor)
        raise
    finally:
        for fut in pending:
            fut.cancel()
        # Targets still running end before the services close under them (a call waiting on a
        # closed backend would wait forever): each stores its answers and removes its staging.
        pressed_again = _wait_for_running(list(pending), services, executor)
        if task is not None and hasattr(executor, "say"):
            executor.say = None
        if own:
            executor.shutdown()
        if services is not None:
            services.close()
        console.stop()
        try:
            report.spend = ledger.snapshot()
        except Exception:  # a remote ledger that is gone: the run's outcome matters more than its total
            report.spend = {}
        if task is not None and hasattr(task.shared, "close"):
            task.shared.close()
        _record_run_spend(cache, spec.name, report.spend)
        report.seconds = time.time() - t0
        if pressed_again:
            raise KeyboardInterrupt
    if not report.failed and outputs_root is not None:
        report.outputs = publish_outputs(loaded, graph, cache, [r.name for r in plan.rows], outputs_root)
    return report


def _remote_build(executor: RemoteExecutor, loaded, graph: Graph, cache: Cache, services, progress: bool,
                  capture: bool, force_gates) -> RemoteBuild:
    """The run as tasks for a remote executor: its shared state made there, and the services
    as a factory each worker calls (they hold sockets and models: not shippable)."""
    import uuid

    factory = None
    if services is not None:
        for_workers = getattr(services, "for_workers", None)
        factory = for_workers() if for_workers is not None else None
        if factory is None:
            raise BuildError("nothing was started: these services cannot be made on another machine "
                             "(they have no for_workers()); use the local executor")
    b = loaded.spec.budget
    shared = executor.shared(b.max_usd, b.max_tokens)
    return RemoteBuild(uuid.uuid4().hex, loaded, graph, cache, factory, shared, progress, capture, tuple(force_gates))


def _interrupt(services, now: bool = False, executor=None) -> None:
    for what in (services, executor):
        if what is not None and hasattr(what, "interrupt"):
            try:
                what.interrupt(now)
            except Exception:  # best effort: the build is ending either way
                pass


def _wait_for_running(futures: list[cf.Future], services, executor=None) -> bool:
    """Wait until every started target has ended; whether Ctrl-C was pressed meanwhile (each
    press drops the calls still in flight at once, rather than leaving a target half-cleaned)."""
    pressed = False
    while True:
        try:
            cf.wait(futures)
            return pressed
        except KeyboardInterrupt:
            pressed = True
            _interrupt(services, now=True, executor=executor)


def _record_run_spend(cache: Cache, spec_name: str, spend: dict) -> None:
    """Add a run's spend to what every run of this spec has spent on this cache (`status`
    shows it: it includes targets a budget stop or a failure left unbuilt)."""
    if not spend.get("calls"):
        return
    try:
        with cache.index.transact():
            total = cache.index.get(("spend", spec_name), {}) or {}
            for k, v in spend.items():
                total[k] = total.get(k, 0) + v
            total["runs"] = total.get("runs", 0) + 1
            cache.index.set(("spend", spec_name), total)
    except Exception:  # the record is informational: never mask the run's own outcome
        pass


def publish_outputs(loaded, graph: Graph, cache: Cache, names: list[str], root: Path = Path("outputs")) -> Path:
    """outputs/<run>/ (`LoadedSpec.output_name`): what the main build's stages publish
    (copied) and provenance: which key made each target, and the command line's overrides.

    Nothing is written through a link: each file or folder is copied to a temporary name in
    the folder and renamed over its place, so a link there (or the folder itself being one)
    is replaced, never followed. A place of the wrong kind (a folder where a file goes), or
    a folder another build made, stops publishing before anything is copied."""
    out = root / _output_name(loaded)
    items: list[tuple[Path, str, bool]] = []  # (source in the cache, name under out, is a folder)
    for name in names:
        node = graph[name]
        if node.defn.spec is not None:
            continue  # a sub-build (another data scale) publishes nothing of its own
        for rel, dest in node.stage.publish(node.defn):
            src = cache.path(node.key) / rel
            if rel == ".":
                if src.is_dir():
                    items += [(f, f.name, False) for f in sorted(src.iterdir()) if f.is_file() and f.name != "MANIFEST.json"]
            elif src.exists():
                items.append((src, dest, src.is_dir()))
    problems = _output_problems(loaded, out, {dest: is_dir for _, dest, is_dir in items})
    if problems:
        raise BuildError(f"cannot publish to {out}/ (every target is built and kept in the cache):\n  "
                         + "\n  ".join(problems))
    if out.is_symlink():
        out.unlink()  # the link goes, what it points at stays as it was
    out.mkdir(parents=True, exist_ok=True)
    for src, dest, is_dir in items:
        _replace_with_copy(src, out / dest, is_dir)
    prov = {"spec": loaded.spec.name, "run": out.name, "overrides": _overrides(loaded),
            "data_scale": loaded.spec.data.scale, "spec_files": [str(f) for f in loaded.files],
            "constitution": str(loaded.constitution_path), "charbuild": __version__,
            "targets": {n: {"key": graph[n].key, "stage": graph[n].stage.name, "version": graph[n].stage.version}
                        for n in names}}
    write_json_atomic(out / "provenance.json", prov)  # a temp file renamed over it: replaces a link
    return out


def check_outputs(loaded, graph: Graph, cache: Cache | None, names: list[str], root: Path = Path("outputs")) -> list[str]:
    """What would stop `publish_outputs`, found before anything is built: `outputs` or the
    run's folder is a file, a published path is of the wrong kind (a folder where a file
    goes), or the folder holds another build's outputs. [] if none. The kind of a path is
    known from the cached object; for a target not built yet, a name with a suffix
    (dpo-pairs.jsonl) is taken for a file, and one without is left to `publish_outputs`."""
    kinds: dict[str, bool | None] = {}
    for name in names:
        node = graph[name]
        if node.defn.spec is not None:
            continue
        for rel, dest in node.stage.publish(node.defn):
            src = cache.path(node.key) / rel if cache is not None and cache.has(node.key) else None
            if rel == ".":
                if src is not None and src.is_dir():
                    kinds.update({f.name: False for f in src.iterdir() if f.is_file() and f.name != "MANIFEST.json"})
            else:
                kinds[dest] = src.is_dir() if src is not None and src.exists() else False if Path(rel).suffix else None
    return _output_problems(loaded, root / _output_name(loaded), kinds)


def _output_name(loaded) -> str:
    return getattr(loaded, "output_name", None) or loaded.spec.run_name


def _overrides(loaded) -> dict:
    return getattr(loaded, "overrides", None) or {"set": [], "scale": None}


def _output_problems(loaded, out: Path, kinds: dict[str, bool | None]) -> list[str]:
    """kinds: name under `out` -> True (a folder goes there), False (a file), None (unknown)."""
    import json
    import os

    above = out.parent
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():  # `outputs` (or a folder above it) is a file, or a link to nothing
        what = "a link to nothing" if above.is_symlink() and not above.exists() else "not a folder"
        return [f"{above} is {what}: move it away, or run from another directory"]
    if out.is_symlink():
        return []  # the link is replaced by a folder: nothing inside it is ours to check
    if os.path.lexists(out) and not out.is_dir():
        return [f"{out} is a file, not a folder: move it away"]
    problems = []
    for dest, is_dir in sorted({**kinds, "provenance.json": False}.items()):
        if Path(dest).name != dest or dest in (".", ".."):
            problems.append(f"{dest!r} is not a plain file name (a stage publishes it)")
            continue
        p = out / dest
        if is_dir is None or p.is_symlink() or not os.path.lexists(p):
            continue  # links are replaced, not followed
        if is_dir and not p.is_dir():
            problems.append(f"{p} is a file where a folder goes: move it away")
        elif not is_dir and p.is_dir():
            problems.append(f"{p} is a folder where a file goes: move it away")
    prov = out / "provenance.json"
    if prov.is_file() and not prov.is_symlink():
        try:
            before = json.loads(prov.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict):
            ours = {"spec": loaded.spec.name, "overrides": _overrides(loaded)}
            theirs = {"spec": before.get("spec"), "overrides": before.get("overrides", ours["overrides"])}
            if theirs != ours:
                problems.append(f"{out} holds the outputs of another build (spec {theirs['spec']!r}, overrides "
                                f"{theirs['overrides']}); this one is spec {ours['spec']!r}, overrides "
                                f"{ours['overrides']}: move the folder away to replace it")
    return problems


def _replace_with_copy(src: Path, dest: Path, is_dir: bool) -> None:
    """Copy src to a temporary name beside dest, then rename it over dest: a link at dest is
    replaced, never written through; a folder being replaced is moved aside, then removed
    (removing a folder removes the links in it, not what they point at)."""
    import os
    import uuid

    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if is_dir:
            shutil.copytree(src, tmp)
            if dest.is_symlink() or not dest.is_dir():
                if os.path.lexists(dest):
                    dest.unlink()
                os.replace(tmp, dest)
            else:
                old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old")
                os.rename(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.copy2(src, tmp)
            os.replace(tmp, dest)
    finally:  # a failed copy leaves nothing behind
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            tmp.unlink()
