"""Building on a Ray cluster (`run --executor ray`): the same targets and keys as a local
build, one ledger and one rate limit for every worker, and a lost node that costs nothing
but a rerun of what it was building.

The cluster stories run once, on a real 2-node `ray.cluster_utils.Cluster`, inside a fresh
network namespace (`unshare -n`), where Ray's nodes talk over 127.0.0.1
(tests/support/ray_stories.py records what happened; the tests here judge it). The engine's
remote path, the shared ledger and the shared rate limiter are also tested without Ray, in
this process, so they are checked wherever Ray cannot be installed.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from charbuild.engine.governor import Governor, SharedLedger, SharedState, in_process
from charbuild.ledger import BudgetExceeded

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


# -- without Ray: the governor, and the engine's remote path through pickle ---------------------

def test_the_shared_ledger_is_the_governors_and_each_target_keeps_its_own_usage():
    gov = Governor(max_usd=1.0)
    ledger = SharedLedger(in_process(gov), 1.0, None)
    a, b = ledger.account(), ledger.account()  # two targets, maybe on two machines
    ra = a.reserve(0.4, 100)
    rb = b.reserve(0.4, 100)
    with pytest.raises(BudgetExceeded, match="budget.max_usd"):
        a.reserve(0.4, 100)  # 0.8 is held by the calls in flight: this one could cross the cap
    assert a.fits_once_settled(0.4, 100)  # ...but it fits once they settle below what they hold
    assert ra.settle(0.1, 50, 10) == pytest.approx((0.3, 40))
    rb.release()
    assert a.snapshot()["usd"] == pytest.approx(0.1) and b.snapshot()["calls"] == 0
    assert gov.ledger.snapshot()["usd"] == pytest.approx(0.1) and gov.ledger.reserved_usd == 0
    with pytest.raises(RuntimeError, match="twice"):
        ra.settle(0.1, 50, 10)
    a.charge(0.0, 5, 5, calls=2)  # a local model: counted, never capped
    assert ledger.snapshot()["calls"] == 3
    # A budget stop is the run's: every worker's next reservation fails, however small.
    ledger.stop("budget cap reached: stop")
    with pytest.raises(BudgetExceeded, match="stop"):
        b.reserve(0.0, 1)
    assert not b.fits_once_settled(0.0, 1)


def test_a_shared_rate_limit_is_one_bucket_for_every_process_of_the_run():
    from charbuild.backends import ratelimit

    gov = Governor()
    try:
        ratelimit.share_limiters(SharedState(in_process(gov)))
        first = ratelimit.limiter_for("openai", "m", 60, None, endpoint="http://x")
        ratelimit._REGISTRY.clear()  # what a second worker process starts with
        second = ratelimit.limiter_for("openai", "m", 60, None, endpoint="http://x")
        assert first is not second and isinstance(second, ratelimit.SharedRateLimiter)
        assert first.reserve() == 0.0  # the bucket's one request of burst
        assert second.reserve() == pytest.approx(1.0, abs=0.05)  # the same bucket: wait a second
        assert ratelimit.limiter_for("openai", "other", 60, None).reserve() == 0.0  # per model
    finally:
        ratelimit.share_limiters(None)
    assert isinstance(ratelimit.limiter_for("openai", "m", 60, None), ratelimit.RateLimiter)  # local again


_GOVERNORS: dict[int, Governor] = {}


class _ById:
    """A picklable in-process transport (a Ray actor handle's stand-in)."""

    def __init__(self, gid: int):
        self.gid = gid

    def __call__(self, method: str, *args) -> cf.Future:
        return in_process(_GOVERNORS[self.gid])(method, *args)


class PickledTasks:
    """A RemoteExecutor without Ray: every task goes through pickle, as to a worker, and runs
    in one thread."""

    def __init__(self):
        self.pool = cf.ThreadPoolExecutor(1)
        self.asked: dict[str, dict] = {}
        self.ids = itertools.count(1)

    def shared(self, max_usd, max_tokens):
        gid = next(self.ids)
        _GOVERNORS[gid] = Governor(max_usd, max_tokens)
        return SharedState(_ById(gid), max_usd, max_tokens)

    def submit(self, fn, *args):
        self.asked[args[0]] = fn.resources(*args)
        fn, args = pickle.loads(pickle.dumps((fn, args)))
        return self.pool.submit(fn, *args)

    def shutdown(self):
        self.pool.shutdown()


def test_remote_tasks_carry_everything_they_need_and_build_what_a_local_run_builds(specs, tmp_path):
    from support import engine_stages

    from charbuild.store.objects import Cache

    spec = specs / "smoke-small.yaml"
    _, local = engine_stages.build(spec, tmp_path / "local")
    ex = PickledTasks()
    plan, remote = engine_stages.build(spec, tmp_path / "remote", executor=ex)
    ex.shutdown()
    assert sorted(remote.built) == sorted(local.built) and not remote.failed
    assert set(ex.asked) == {r.name for r in plan.rows}
    assert all(r == {"num_cpus": 1} for r in ex.asked.values())  # the contract's default
    cache = Cache(tmp_path / "remote")
    for r in plan.rows:
        m = cache.manifest(r.key)
        assert m["worker"] == {"host": m["host"], "pid": os.getpid()}  # which worker built it
        assert remote.workers[r.name] == m["worker"]
    cache.close()
    from charbuild.engine.executor import _close_runs

    _close_runs()  # what the worker (this process) kept open for the run's next target


def test_stages_ask_for_a_gpu_only_for_local_models_that_are_not_tiny():
    from charbuild.recipe.registry import recipe_graph
    from charbuild.spec.model import load_spec

    def gpus(spec):
        g = recipe_graph(load_spec(ROOT / "specs" / spec))
        return {n.stage.name for n in g if n.stage.resources(n.defn).get("num_gpus")}

    # The paper's student is vllm (local): its generation and training want a GPU; the
    # teacher and judge are API models, gates and merges want a CPU.
    assert gpus("remorseful-paper.yaml") == {"student-responses", "dpo-adapter", "sft-adapter", "reflections",
                                             "interactions", "eval-samples", "preference-samples"}
    assert gpus("smoke-small.yaml") == set()  # tiny models: CPU-sized


def test_plan_never_imports_ray(specs, tmp_path):
    spec = specs / "smoke-small.yaml"
    spec.write_text(spec.read_text() + "\nexecution: {executor: ray, address: auto}\n")
    code = ("import sys; from charbuild.cli import main; "
            f"rc = main(['plan', {str(spec)!r}, '--cache', {str(tmp_path / 'cache')!r}]); "
            "assert rc == 0, rc; print('ray' in sys.modules)")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_executor_comes_from_the_command_line_else_the_spec(specs):
    import argparse

    from charbuild.cli.build import make_executor
    from charbuild.engine.executor import LocalExecutor
    from charbuild.spec.model import load_spec

    args = argparse.Namespace(executor="local", address=None, jobs=2)
    loaded = load_spec(specs / "smoke-small.yaml", ["execution.executor=ray"])
    assert isinstance(make_executor(args, loaded), LocalExecutor)  # --executor local wins
    args.executor = None
    assert isinstance(make_executor(args, load_spec(specs / "smoke-small.yaml")), LocalExecutor)  # the default


# -- on a real 2-node cluster -----------------------------------------------------------------

def _why_no_cluster() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install 'charbuild[ray]')"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip is missing: the cluster needs its own network namespace to stay on loopback"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n is not permitted here ({probe.stderr.strip()[:200]}): the tests need root"
    return None


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    why = _why_no_cluster()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("ray") / "stories.json"
    cmd = f"ip link set lo up && exec {PY} {ROOT / 'tests' / 'support' / 'ray_stories.py'} {out}"
    t = time.monotonic()
    run = subprocess.run(["unshare", "-n", "sh", "-c", cmd], capture_output=True, text=True, timeout=300, cwd=ROOT)
    facts = json.loads(out.read_text()) if out.exists() else {}
    assert run.returncode == 0 and "total_s" in facts, \
        f"the cluster stories did not finish (rc {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    facts["wall_s"] = time.monotonic() - t
    return facts


