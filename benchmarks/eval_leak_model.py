"""Measure the paraphrased-leak patterns alone and patterns OR classifier on the labelled sets.

    python benchmarks/eval_leak_model.py [--model benchmarks/results/leak-model.json] [--show]

Prints, per set: leaks caught and false alarms for the patterns (quality.find_paraphrased_leak),
the classifier alone, and the two combined; and the classifier's scoring time per reply.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from leak_model import LeakModel, find_leak_combined  # noqa: E402
from charbuild.recipe.quality import find_paraphrased_leak  # noqa: E402

SETS = ("leaks.jsonl", "leaks-untuned.jsonl", "leaks-heldout.jsonl", "leaks-heldout2.jsonl", "leaks-heldout3.jsonl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "benchmarks" / "results" / "leak-model.json")
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument("--show", action="store_true", help="list the misses and false alarms")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "leak_model_eval.json")
    args = ap.parse_args(argv)
    model = LeakModel.load(args.model)
    print(f"threshold {model.threshold}")
    results: dict = {"model": model.meta, "threshold": model.threshold}
    for name in args.sets:
        path = ROOT / "tests" / "data" / name
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out = {}
        for r in rows:
            p = find_paraphrased_leak(r["text"]) is not None
            s = model.score(r["text"])
            c = s > model.threshold
            both = find_leak_combined(r["text"], model) is not None
            assert both == (p or c)
            out[id(r)] = (p, c, both, s)
        leaks = [r for r in rows if r["leak"]]
        clean = [r for r in rows if not r["leak"]]
        line = [f"{name}: {len(leaks)} leaks, {len(clean)} clean"]
        results[name] = {"leaks": len(leaks), "clean": len(clean)}
        for k, label in enumerate(("patterns", "classifier", "combined")):
            caught = sum(out[id(r)][k] for r in leaks)
            fa = sum(out[id(r)][k] for r in clean)
            results[name][label] = {"caught": caught, "false_alarms": fa}
            line.append(f"{label} {caught}/{len(leaks)} = {caught / len(leaks):.1%} caught, "
                        f"{fa}/{len(clean)} = {fa / len(clean):.1%} false alarms")
        print("\n  ".join(line))
        if args.show:
            for r in leaks:
                p, c, _, s = out[id(r)]
                if not (p and c):
                    print(f"    leak  patterns={int(p)} clf={int(c)} p={s:.3f} | {r['text'][:160]!r}")
            for r in clean:
                p, c, _, s = out[id(r)]
                if p or c:
                    print(f"    clean patterns={int(p)} clf={int(c)} p={s:.3f} | {r['text'][:160]!r}")
    texts = [json.loads(line)["text"] for name in SETS if (ROOT / "tests/data" / name).exists()
             for line in (ROOT / "tests/data" / name).read_text(encoding="utf-8").splitlines()]
    t0 = time.perf_counter()
    for t in texts:
        model.score(t)
    per = (time.perf_counter() - t0) / len(texts)
    long = max(texts, key=len)
    t0 = time.perf_counter()
    for _ in range(20):
        model.score(long)
    print(f"scoring: {per * 1e3:.3f} ms per reply on average over {len(texts)} "
          f"(mean {sum(map(len, texts)) / len(texts):.0f} chars); {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms "
          f"for the longest ({len(long)} chars)")
    results["ms_per_reply"] = round(per * 1e3, 4)
    if args.results:
        args.results.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
