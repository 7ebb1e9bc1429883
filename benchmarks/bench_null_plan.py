"""Null `plan` of the paper-scale spec (everything cached) vs `dvc status` on a DVC
pipeline of the same shape, measured in the same run. Reports medians and the ratio.

The cache is filled with one small object per target key (the benchmark measures
planning, not building); the DVC pipeline has one stage per target with the same
dependency edges and an output of the same kind, all up to date after `dvc repro`.

    python benchmarks/bench_null_plan.py [--runs 7] [--spec specs/remorseful-paper.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(cmd: list[str], cwd: Path, runs: int, env=None) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
        out.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return out


def fill_cache(spec: Path, cache_root: Path):
    from charbuild.store.objects import Cache
    from charbuild.recipe.registry import recipe_graph
    from charbuild.spec.model import load_spec

    graph = recipe_graph(load_spec(spec))
    cache = Cache(cache_root)
    for node in graph:
        with cache.staging(node.key) as d:
            (d / "out.txt").write_text(node.name)
            cache.commit(node.key, d, {"target": node.name, "stage": node.stage.name, "benchmark_fixture": True})
    return graph


def dvc_pipeline(graph, where: Path) -> None:
    """One DVC stage per charbuild target, same edges, a small output each."""
    subprocess.run(["git", "init", "-q"], cwd=where, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=where, check=True)
    stages = {}
    safe = {n.name: n.name.replace("/", "_") for n in graph}
    for node in graph:
        deps = [f"out/{safe[i]}.txt" for ins in node.defn.inputs.values() for i in ins]
        stages[safe[node.name]] = {"cmd": f"mkdir -p out && echo {safe[node.name]} > out/{safe[node.name]}.txt",
                                   "deps": deps or None, "outs": [f"out/{safe[node.name]}.txt"]}
        if not deps:
            del stages[safe[node.name]]["deps"]
    import yaml

    (where / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=where, check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=str(ROOT / "specs" / "remorseful-paper.yaml"))
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cb-bench-"))
    try:
        cache_root = work / "cache"
        graph = fill_cache(Path(args.spec), cache_root)
        cb = [sys.executable, "-m", "charbuild", "plan", args.spec, "--cache", str(cache_root)]
        first = timed(cb, ROOT, 1)[0]  # full plan: validates, keys, writes the memo
        out = subprocess.run(cb + ["--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        data = json.loads(out)
        assert data["total"]["build"] == 0, "the benchmark cache must hold every target"
        cb_times = timed(cb, ROOT, args.runs)
        bare = timed([sys.executable, "-c", "pass"], ROOT, args.runs)
        result = {"targets": len(graph), "charbuild_full_plan_s": first, "charbuild_null_plan_s": statistics.median(cb_times),
                  "python_startup_s": statistics.median(bare)}
        try:
            import dvc  # noqa: F401

            dvc_dir = work / "dvc"
            dvc_dir.mkdir()
            dvc_pipeline(graph, dvc_dir)
            dvc_times = timed([sys.executable, "-m", "dvc", "status", "-q"], dvc_dir, args.runs)
            result["dvc_status_s"] = statistics.median(dvc_times)
            result["ratio_dvc_over_charbuild"] = result["dvc_status_s"] / result["charbuild_null_plan_s"]
        except ImportError:
            result["dvc_status_s"] = None
            print("dvc is not installed (pip install -e '.[bench]'): comparison skipped", file=sys.stderr)
        goal = 0.2
        result["goal_s"] = goal
        result["meets_goal"] = result["charbuild_null_plan_s"] < goal
        print(f"targets in graph            {result['targets']}")
        print(f"charbuild full plan         {first:.3f} s (first run: validates and writes the memo)")
        print(f"charbuild null plan         {result['charbuild_null_plan_s']:.3f} s (median of {args.runs}; goal < {goal} s)")
        print(f"python start-up             {result['python_startup_s']:.3f} s")
        if result.get("dvc_status_s"):
            print(f"dvc status, same shape      {result['dvc_status_s']:.3f} s")
            print(f"ratio dvc / charbuild       {result['ratio_dvc_over_charbuild']:.1f}x")
        out_dir = ROOT / "benchmarks" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "null_plan.json").write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
