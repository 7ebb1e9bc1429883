"""Throughput of the `openai` backend against a fake OpenAI server on loopback.

The limit: the server answers every request `--latency` seconds after it arrived (no
faults), so at concurrency c no client can do better than c / latency requests/s. For each
concurrency this sends about `--seconds` worth of requests through `OpenAIBackend.generate`
and reports achieved / limit (goal: >= 90 % at 16, 64 and 256; the median of `--repeats`).

The backend is driven the way the engine drives it: every call reserves its worst case on
a ledger account and settles its priced usage, every answer is streamed to `on_result`,
every request has its own seed. Next to it, measured in the same run against the same
server and interleaved with it, a bare aiohttp client (c workers posting prebuilt bodies
and parsing the answers, nothing else): what this machine, its kernel and aiohttp allow,
so the backend's own cost is the gap between the two rows.

The server runs in its own process (`--server process`; a server thread in the client's
process shares its GIL and caps the numbers: `--server thread` shows it). It is the lean
implementation by default (`--server-impl lean`, LeanOpenAIServer: the same answers as the
tests' aiohttp.web FakeOpenAIServer, about half its CPU per request): on a 2-core machine the
server's own work competes with the client for the cores and its queueing adds to every
request's latency, which is the server's cost, not the client's. `--server-impl aiohttp`
measures against the tests' server. One warm-up round of `concurrency` requests per client
opens the keep-alive connections before the timed runs.

    .venv/bin/python benchmarks/bench_openai_throughput.py [--quick] [--repeats 3]
        [--server process|thread] [--server-impl lean|aiohttp]

Writes benchmarks/results/openai_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from charbuild.backends.base import GenRequest  # noqa: E402
from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig, build_payload  # noqa: E402
from charbuild.ledger import Ledger  # noqa: E402
from machine import busy_cpu_s  # noqa: E402  (benchmarks/machine.py)
from support.openai_server import ServerHandle  # noqa: E402


def price(tokens_in: int, tokens_out: int) -> float:
    return tokens_in * 0.27e-6 + tokens_out * 1.1e-6  # a typical API price: every answer is priced


def make_requests(n: int, tag: str) -> list[GenRequest]:
    return [GenRequest(messages=[{"role": "user", "content": f"{tag} prompt number {i}"}], max_tokens=64, seed=i)
            for i in range(n)]


class Timed:
    """One timed run: wall, this process's CPU, the server's CPU, the rest of the machine's."""

    def __init__(self, server: ServerHandle):
        self.server = server

    def __enter__(self) -> "Timed":
        self.scpu0, self.busy0 = self.server.cpu(), busy_cpu_s()
        self.cpu0, self.t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.cpu0
        self.scpu = self.server.cpu() - self.scpu0
        self.other = max(0.0, busy_cpu_s() - self.busy0 - self.cpu - self.scpu) / self.wall


def run_backend(be: OpenAIBackend, server: ServerHandle, n: int, tag: str) -> tuple[Timed, int]:
    ledger = Ledger()
    reqs = make_requests(n, tag)
    streamed = []
    with Timed(server) as t:
        results = be.generate(reqs, on_result=lambda i, r: streamed.append(i), ledger=ledger.account())
    assert len(results) == n and len(streamed) == n and all(r.meta["attempts"] == 1 for r in results)
    # every call was reserved and settled (what is left reserved is float rounding), and priced
    assert ledger.api_calls == n and ledger.reserved_tokens == 0 and abs(ledger.reserved_usd) < 1e-9 and ledger.usd > 0
    return t, n


def run_bare(base_url: str, server: ServerHandle, concurrency: int, n: int, tag: str, warm: bool) -> Timed | None:
    """The reference client: `concurrency` workers on one aiohttp session, prebuilt bodies."""
    import aiohttp

    url = base_url.rstrip("/") + "/chat/completions"
    bodies = [json.dumps(build_payload("fake-model", r)).encode() for r in make_requests(n, tag)]
    headers = {"Content-Type": "application/json"}

    async def main() -> Timed | None:
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def worker(queue: list[bytes]) -> None:
                while queue:
                    body = queue.pop()
                    async with session.post(url, data=body, headers=headers) as resp:
                        data = json.loads(await resp.read())
                        assert resp.status == 200 and data["choices"][0]["message"]["content"]

            async def round_(queue: list[bytes]) -> None:
                await asyncio.gather(*[worker(queue) for _ in range(concurrency)])

            await round_(bodies[:concurrency])  # warm-up: open the keep-alive connections
            if warm:
                return None
            queue = bodies[::-1]
            with Timed(server) as t:
                await round_(queue)
            return t

    return asyncio.run(main())


