"""Measure leak detection on the labelled sets: the patterns alone, the classifier alone, and
the two together (what the teacher stages use, quality.find_paraphrased_leak).

    python benchmarks/eval_leak_model.py [--model PATH.json.gz] [--sets NAME ...] [--show]

By default the shipped model (charbuild/data/leak_model.json.gz) on every set in
tests/data; `--model` measures a freshly trained file instead (leak_training.py --out),
refused unless it was trained with this checkout's featuriser.
Prints per set: leaks caught and false alarms, and the scoring time per reply; writes
benchmarks/results/leak_model_eval.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charbuild.recipe.leak_model import LeakModel, check_featuriser, packaged  # noqa: E402
from charbuild.recipe.quality import find_paraphrased_leak, leak_by_patterns  # noqa: E402

DATA = ROOT / "tests" / "data"


def all_sets() -> list[str]:
    return [p.name for p in sorted(DATA.glob("leaks*.jsonl"))] + \
        [str(p.relative_to(DATA)) for p in sorted(DATA.glob("leak-corpus/*.jsonl"))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="a trained .json.gz (default: the shipped model)")
    ap.add_argument("--sets", nargs="*", default=None)
    ap.add_argument("--show", action="store_true", help="list the misses and false alarms")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "leak_model_eval.json")
    args = ap.parse_args(argv)
    model = (check_featuriser(LeakModel.from_json(gzip.decompress(args.model.read_bytes())), str(args.model))
             if args.model else packaged())
    print(f"threshold {model.threshold}, pattern floor {model.pattern_floor}; trained on {model.meta.get('trained_on')}")
    results: dict = {"model": model.meta, "threshold": model.threshold, "sets": {}}
    texts: list[str] = []
    for name in args.sets or all_sets():
        rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]
        texts += [r["text"] for r in rows]
        out = []
        for r in rows:
            # the request the reply answers, which the teacher stages show the screen (older sets have none)
            found, asked = leak_by_patterns(r["text"]), r.get("request", "")
            s, _ = model.best_passage(r["text"], asked)
            both = model.find(r["text"], found, asked) is not None
            out.append((found is not None, s > model.threshold, s, both))
            if args.model is None:  # the shipped model: what the stages run is exactly this
                assert (find_paraphrased_leak(r["text"], request=asked) is not None) == both
        leaks = [o for o, r in zip(out, rows) if r["leak"]]
        clean = [o for o, r in zip(out, rows) if not r["leak"]]
        line = [f"{name}: {len(leaks)} leaks, {len(clean)} clean"]
        res = results["sets"][name] = {"leaks": len(leaks), "clean": len(clean)}
        for label, hit in (("patterns", lambda o: o[0]), ("classifier", lambda o: o[1]),
                           ("combined", lambda o: o[3])):
            caught = sum(map(hit, leaks))
            fa = sum(map(hit, clean))
            res[label] = {"caught": caught, "false_alarms": fa}
            line.append(f"{label:10} {caught}/{len(leaks)} = {caught / max(1, len(leaks)):.1%} caught, "
                        f"{fa}/{len(clean)} = {fa / max(1, len(clean)):.1%} false alarms")
        print("\n  ".join(line))
        if args.show:
            for (p, c, s, both), r in zip(out, rows):
                if r["leak"] != both:
                    print(f"    {'missed' if r['leak'] else 'alarm '} patterns={int(p)} clf={int(c)} p={s:.3f} | "
                          f"{r['text'][:200]!r}")
    t0 = time.perf_counter()
    for t in texts:
        model.best_passage(t)
    per = (time.perf_counter() - t0) / max(1, len(texts))
    long = max(texts, key=len)
    t0 = time.perf_counter()
    for _ in range(20):
        model.best_passage(long)
    print(f"scoring: {per * 1e3:.3f} ms per reply on average over {len(texts)} "
          f"(mean {sum(map(len, texts)) / max(1, len(texts)):.0f} chars); "
          f"{(time.perf_counter() - t0) / 20 * 1e3:.2f} ms for the longest ({len(long)} chars)")
    results["ms_per_reply"] = round(per * 1e3, 4)
    if args.results and args.results.name:  # --results "" writes nothing
        args.results.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
