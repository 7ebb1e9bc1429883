"""The Ray executor's stories on a real 2-node Ray cluster (`ray.cluster_utils.Cluster`), run
by tests/test_ray_executor.py inside a fresh network namespace, where Ray's nodes talk over
127.0.0.1 (outside one, Ray advertises the machine's interface address even when told
127.0.0.1):

    unshare -n sh -c 'ip link set lo up && exec python tests/support/ray_stories.py OUT.json [STORY...]'

One cluster for every story (it takes ~10-15 s to start on 2 cores). Each story records
facts, not verdicts: the test asserts on them. OUT.json is rewritten after each story, so a
story that hangs still leaves the others' facts.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
# Workers unpickle the tests' plug-in stages (support.engine_stages): they must import them.
os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])
sys.path[:0] = [str(TESTS), str(ROOT)]

KEY = "sk-ray-stories"
os.environ["CB_TEST_KEY"] = KEY  # the driver checks it before anything starts; workers get it in runtime_env
MB = 1024 * 1024


def engine_spec(tmp: Path) -> Path:
    import shutil

    shutil.copytree(ROOT / "specs", tmp / "specs", dirs_exist_ok=True)
    shutil.copytree(ROOT / "constitutions", tmp / "constitutions", dirs_exist_ok=True)
    return tmp / "specs" / "smoke-small.yaml"


def manifests(cache_dir: Path, graph, names) -> dict:
    from charbuild.store.objects import Cache

    cache = Cache(cache_dir)
    try:
        return {n: cache.manifest(graph[n].key) for n in names if cache.has(graph[n].key)}
    finally:
        cache.close()


def same_as_local(tmp: Path, cluster) -> dict:
    """The engine stages' build on the cluster against a local build of the same spec."""
    from support import engine_stages

    from charbuild.engine.graph import build_graph
    from charbuild.engine.ray_executor import RayExecutor
    from charbuild.spec.model import load_spec

    spec = engine_spec(tmp)
    sets = ["data.dpo_pairs=24"]  # 6 item shards: enough to spread over both nodes
    env = {"CB_SLEEP": "0.4", "CB_TEST_LOG": str(tmp / "same.log")}
    os.environ.update(env)  # the local build reads them too
    warm(env)
    t = time.monotonic()
    _, local = engine_stages.build(spec, tmp / "local", sets)
    local_s = time.monotonic() - t
    ex = RayExecutor(runtime_env={"env_vars": env})
    try:
        t = time.monotonic()
        plan, remote = engine_stages.build(spec, tmp / "ray", sets, executor=ex)
        ray_s = time.monotonic() - t
        _, again = engine_stages.build(spec, tmp / "ray", sets, executor=ex)
    finally:
        ex.shutdown()
        for k in env:
            os.environ.pop(k, None)
    graph = build_graph(load_spec(spec, sets), engine_stages.stages())
    names = [r.name for r in plan.rows]
    loc, ray_m = manifests(tmp / "local", graph, names), manifests(tmp / "ray", graph, names)
    return {
        "local_built": sorted(local.built), "ray_built": sorted(remote.built), "ray_failed": remote.failed,
        "keys": {n: graph[n].key for n in names},
        "local_digests": {n: m.get("content_digest") for n, m in loc.items()},
        "ray_digests": {n: m.get("content_digest") for n, m in ray_m.items()},
        "ray_workers": {n: m.get("worker") for n, m in ray_m.items()},
        "report_workers": remote.workers,
        "again_built": again.built, "again_cached": sorted(again.cached), "again_failed": again.failed,
        "local_s": round(local_s, 2), "ray_s": round(ray_s, 2),
    }


