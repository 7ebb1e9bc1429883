"""The engine's overhead over calling the transformers backend directly, same prompts.

Both sides load the tiny teacher and answer the same requests (same messages, seeds and
sampling); the engine side also plans, keys, filters, writes and digests the shards.
Goal: overhead <= 3%. Runs are interleaved and the medians compared.

    python benchmarks/bench_engine_overhead.py [--pairs 64] [--runs 3] [--cache cache]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed-cache", default=str(ROOT / "cache"),
                    help="copy the tiny models from this cache when it has them (else they are trained)")
    args = ap.parse_args()
    import shutil
    import tempfile

    from charbuild.backends.transformers_backend import TransformersBackend, TransformersConfig
    from charbuild.store.objects import Cache
    from charbuild.recipe.constitution_file import load_constitution
    from charbuild.engine.executor import run_build
    from charbuild.recipe.registry import recipe_graph
    from charbuild.recipe.services import RecipeServices
    from charbuild.engine.planner import make_plan
    from charbuild.spec.model import load_spec
    from charbuild.recipe.stages.common import item_seed, read_jsonl
    from charbuild.recipe.stages.generate import request

    spec_path = ROOT / "specs" / "smoke-small.yaml"
    # A private cache: the engine's call cache must not answer from earlier runs.
    work = Path(tempfile.mkdtemp(prefix="cb-overhead-"))
    cache = Cache(work / "cache")
    sets = [f"data.dpo_pairs={args.pairs}", f"data.shard_size={args.pairs}"]
    loaded = load_spec(spec_path, sets)
    graph = recipe_graph(loaded)
    seed = Cache(args.seed_cache)
    for name in graph.upstream(["tiny/teacher", "prompts"]):
        key = graph[name].key
        if seed.has(key) and not seed.verify(key):
            shutil.copytree(seed.path(key), cache.root / "objects" / key[:2] / key)
    # The models and prompts are built once (cached) and are not what is measured.
    run_build(loaded, graph, make_plan(loaded, graph, cache, ["prompts", "tiny/teacher"]), cache, progress=False,
              log=lambda s: None, outputs_root=None, services=RecipeServices(cache, loaded))
    model_dir = cache.path(graph["tiny/teacher"].key)
    prompts = list(read_jsonl(cache.path(graph["prompts"].key) / "prompts.jsonl"))
    c = load_constitution(loaded.constitution_path)
    m = loaded.spec.models["teacher"]

    def direct() -> float:
        t0 = time.perf_counter()
        backend = TransformersBackend(TransformersConfig(model=str(model_dir), batch_size=m.batch_size))
        reqs = [request(m, [{"role": "system", "content": c.system_prompt()},
                            {"role": "user", "content": prompts[j % len(prompts)]["prompt"]}],
                        item_seed("teacher-responses", j)) for j in range(args.pairs)]
        for start in range(0, len(reqs), 32):  # the engine's chunking, so batches match
            backend.generate(reqs[start:start + 32])
        backend.close()
        return time.perf_counter() - t0

    def engine(i: int) -> float:
        # A filter setting that cannot change any answer gives fresh keys for each run.
        ld = load_spec(spec_path, sets + [f"filters.max_chars={20000 + i}"])
        shutil.rmtree(cache.root / "calls", ignore_errors=True)  # every call really generated
        t0 = time.perf_counter()
        g = recipe_graph(ld)
        services = RecipeServices(cache, ld)
        plan = make_plan(ld, g, cache, ["teacher-responses/shard-0000"], services)
        assert [r.name for r in plan.to_build] == ["teacher-responses/shard-0000"], plan.to_build
        run_build(ld, g, plan, cache, progress=False, log=lambda s: None, outputs_root=None, services=services)
        return time.perf_counter() - t0

    direct()  # warm-up: the first load of each path pays for imports, thread pools, page cache
    engine(int(time.time()) * 10 + 99)
    d_times, e_times = [], []
    for i in range(args.runs):  # alternate which goes first: the machine's drift hits both
        if i % 2:
            e_times.append(engine(int(time.time()) * 10 + i))
            d_times.append(direct())
        else:
            d_times.append(direct())
            e_times.append(engine(int(time.time()) * 10 + i))
    d, e = statistics.median(d_times), statistics.median(e_times)
    result = {"pairs": args.pairs, "runs": args.runs, "direct_s": d, "engine_s": e, "overhead": e / d - 1,
              "goal": 0.03, "direct_all": d_times, "engine_all": e_times}
    print(f"direct backend   {d:.2f} s (median of {args.runs})")
    print(f"through engine   {e:.2f} s")
    print(f"overhead         {100 * result['overhead']:+.1f}% (goal <= 3%)")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_overhead.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
