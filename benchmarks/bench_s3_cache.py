"""The cost per target of a cache on S3 against a local one, on a real S3 API on loopback
(moto's server, in a child process), measured in the same run.

The spec is the engine tests' plug-in stages (tests/support/engine_stages.py: a source,
N item shards, a merge), whose stages do almost nothing: what is measured is the cache's
own work per target, not a stage's. Three situations, each run on both caches, local and
S3 interleaved (local first, then S3 first, ...):

- build:       everything built into an empty cache (S3: staged and committed locally, then
               the files uploaded and the manifest created, build leases taken and dropped);
- null, fresh: a second run on a worker that has nothing (S3: a new local working cache,
               every target found by its manifest in the bucket; nothing is downloaded);
- null, warm:  a second run on the worker that built (both: local objects, verified by stat).

Reported: median seconds per target for each cache, the difference (the overhead per
target) and the ratio S3 / local. Loopback has no network latency: against a real bucket
add a round trip (~10-30 ms in region) per request: a built target costs 1 GET (its
manifest, before publishing) + 1 PUT per file + 1 PUT (manifest) + 2 lease requests; a
target found in a fresh worker's null run 1 GET (2 when it is missing: its alias too).

    python benchmarks/bench_s3_cache.py [--shards 48] [--runs 5]

Writes benchmarks/results/s3_cache.json.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from machine import busy_cpu_s  # noqa: E402  (benchmarks/machine.py)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=48, help="item shards (targets = shards + 2)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each situation on each cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "s3_cache.json"))
    args = ap.parse_args()

    from support.s3_server import S3Server, missing

    why = missing()
    if why:
        sys.exit(f"bench_s3_cache: {why}")
    from support.engine_stages import build

    work = Path(tempfile.mkdtemp(prefix="cb-s3-bench-"))
    shutil.copytree(ROOT / "specs", work / "specs")
    shutil.copytree(ROOT / "constitutions", work / "constitutions")
    spec = work / "specs" / "smoke-small.yaml"
    sets = [f"data.dpo_pairs={4 * args.shards}", "data.shard_size=4"]
    os.environ.pop("CB_TEST_LOG", None)

    def timed(cache, local=None) -> tuple[float, int, int]:
        if local is not None:
            os.environ["CHARBUILD_LOCAL_CACHE"] = str(local)
        t = time.perf_counter()
        plan, report = build(spec, cache, sets)
        wall = time.perf_counter() - t
        return wall, len(plan.rows), len(report.built)

    walls: dict[str, dict[str, list[float]]] = {s: {"local": [], "s3": []} for s in ("build", "null_fresh", "null_warm")}
    targets = 0
    busy0, t0 = busy_cpu_s(), time.time()
    with S3Server(bucket="charbuild-bench", own_process=True) as s3:
        timed(str(work / "warmup"))  # imports, first spec load: paid by neither side
        timed(s3.url("warmup"), work / "warmup-w")
        for run in range(args.runs):
            order = ("local", "s3") if run % 2 == 0 else ("s3", "local")
            for side in order:
                if side == "local":
                    root = work / f"local-{run}"
                    w, targets, built = timed(str(root))
                    assert built == targets
                    walls["build"]["local"].append(w)
                    # A fresh worker of a local cache is a copy of the whole cache: the
                    # baseline for a null run that finds every object present.
                    shutil.copytree(root, work / f"local-{run}-copy")
                    w, _, built = timed(str(work / f"local-{run}-copy"))
                    assert built == 0
                    walls["null_fresh"]["local"].append(w)
                    w, _, built = timed(str(root))
                    assert built == 0
                    walls["null_warm"]["local"].append(w)
                else:
                    url = s3.url(f"run-{run}")
                    w, targets, built = timed(url, work / f"s3-{run}-a")
                    assert built == targets
                    walls["build"]["s3"].append(w)
                    w, _, built = timed(url, work / f"s3-{run}-b")  # a fresh worker
                    assert built == 0
                    walls["null_fresh"]["s3"].append(w)
                    w, _, built = timed(url, work / f"s3-{run}-a")
                    assert built == 0
                    walls["null_warm"]["s3"].append(w)
    elapsed = time.time() - t0
    busy = (busy_cpu_s() - busy0) / elapsed if elapsed else float("nan")
    shutil.rmtree(work, ignore_errors=True)

    out = {"benchmark": "cache on S3 (moto on loopback) vs a local cache: seconds per target, same run",
           "targets": targets, "runs": args.runs, "situations": {}}
    print(f"{targets} targets, {args.runs} runs of each; median seconds per target")
    print(f"{'situation':<12} {'local ms':>9} {'S3 ms':>9} {'overhead ms':>12} {'S3/local':>9}")
    for situation, sides in walls.items():
        local = statistics.median(sides["local"]) / targets
        remote = statistics.median(sides["s3"]) / targets
        out["situations"][situation] = {
            "walls_s": sides, "local_s_per_target": local, "s3_s_per_target": remote,
            "overhead_s_per_target": remote - local, "ratio": remote / local}
        print(f"{situation:<12} {local * 1e3:>9.2f} {remote * 1e3:>9.2f} {(remote - local) * 1e3:>12.2f} "
              f"{remote / local:>8.1f}x")
    out["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                      "busy_cores_during_run": round(busy, 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"machine busy {busy:.2f} cores on average; wrote {args.out}")


if __name__ == "__main__":
    main()
