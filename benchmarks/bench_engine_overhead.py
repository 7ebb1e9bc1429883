"""The engine's overhead over calling the transformers backend directly, same prompts.

Both sides load the tiny teacher and answer the same requests (same messages, seeds,
sampling and chunks of 32); the engine side is what `charbuild run` does for one
teacher-responses shard: load the spec, build the graph, plan (counting the shard's
calls), verify the inputs, ask every call through the call cache (each stored as it is
answered), filter, write, digest and commit the shard with its manifest. Every engine run
has fresh keys (a filter setting that cannot change an answer) and an empty call cache, so
every call really generates; the two sides' answers are checked to be the same tokens.

Headline (what a user feels): the median wall time of the engine runs over the median of
the direct runs, runs interleaved (direct first, then engine first, ...) after a warm-up
of each. Also reported: the median of the paired ratios (each engine run over its
neighbouring direct run), and the engine's own work measured inside each run: wall time
minus the time spent in the model's `generate` (on both sides), which the machine's noise
(other processes on its 2 cores) barely touches. Goal: overhead <= 3%.

    python benchmarks/bench_engine_overhead.py [--pairs 128] [--runs 7]

Writes benchmarks/results/engine_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import busy_cpu_s  # noqa: E402  (benchmarks/machine.py)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=128, help="generations per run (one shard of this many DPO pairs)")
    ap.add_argument("--runs", type=int, default=7, help="timed runs of each side, interleaved")
    ap.add_argument("--seed-cache", default=str(ROOT / "cache"),
                    help="copy the tiny models from this cache when it has them (else they are trained)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_overhead.json"))
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

    # Time spent in the model, on both sides (one perf_counter pair per chunk of 32).
    in_model = [0.0]
    generate = TransformersBackend.generate

    def timed_generate(self, *a, **kw):
        t = time.perf_counter()
        try:
            return generate(self, *a, **kw)
        finally:
            in_model[0] += time.perf_counter() - t

    TransformersBackend.generate = timed_generate

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
    system = load_constitution(loaded.constitution_path).system_prompt()
    m = loaded.spec.models["teacher"]
    answers: dict[str, list] = {}

    def direct() -> tuple[float, float]:
        in_model[0] = 0.0
        t0 = time.perf_counter()
        backend = TransformersBackend(TransformersConfig(model=str(model_dir), batch_size=m.batch_size))
        reqs = [request(m, [{"role": "system", "content": system},
                            {"role": "user", "content": prompts[j % len(prompts)]["prompt"]}],
                        item_seed("teacher-responses", j)) for j in range(args.pairs)]
        out = []
        for start in range(0, len(reqs), 32):  # the engine's chunking, so batches match
            out += backend.generate(reqs[start:start + 32])
        backend.close()
        wall = time.perf_counter() - t0
        answers["direct"] = [(r.prompt_tokens, r.completion_tokens) for r in out]
        return wall, in_model[0]

    def engine(i: int) -> tuple[float, float]:
        shutil.rmtree(cache.root / "calls", ignore_errors=True)  # every call really generated
        in_model[0] = 0.0
        t0 = time.perf_counter()
        # What `charbuild run --set ...` does, from reading the spec on.
        # A filter setting that cannot change any answer gives fresh keys for each run.
        ld = load_spec(spec_path, sets + [f"filters.max_chars={20000 + i}"])
        g = recipe_graph(ld)
        services = RecipeServices(cache, ld)
        plan = make_plan(ld, g, cache, ["teacher-responses/shard-0000"], services)
        assert [r.name for r in plan.to_build] == ["teacher-responses/shard-0000"], plan.to_build
        report = run_build(ld, g, plan, cache, progress=False, log=lambda s: None, outputs_root=None,
                           services=services)
        wall = time.perf_counter() - t0
        assert report.built == ["teacher-responses/shard-0000"], report
        rows = read_jsonl(cache.path(g["teacher-responses/shard-0000"].key) / "responses.jsonl")
        answers["engine"] = [(r["prompt_tokens"], r["completion_tokens"]) for r in rows]
        return wall, in_model[0]

    stamp = int(time.time()) * 100
    direct()  # warm-up: the first load of each path pays for imports, thread pools, page cache
    engine(stamp + 99)
    assert answers["engine"] == answers["direct"], "the engine and the direct calls answered differently"
    d_runs, e_runs = [], []
    cpu0, busy0, t_start = time.process_time(), busy_cpu_s(), time.perf_counter()
    for i in range(args.runs):  # alternate which goes first: the machine's drift hits both
        if i % 2:
            e_runs.append(engine(stamp + i))
            d_runs.append(direct())
        else:
            d_runs.append(direct())
            e_runs.append(engine(stamp + i))
        assert answers["engine"] == answers["direct"], "the engine and the direct calls answered differently"
    elapsed = time.perf_counter() - t_start
    other_load = max(0.0, (busy_cpu_s() - busy0) - (time.process_time() - cpu0)) / elapsed

    d_wall = [w for w, _ in d_runs]
    e_wall = [w for w, _ in e_runs]
    d, e = statistics.median(d_wall), statistics.median(e_wall)
    d_own = statistics.median([w - g for w, g in d_runs])  # loading the model, building the requests
    e_own = statistics.median([w - g for w, g in e_runs])  # the same, plus all the engine does
    result = {
        "pairs": args.pairs, "runs": args.runs,
        "direct_s": d, "engine_s": e, "overhead": e / d - 1, "goal": 0.03,
        "paired_overhead_median": statistics.median([ew / dw - 1 for dw, ew in zip(d_wall, e_wall)]),
        "direct_outside_model_s": d_own, "engine_outside_model_s": e_own,
        "engine_own_work_s": e_own - d_own, "engine_own_work_overhead": (e_own - d_own) / d,
        "direct_all": d_runs, "engine_all": e_runs,  # [wall, of which in the model's generate]
        "other_load_cores": round(other_load, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(f"engine overhead, {args.pairs} tiny-model generations, {args.runs} interleaved runs each, "
          f"{os.cpu_count()} CPUs")
    print(f"direct backend   {d:.2f} s (median; runs {', '.join(f'{x:.1f}' for x in d_wall)})")
    print(f"through engine   {e:.2f} s (median; runs {', '.join(f'{x:.1f}' for x in e_wall)})")
    print(f"overhead         {100 * result['overhead']:+.1f}% end to end (goal <= 3%); "
          f"median of paired runs {100 * result['paired_overhead_median']:+.1f}%")
    print(f"engine's own work {e_own - d_own:.3f} s a build ({100 * result['engine_own_work_overhead']:+.2f}% of the "
          f"direct time): outside the model {e_own:.3f} s vs {d_own:.3f} s direct")
    if other_load > 0.2:
        print(f"note: other processes kept {other_load:.1f} cores busy meanwhile: the end-to-end figures are noisy; "
              f"the own-work line is measured inside each run")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
