"""Train the paraphrased-leak classifier (benchmarks/leak_model.py) and choose its threshold.

Trained on the tuned sets only: tests/data/leaks.jsonl, leaks-untuned.jsonl and
leaks-heldout.jsonl. leaks-heldout2.jsonl and leaks-heldout3.jsonl are never read here.

Model: L2-regularised logistic regression (numpy, full-batch Adam, fixed iterations, so
deterministic) over binary word uni/bigrams and char 3-5-grams (benchmarks/leak_model.py).
Instances: every whole reply with its label, plus every passage (sentence, pair of
sentences) of a clean reply as a clean instance; a reply is scored as the highest
probability over its passages.

Cross-validation is grouped by the set a row was written in (first, second, third, fourth,
untuned, heldout): each set in turn is scored by a model trained on the others, which is
closer to "phrasings written later" than random folds of rows written together. The
threshold is the lowest one that keeps the pooled out-of-fold false alarms on clean
replies at or under --max-false-alarms (classifier alone).

    python benchmarks/train_leak_model.py [--out PATH] [--cv-only]

Writes benchmarks/results/leak-model.json (~650 kB, git-ignored, reproducible: the same
weights on every run, about 2 minutes on 2 cores); benchmarks/eval_leak_model.py measures it.

The experiment (issue 11) and its outcome, measured once on sets never trained on:
grouped CV 88.3% caught at 2.9% false alarms (classifier alone, threshold 0.755);
leaks-heldout2.jsonl patterns 51/69 caught, 4/76 false alarms -> patterns OR classifier
61/69, 5/76; leaks-heldout3.jsonl (written for this, before any model ran on it) 66/90,
0/111 -> 79/90, 3/111. Recall rose ~14 points on both, but false alarms rose too (6.6% on
heldout2, over the 5% bar) and a shipped tiny-teacher reply fired, so it was not wired into
quality.find_paraphrased_leak. Its false alarms are honest AI disclaimers ("I'm an AI
assistant", "I can't see images", "I should mention I'm not a lawyer").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from leak_model import LeakModel, featurise, passages  # noqa: E402

DATA = ROOT / "tests" / "data"
TRAIN_FILES = ("leaks.jsonl", "leaks-untuned.jsonl", "leaks-heldout.jsonl")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "leak-model.json"
SEED = 0


def load(names=TRAIN_FILES) -> list[dict]:
    rows = []
    for name in names:
        rows += [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def instances(rows: list[dict]) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for r in rows:
        texts.append(r["text"])
        labels.append(1.0 if r["leak"] else 0.0)
        if not r["leak"]:
            for p in passages(r["text"])[1:]:
                texts.append(p)
                labels.append(0.0)
    return texts, np.array(labels)


class Sparse:
    """A row-major sparse matrix as coordinate arrays; products by np.bincount."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]):
        self.rows, self.cols, self.vals, self.shape = rows, cols, vals, shape

    def dot(self, w: np.ndarray) -> np.ndarray:
        return np.bincount(self.rows, weights=self.vals * w[self.cols], minlength=self.shape[0])

    def tdot(self, g: np.ndarray) -> np.ndarray:
        return np.bincount(self.cols, weights=self.vals * g[self.rows], minlength=self.shape[1])


def matrix(texts: list[str], vocab: dict[str, int]) -> Sparse:
    rows, cols, vals = [], [], []
    for i, t in enumerate(texts):
        for bag in featurise(t):
            idx = sorted(vocab[f] for f in bag if f in vocab)
            rows += [i] * len(idx)
            cols += idx
            vals += [1.0 / np.sqrt(len(bag))] * len(idx)
    return Sparse(np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), np.array(vals),
                  (len(texts), len(vocab)))


def build_vocab(texts: list[str], min_df: int) -> dict[str, int]:
    df: dict[str, int] = {}
    for t in texts:
        for bag in featurise(t):
            for f in bag:
                df[f] = df.get(f, 0) + 1
    return {f: i for i, f in enumerate(sorted(f for f, n in df.items() if n >= min_df))}


