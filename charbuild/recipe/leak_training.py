"""Train the paraphrased-leak classifier (leak_model.py) and choose its threshold.

    python -m charbuild.recipe.leak_training [--cv-only] [--out PATH]

Run from a checkout: the corpus is tests/data (TRAIN_FILES and leak-corpus/train-*.jsonl).
The sets measured as unseen (tests/test_leaks.UNSEEN) are never read here.

Model: L2-regularised logistic regression with balanced classes, fitted by L-BFGS (scipy,
deterministic), over leak_model.featurise. Instances: every passage of a clean reply is a
clean instance (a reply is scored as its most leak-like passage, so every passage must
score low); a leaking reply is one positive instance, then -- once a first model exists
-- also its most leak-like passage (multiple-instance learning: which sentence leaks is
not labelled, and a long helpful reply around it would otherwise drown it).

The threshold is the lowest whose pooled out-of-fold false alarms, patterns OR model, stay
at or under --max-false-alarms, over 5 folds of whole sets: each writer's replies are scored
by a model trained without that writer, as a new writer's are by the shipped model. Random
folds (`--random-folds`, by each text's digest, the default until model eeb88d06) score a
writer by a model that has seen the writer's other replies.

The budget is 4.5%: the goal (issue 11) is >= 95% caught and <= 5% false alarms on new
writers, and on the folds of whole sets 4.5% leaves both a margin (96.2% caught; at 4%,
95.9%; at 5%, 96.5% with no margin on false alarms), where one new set of 140 clean replies
moves the rate by 0.7 points a reply. New writers' clean replies about the assistant itself
still draw 4-15% false alarms (tests/test_leaks.py). A leak in the DPO data costs more than a dropped pair
(one teacher call), so the budget sits near the goal's limit, not at the 3% it was until
model a79fe467.

The regularisation (--l2, 1e-6) is the best of 1e-6 ... 3e-5 on the folds of whole sets
(caught at 5% false alarms, with a word class for "the user" since dropped, as it added
nothing: 96.3% at 1e-6, 96.1% at 3e-6, 95.7% at 1e-5, the value until now, 94.9% at 3e-5):
more writers let the model lean on rarer words without losing new writers. The sets
measured as unseen (tests/test_leaks.py) say what a new writer's phrasings get.

leak-corpus/drafts-f.jsonl (reasoning drafts only, whose clean half was written to share
every word with its leaks: "the user asked me to ...") is not trained on. Out of fold its
clean drafts scored 21% false alarms, which pushed the threshold past 0.99 and left the
model nearly silent everywhere. The classifier judges replies: a teacher's reasoning is
taken out before the filters run (quality.split_reasoning), and introspection's kept
traces are judged by the patterns alone.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
from scipy import optimize, sparse

from charbuild.recipe.leak_model import WEIGHTS_FILE, LeakModel, featurise, featuriser_digest, passages
from charbuild.store.atomic import write_bytes_atomic

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
# Each of these was measured as unseen once before it was trained on (tests/test_leaks.py).
TRAIN_FILES = ("leaks.jsonl", "leaks-untuned.jsonl", "leaks-heldout.jsonl", "leaks-heldout2.jsonl",
               "leaks-heldout3.jsonl", "leaks-fresh1.jsonl", "leaks-fresh2.jsonl", "leaks-fresh3.jsonl",
               "leaks-fresh4.jsonl", "leaks-fresh5.jsonl", "leaks-fresh6.jsonl", "leaks-fresh7.jsonl",
               "leaks-fresh8.jsonl", *(f"leaks-fresh{n}.jsonl" for n in range(9, 33)))
CORPUS_GLOB = "leak-corpus/train-*.jsonl"
DEFAULT_OUT = ROOT / "charbuild" / "data" / WEIGHTS_FILE


def training_files() -> list[Path]:
    return [DATA / n for n in TRAIN_FILES] + sorted(DATA.glob(CORPUS_GLOB))


def load(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        rows += [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def instances(rows: list[dict], model: LeakModel | None) -> tuple[list[str], np.ndarray]:
    texts: list[str] = []
    labels: list[float] = []
    for r in rows:
        ps = passages(r["text"])
        if r["leak"]:
            texts.append(r["text"])
            labels.append(1.0)
            if model is not None and len(ps) > 1:
                texts.append(max(ps, key=model.logit))
                labels.append(1.0)
        else:
            for p in dict.fromkeys([r["text"].strip(), *ps]):
                texts.append(p)
                labels.append(0.0)
    return texts, np.array(labels)


def build_vocab(texts: list[str], min_df: int) -> dict[str, int]:
    df: dict[str, int] = {}
    for t in texts:
        for bag in featurise(t):
            for f in bag:
                df[f] = df.get(f, 0) + 1
    return {f: i for i, f in enumerate(sorted(f for f, n in df.items() if n >= min_df))}


def matrix(texts: list[str], vocab: dict[str, int]) -> sparse.csr_matrix:
    indptr, cols, vals = [0], [], []
    for t in texts:
        for bag in featurise(t):
            if not bag:
                continue
            idx = sorted(vocab[f] for f in bag if f in vocab)
            cols += idx
            vals += [1.0 / np.sqrt(len(bag))] * len(idx)
        indptr.append(len(cols))
    return sparse.csr_matrix((np.array(vals), np.array(cols, dtype=np.int64), np.array(indptr, dtype=np.int64)),
                             shape=(len(texts), len(vocab)))


def fit(x: sparse.csr_matrix, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    n, d = x.shape
    pos = y.sum()
    sw = np.where(y > 0, 0.5 / pos, 0.5 / (n - pos))  # balanced: each class weighs one half
    xt = x.T.tocsr()

    def loss(theta):
        w, b = theta[:-1], theta[-1]
        z = x @ w + b
        # log(1 + e^-z) for positives, log(1 + e^z) for negatives, stably
        lz = np.logaddexp(0.0, np.where(y > 0, -z, z))
        p = 0.5 * (1.0 + np.tanh(0.5 * z))
        g = sw * (p - y)
        return float(sw @ lz + 0.5 * l2 * w @ w), np.concatenate([xt @ g + l2 * w, [g.sum()]])

    res = optimize.minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": 400})
    return res.x[:-1], float(res.x[-1])


def train(rows: list[dict], l2: float, min_df: int) -> LeakModel:
    model = None
    for _ in range(2):  # the second round adds each leak's most leak-like passage
        texts, y = instances(rows, model)
        vocab = build_vocab(texts, min_df)
        w, b = fit(matrix(texts, vocab), y, l2)
        inv = sorted(vocab, key=vocab.get)
        model = LeakModel({f: round(float(w[i]), 4) for i, f in enumerate(inv) if abs(w[i]) >= 1e-3},
                          round(b, 4), 0.5)
    return model


def pattern_hits(rows: list[dict]) -> list[bool]:
    from charbuild.recipe.quality import leak_by_patterns

    return [leak_by_patterns(r["text"]) is not None for r in rows]


def threshold_for(scores: list[float], patterns: list[bool], rows: list[dict], max_fa: float) -> float:
    """The lowest threshold at which patterns OR model fire on at most max_fa of clean replies."""
    clean = [(s, p) for s, p, r in zip(scores, patterns, rows) if not r["leak"]]
    budget = int(np.floor(max_fa * len(clean))) - sum(p for _, p in clean)
    model_only = sorted((s for s, p in clean if not p), reverse=True)
    if budget < 0:
        return 1.0
    return model_only[budget] if budget < len(model_only) else 0.0


def rates(scores, patterns, rows, t) -> dict:
    hit = [p or s > t for s, p in zip(scores, patterns)]
    leaks = [h for h, r in zip(hit, rows) if r["leak"]]
    clean = [h for h, r in zip(hit, rows) if not r["leak"]]
    return {"caught": round(sum(leaks) / len(leaks), 4), "false_alarms": round(sum(clean) / len(clean), 4),
            "leaks": len(leaks), "clean": len(clean)}


FOLDS = 5


def fold_of(row: dict, grouped: bool) -> str:
    """One of FOLDS folds: grouped, by the digest of the set the row was written in (each
    fold holds whole sets, so a fold's writers are new to the model scoring it); otherwise
    by the text's digest (every fold holds rows of every set and writer)."""
    return str(int(hashlib.sha256((row["set"] if grouped else row["text"]).encode()).hexdigest(), 16) % FOLDS)


def _fold(args) -> list[tuple[int, float]]:
    rows, g, l2, min_df, grouped = args
    model = train([r for r in rows if fold_of(r, grouped) != g], l2, min_df)
    print(f"  l2={l2:g}: scored fold {g}", file=sys.stderr, flush=True)
    return [(i, model.best_passage(r["text"])[0]) for i, r in enumerate(rows) if fold_of(r, grouped) == g]


def cross_validate(rows: list[dict], l2: float, min_df: int, jobs: int = 1, grouped: bool = True) -> list[float]:
    """Each row's score by a model trained without its fold."""
    folds = [(rows, g, l2, min_df, grouped) for g in sorted({fold_of(r, grouped) for r in rows})]
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            done = pool.map(_fold, folds)
    else:
        done = [_fold(f) for f in folds]
    scores = [0.0] * len(rows)
    for fold in done:
        for i, s in fold:
            scores[i] = s
    return scores


def curve(scores: list[float], patterns: list[bool], rows: list[dict]) -> dict:
    """Leaks caught, patterns OR model, at a few false-alarm rates, each at its own threshold
    (shown beside it)."""
    out = {}
    for fa in (0.02, 0.03, 0.04, 0.045, 0.05):
        t = threshold_for(scores, patterns, rows, fa)
        out[f"{fa:.1%}"] = f"{rates(scores, patterns, rows, t)['caught']:.2%} at {t:.3f}"
    return out


def write(model: LeakModel, out: Path) -> str:
    raw = model.to_json()
    write_bytes_atomic(out, gzip.compress(raw, compresslevel=9, mtime=0))
    return hashlib.sha256(raw).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m charbuild.recipe.leak_training")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--l2", type=float, nargs="*", default=[1e-6])
    ap.add_argument("--min-df", type=int, default=2)
    ap.add_argument("--max-false-alarms", type=float, default=0.045)
    ap.add_argument("--cv-only", action="store_true")
    ap.add_argument("--random-folds", dest="grouped", action="store_false",
                    help="cross-validate on folds drawn by each text's digest instead of folds of whole sets "
                         "(optimistic: a writer is scored by a model that saw the writer's other replies); the "
                         "threshold then comes from those folds")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="folds trained at once")
    args = ap.parse_args(argv)
    files = training_files()
    rows = load(files)
    patterns = pattern_hits(rows)
    results = {}
    fresh = [i for i, r in enumerate(rows) if r["set"].startswith("train-")]  # sets no pattern was tuned on
    for l2 in args.l2:
        scores = cross_validate(rows, l2, args.min_df, args.jobs, args.grouped)
        t = threshold_for(scores, patterns, rows, args.max_false_alarms)
        results[l2] = (t, scores, rates(scores, patterns, rows, t))
        how = "folds of whole sets" if args.grouped else "random folds"
        print(f"l2={l2:g}: cross-validated ({how}), patterns OR model, threshold {t:.4f}: {results[l2][2]}; "
              f"caught at a false alarm rate of: all sets {curve(scores, patterns, rows)}, the corpus' sets "
              f"{curve(*([x[i] for i in fresh] for x in (scores, patterns, rows)))}", flush=True)
    best = max(args.l2, key=lambda l2: results[l2][2]["caught"] - results[l2][2]["false_alarms"])
    t, scores, cv = results[best]
    per_set = {}
    for g in sorted({r["set"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["set"] == g]
        per_set[g] = rates([scores[i] for i in idx], [patterns[i] for i in idx], [rows[i] for i in idx], t)
    print(f"chosen l2={best:g}, threshold {t:.4f}; per set, out of fold: {json.dumps(per_set)}")
    if args.cv_only:
        return 0
    model = train(rows, best, args.min_df)
    model.threshold = round(t, 4)
    model.meta = {"featuriser": featuriser_digest(),
                  "trained_on": [str(p.relative_to(DATA)) for p in files], "rows": len(rows), "l2": best,
                  "min_df": args.min_df, "max_false_alarms": args.max_false_alarms,
                  "cv": {"folds": f"{FOLDS} of whole sets" if args.grouped else f"{FOLDS} by text digest", **cv,
                         "per_set": per_set}}
    digest = write(model, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(model.weights)} weights); "
          f"WEIGHTS_SHA256 = {digest!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