def failures(tmp: Path, cluster) -> dict:
    """Targets that fail by themselves fail on Ray as they do locally: same messages, same
    skipped dependents, not retried (a stage's exception is not a lost worker)."""
    from support import engine_stages

    from charbuild.engine.executor import run_build
    from charbuild.engine.graph import build_graph
    from charbuild.engine.planner import make_plan
    from charbuild.engine.ray_executor import RayExecutor
    from charbuild.spec.model import load_spec
    from charbuild.store.objects import Cache

    spec = engine_spec(tmp)
    log = tmp / "crash.log"
    env = {"CB_CRASH_AT": "items/shard-0001", "CB_TEST_LOG": str(log)}

    def build(name, executor):
        loaded = load_spec(spec, ["persona=failures"])
        graph = build_graph(loaded, [*engine_stages.stages(), engine_stages.ReadsUnkeyed()])
        cache = Cache(tmp / name)
        try:
            report = run_build(loaded, graph, make_plan(loaded, graph, cache), cache, executor, keep_going=True,
                               progress=False, log=lambda s: None, outputs_root=None)
        finally:
            cache.close()
        return {"failed": report.failed, "skipped": sorted(report.skipped), "built": sorted(report.built)}

    os.environ.update(env)
    try:
        local = build("local", None)
    finally:
        for k in env:
            os.environ.pop(k, None)
    log.unlink()
    ex = RayExecutor(runtime_env={"env_vars": env})
    try:
        remote = build("ray", ex)
    finally:
        ex.shutdown()
    crashes = sum(1 for ln in log.read_text().splitlines() if ln.startswith("build items/shard-0001"))
    return {"local": local, "ray": remote, "crash_attempts": crashes}


def api_spec(tmp: Path, base_url: str, extra: str = "") -> Path:
    from support.api_build import write_spec

    d = tmp / "api"
    d.mkdir(exist_ok=True)
    spec = write_spec(d, base_url)
    spec.write_text(spec.read_text() + extra)
    return spec


def recipe_build(spec: Path, cache_dir: Path, sets, targets, executor):
    from charbuild.engine.executor import run_build
    from charbuild.engine.planner import make_plan
    from charbuild.recipe.registry import recipe_graph
    from charbuild.recipe.services import RecipeServices
    from charbuild.spec.model import load_spec
    from charbuild.store.objects import Cache

    loaded = load_spec(spec, list(sets))
    graph = recipe_graph(loaded)
    cache = Cache(cache_dir)
    services = RecipeServices(cache, loaded)
    try:
        plan = make_plan(loaded, graph, cache, targets, services)
        return graph, run_build(loaded, graph, plan, cache, executor, progress=False, log=lambda s: None,
                                outputs_root=None, services=services)
    finally:
        cache.close()