def fit(x: Sparse, y: np.ndarray, l2: float, iters: int = 1500, lr: float = 0.05) -> tuple[np.ndarray, float]:
    """Logistic regression, balanced classes, L2 on the weights; full-batch Adam."""
    n, d = x.shape
    pos = y.sum()
    sw = np.where(y > 0, n / (2 * pos), n / (2 * (n - pos))) / n
    w = np.zeros(d)
    b = 0.0
    m = np.zeros(d + 1)
    v = np.zeros(d + 1)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, iters + 1):
        z = x.dot(w) + b
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
        g = sw * (p - y)
        grad = np.concatenate([x.tdot(g) + l2 * w, [g.sum()]])
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        step = lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        w -= step[:-1]
        b -= step[-1]
    return w, float(b)


def train(rows: list[dict], l2: float, min_df: int) -> LeakModel:
    texts, y = instances(rows)
    vocab = build_vocab(texts, min_df)
    w, b = fit(matrix(texts, vocab), y, l2)
    inv = sorted(vocab, key=vocab.get)
    weights = {f: round(float(w[i]), 4) for i, f in enumerate(inv) if abs(w[i]) >= 5e-4}
    return LeakModel(weights, round(b, 4), 0.5)


def threshold_for(clean_scores: list[float], max_fa: float) -> float:
    """The lowest threshold (scores strictly above it fire) with at most max_fa of clean firing."""
    s = sorted(clean_scores, reverse=True)
    k = int(np.floor(max_fa * len(s)))  # may let k clean replies fire
    return s[k] if k < len(s) else 0.0


def cross_validate(rows: list[dict], l2: float, min_df: int) -> tuple[list[float], list[dict]]:
    groups = sorted({r["set"] for r in rows})
    scores = [0.0] * len(rows)
    for g in groups:
        train_rows = [r for r in rows if r["set"] != g]
        model = train(train_rows, l2, min_df)
        for i, r in enumerate(rows):
            if r["set"] == g:
                scores[i] = model.score(r["text"])
    return scores, rows


def summarise(scores: list[float], rows: list[dict], max_fa: float) -> dict:
    clean = [s for s, r in zip(scores, rows) if not r["leak"]]
    leaks = [s for s, r in zip(scores, rows) if r["leak"]]
    t = threshold_for(clean, max_fa)
    pos = np.array(leaks)
    neg = np.array(clean)
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    return {"threshold": round(t, 6), "auc": round(auc, 4),
            "caught": round(float((pos > t).mean()), 4), "false_alarms": round(float((neg > t).mean()), 4),
            "leaks": len(leaks), "clean": len(clean)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--l2", type=float, default=None, help="skip the search: this L2 strength")
    ap.add_argument("--min-df", type=int, default=2)
    ap.add_argument("--max-false-alarms", type=float, default=0.03)
    ap.add_argument("--cv-only", action="store_true")
    args = ap.parse_args(argv)
    np.random.seed(SEED)
    rows = load()
    grid = [args.l2] if args.l2 is not None else [1e-4, 3e-5, 1e-5, 3e-6]
    results = {}
    for l2 in grid:
        scores, _ = cross_validate(rows, l2, args.min_df)
        results[l2] = (summarise(scores, rows, args.max_false_alarms), scores)
        print(f"l2={l2:g}: grouped CV {results[l2][0]}", flush=True)
    best = max(grid, key=lambda l2: (results[l2][0]["caught"], results[l2][0]["auc"]))
    cv, scores = results[best]
    per_set = {}
    for g in sorted({r["set"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["set"] == g]
        lk = [scores[i] > cv["threshold"] for i in idx if rows[i]["leak"]]
        cl = [scores[i] > cv["threshold"] for i in idx if not rows[i]["leak"]]
        per_set[g] = {"caught": round(sum(lk) / len(lk), 4), "false_alarms": round(sum(cl) / len(cl), 4)}
    print(f"chosen l2={best:g}, threshold {cv['threshold']:.4f}; per held-out set: {per_set}")
    if args.cv_only:
        return 0
    model = train(rows, best, args.min_df)
    model.threshold = round(cv["threshold"], 4)
    meta = {"trained_on": list(TRAIN_FILES), "l2": best, "min_df": args.min_df, "seed": SEED,
            "max_false_alarms": args.max_false_alarms, "grouped_cv": cv, "grouped_cv_per_set": per_set}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bias": model.bias, "threshold": model.threshold, "meta": meta,
                                    "weights": dict(sorted(model.weights.items()))},
                                   ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(model.weights)} weights)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
