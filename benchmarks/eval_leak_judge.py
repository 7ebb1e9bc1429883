"""Measure a leak judge (`filters.leak_judge`) on the labelled sets: what a model role of a
spec answers to the judge's question for each reply, against the labels, alone and beside
the screen the teacher stages run.

    python benchmarks/eval_leak_judge.py SPEC [--role judge] [--sets NAME ...] [--limit N]

Each reply is sent as the teacher stage sends it to its judge (LEAK_JUDGE: the user's
request and the reply, temperature 0, at most 16 tokens out) through the backend the spec
names for the role: an API model needs its key in the environment and is paid for, one
call per reply (about 300 tokens in); the price is printed before the first call. Only sets
whose lines carry the request (`request`, from fresh177 on) can be measured: the judge
without the request is not the judge the stage asks. By default the eight newest sets
(2,080 replies). Prints per set, and pooled, the leaks caught and the clean replies flagged
by:

    screen          the patterns and the classifier (the teacher stages without a judge)
    judge           the judge alone
    screen+judge    either: what `filters.leak_judge` does (it reads what the screen kept)
    overruling      with `filters.leak_judge_overrules_classifier` too: the judge also reads
                    what the classifier alone flagged, and keeps what it finds clean

and the verdicts without an answer (the stage keeps those replies). Writes every verdict
and the figures to benchmarks/results/leak_judge_eval.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charbuild.recipe.quality import paraphrased_leak  # noqa: E402
from charbuild.recipe.stages.generate import judge_verdict, judged_leak, leak_judge_requests  # noqa: E402

DATA = ROOT / "tests" / "data"
WAYS = ("screen", "judge", "screen+judge", "overruling")


def load_set(name: str, limit: int | None) -> list[dict]:
    """A labelled set's first `limit` rows; each must carry the request its reply answers."""
    path = DATA / name
    rows = []
    for n, x in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not x.strip():
            continue
        row = json.loads(x)
        if not isinstance(row.get("request"), str) or not row["request"].strip():
            raise SystemExit(f"{path}:{n}: no request: the judge is shown the user's message beside the reply, "
                             "and only sets written with one (fresh177 on) can measure it")
        rows.append(row)
    return rows[:limit] if limit else rows


def newest_sets(n: int = 8) -> list[str]:
    numbered = [(int(m.group(1)), p.name) for p in DATA.glob("leaks-fresh*.jsonl")
                if (m := re.fullmatch(r"leaks-fresh(\d+)\.jsonl", p.name))]
    return [name for _, name in sorted(numbered)[-n:]]


def flags(row: dict, said: bool | None) -> dict[str, bool]:
    """Whether each way of screening flags the reply, given the judge's verdict on it, as the
    teacher stage decides (generate.judged_leak)."""
    by = paraphrased_leak(row["text"], request=row["request"])[0]
    return {"screen": by is not None, "judge": said is True, "screen+judge": judged_leak(by, said, False),
            "overruling": judged_leak(by, said, True)}


def tally(rows: list[dict], verdicts: list[bool | None]) -> dict:
    """Per way: leaks caught and clean replies flagged, with the counts they are rates of."""
    out: dict = {"leaks": sum(r["leak"] for r in rows), "clean": sum(not r["leak"] for r in rows),
                 "unanswered": sum(v is None for v in verdicts)}
    got = [flags(r, v) for r, v in zip(rows, verdicts)]
    for way in WAYS:
        out[way] = {"caught": sum(g[way] for g, r in zip(got, rows) if r["leak"]),
                    "flagged": sum(g[way] for g, r in zip(got, rows) if not r["leak"])}
    return out


def line(name: str, t: dict) -> str:
    def pct(a: int, b: int) -> str:
        return f"{a / b:.1%}" if b else "-"

    ways = "; ".join(f"{w} {pct(t[w]['caught'], t['leaks'])} caught, {pct(t[w]['flagged'], t['clean'])} flagged"
                     for w in WAYS)
    return f"{name}: {t['leaks']} leaks, {t['clean']} clean, {t['unanswered']} unanswered | {ways}"


def judge_backend(spec_path: str, role: str):
    """(backend, model, price) of the spec's role, as a build would make it."""
    from charbuild.backends.pool import make_backend, missing_keys
    from charbuild.spec.model import load_spec
    from charbuild.spec.prices import PriceTable, usd_of

    spec = load_spec(spec_path).spec
    if role not in spec.models:
        raise SystemExit(f"{spec_path}: no model role {role!r} in models ({', '.join(sorted(spec.models))})")
    m = spec.models[role]
    if missing := missing_keys({role: m}):
        raise SystemExit(f"models.{role} needs {', '.join(missing)} set in the environment")
    price = PriceTable.load(spec).price(m) if m.backend == "openai" else None
    cost = (lambda i, o: usd_of(price, i, o)) if price is not None else None
    return make_backend(m, m.model, None, (), cost, role=role), m, price


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/eval_leak_judge.py")
    ap.add_argument("spec", help="a spec whose models: hold the judge role")
    ap.add_argument("--role", default="judge")
    ap.add_argument("--sets", nargs="*", default=None, help="names in tests/data (default: the eight newest)")
    ap.add_argument("--limit", type=int, default=None, help="the first N replies of each set")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "leak_judge_eval.json")
    args = ap.parse_args(argv)
    sets = {}
    for name in args.sets or newest_sets():
        sets[name] = load_set(name, args.limit)
    backend, m, price = judge_backend(args.spec, args.role)
    rows = [r for rs in sets.values() for r in rs]
    reqs = leak_judge_requests(m, [r["request"] for r in rows], [r["text"] for r in rows])
    per_call = f", at {price['input']}/{price['output']} USD per million tokens in/out" if price else ""
    print(f"asking models.{args.role} ({m.backend} {m.model}) about {len(reqs)} replies{per_call}", flush=True)
    from tqdm.auto import tqdm

    with tqdm(total=len(reqs), unit="reply", desc="judge") as bar:
        try:
            results = backend.generate(reqs, progress=bar.update)
        finally:
            backend.close()
    verdicts = [judge_verdict(r.text) for r in results]
    out: dict = {"spec": args.spec, "role": args.role, "model": m.model, "sets": {},
                 "tokens": {"in": sum(r.prompt_tokens for r in results),
                            "out": sum(r.completion_tokens for r in results)}}
    at = 0
    for name, rs in sets.items():
        out["sets"][name] = tally(rs, verdicts[at: at + len(rs)])
        print(line(name, out["sets"][name]))
        at += len(rs)
    out["pooled"] = tally(rows, verdicts)
    print(line("pooled", out["pooled"]))
    usd = getattr(backend, "usd_of_result", None)
    if usd is not None:
        out["usd"] = round(sum(usd(r) for r in results), 6)
    print(f"tokens: {out['tokens']['in']} in, {out['tokens']['out']} out" +
          (f"; {out['usd']:.4f} USD" if "usd" in out else ""))
    out["verdicts"] = [{"set": r["set"], "leak": r["leak"], "request": r["request"], "text": r["text"], "judge": v,
                        "answer": res.text}
                       for r, v, res in zip(rows, verdicts, results)]
    if args.results and args.results.name:  # --results "" writes nothing
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
