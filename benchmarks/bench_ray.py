"""The Ray executor against the local one: the four-scale ablation of the smoke spec, on a
2-worker local Ray cluster (2 nodes of 1 CPU) and in this process, measured in the same run.

The build is the smoke spec with the engine's plug-in stages (tests/support/engine_stages.py:
a source, item shards, a merge; no models) at 25/50/75/100% of 64 items in shards of 4,
one scale after another in one cache, as an ablation is built: a shard built for 25% is
reused by 50%, so 16 item shards and 4 merges are built in all. Each shard does `--work`
seconds of work, CPU-bound (`spin`: threads cannot share it, processes can) or waiting
(`sleep`: an API call's wait). Reported, each as a ratio to the local executor with one
job, the baseline measured in the same run:

  local-1: LocalExecutor(1), the default;   local-2: LocalExecutor(2), two threads;
  ray-2:   RayExecutor on the 2-node cluster (first run after the cluster is up; its
           workers' start is part of it), and ray-2-warm (the same, run again with new keys).

Plus the overhead per target: the same build with no work per shard, (ray - local) / targets,
with a new executor in a new worker environment (cold) and again (warm).

Ray needs its own network namespace to stay on loopback, so the script re-runs itself under
`unshare -n` (root) unless it is inside one already.

    python benchmarks/bench_ray.py [--work 0.5] [--kind spin|sleep]

Writes benchmarks/results/ray-<kind>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT)]
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])

SCALES = (0.25, 0.5, 0.75, 1.0)
MB = 1024 * 1024


def ablation(spec: Path, cache: Path, executor_factory, tag: str, env: dict) -> dict:
    """The four scales in turn on one cache, with one executor (an ablation spec builds them
    in one run); seconds (the executor's start included) and targets built."""
    os.environ.update(env)
    t = time.perf_counter()
    built = 0
    ex = executor_factory()
    try:
        for scale in SCALES:
            _, report = _build(spec, cache, scale, tag, ex)
            assert not report.failed, report.failed
            built += len(report.built)
    finally:
        ex.shutdown()
    return {"seconds": round(time.perf_counter() - t, 3), "built": built}


def _build(spec: Path, cache: Path, scale: float, tag: str, ex):
    from support import engine_stages

    from charbuild.engine.executor import run_build
    from charbuild.engine.graph import build_graph
    from charbuild.engine.planner import make_plan
    from charbuild.spec.model import load_spec
    from charbuild.store.objects import Cache

    loaded = load_spec(spec, ["data.dpo_pairs=64", f"persona={tag}", f"data.scale={scale}"])
    graph = build_graph(loaded, engine_stages.stages())
    c = Cache(cache)
    try:
        plan = make_plan(loaded, graph, c)
        return plan, run_build(loaded, graph, plan, c, ex, progress=False, log=lambda s: None, outputs_root=None)
    finally:
        c.close()


def inside(args) -> dict:
    import shutil

    import ray
    from ray.cluster_utils import Cluster

    from charbuild.engine.executor import LocalExecutor
    from charbuild.engine.ray_executor import RayExecutor
    from machine import busy_cpu_s

    work = {"CB_SPIN" if args.kind == "spin" else "CB_SLEEP": str(args.work)}
    idle = {"CB_SPIN": "0", "CB_SLEEP": "0"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shutil.copytree(ROOT / "specs", tmp / "specs")
        shutil.copytree(ROOT / "constitutions", tmp / "constitutions")
        spec = tmp / "specs" / "smoke-small.yaml"
        t = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                "object_store_memory": 80 * MB})
        cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        up_s = time.perf_counter() - t
        busy0, t0 = busy_cpu_s(), time.perf_counter()
        try:
            runs = {}
            for name, factory, env in (
                    ("local-1", lambda: LocalExecutor(1), work),
                    ("local-2", lambda: LocalExecutor(2), work),
                    ("ray-2", lambda: RayExecutor(runtime_env={"env_vars": work}), work),
                    ("ray-2-warm", lambda: RayExecutor(runtime_env={"env_vars": work}), work),
                    ("local-1-idle", lambda: LocalExecutor(1), idle),
                    ("ray-2-idle", lambda: RayExecutor(runtime_env={"env_vars": idle}), idle),
                    ("ray-2-idle-warm", lambda: RayExecutor(runtime_env={"env_vars": idle}), idle)):
                runs[name] = ablation(spec, tmp / f"cache-{name}", factory, name, env)
        finally:
            ray.shutdown()
            cluster.shutdown()
        wall = time.perf_counter() - t0
        busy = busy_cpu_s() - busy0
    base = runs["local-1"]["seconds"]
    targets = runs["local-1-idle"]["built"]
    return {
        "benchmark": "bench_ray", "machine": platform.machine(), "cpus": os.cpu_count(),
        "work": {"kind": args.kind, "seconds_per_shard": args.work, "scales": SCALES, "items": 64, "shard_size": 4},
        "cluster": {"nodes": 2, "cpus_per_node": 1, "up_s": round(up_s, 1)},
        "runs": runs,
        "ratio_to_local_1": {k: round(v["seconds"] / base, 3) for k, v in runs.items() if "idle" not in k},
        # No work per shard: what Ray adds per target, with its start (a governor actor, worker
        # processes for a new environment) and once its workers are up.
        "overhead_per_target_ms": round(1000 * (runs["ray-2-idle"]["seconds"] - runs["local-1-idle"]["seconds"])
                                        / targets, 1),
        "overhead_per_target_ms_warm": round(1000 * (runs["ray-2-idle-warm"]["seconds"]
                                                     - runs["local-1-idle"]["seconds"]) / targets, 1),
        "targets_per_ablation": targets,
        "machine_busy": round(busy / (wall * (os.cpu_count() or 1)), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=float, default=0.5, help="seconds of work per item shard")
    ap.add_argument("--kind", choices=["spin", "sleep"], default="spin", help="CPU-bound work, or waiting")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/ray-<kind>.json")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"ray-{args.kind}.json")
    if not args.inside:
        cmd = " ".join([sys.executable, str(Path(__file__).resolve()), "--inside", "--work", str(args.work),
                        "--kind", args.kind, "--out", args.out])
        sys.exit(subprocess.call(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {cmd}"]))
    result = inside(args)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio_to_local_1", "overhead_per_target_ms",
                                             "overhead_per_target_ms_warm", "machine_busy")}))


if __name__ == "__main__":
    main()