def warm(env: dict) -> None:
    """A worker on every node, with this environment and charbuild's modules imported, so a
    story's first targets start together rather than one node's first process lagging."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1, runtime_env={"env_vars": env})
    def imports():
        import charbuild.backends.openai_backend  # noqa: F401
        import charbuild.recipe.registry  # noqa: F401

        return os.getpid()

    ray.get([imports.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
             for n in ray.nodes() if n["Alive"]])


def watched_executor(**kw):
    """A RayExecutor that remembers how each of its tasks ended (`outcomes`)."""
    from charbuild.engine.ray_executor import RayExecutor

    class Watched(RayExecutor):
        def submit(self, fn, *args):
            fut = super().submit(fn, *args)
            self.futures.append((args[0], fut))
            return fut

    ex = Watched(**kw)
    ex.futures = []
    return ex


def outcomes(ex) -> dict:
    out = {}
    for name, fut in ex.futures:
        exc = fut.exception()
        out[name] = "ok" if exc is None else type(exc).__name__
    return out


def budget(tmp: Path, cluster) -> dict:
    """A dollar cap over two workers: API shards on the loopback server, priced so the real
    replies cross the cap the plan's estimate stays under. Two calls in flight per worker,
    so more than two in flight at the server means both workers were sending."""
    from support.api_build import persona_reply
    from support.openai_server import FakeOpenAIServer

    from charbuild.engine import governor
    from charbuild.ledger import BudgetExceeded
    from charbuild.store.calls import CallCache
    from charbuild.store.objects import Cache

    stops: list[float] = []
    stop = governor.SharedLedger.stop

    def timed_stop(self, reason):
        stops.append(time.monotonic())
        return stop(self, reason)

    governor.SharedLedger.stop = timed_stop
    cap = 0.7  # about 14 teacher calls: both workers are half-way through a shard of 10
    per_call = 60 * 1000 / 1e6  # the most one teacher call can cost: max_tokens 60 at $1000/M output
    facts: dict = {"cap": cap, "max_call_usd": per_call}
    warm({"CB_TEST_KEY": KEY})
    # 0.3 s a call: the cap takes one worker alone seven round trips (2 s), time enough for the
    # other to start sending on a loaded machine (at 0.1 s it sometimes had not).
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY, latency_s=0.3) as srv:
        spec = api_spec(tmp, srv.base_url,
                        "prices: {teacher-model: {input: 0, output: 1000}, student-model: {input: 0, output: 0}}\n")
        sets = ["models.teacher.sampling.max_tokens=60", "expect.response_tokens=1", "models.teacher.concurrency=2",
                "models.student.concurrency=2", f"budget.max_usd={cap}"]
        cache_dir = tmp / "budget-cache"
        ex = watched_executor(runtime_env={"env_vars": {"CB_TEST_KEY": KEY}})
        try:
            try:
                recipe_build(spec, cache_dir, sets, ["dpo-pairs"], ex)
                facts["raised"] = None
            except BudgetExceeded as exc:
                facts["raised"] = str(exc)
            t_end = time.monotonic()
            facts["outcomes"] = outcomes(ex)
            stats = srv.stats()
            facts.update(completed=stats["completed"], requests=stats["requests_total"],
                         peak_in_flight=stats["peak_in_flight"], stops=len(stops),
                         arrivals_after_stop=sum(1 for a in srv.arrivals if stops and a > stops[0]),
                         stop_to_end_s=round(t_end - stops[0], 2) if stops else None)
            facts["stored_calls"] = len(CallCache(cache_dir))
            cache = Cache(cache_dir)
            facts["spent"] = cache.index.get(("spend", "api-smoke"), {}) or {}
            cache.close()
            # A raised cap goes on from there, on the cluster, without asking any call twice.
            _, report = recipe_build(spec, cache_dir, sets[:-1] + ["budget.max_usd=100"], ["dpo-pairs"], ex)
            facts["after_raise"] = {"failed": report.failed, "completed": srv.stats()["completed"],
                                    "asked_twice": sum(1 for n in srv.answered.values() if n > 1),
                                    "api_calls": report.spend.get("api_calls")}
        finally:
            ex.shutdown()
            governor.SharedLedger.stop = stop
    return facts


def rpm(tmp: Path, cluster) -> dict:
    """One RPM bucket for the teacher across both workers: the server's arrival times."""
    from support.api_build import persona_reply
    from support.openai_server import FakeOpenAIServer

    from charbuild.engine.ray_executor import RayExecutor

    limit = 600  # 10/s, a bucket of one second's worth: 10 at once, then one per 0.1 s
    warm({"CB_TEST_KEY": KEY})
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY, latency_s=0.02) as srv:
        spec = api_spec(tmp, srv.base_url)
        d = tmp / "rpm"
        d.mkdir()
        ex = RayExecutor(runtime_env={"env_vars": {"CB_TEST_KEY": KEY}})
        try:
            targets = [f"teacher-responses/shard-{i:04d}" for i in range(3)]
            graph, report = recipe_build(spec, d / "cache", [f"models.teacher.rpm={limit}"], targets, ex)
        finally:
            ex.shutdown()
        arrivals = sorted(srv.arrivals)
        workers = manifests(d / "cache", graph, targets)
    return {"rpm": limit, "failed": report.failed, "built": sorted(report.built),
            "arrivals": [round(a - arrivals[0], 4) for a in arrivals],
            "nodes": sorted({m["worker"]["node"] for m in workers.values()}),
            "pids": sorted({m["worker"]["pid"] for m in workers.values()})}