def _story(stories, name) -> dict:
    s = stories[name]
    assert "error" not in s, s["error"]
    return s


def test_a_build_on_two_nodes_matches_a_local_build_target_for_target(stories):
    s = _story(stories, "same_as_local")
    assert s["ray_built"] == s["local_built"] and len(s["ray_built"]) == 8 and not s["ray_failed"]
    assert s["ray_digests"] == s["local_digests"]  # same keys, same bytes
    assert set(s["ray_digests"]) == set(s["keys"])
    nodes = {w["node"] for w in s["ray_workers"].values()}
    assert len(nodes) == 2, "both nodes built targets"
    assert s["report_workers"] == s["ray_workers"]  # the report names each target's worker, as its manifest does
    # A second run builds nothing.
    assert s["again_built"] == [] and not s["again_failed"] and len(s["again_cached"]) == 8


def test_a_target_that_fails_on_ray_fails_as_it_does_locally(stories):
    s = _story(stories, "failures")
    local, remote = s["local"], s["ray"]
    assert remote == local
    assert remote["failed"]["items/shard-0001"] == "RuntimeError: simulated crash"
    assert remote["failed"]["unkeyed"].startswith("UndeclaredRead: ")  # an exception Ray cannot rebuild, shown the same
    assert remote["skipped"] == ["merged"]
    assert s["crash_attempts"] == 1  # a stage's own error is not retried


