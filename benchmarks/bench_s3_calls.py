"""The call cache's own work per missed call with the cache in a bucket (moto's S3 server on
loopback, in a child process), store requests sent side by side vs one after another, and
a local call cache as the floor, measured in the same run.

What a shard does with N calls it has never asked, minus the asking itself: look each up
(a miss: the working copy, then the bucket), claim each (a lease created in the bucket,
then the entry looked up again in case another machine stored it meanwhile), store each
answer (created in the bucket only if absent) and drop each claim. `side by side` is what
`CachedBackend` does (`CallCache.get_many` and `claim_new`, REMOTE_REQUESTS in flight);
`one by one` is the same with one in flight, as before; answers are stored one by one in
both, as they arrive from the provider. Then what `plan` asks on a machine that never ran
the build, about calls half of which the bucket holds: `has` key by key (as before) vs
`has_many` (a listing per key prefix).

    python benchmarks/bench_s3_calls.py [--calls 200] [--runs 3] [--plan-calls 2000]

Writes benchmarks/results/s3_calls.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from machine import busy_cpu_s  # noqa: E402  (benchmarks/machine.py)


def shard(cache, n: int) -> tuple[float, float]:
    """Seconds of the call cache's work on n calls missed at first: before the first call
    can be sent (look-ups and claims), and storing the answers (puts and releases)."""
    keys = [uuid.uuid4().hex + uuid.uuid4().hex for _ in range(n)]
    t = time.perf_counter()
    assert all(e is None for e in cache.get_many(keys))
    claims, stored, busy = cache.claim_new(keys)
    assert len(claims) == n and not stored and not busy
    t1 = time.perf_counter()
    for k in keys:
        cache.put(k, {"text": "an answer", "finish_reason": "stop", "prompt_tokens": 40, "completion_tokens": 3,
                      "meta": {}}, usage_usd=0.0)
        claims[k].release(done=True)
    return t1 - t, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200, help="calls in the shard")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each side")
    ap.add_argument("--plan-calls", type=int, default=2000, help="calls a plan asks about")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "s3_calls.json"))
    args = ap.parse_args()

    from support.s3_server import S3Server, missing

    why = missing()
    if why:
        sys.exit(f"bench_s3_calls: {why}")
    from charbuild.store import calls
    from charbuild.store.calls import CallCache

    work = Path(tempfile.mkdtemp(prefix="cb-s3-calls-"))
    side_by_side = calls.REMOTE_REQUESTS
    walls: dict[str, list[tuple[float, float]]] = {"local": [], "s3 side by side": [], "s3 one by one": []}
    busy0, t0 = busy_cpu_s(), time.time()
    with S3Server(bucket="charbuild-bench", own_process=True) as s3:
        for warm in ("warm-a", "warm-b"):  # connections, imports: paid by neither side
            os.environ["CHARBUILD_LOCAL_CACHE"] = str(work / warm)
            shard(CallCache(s3.url(warm)), 8)
        for run in range(args.runs):
            order = list(walls) if run % 2 == 0 else list(reversed(walls))
            for side in order:
                if side == "local":
                    cache = CallCache(work / f"local-{run}")
                else:
                    calls.REMOTE_REQUESTS = side_by_side if side == "s3 side by side" else 1
                    os.environ["CHARBUILD_LOCAL_CACHE"] = str(work / f"{side[3:7]}-{run}")
                    cache = CallCache(s3.url(f"{side[3:7]}-{run}"))
                walls[side].append(shard(cache, args.calls))
                cache.close()
        # What `plan` asks on a machine that never ran the build: is each call answered?
        os.environ["CHARBUILD_LOCAL_CACHE"] = str(work / "plan-a")
        stored = CallCache(s3.url("plan"))
        keys = [uuid.uuid4().hex + uuid.uuid4().hex for _ in range(args.plan_calls)]
        for k in keys[::2]:
            stored.put(k, {"text": "an answer", "finish_reason": "stop", "prompt_tokens": 40, "completion_tokens": 3,
                           "meta": {}}, usage_usd=0.0)
        plan_walls: dict[str, list[float]] = {"has, one by one": [], "has_many": []}
        for run in range(args.runs):
            for side in (plan_walls if run % 2 == 0 else reversed(list(plan_walls))):
                os.environ["CHARBUILD_LOCAL_CACHE"] = str(work / f"plan-{side[:3]}-{run}")  # a fresh machine
                fresh = CallCache(s3.url("plan"))
                t = time.perf_counter()
                found = fresh.has_many(keys) if side == "has_many" else [fresh.has(k) for k in keys]
                plan_walls[side].append(time.perf_counter() - t)
                assert sum(found) == len(keys[::2])
                fresh.close()
    calls.REMOTE_REQUESTS = side_by_side
    elapsed = time.time() - t0
    busy = (busy_cpu_s() - busy0) / elapsed if elapsed else float("nan")
    shutil.rmtree(work, ignore_errors=True)

    def ms(side: str, phase: int | None) -> float:
        return statistics.median(sum(w) if phase is None else w[phase] for w in walls[side]) / args.calls * 1e3

    table = {side: {"before_sending_ms": ms(side, 0), "storing_ms": ms(side, 1), "total_ms": ms(side, None)}
             for side in walls}
    ratio = table["s3 one by one"]["before_sending_ms"] / table["s3 side by side"]["before_sending_ms"]
    out = {"benchmark": "call cache work per missed call: S3 (moto on loopback) side by side vs one by one, "
                        "local as the floor; same run", "calls": args.calls, "runs": args.runs,
           "remote_requests": side_by_side, "walls_s": walls, "ms_per_call": table,
           "before_sending_one_by_one_over_side_by_side": ratio}
    print(f"{args.calls} missed calls, {args.runs} runs a side; median ms per call of the call cache's own work")
    print(f"  {'':<16} {'before sending':>15} {'storing':>9} {'total':>9}")
    for side, t in table.items():
        print(f"  {side:<16} {t['before_sending_ms']:>12.2f} ms {t['storing_ms']:>6.2f} ms {t['total_ms']:>6.2f} ms")
    print(f"  before the first call is sent, one by one / side by side: {ratio:.2f}x")
    plan = {side: statistics.median(w) for side, w in plan_walls.items()}
    out["plan_s"] = {"calls": args.plan_calls, "walls_s": plan_walls, "median_s": plan,
                     "one_by_one_over_has_many": plan["has, one by one"] / plan["has_many"]}
    print(f"plan on a fresh machine, {args.plan_calls} calls (half answered): has one by one "
          f"{plan['has, one by one']:.2f} s, has_many {plan['has_many']:.2f} s "
          f"({out['plan_s']['one_by_one_over_has_many']:.1f}x)")
    out["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                      "busy_cores_during_run": round(busy, 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"machine busy {busy:.2f} cores on average; wrote {args.out}")


if __name__ == "__main__":
    main()