def cli(tmp: Path, cluster) -> dict:
    """`charbuild run --executor ray --address ...` against `--executor local`: what a person
    sees; then the spec's execution block, on the run that finds everything built."""
    import subprocess

    from support.api_build import persona_reply
    from support.openai_server import FakeOpenAIServer

    # The person's key: only this command has it. The workers' own environment holds another
    # (KEY, from when the cluster started), which the server refuses.
    driver_key = "sk-only-the-driver-has-this-one"

    def run(name: str, *extra: str) -> dict:
        cwd = tmp / name
        cwd.mkdir()
        p = subprocess.run([sys.executable, "-m", "charbuild", "run", str(spec), "dpo-pairs", "--no-progress",
                            "--cache", str(tmp / ("local-cache" if name == "local" else "ray-cache")), *extra],
                           capture_output=True, text=True, cwd=cwd, timeout=180,
                           env={**os.environ, "CB_TEST_KEY": driver_key})
        return {"rc": p.returncode, "out": p.stdout.splitlines(), "err": p.stderr[-3000:]}

    def holding_the_key(root: Path) -> list[str]:
        return [str(f) for f in root.rglob("*") if f.is_file() and driver_key.encode() in f.read_bytes()]

    with FakeOpenAIServer(reply=persona_reply, require_key=driver_key) as srv:
        spec = api_spec(tmp, srv.base_url)
        local = run("local", "--executor", "local")
        remote = run("ray", "--executor", "ray", "--address", cluster.address)
        asked = srv.stats()["completed"]
        again = run("again", "--set", "execution.executor=ray", "--set", f"execution.address={cluster.address}")
    ray_logs = Path("/tmp/ray/session_latest/logs")
    return {"local": local, "ray": remote, "again": again, "asked": asked, "asked_again": srv.stats()["completed"] - asked,
            "key_written_to": holding_the_key(tmp) + (holding_the_key(ray_logs) if ray_logs.is_dir() else []),
            "ray_logs_looked_at": ray_logs.is_dir()}


CTRL_C_PAIRS = 40  # 4 teacher + 4 student shards of 10 calls: four rounds on two 1-CPU nodes


def ctrl_c(tmp: Path, cluster) -> dict:
    """Ctrl-C on `charbuild run --executor ray`, pressed as a user presses it (SIGINT to the
    command's process group) once a response shard has finished, while workers have calls in
    flight at the loopback server (slow replies). A second run goes on from there and is
    stopped the same way with Ctrl-C pressed twice; a third, at full speed, finishes."""
    import re
    import signal
    import subprocess

    from support.api_build import persona_reply, write_spec
    from support.openai_server import FakeOpenAIServer

    from charbuild.store.calls import CallCache

    def command() -> list[str]:
        return [sys.executable, "-m", "charbuild", "run", str(spec), "dpo-pairs", "--no-progress", "--cache", str(cache),
                "--executor", "ray", "--address", cluster.address]

    def built(lines: list[str]) -> list[str]:
        return sorted(m.group(1) for ln in lines for m in [re.match(r"✓ (\S+) \(built\)", ln)] if m)

    def interrupted(presses: int) -> dict:
        from support.keyboard import interruptible

        started = time.monotonic()
        proc = subprocess.Popen(command(), cwd=tmp, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=interruptible)
        out: list[str] = []
        err: list[str] = []
        readers = [threading.Thread(target=lambda f, into: into.extend(ln.rstrip("\n") for ln in f), args=a,
                                    daemon=True) for a in ((proc.stdout, out), (proc.stderr, err))]
        for r in readers:
            r.start()
        deadline = time.monotonic() + 60
        while not (any(re.match(r"✓ (teacher|student)-responses/shard-", ln) for ln in list(out)) and srv.in_flight):
            if proc.poll() is not None or time.monotonic() > deadline:  # nothing left to interrupt
                proc.kill()
                return {"error": f"no shard finished with calls in flight (rc {proc.wait()}):\n"
                                 + "\n".join(out + err[-30:])}
            time.sleep(0.01)
        facts: dict = {"press_after_s": round(time.monotonic() - started, 2), "in_flight_at_press": srv.in_flight}
        pressed = time.monotonic()
        for i in range(presses):
            if i:
                time.sleep(0.2)
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:  # it had ended already
                break
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        facts["exit_s"] = round(time.monotonic() - pressed, 2)
        for r in readers:
            r.join(5)
        # What the server saw when the command ended, and a second later: a task the run
        # left behind would still be sending.
        stats = srv.stats()
        time.sleep(1.0)
        facts.update(
            rc=proc.returncode, out=out, err="\n".join(err)[-3000:], kept=built(out),
            answered=stats["completed"], requests=stats["requests_total"],
            requests_a_second_later=srv.stats()["requests_total"],
            arrivals_after_press=[round(a - pressed, 2) for a in srv.arrivals if a > pressed],
            stored=len(CallCache(cache)),
            staging=sorted(p.name for p in (cache / "tmp").iterdir()) if (cache / "tmp").is_dir() else [])
        return facts

    warm({"CB_TEST_KEY": KEY})
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY, latency_s=0.4) as srv:
        spec = write_spec(tmp, srv.base_url, dpo_pairs=CTRL_C_PAIRS, shard_size=10)
        cache = tmp / "cache"
        once = interrupted(1)
        twice = interrupted(2)
        srv.latency_s = 0.0
        before = srv.stats()["completed"]
        started = time.monotonic()
        again = subprocess.run(command(), cwd=tmp, capture_output=True, text=True, timeout=180)
        rerun = {"rc": again.returncode, "built": built(again.stdout.splitlines()), "err": again.stderr[-3000:],
                 "asked": srv.stats()["completed"] - before, "seconds": round(time.monotonic() - started, 2)}
    return {"calls": 2 * CTRL_C_PAIRS, "once": once, "twice": twice, "rerun": rerun}