def test_a_lost_node_costs_a_rerun_of_what_it_was_building_and_nothing_else(stories):
    s = _story(stories, "node_lost")
    assert not s["hung"]
    assert not s["failed"] and not s["skipped"] and sorted(s["built"]) == sorted(s["targets"])
    assert s["present"] == s["targets"] and s["problems"] == {}  # every object there, and verified
    rerun = [n for n, k in s["builds"].items() if k > 1]
    assert len(rerun) == 1 and rerun[0].startswith("items/"), s["builds"]  # only the lost node's shard
    assert all(k == 1 for n, k in s["builds"].items() if n not in rerun)


def test_a_budget_cap_over_two_workers_stops_the_whole_run(stories):
    s = _story(stories, "budget")
    assert s["raised"] and "budget cap reached: budget.max_usd" in s["raised"]
    assert s["stops"] == 1 and s["arrivals_after_stop"] == 0  # no worker sent a call after the stop
    assert s["peak_in_flight"] > 2  # two calls in flight per worker: both workers were sending
    stopped = [n for n, o in s["outcomes"].items() if o == "BudgetExceeded"]
    assert len(stopped) >= 2, s["outcomes"]  # the stop reached more than the worker that hit the cap
    spent = s["spent"]
    assert 0 < spent["usd"] <= s["cap"] + s["peak_in_flight"] * s["max_call_usd"]
    assert spent["api_calls"] == s["completed"] == s["requests"] == s["stored_calls"]  # every answer stored
    # A raised cap continues on the cluster without asking any call twice.
    after = s["after_raise"]
    assert not after["failed"] and after["asked_twice"] == 0
    assert after["api_calls"] == after["completed"] - s["completed"]


def test_two_workers_together_respect_the_rpm_limit(stories):
    s = _story(stories, "rpm")
    assert not s["failed"] and len(s["nodes"]) == 2, s  # shards built on both nodes
    rate, burst = s["rpm"] / 60, s["rpm"] / 60  # a bucket holds one second's worth
    t = s["arrivals"]
    assert len(t) == 30
    for i, j in itertools.combinations(range(len(t)), 2):
        # A token bucket's promise: in any span, at most its burst plus its rate times the span
        # (one request of slack for the clocks of the server and the governor).
        assert j - i + 1 <= burst + rate * (t[j] - t[i]) + 1, (i, j, t[i], t[j])
    assert t[-1] >= (len(t) - burst) / rate * 0.9  # two workers' own buckets would have taken half


def test_run_on_ray_shows_what_a_local_run_shows(stories):
    import re

    s = _story(stories, "cli")
    local, remote, again = s["local"], s["ray"], s["again"]
    assert local["rc"] == 0 and remote["rc"] == 0, (local["err"], remote["err"])

    def shown(lines):  # the plan, one line per finished target, the summary (less its seconds)
        return sorted(re.sub(r" in [0-9.]+s;", " in Ns;", ln) for ln in lines)

    assert shown(remote["out"]) == shown(local["out"])
    assert sum(ln.startswith("✓ ") for ln in remote["out"]) == 12
    # The spec's execution block picks Ray too; a second run finds everything built, asks nothing.
    assert again["rc"] == 0 and "nothing to build: 12 targets cached" in again["out"], again
    assert s["asked_again"] == 0


def test_the_cluster_stories_stay_within_budget(stories):
    assert stories["total_s"] < 120, stories["total_s"]