def measure(server: ServerHandle, concurrency: int, latency: float, seconds: float, repeats: int) -> dict:
    limit = concurrency / latency
    n = max(concurrency, int(round(limit * seconds / concurrency)) * concurrency)
    cfg = OpenAIConfig(model="fake-model", base_url=server.base_url, api_key_env=None,
                       concurrency=concurrency, timeout_s=60)
    backend_runs: list[Timed] = []
    bare_runs: list[Timed] = []
    with OpenAIBackend(cfg, cost=price) as be:
        be.generate(make_requests(concurrency, "warm-up"))  # open the keep-alive connections
        for r in range(repeats):  # interleaved, alternating which goes first
            if r % 2:
                bare_runs.append(run_bare(server.base_url, server, concurrency, n, f"bare{r}", False))
                backend_runs.append(run_backend(be, server, n, f"backend{r}")[0])
            else:
                backend_runs.append(run_backend(be, server, n, f"backend{r}")[0])
                bare_runs.append(run_bare(server.base_url, server, concurrency, n, f"bare{r}", False))

    def med(runs: list[Timed], attr: str) -> float:
        return statistics.median(getattr(t, attr) for t in runs)

    wall, bare_wall = med(backend_runs, "wall"), med(bare_runs, "wall")
    return {"concurrency": concurrency, "requests": n, "repeats": repeats,
            "wall_s": round(wall, 3), "req_per_s": round(n / wall, 1), "limit_req_per_s": round(limit, 1),
            "ratio": round(n / wall / limit, 4),
            "bare_aiohttp_wall_s": round(bare_wall, 3), "bare_aiohttp_ratio": round(n / bare_wall / limit, 4),
            "backend_over_bare": round(bare_wall / wall, 4),
            "ratios_all": [round(n / t.wall / limit, 4) for t in backend_runs],
            "bare_ratios_all": [round(n / t.wall / limit, 4) for t in bare_runs],
            "client_cpu_s": round(med(backend_runs, "cpu"), 3), "bare_client_cpu_s": round(med(bare_runs, "cpu"), 3),
            "server_cpu_s": round(med(backend_runs, "scpu"), 3),
            # CPU the rest of the machine burnt meanwhile, in cores: > 0.2 means a noisy run
            "other_load_cores": round(max(t.other for t in backend_runs + bare_runs), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~1 s per run and one repeat instead of ~5 s and three")
    ap.add_argument("--server", choices=["process", "thread"], default="process")
    ap.add_argument("--server-impl", choices=["lean", "aiohttp"], default="lean")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "openai_throughput.json"))
    args = ap.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    repeats = args.repeats or (1 if args.quick else 3)

    rows = []
    for c in args.concurrency:
        server = ServerHandle(args.server, args.latency, args.server_impl)  # fresh server per concurrency
        try:
            row = measure(server, c, args.latency, seconds, repeats)
        finally:
            stats = server.stop()
        row["server_peak_in_flight"] = stats["peak_in_flight"]
        rows.append(row)

    print(f"openai backend throughput, server={args.server}/{args.server_impl}, latency={args.latency}s, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}, median of {repeats}")
    print("limit = concurrency / latency (the server answers each request that long after it arrives); "
          "bare = a bare aiohttp client on the same server, same run")
    print(f"{'conc':>5} {'requests':>9} {'wall s':>7} {'req/s':>8} {'limit':>8} {'ratio':>7} {'bare':>7} "
          f"{'vs bare':>7} {'peak':>5} {'client cpu':>10} {'bare cpu':>9} {'server cpu':>10} {'other load':>10}")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['requests']:>9} {r['wall_s']:>7.2f} {r['req_per_s']:>8.1f} "
              f"{r['limit_req_per_s']:>8.1f} {r['ratio']:>7.1%} {r['bare_aiohttp_ratio']:>7.1%} "
              f"{r['backend_over_bare']:>7.1%} {r['server_peak_in_flight']:>5} {r['client_cpu_s']:>9.2f}s "
              f"{r['bare_client_cpu_s']:>8.2f}s {r['server_cpu_s']:>9.2f}s {r['other_load_cores']:>6.2f} cores")
    if any(r["other_load_cores"] > 0.2 for r in rows):
        print("note: other processes used CPU during the run; its ratios understate the backend")
    worst = min(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.1%} of the limit (goal >= 90%): {'OK' if worst >= 0.9 else 'BELOW GOAL'}")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"server": args.server, "server_impl": args.server_impl, "latency_s": args.latency,
                   "seconds_per_run": seconds, "repeats": repeats, "quick": args.quick, "cpus": os.cpu_count(),
                   "python": platform.python_version(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "limit": "concurrency / latency_s", "results": rows, "worst_ratio": worst, "goal": 0.9}, f, indent=2)
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