class _ReserveInAThread:
    """A target whose calls to the run's Governor come from another thread, as a backend's
    event loop makes them, while the task's main thread waits for that thread; Ctrl-C tells
    the thread to stop and waits for it, as `OpenAIBackend.generate` waits for its batch."""

    def __init__(self, shared, mark: str):
        self.shared = shared
        self.mark = mark

    def __call__(self, name: str) -> int:
        stop = threading.Event()
        made = [0]

        def reserve_until_stopped():
            while not stop.is_set():
                self.shared.ledger.reserve(0.0, 0).release()
                made[0] += 1
                if made[0] == 20:
                    Path(self.mark).write_text("started")

        t = threading.Thread(target=reserve_until_stopped)
        t.start()
        try:
            while t.is_alive():
                t.join(0.05)
        finally:
            stop.set()
            t.join()
        return made[0]


def _child(mark: str) -> None:
    time.sleep(1.5)
    Path(mark).write_text("done")


class _SpawnsAChild:
    """A target that starts a Ray task of its own (as its Governor calls are) and waits on it."""

    def __init__(self, mark: str, child_mark: str):
        self.mark, self.child_mark = mark, child_mark

    def __call__(self, name: str) -> None:
        import ray

        ref = ray.remote(num_cpus=0)(_child).remote(self.child_mark)
        Path(self.mark).write_text("started")
        ray.get(ref)


CANCELS = 6


