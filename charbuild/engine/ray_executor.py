"""Build on a Ray cluster: each target is a Ray task, placed by its stage's resources.

`RayExecutor` is a `RemoteExecutor` (charbuild.engine.executor): the engine submits it one
`RemoteBuild` per run (shipped to the object store once) and a target name per task. Each
task asks the cluster for what the target's stage declares (`Stage.resources`: for local
generation as many GPUs as the model spans, one for training, a CPU for API shards and
gates), and Ray reruns it, up to `max_retries` times, when its worker or node is lost; a
target that fails by itself (an exception in its stage) fails as it would locally, and
every finished target is kept, as each was committed to the cache by the worker that
built it. Ctrl-C cancels the tasks, which stop as a local build does (`_CancelIsCtrlC`).

A straggler (a shard running `straggler_factor` times longer than the median of its
finished peers: a slow node, a stalled connection) is cancelled the same way and submitted
once more, as a fresh task Ray may place elsewhere (`stragglers`): the cancelled attempt
keeps its answered calls in the call cache and gives up its build lease as it unwinds, so
the retry asks again only what was never answered. The cancelled attempt's failure counts
for nothing; the target's outcome is the retry's (or the first attempt's, should it finish
before the cancel reaches it).

The run's ledger and the backends' rate limiters live in a named actor on the driver's node
(one `Governor` per run; one actor per executor, started with it, since an actor is a
process that takes a second to start): workers reserve, settle and charge there, so
there is one spend ledger and one RPM/TPM bucket per endpoint and model, whichever worker
sends a call, and a budget stop reaches every worker at its next call boundary.

Imported only when a run asks for it (`--executor ray`, `execution.executor: ray`):
`plan`, and `run` with the local executor, never import ray.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import os
import statistics
import threading
import time
import uuid
from typing import Any, Callable, Hashable

from charbuild.contract import shard_of
from charbuild.engine.interrupts import SigintHandler
from charbuild.engine.governor import Governor, SharedState

# Ray's task options a stage may ask for (Stage.resources); anything else is refused early.
TASK_OPTIONS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")

STRAGGLER_POLL_S = 0.5


def stragglers(running: dict[Any, tuple[Hashable, float]], finished: dict[Hashable, list[float]],
               factor: float, min_samples: int = 3, floor_s: float = 5.0) -> dict[Any, float]:
    """The running tasks to retry: task -> how many times its peers' median it has run.
    `running`: task -> (its kind, seconds it has run); `finished`: kind -> the durations of
    its finished tasks. A task is a straggler once `min_samples` of its kind have finished
    (fewer say little of what is normal), and it has run more than `factor` times their
    median and more than `floor_s` (a shard of a second that takes four is not worth a
    cancel and a second start)."""
    medians = {kind: statistics.median(d) for kind, d in finished.items() if len(d) >= min_samples}
    out = {}
    for task, (kind, age) in running.items():
        median = medians.get(kind)
        if median is not None and age > floor_s and age > factor * median:
            out[task] = age / max(median, 1e-9)
    return out


def task_kind(name: str, want: dict) -> Hashable:
    """Which tasks are peers, from what the engine knows without a recipe: the shards of
    one target (`x/shard-0003` -> `x`) asking for the same resources. Any other target is
    a kind of its own, so it is never compared and never retried as a straggler."""
    return (shard_of(name) or name, repr(sorted(want.items())))


class RayUnavailable(RuntimeError):
    pass


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable("the ray executor needs Ray: pip install 'charbuild[ray]'") from exc
    return ray


def _cancel(ref) -> None:
    """Cancel one attempt as Ctrl-C would (`_CancelIsCtrlC`), never its calls to the run's
    Governor: Ray's default (`recursive=True`) cancels those child actor tasks too, and one
    cancelled mid-flight can leave its caller waiting forever (ray-project/ray#46157). A
    worker's event loop blocked in `SharedLedger.reserve` that way never stops its batch,
    so the build hung after Ctrl-C and kept its staging folder. Raises what `ray.cancel` does."""
    _ray().cancel(ref, force=False, recursive=False)


def _run_task(fn: Callable, env: dict, started: tuple | None, *args) -> tuple[float, Any]:
    """What runs in a Ray worker: the engine's task, after naming the node for its manifest
    and setting the driver's variables (`RayExecutor(env=...)`) in the worker's environment.
    `started`: (the executor's actor, this attempt's token), told when the task starts, so
    the driver can tell a task that runs long from one still waiting for a CPU. Returns how
    long the task ran with its result: the durations its peers are judged by."""
    import ray

    from charbuild.engine.executor import note_worker

    if started is not None:
        actor, token = started
        actor.started.remote(token)
    t0 = time.monotonic()
    os.environ.update(env)
    note_worker(node=ray.get_runtime_context().get_node_id())
    with _CancelIsCtrlC(fn):
        result = fn(*args)
    return time.monotonic() - t0, result


class _CancelIsCtrlC(SigintHandler):
    """`ray.cancel` of the running task, read as `charbuild run` reads Ctrl-C. Ray delivers
    each cancel as SIGINT in the worker's main thread: the first raises KeyboardInterrupt,
    after telling the task's backends (`fn.interrupt`) to send nothing more, so the calls in
    flight may still answer and be stored while the stage unwinds and its staging folder
    goes. Later ones never raise (one landing in the middle of that cleanup is what leaves a
    staging folder and unstored answers behind): they drop the calls still in flight."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.cancels = 0

    def __call__(self, signum, frame) -> None:
        self.cancels += 1
        stop = getattr(self.fn, "interrupt", None)
        if stop is not None:
            try:
                stop(now=self.cancels > 1)
            except Exception:  # the stage is stopping either way
                pass
        if self.cancels == 1:
            raise KeyboardInterrupt


class _GovernorHost:
    """The actor: the Governor of each run the executor builds (runs in turn, or at once),
    and when each task started, on the actor's one clock (workers' clocks may disagree)."""

    def __init__(self):
        self._runs: dict[str, Governor] = {}
        self._started: dict[str, float] = {}

    def started(self, token: str) -> None:
        self._started[token] = time.monotonic()  # a rerun of a lost worker's task starts afresh

    def ages(self, tokens: list[str], forget: list[str]) -> dict[str, float]:
        """How long each of `tokens` has run (those started); `forget`: tasks that ended."""
        for t in forget:
            self._started.pop(t, None)
        now = time.monotonic()
        return {t: now - self._started[t] for t in tokens if t in self._started}

    def open(self, run: str, max_usd, max_tokens) -> None:
        self._runs[run] = Governor(max_usd, max_tokens)

    def drop(self, run: str) -> None:
        self._runs.pop(run, None)

    def call(self, run: str, method: str, *args) -> Any:
        return getattr(self._runs[run], method)(*args)


class _ActorCall:
    """A run's Governor's transport: a method call on the actor, as a concurrent future (a
    worker's event loop awaits it; a thread blocks on it)."""

    def __init__(self, actor, run: str):
        self.actor = actor
        self.run = run

    def __call__(self, method: str, *args) -> cf.Future:
        return self.actor.call.remote(self.run, method, *args).future()


class _DriverShared(SharedState):
    """The driver's handle on the run's shared state: it alone ends it (`close`). Workers get
    a plain SharedState when it is pickled, so a task can never end the run's ledger."""

    def __init__(self, call: _ActorCall, max_usd, max_tokens):
        super().__init__(call, max_usd, max_tokens)
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._call.actor.drop.remote(self._call.run)


class _Target:
    """A submitted target: the engine's future and the attempts made for it (a straggler's
    retry is the second), the current one last."""

    def __init__(self, fut: cf.Future, name: str, kind: Hashable, launch: Callable[[str], Any]):
        self.fut = fut
        self.name = name
        self.kind = kind
        self.launch = launch  # token -> the ObjectRef of a fresh attempt
        self.attempts: list[tuple[str, Any]] = []  # (token, ObjectRef)
        self.retried = False


class RayExecutor:
    """Targets as Ray tasks. `address`: the cluster (None: RAY_ADDRESS, else the cluster
    `ray start` runs on this machine, else a new one here; "auto": an existing one only;
    "ray://host:10001": Ray Client). An already connected process (`ray.init` done) is
    used as it is, and left connected. `runtime_env`: Ray's, for every task (a working_dir).
    `env`: variables set in each worker before its task (the driver's API keys): sent with
    the task, not in runtime_env, which Ray keeps in its control store and shows on its
    dashboard. `log_to_driver`: workers' own output on this console (the targets' library
    output goes to their logs in the cache unless `-v`). `straggler_factor` (None: off),
    `straggler_min_samples`, `straggler_floor_s`: when a running shard is retried
    (`stragglers`); `say` (the engine sets it for a run) shows that it was."""

    def __init__(self, address: str | None = None, max_retries: int = 3, runtime_env: dict | None = None,
                 log_to_driver: bool = False, env: dict[str, str] | None = None,
                 straggler_factor: float | None = 3.0, straggler_min_samples: int = 3,
                 straggler_floor_s: float = 5.0, **init: Any):
        ray = _ray()
        self._own = not ray.is_initialized()
        if self._own:
            import logging

            # Ray's own INFO lines ("Connecting to...") would sit among the build's lines.
            init.setdefault("logging_level", logging.INFO if log_to_driver else logging.WARNING)
            ray.init(address=address, log_to_driver=log_to_driver, **init)
        self.max_retries = max_retries
        self.runtime_env = runtime_env
        self._env = dict(env or {})
        self._cpu_task = ray.remote(_run_task)
        # A GPU task gets a fresh worker process each time (max_calls=1): its CUDA memory goes
        # when the process does, not when the next target on that GPU runs out of it.
        self._gpu_task = ray.remote(num_gpus=1, max_calls=1)(_run_task)
        self._shipped: dict[int, tuple] = {}  # id(fn) -> (fn, its ObjectRef): a run is put once
        self._targets: dict[cf.Future, _Target] = {}
        self._lock = threading.Lock()
        self.straggler_factor = straggler_factor
        self.straggler_min_samples = straggler_min_samples
        self.straggler_floor_s = straggler_floor_s
        self.say: Callable[[str], None] | None = None
        self._durations: dict[Hashable, list[float]] = {}  # kind -> how long its finished tasks ran
        self._ended: list[str] = []  # tokens of attempts that ended, for the actor to forget
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None
        opts: dict = {"name": f"charbuild-governor-{uuid.uuid4().hex[:12]}", "num_cpus": 0, "max_concurrency": 1}
        try:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # Beside the driver: a worker node that goes away must not take the ledger with it.
            here = ray.get_runtime_context().get_node_id()
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=here, soft=True)
        except Exception:  # Ray Client: the driver is no node; anywhere will do
            pass
        if runtime_env:
            opts["runtime_env"] = runtime_env
        # Started now, not waited for: its process boots while the driver does the rest.
        self._governors = ray.remote(_GovernorHost).options(**opts).remote()

    # -- RemoteExecutor ---------------------------------------------------------------------
    def shared(self, max_usd: float | None, max_tokens: int | None) -> SharedState:
        run = uuid.uuid4().hex
        _ray().get(self._governors.open.remote(run, max_usd, max_tokens))  # an error here, not in a worker
        return _DriverShared(_ActorCall(self._governors, run), max_usd, max_tokens)

    def submit(self, fn: Callable, *args) -> cf.Future:
        want = getattr(fn, "resources", None)
        want = dict(want(*args)) if callable(want) else {"num_cpus": 1}
        bad = sorted(set(want) - set(TASK_OPTIONS))
        if bad:
            raise ValueError(f"a stage asked for {bad}: Ray tasks take {list(TASK_OPTIONS)}")
        opts = {**want, "max_retries": self.max_retries, "retry_exceptions": False,
                "name": f"charbuild {args[0]}" if args and isinstance(args[0], str) else "charbuild"}
        if self.runtime_env:
            opts["runtime_env"] = self.runtime_env
        remote = self._gpu_task if want.get("num_gpus") else self._cpu_task
        shipped = self._ship(fn)
        watch = self.straggler_factor is not None

        def launch(token: str):
            return remote.options(**opts).remote(shipped, self._env, (self._governors, token) if watch else None, *args)

        fut: cf.Future = cf.Future()
        # Running from the start: Ray has it; cancelling it is `interrupt`'s, never a silent skip.
        fut.set_running_or_notify_cancel()
        name = args[0] if args and isinstance(args[0], str) else "charbuild"
        # id(fn): one run's tasks are never peers of another's (the executor may serve several).
        target = _Target(fut, name, (id(fn), task_kind(name, want)), launch)
        with self._lock:
            self._targets[fut] = target
        self._attempt(target)
        if watch and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="charbuild-stragglers", daemon=True)
            self._watcher.start()
        return fut

    def _attempt(self, target: _Target) -> None:
        token = uuid.uuid4().hex
        ref = target.launch(token)
        with self._lock:
            target.attempts.append((token, ref))
        ref.future().add_done_callback(functools.partial(self._land, target, token))

    def _ship(self, fn: Callable):
        if not hasattr(fn, "resources"):
            return fn
        with self._lock:
            if id(fn) not in self._shipped:
                self._shipped[id(fn)] = (fn, _ray().put(fn))
            return self._shipped[id(fn)][1]

    def _land(self, target: _Target, token: str, done: cf.Future) -> None:
        ray = _ray()
        result: Any = None
        error: BaseException | None = None
        try:
            seconds, result = done.result()
        except ray.exceptions.RayTaskError as exc:
            # The stage's own exception, as a local build would raise it (BudgetExceeded stops
            # the run, anything else fails the target); retries were Ray's to make already.
            cause = getattr(exc, "cause", None)
            error = cause if isinstance(cause, BaseException) else exc
        except BaseException as exc:  # the worker or node was lost more often than max_retries
            error = exc
        later = None
        with self._lock:
            self._ended.append(token)
            current = target.attempts[-1][0] == token
            if error is None:
                self._durations.setdefault(target.kind, []).append(seconds)
                if not current:
                    later = target.attempts[-1][1]  # the retry is not needed: the cancel came too late
            if not target.fut.done() and (error is None or current):
                if error is None:
                    target.fut.set_result(result)
                else:
                    target.fut.set_exception(error)
            if target.fut.done():
                self._targets.pop(target.fut, None)
        if later is not None:
            try:
                _cancel(later)
            except Exception:
                pass

    def _watch(self) -> None:
        while not self._stop_watching.wait(STRAGGLER_POLL_S):
            try:
                self._retry_stragglers()
            except Exception:  # the actor or cluster is going: the build goes on without retries
                pass

    def _retry_stragglers(self) -> None:
        ray = _ray()
        with self._lock:
            ready = {k for k, d in self._durations.items() if len(d) >= self.straggler_min_samples}
            watched = {t.attempts[-1][0]: t for t in self._targets.values()
                       if t.kind in ready and not t.retried and not t.fut.done()}
            ended, self._ended = self._ended, []
            finished = {k: list(self._durations[k]) for k in ready}
        if not watched and not ended:
            return
        ages = ray.get(self._governors.ages.remote(list(watched), ended), timeout=30)
        running = {token: (watched[token].kind, age) for token, age in ages.items()}
        slow = stragglers(running, finished, self.straggler_factor, self.straggler_min_samples, self.straggler_floor_s)
        for token, ratio in slow.items():
            target = watched[token]
            with self._lock:
                if target.fut.done() or target.retried:
                    continue
                target.retried = True
                first = target.attempts[-1][1]
            if self.say is not None:
                self.say(f"retrying {target.name}: running {ratio:.1f}x longer than its peers")
            # The retry is the current attempt before the first is cancelled: the cancel's
            # failure then lands on an attempt that no longer counts.
            self._attempt(target)
            try:
                _cancel(first)
            except Exception:
                pass

    def interrupt(self, now: bool = False) -> None:
        """Ctrl-C: tasks not started yet never start, and every running one is told as a
        local build is (`_CancelIsCtrlC`): it stores what was answered and removes its
        staging folder; `now` (Ctrl-C again): its calls still in flight are dropped. Never a
        forced cancel: a killed worker leaves its staging folder and loses the answers on
        their way to the call cache. A task stuck where Python cannot interrupt it ends with
        the driver: Ray ends the tasks of a driver that exits (the third Ctrl-C)."""
        with self._lock:
            refs = [ref for t in self._targets.values() for _, ref in t.attempts]
        for ref in refs:
            try:
                _cancel(ref)
            except Exception:
                pass

    def shutdown(self) -> None:
        self._stop_watching.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None
        self._stop_watching.clear()
        self._shipped.clear()
        if self._governors is not None:
            try:
                _ray().kill(self._governors)
            except Exception:  # the cluster may be gone already
                pass
            self._governors = None
        if self._own:
            _ray().shutdown()
            self._own = False
