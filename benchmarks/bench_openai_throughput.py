"""Throughput of the `openai` backend against the fake OpenAI server on loopback.

The server answers every request after `--latency` seconds (no faults), so the best
possible rate at concurrency c is c / latency requests/s.  For each concurrency this
sends about `--seconds` worth of requests through `OpenAIBackend.generate` and reports
achieved/limit (goal: >= 90 %).

By default the server runs in a separate process (`--server process`): on a 2-core
machine a server thread in the client's process shares its GIL and caps the numbers
(measured: use `--server thread` to see it).  One warm-up round of `concurrency`
requests opens the keep-alive connections before the timed run.

    .venv/bin/python benchmarks/bench_openai_throughput.py [--quick] [--server thread|process]

Writes benchmarks/results/openai_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from charbuild.backends.base import GenRequest  # noqa: E402
from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig  # noqa: E402
from support.openai_server import ServerHandle  # noqa: E402


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy so far (Linux /proc/stat), or nan."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def run_one(server: ServerHandle, concurrency: int, latency: float, seconds: float) -> dict:
    base_url = server.base_url
    limit = concurrency / latency
    n = max(concurrency, int(round(limit * seconds / concurrency)) * concurrency)
    cfg = OpenAIConfig(model="fake-model", base_url=base_url, api_key_env=None,
                       concurrency=concurrency, timeout_s=60)
    reqs = [GenRequest(messages=[{"role": "user", "content": f"prompt number {i}"}], max_tokens=64, seed=i)
            for i in range(n)]
    with OpenAIBackend(cfg) as be:
        be.generate(reqs[:concurrency])  # warm-up: open the keep-alive connections
        scpu0, busy0 = server.cpu(), busy_cpu_s()
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        results = be.generate(reqs)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        scpu, busy = server.cpu() - scpu0, busy_cpu_s() - busy0
    assert len(results) == n and all(r.meta["attempts"] == 1 for r in results)
    rate = n / wall
    return {"concurrency": concurrency, "requests": n, "wall_s": round(wall, 3),
            "req_per_s": round(rate, 1), "limit_req_per_s": round(limit, 1),
            "ratio": round(rate / limit, 4), "client_cpu_s": round(cpu, 3), "server_cpu_s": round(scpu, 3),
            # CPU the rest of the machine burnt meanwhile, in cores: > 0.2 means a noisy run
            "other_load_cores": round(max(0.0, busy - cpu - scpu) / wall, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~1 s per concurrency instead of ~5 s")
    ap.add_argument("--server", choices=["process", "thread"], default="process")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "openai_throughput.json"))
    args = ap.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 5.0)

    rows = []
    for c in args.concurrency:
        server = ServerHandle(args.server, args.latency)  # fresh server per run
        try:
            row = run_one(server, c, args.latency, seconds)
        finally:
            stats = server.stop()
        row["server_peak_in_flight"] = stats["peak_in_flight"]
        rows.append(row)

    print(f"openai backend throughput, server={args.server}, latency={args.latency}s, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{'conc':>5} {'requests':>9} {'wall s':>7} {'req/s':>8} {'limit':>8} {'ratio':>7} {'peak':>5} "
          f"{'client cpu':>10} {'server cpu':>10} {'other load':>10}")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['requests']:>9} {r['wall_s']:>7.2f} {r['req_per_s']:>8.1f} "
              f"{r['limit_req_per_s']:>8.1f} {r['ratio']:>7.1%} {r['server_peak_in_flight']:>5} "
              f"{r['client_cpu_s']:>9.2f}s {r['server_cpu_s']:>9.2f}s {r['other_load_cores']:>6.2f} cores")
    if any(r["other_load_cores"] > 0.2 for r in rows):
        print("note: other processes used CPU during the run; its ratios understate the backend")
    worst = min(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.1%} (goal >= 90%): {'OK' if worst >= 0.9 else 'BELOW GOAL'}")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"server": args.server, "latency_s": args.latency, "seconds_per_run": seconds,
                   "quick": args.quick, "cpus": os.cpu_count(), "python": platform.python_version(),
                   "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": rows,
                   "worst_ratio": worst, "goal": 0.9}, f, indent=2)
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