def cancel_spares_governor_calls(tmp: Path, cluster) -> dict:
    """Ctrl-C cancels a target alone: a Ray task it started goes on. Ray's default cancel is
    recursive, and would cancel a target's calls to the run's Governor with it; one cancelled
    in flight can be left unanswered (ray-project/ray#46157), and a backend's event loop
    waiting on it then never stops its batch (a build hung after Ctrl-C, keeping its staging
    folder). Then targets cancelled while their Governor calls are in flight, a few times."""
    import concurrent.futures as cf

    from charbuild.engine.ray_executor import RayExecutor

    def wait_for(path: Path, seconds: float = 60) -> bool:
        deadline = time.monotonic() + seconds
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return path.exists()

    ex = RayExecutor(straggler_factor=None)
    ends: list = []
    try:
        # What the target started goes on: only the target is cancelled.
        fut = ex.submit(_SpawnsAChild(str(tmp / "parent"), str(tmp / "child")), "parent")
        parent_started = wait_for(tmp / "parent")
        ex.interrupt()
        parent_ended = type(fut.exception(timeout=30)).__name__
        child_finished = wait_for(tmp / "child", 10)  # it sleeps 1.5 s
        shared = ex.shared(None, None)
        for i in range(CANCELS):
            mark = tmp / f"started-{i}"
            fut = ex.submit(_ReserveInAThread(shared, str(mark)), f"reserve-{i}")
            if not wait_for(mark):
                ends.append("never started")
                continue
            # Other workers' calls queue at the Governor (one call at a time), as in a real run.
            crowd = [shared._call("snapshot") for _ in range(300)]
            time.sleep(0.05)
            ex.interrupt()
            t = time.monotonic()
            try:
                fut.result(timeout=20)
                ends.append("finished")
            except cf.TimeoutError:
                ends.append("hung")
                continue
            except BaseException as exc:
                ends.append(round(time.monotonic() - t, 2) if type(exc).__name__ == "TaskCancelledError"
                            else type(exc).__name__)
            cf.wait(crowd, timeout=60)
        shared.close()
    finally:
        ex.shutdown()
    return {"parent_started": parent_started, "parent_ended": parent_ended, "child_finished": child_finished,
            "ends": ends}


SLOW_S = 16.0  # the straggler's first attempt: four times what the whole build takes without it


def straggler(tmp: Path, cluster) -> dict:
    """One shard of six is slow on its first attempt only (a slow node, a stalled call): the
    build cancels it once its finished peers show what normal is, and builds it again; with
    `execution.straggler_factor: null` it waits for the slow attempt instead."""
    import re

    from support import engine_stages

    from charbuild.engine.console import Console
    from charbuild.engine.ray_executor import RayExecutor
    from charbuild.spec.model import load_spec

    spec = engine_spec(tmp)
    slow = "items/shard-0002"

    def build(name: str, *sets: str) -> dict:
        sets = ("data.dpo_pairs=24", f"persona={name}", *sets)  # 6 shards; keys of its own
        log, done = tmp / f"{name}.log", tmp / f"{name}.done"
        env = {"CB_SLEEP": "0.5", "CB_SLOW_ONCE": slow, "CB_SLOW_S": str(SLOW_S), "CB_SLOW_MARK": str(tmp / f"{name}.mark"),
               "CB_TEST_LOG": str(log), "CB_DONE_LOG": str(done)}
        warm(env)
        factor = load_spec(spec, list(sets)).spec.execution.straggler_factor
        lines: list[str] = []
        # A floor of 2 s, not 5: these shards take half a second.
        ex = RayExecutor(runtime_env={"env_vars": env}, straggler_factor=factor, straggler_floor_s=2)
        try:
            t = time.monotonic()
            plan, report = engine_stages.build(spec, tmp / f"{name}-cache", sets, executor=ex,
                                               console=Console(capture=False, log=lines.append))
            seconds, ended = time.monotonic() - t, time.time()
        finally:
            ex.shutdown()

        def count(path: Path, field: int) -> dict[str, int]:
            out: dict[str, int] = {}
            for ln in path.read_text().splitlines():
                parts = ln.split()
                if field == 0 or parts[0] == "build":
                    out[parts[field]] = out.get(parts[field], 0) + 1
            return out

        slow_began = float((tmp / f"{name}.mark").read_text())
        return {"seconds": round(seconds, 2), "ended_after_slow_began_s": round(ended - slow_began, 2),
                "targets": sorted(r.name for r in plan.rows),
                "built": sorted(report.built), "failed": report.failed, "skipped": report.skipped,
                "started": count(log, 1), "finished": count(done, 0),
                "retry_lines": [ln for ln in lines if re.search(r"\bretrying\b", ln)]}

    return {"slow": slow, "slow_s": SLOW_S, "retried": build("straggler"),
            "waited": build("straggler-off", "execution.straggler_factor=null")}


