"""Build on a Ray cluster: each target is a Ray task, placed by its stage's resources.

`RayExecutor` is a `RemoteExecutor` (charbuild.engine.executor): the engine submits it one
`RemoteBuild` per run (shipped to the object store once) and a target name per task. Each
task asks the cluster for what the target's stage declares (`Stage.resources`: a GPU for
local generation and training, a CPU for API shards and gates), and Ray reruns it, up to
`max_retries` times, when its worker or node is lost; a target that fails by itself (an
exception in its stage) fails as it would locally, and every finished target is kept, as
each was committed to the cache by the worker that built it.

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
import threading
import uuid
from typing import Any, Callable

from charbuild.engine.governor import Governor, SharedState

# Ray's task options a stage may ask for (Stage.resources); anything else is refused early.
TASK_OPTIONS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


class RayUnavailable(RuntimeError):
    pass


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable("the ray executor needs Ray: pip install 'charbuild[ray]'") from exc
    return ray


def _run_task(fn: Callable, *args) -> Any:
    """What runs in a Ray worker: the engine's task, after naming the node for its manifest."""
    import ray

    from charbuild.engine.executor import note_worker

    note_worker(node=ray.get_runtime_context().get_node_id())
    return fn(*args)


class _GovernorHost:
    """The actor: the Governor of each run the executor builds (runs in turn, or at once)."""

    def __init__(self):
        self._runs: dict[str, Governor] = {}

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


class RayExecutor:
    """Targets as Ray tasks. `address`: the cluster (None: RAY_ADDRESS, else the cluster
    `ray start` runs on this machine, else a new one here; "auto": an existing one only;
    "ray://host:10001": Ray Client). An already connected process (`ray.init` done) is
    used as it is, and left connected. `runtime_env`: Ray's, for every task (env_vars with
    API keys, a working_dir). `log_to_driver`: workers' own output on this console (the
    targets' library output goes to their logs in the cache unless `-v`)."""

    def __init__(self, address: str | None = None, max_retries: int = 3, runtime_env: dict | None = None,
                 log_to_driver: bool = False, **init: Any):
        ray = _ray()
        self._own = not ray.is_initialized()
        if self._own:
            import logging

            # Ray's own INFO lines ("Connecting to...") would sit among the build's lines.
            init.setdefault("logging_level", logging.INFO if log_to_driver else logging.WARNING)
            ray.init(address=address, log_to_driver=log_to_driver, **init)
        self.max_retries = max_retries
        self.runtime_env = runtime_env
        self._cpu_task = ray.remote(_run_task)
        # A GPU task gets a fresh worker process each time (max_calls=1): its CUDA memory goes
        # when the process does, not when the next target on that GPU runs out of it.
        self._gpu_task = ray.remote(num_gpus=1, max_calls=1)(_run_task)
        self._shipped: dict[int, tuple] = {}  # id(fn) -> (fn, its ObjectRef): a run is put once
        self._refs: dict[cf.Future, Any] = {}
        self._lock = threading.Lock()
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
        ref = remote.options(**opts).remote(self._ship(fn), *args)
        fut: cf.Future = cf.Future()
        # Running from the start: Ray has it; cancelling it is `interrupt`'s, never a silent skip.
        fut.set_running_or_notify_cancel()
        with self._lock:
            self._refs[fut] = ref
        ref.future().add_done_callback(functools.partial(self._land, fut))
        return fut

    def _ship(self, fn: Callable):
        if not hasattr(fn, "resources"):
            return fn
        with self._lock:
            if id(fn) not in self._shipped:
                self._shipped[id(fn)] = (fn, _ray().put(fn))
            return self._shipped[id(fn)][1]

    def _land(self, fut: cf.Future, done: cf.Future) -> None:
        ray = _ray()
        with self._lock:
            self._refs.pop(fut, None)
        try:
            fut.set_result(done.result())
        except ray.exceptions.RayTaskError as exc:
            # The stage's own exception, as a local build would raise it (BudgetExceeded stops
            # the run, anything else fails the target); retries were Ray's to make already.
            cause = getattr(exc, "cause", None)
            fut.set_exception(cause if isinstance(cause, BaseException) else exc)
        except BaseException as exc:  # the worker or node was lost more often than max_retries
            fut.set_exception(exc)

    def interrupt(self, now: bool = False) -> None:
        """Ctrl-C: every task still running gets a KeyboardInterrupt (the stage stores what was
        answered, the staging folder goes); `now`: their workers are killed."""
        ray = _ray()
        with self._lock:
            refs = list(self._refs.values())
        for ref in refs:
            try:
                ray.cancel(ref, force=now)
            except Exception:
                pass

    def shutdown(self) -> None:
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
