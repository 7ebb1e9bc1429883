"""Overhead of the call-level cache against a generation call to the loopback server.

Two measurements:

* per call (the issue's goal, < 2 % of a 0.2 s call): the cache's own work for one
  call on a miss (key, lookup, claim, store, release) and on a hit (key, verified read),
  timed with an instant in-process backend so nothing else is in the number;
* end to end: `--n` requests at `--concurrency` through `OpenAIBackend` to the fake
  server (in its own process) with `--latency` s per reply, with and without the cache
  (cold, then warm), alternating rounds; reports wall times and the slowdown.

    .venv/bin/python benchmarks/bench_callcache.py [--quick]

Writes benchmarks/results/callcache.json.
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from charbuild.backends.base import GenRequest, GenResult  # noqa: E402
from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig  # noqa: E402
from charbuild.backends.cached import CachedBackend
from charbuild.store.calls import CallCache  # noqa: E402
from support.openai_server import ServerHandle  # noqa: E402


def make_requests(n: int, tag: str) -> list[GenRequest]:
    # a realistic prompt: a system prompt (constitution-sized) and a user question
    system = "You are a character. " + "Be kind, curious and direct. " * 60
    return [GenRequest(messages=[{"role": "system", "content": system},
                                 {"role": "user", "content": f"{tag} question number {i}: what do you think?"}],
                       max_tokens=512, seed=i) for i in range(n)]


class Instant:
    """A backend that answers at once (streams results like the openai backend)."""

    text = "word " * 300  # a ~1.5 kB answer, like a real sample

    def generate(self, requests, progress=None, on_result=None):
        out = [GenResult(self.text, "stop", 400, 300, {"attempts": 1, "latency_s": 0.2}) for _ in requests]
        if on_result is not None:
            for i, r in enumerate(out):
                on_result(i, r)
        return out

    def close(self):
        pass


def per_call(n: int, batch: int) -> dict:
    root = tempfile.mkdtemp(prefix="cb-bench-")
    try:
        reqs = make_requests(n, "micro")
        inner = Instant()
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            inner.generate(reqs[s:s + batch], on_result=lambda i, r: None)
        base = time.perf_counter() - t0

        cb = CachedBackend(inner, CallCache(root), "openai", "fake-model")
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            cb.generate(reqs[s:s + batch])
        miss = time.perf_counter() - t0

        cb2 = CachedBackend(inner, CallCache(root), "openai", "fake-model")
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            cb2.generate(reqs[s:s + batch])
        hit = time.perf_counter() - t0
        assert cb.asked == n and cb2.asked == 0 and cb2.cache.hits == n
        entry = os.path.getsize(cb.cache.path(cb.key(reqs[0], 0)))
        return {"calls": n, "batch": batch, "miss_overhead_us": (miss - base) / n * 1e6,
                "hit_us": (hit - base) / n * 1e6, "entry_bytes": entry}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def end_to_end(base_url: str, n: int, concurrency: int, rounds: int) -> dict:
    cfg = OpenAIConfig(model="fake-model", base_url=base_url, api_key_env=None, concurrency=concurrency, timeout_s=60)
    walls: dict[str, list[float]] = {"plain": [], "cached_cold": [], "cached_warm": []}
    with OpenAIBackend(cfg) as be:
        be.generate(make_requests(concurrency, "warmup"))  # open the keep-alive connections
        for r in range(rounds):
            reqs = make_requests(n, f"round{r}")
            t0 = time.perf_counter()
            be.generate(reqs)
            walls["plain"].append(time.perf_counter() - t0)

            root = tempfile.mkdtemp(prefix="cb-bench-")
            try:
                reqs = make_requests(n, f"cached{r}")
                cb = CachedBackend(be, CallCache(root), "openai", "fake-model")
                t0 = time.perf_counter()
                cb.generate(reqs)
                walls["cached_cold"].append(time.perf_counter() - t0)
                cb2 = CachedBackend(be, CallCache(root), "openai", "fake-model")
                t0 = time.perf_counter()
                cb2.generate(reqs)
                walls["cached_warm"].append(time.perf_counter() - t0)
                assert cb.asked == n and cb2.asked == 0
            finally:
                shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    return {"n": n, "concurrency": concurrency, "rounds": rounds, "walls_s": walls, "median_s": med,
            "slowdown_cold_pct": (med["cached_cold"] / med["plain"] - 1) * 100,
            "speedup_warm": med["plain"] / med["cached_warm"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--micro-calls", type=int, default=2000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "callcache.json"))
    a = ap.parse_args()
    if a.quick:
        a.n, a.rounds, a.micro_calls = 128, 1, 500

    micro = per_call(a.micro_calls, 32)
    handle = ServerHandle("process", a.latency)
    try:
        e2e = end_to_end(handle.base_url, a.n, a.concurrency, a.rounds)
    finally:
        server = handle.stop()

    ratio = micro["miss_overhead_us"] / 1e6 / a.latency
    result = {
        "benchmark": "call cache overhead per call vs a loopback generation call",
        "latency_s": a.latency,
        "per_call": micro,
        "overhead_over_latency_pct": ratio * 100,
        "goal_pct": 2.0,
        "meets_goal": ratio < 0.02,
        "end_to_end": e2e,
        "server": server,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"per call: miss (key+lookup+claim+store) {micro['miss_overhead_us']:.0f} us, hit {micro['hit_us']:.0f} us, "
          f"entry {micro['entry_bytes']} B")
    print(f"overhead / {a.latency:g} s call = {ratio * 100:.3f} % (goal < 2 %)")
    m = e2e["median_s"]
    print(f"end to end, {a.n} calls at concurrency {a.concurrency}: plain {m['plain']:.3f} s, cached cold "
          f"{m['cached_cold']:.3f} s ({e2e['slowdown_cold_pct']:+.2f} %), cached warm {m['cached_warm']:.3f} s")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