def node_lost(tmp: Path, cluster, node) -> dict:
    """The second node goes away while it builds a shard: Ray reruns it on the head."""
    from support import engine_stages

    from charbuild.engine.graph import build_graph
    from charbuild.engine.ray_executor import RayExecutor
    from charbuild.spec.model import load_spec
    from charbuild.store.objects import Cache

    spec = engine_spec(tmp)
    sets = ["data.dpo_pairs=16", "persona=lost-node"]  # new keys: nothing of the first story is reused
    log = tmp / "lost.log"
    env = {"CB_SLEEP": "2", "CB_TEST_LOG": str(log)}
    warm(env)
    ex = RayExecutor(runtime_env={"env_vars": env}, max_retries=3)
    out: dict = {}

    def build():
        try:
            out["plan"], out["report"] = engine_stages.build(spec, tmp / "lost-cache", sets, executor=ex)
        except BaseException as exc:
            out["error"] = "".join(traceback.format_exception(exc))

    t = threading.Thread(target=build)
    t.start()
    # Both nodes busy with a shard (1 CPU each: two worker processes building at once), one
    # second into their 2 s: take one away.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len({ln.split()[2] for ln in lines if ln.startswith("build items/")}) >= 2:
            break
        time.sleep(0.05)
    time.sleep(1.0)
    removed_at = time.monotonic()
    cluster.remove_node(node)
    t.join(timeout=120)
    ex.shutdown()
    facts = {"removed_after_s": round(time.monotonic() - removed_at, 2), "hung": t.is_alive()}
    if "error" in out or "report" not in out:
        return {**facts, "error": out.get("error", "no report")}
    report = out["report"]
    graph = build_graph(load_spec(spec, sets), engine_stages.stages())
    names = [r.name for r in out["plan"].rows]
    cache = Cache(tmp / "lost-cache")
    try:
        problems = {n: cache.verify(graph[n].key) for n in names}
        present = [n for n in names if cache.has(graph[n].key)]
    finally:
        cache.close()
    builds: dict[str, int] = {}
    for ln in log.read_text().splitlines():
        _, name, _pid = ln.split()
        builds[name] = builds.get(name, 0) + 1
    return {**facts, "targets": names, "built": sorted(report.built), "failed": report.failed,
            "skipped": report.skipped, "present": present, "problems": {n: p for n, p in problems.items() if p},
            "builds": builds}


def main(out_path: str, *only: str) -> int:
    """`only`: the stories to run (all when none is named)."""
    import ray
    from ray.cluster_utils import Cluster

    facts: dict = {}
    out = Path(out_path)

    def save():
        out.write_text(json.dumps(facts, indent=1, default=str))

    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 80 * MB})
    second = cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    facts["cluster"] = {"address": cluster.address, "nodes": len(ray.nodes()), "up_s": round(time.monotonic() - t0, 1)}
    save()
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            for story in (same_as_local, failures, budget, rpm, cli, ctrl_c, cancel_spares_governor_calls, straggler):
                if only and story.__name__ not in only:
                    continue
                t = time.monotonic()
                (tmp / story.__name__).mkdir()
                try:
                    facts[story.__name__] = story(tmp / story.__name__, cluster)
                except BaseException as exc:
                    facts[story.__name__] = {"error": "".join(traceback.format_exception(exc))}
                facts[story.__name__]["seconds"] = round(time.monotonic() - t, 1)
                save()
            if not only or "node_lost" in only:  # last: the cluster has one node after it
                t = time.monotonic()
                (tmp / "node_lost").mkdir()
                try:
                    facts["node_lost"] = node_lost(tmp / "node_lost", cluster, second)
                except BaseException as exc:
                    facts["node_lost"] = {"error": "".join(traceback.format_exception(exc))}
                facts["node_lost"]["seconds"] = round(time.monotonic() - t, 1)
                save()
    finally:
        ray.shutdown()
        cluster.shutdown()
    facts["total_s"] = round(time.monotonic() - t0, 1)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
