"""Train the paraphrased-leak classifier (leak_model.py) and choose its threshold.

    python -m charbuild.recipe.leak_training [--cv-only] [--out PATH]

Run from a checkout: the corpus is tests/data (TRAIN_FILES and leak-corpus/train-*.jsonl).
The sets measured as unseen (tests/test_leaks.UNSEEN) are never read here.

Model: logistic regression over leak_model.featurise with balanced classes, fitted to each
reply's label through its most leak-like passage: the reply's logit is the max over its
passages' (the sentences, adjacent pairs and short whole reply that LeakModel scores), as
at run time. Which sentence of a leak leaks is not labelled (multiple-instance learning);
the max lets a long helpful reply around it stay clean, and pushes a clean reply's passages
down only where one stands highest. Adam in torch, one thread and a fixed seed, FitSettings
passes over the data with a small L2 penalty; the shipped LeakModel is the same linear
scorer as before, pure Python at run time.

Until model fd3e8d89 the fit was L-BFGS (scipy) on instances: every passage of a clean reply
a clean instance, each leak the whole reply and then its best passage under a first model.
On the same 5 folds of whole sets (fresh1-44 and the corpus, 16,559 replies), patterns
(standing alone) or model caught, at 3% / 4.5% false alarms: that fit 94.5% / 96.4%; the max over passages,
8 epochs 95.9% / 97.4%, 14 epochs 96.3% / 97.7%, 24 epochs 96.2% / 97.9% (4 epochs 95.0% /
97.0%; a soft max, log-sum-exp, 93.7% / 95.7%; a hidden layer of 16 over the same features,
on one fold, no better than the linear fit).

The threshold is the lowest whose pooled out-of-fold false alarms, patterns and model
together (LeakModel.find), stay at or under --max-false-alarms, over 5 folds of whole sets:
each writer's replies are scored by a model trained without that writer, as a new writer's
are by the shipped model. Since model 77a69ccf the pool is the replies written with the
request they answer (fresh177 on), each scored with it: the teacher stage always shows the
screen the request, whose words move a reply's score (leak_model._request_features), and a
threshold chosen where nine replies in ten have none was too high for replies that all have
one (a candidate with the request's bag at that threshold, on fresh201-208: 97.6% caught
against the model before it's 98.0%, with 0.5% false alarms against 1.1%). Without the
request the screen flags more: at model 77a69ccf's threshold, 3.4% of all the sets' clean
replies out of fold, most written without one. Random folds (`--random-folds`, by each
text's digest, the default until model eeb88d06) score a writer by a model that has seen
the writer's other replies.

A pattern's hit stands where the model scores the reply above a floor, chosen with the
threshold from PATTERN_FLOORS on the same folds: the patterns were tuned on these sets and
their false alarms are words in another sense ("system prompt" in advice on the user's bot,
"the persona" of a poem, "asked me to play" in the user's game), which the model reads in
context. Until model a8a81a30 the patterns stood alone. With the out-of-fold scores of the
14-epoch fit, at 3% false alarms: floor 0, 96.3% caught; 0.05, 96.8%; 0.1 (chosen: the
lowest of the best), 0.2 and 0.3, 97.2%. With fresh45-64 (model 61e98056, 21,687 replies):
floor 0, 95.7%; 0.05, 97.1%; 0.1, 97.6%; 0.2, 97.7%; 0.3 (chosen), 97.8%. With fresh65-88
(model 3e07a62c, 27,927 replies): floor 0, 85.9%; 0.05, 97.2%; 0.1, 97.8%; 0.2 (chosen), 98.2%;
0.3, 98.1%. With fresh89-96 at 2% (model c3a0ba4a, 30,007 replies): 0.05, 90.9%; 0.1, 96.2%;
0.2, 97.2%; 0.3 (chosen), 97.3%. With fresh97-104 and the features of names, a speaker's
people and the reply's opening (model 8b48d30d, 32,087 replies): 0.05, 95.6%; 0.1, 97.2%;
0.2 (chosen), 97.6%; 0.3, 97.6% (without those features, on the same folds: 0.2, 97.1%;
0.3, 97.3%). With fresh105-112 too (b0e0a92b, 34,167 replies, not shipped: it measured the
same as 8b48d30d on eight sets written after both): 0.1, 97.2%; 0.2 (chosen), 97.55%;
0.3, 97.5%. With fresh105-120 and the reply's shape, the pieces users ask for and a
business's campaigns as features (model 505b8077, 36,247 replies): 0.05, 95.8%; 0.1, 97.3%;
0.2, 97.7%; 0.3 (chosen), 97.7% (without those features, on the same folds: 0.3, 97.6%;
with the classes again apart inside a piece, 0.3, 97.7%, not kept). With fresh121-136, a
class of the words a deployed model calls itself by (BOT: "their booking bot", "the shop's
assistant"), possessives read as the word they are of ("the costume's") and verbs of choosing
and bidding in DIRECT (model 7777911a, 40,407 replies): 0.05, 96.4%; 0.1, 97.7%; 0.2 (chosen),
98.0%; 0.3, 97.9% (without those features, on the same folds: 0.2, 97.8%). With fresh137-160
(model 0f5ad436, 46,647 replies): 0.05, 96.0%; 0.1, 97.4%; 0.2, 97.8%; 0.3 (chosen), 97.9%
(with three more classes, a manner's words, where a manner is the speaker's own and made
things, on the same folds: 0.3, 97.95%, not kept). With fresh161-184, and the patterns
reading "Want me to..." as an offer to the user (model 1b45f249, 52,887 replies): 0.05,
96.9%; 0.1, 97.6%; 0.2 (chosen), 97.9%; 0.3, 97.9%. With fresh185-192 (model 7c8775f9,
54,967 replies): 0.05, 97.2%; 0.1, 97.8%; 0.2, 98.06%; 0.3 (chosen), 98.07%. With fresh193-208
and the request's bag, the threshold chosen on the 8,320 replies with requests (model
77a69ccf, 59,127 replies): 0.05, 99.43%; 0.1 (chosen), 99.45%; 0.2 and 0.3, 99.40%. With
fresh209-216 (model e5dcd23f, 61,207 replies, 10,400 with requests): 0.05, 99.35%; 0.1,
99.38%; 0.2 (chosen), 99.40%; 0.3, 99.38%. With fresh217-224 and the words a passage
shares with the request as a bag of their own (model b4836369, 63,287 replies, 12,480 with
requests): 0.05, 99.50%; 0.1, 99.51%; 0.2 (chosen), 99.53%; 0.3, 99.53% (without that bag,
on the same folds: 0.2, 99.51%). Both rules, the
model's (LeakModel.find) and the one these choices are made under, are leak_model.flagged_by.

The budget is 2% (MAX_FALSE_ALARMS): the goal (issue 11) is >= 95% caught and <= 5% false
alarms on new writers, and new writers draw more false alarms than the folds: on the twelve
sets written after model fd3e8d89 (budget 4.5%), 7.4%, while recall held (97.0% against
96.2% out of fold); on the eight after 3e07a62c (budget 3%, 98.2% caught out of fold), 5.7%.
At 2% the folds catch 97.3% (model c3a0ba4a), and the eight writers after it drew 5.1%
(98.1% caught): 2.7% over six, 12.9% and 11.4% on two steered to the kinds it confuses
(tests/test_leaks.py). Model 8b48d30d (97.6% out of fold): 3.9% over the sixteen after it
(97.6% caught); model 505b8077 (97.7%): 2.5% over the sixteen after it (98.2% caught);
model 7777911a (98.0%): 3.8% over the sixteen after it (97.9% caught), 2.1% over the ten
writers not steered to the kinds it does worst on, 5.7% over the eight after those (97.0%);
model 0f5ad436 (97.9%): 4.4% over the sixteen after it (99.1% caught; the first eight 5.1%),
1.4% over the ten not steered, 18.2% on pieces narrated by made things told what to do; 2.9%
over eight more (99.8% caught), 3.9% over all twenty-four, 2.0% over eight held out for the
next model (99.7% caught); model 1b45f249 (97.9%): 1.7% over those eight (99.7% caught), 2.2%
over eight more held out for the next model (99.3% caught); model 7c8775f9 (98.1%): 2.1%
over those eight (99.3% caught), 1.1% over the eight after them (98.0% caught), 2.1% over
the eight after those (98.3% caught); model 77a69ccf (99.45% on the sets with requests, each
reply with its request): 1.9% over those eight (99.1% caught), 2.1% over the eight after
them (99.7% caught); model e5dcd23f (99.4%): 1.6% over those eight (99.6% caught), 1.9%
over the eight after them (99.5% caught); model b4836369 (99.5%): 1.8% over those eight
(99.6% caught). One new set of 140 clean
replies moves the rate by 0.7 points a reply.

The regularisation (FitSettings.l2, 1e-6) was the best of 1e-6 ... 3e-5 for the L-BFGS fit
on the folds of whole sets (at 5% false alarms: 96.3% at 1e-6, 95.7% at 1e-5, 94.9% at
3e-5); with Adam the number of passes regularises too. The sets measured as unseen
(tests/test_leaks.py) say what a new writer's phrasings get.

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
import math
import multiprocessing
import os
import sys
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from charbuild.recipe.leak_model import (WEIGHTS_FILE, LeakModel, featuriser_digest, flagged_by,
                                         reply_passages)
from charbuild.store.atomic import write_bytes_atomic

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
# Each of these was measured as unseen once before it was trained on (tests/test_leaks.py).
TRAIN_FILES = ("leaks.jsonl", "leaks-untuned.jsonl", "leaks-heldout.jsonl", "leaks-heldout2.jsonl",
               "leaks-heldout3.jsonl", "leaks-fresh1.jsonl", "leaks-fresh2.jsonl", "leaks-fresh3.jsonl",
               "leaks-fresh4.jsonl", "leaks-fresh5.jsonl", "leaks-fresh6.jsonl", "leaks-fresh7.jsonl",
               "leaks-fresh8.jsonl", *(f"leaks-fresh{n}.jsonl" for n in range(9, 225)))
CORPUS_GLOB = "leak-corpus/train-*.jsonl"
DEFAULT_OUT = ROOT / "charbuild" / "data" / WEIGHTS_FILE


def training_files() -> list[Path]:
    return [DATA / n for n in TRAIN_FILES] + sorted(DATA.glob(CORPUS_GLOB))


def load(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        rows += [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


class _Flat:
    """Replies as flat arrays: reply r owns passages pstart[r]:pstart[r+1]; passage p owns the
    feature occurrences fstart[p]:fstart[p+1], each a column `ids` with its bag's weight `wts`,
    1/sqrt(the bag's size), as LeakModel.logit weighs it."""

    def __init__(self, ids: np.ndarray, wts: np.ndarray, fstart: np.ndarray, pstart: np.ndarray):
        self.ids, self.wts, self.fstart, self.pstart = ids, wts, fstart, pstart

    def select(self, replies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The passages of `replies`, and their feature occurrences, in order."""
        ps = _ranges(self.pstart[replies], self.pstart[replies + 1])
        return ps, _ranges(self.fstart[ps], self.fstart[ps + 1])

    def batch(self, replies: np.ndarray):
        """EmbeddingBag inputs for `replies`' passages, and each passage's reply in the batch."""
        ps, occ = self.select(replies)
        owner = np.repeat(np.arange(len(replies)), self.pstart[replies + 1] - self.pstart[replies])
        offsets = np.concatenate([[0], np.cumsum(self.fstart[ps + 1] - self.fstart[ps])[:-1]])
        return (torch.from_numpy(self.ids[occ].astype(np.int64)), torch.from_numpy(self.wts[occ]),
                torch.from_numpy(offsets), torch.from_numpy(owner))


class Featurised:
    """Every row's passages featurised once, compactly (`all`, over every feature seen, its
    ids into `names`, which are sorted so that a vocabulary's columns keep the names' order).
    The bags as sets of strings took 6 GB for the 16,500 training replies; these arrays take a
    few hundred MB, shared by the forked fold workers."""

    def __init__(self, rows: list[dict]):
        index: dict[str, int] = {}
        ids, wts = array("i"), array("f")
        fstart, pstart = [0], [0]
        for r in rows:
            for _, bags in reply_passages(r["text"], r.get("request", "")):
                for bag in bags:
                    if bag:
                        ids.extend(index.setdefault(f, len(index)) for f in bag)
                        wts.extend([1.0 / math.sqrt(len(bag))] * len(bag))
                fstart.append(len(ids))
            pstart.append(len(fstart) - 1)
        by_id = list(index)
        del index
        order = sorted(range(len(by_id)), key=by_id.__getitem__)
        rank = np.empty(len(by_id), dtype=np.int32)
        rank[order] = np.arange(len(by_id), dtype=np.int32)
        self.names = [by_id[i] for i in order]
        self.all = _Flat(rank[np.frombuffer(ids, dtype=np.int32)], np.frombuffer(wts, dtype=np.float32),
                         np.array(fstart, dtype=np.int64), np.array(pstart, dtype=np.int64))

    def flat(self, rows: np.ndarray, min_df: int) -> tuple[_Flat, list[str]]:
        """`rows`' passages over their own vocabulary (the features in at least min_df of their
        bags, as columns in name order), and the vocabulary's names."""
        a = self.all
        ps, occ = a.select(rows)
        ids = a.ids[occ]
        keep = np.bincount(ids, minlength=len(self.names)) >= min_df
        kept = keep[ids]
        col = np.cumsum(keep) - 1
        per_passage = np.bincount(np.repeat(np.arange(len(ps)), a.fstart[ps + 1] - a.fstart[ps])[kept],
                                  minlength=len(ps))
        flat = _Flat(col[ids[kept]], a.wts[occ][kept], np.concatenate([[0], np.cumsum(per_passage)]),
                     np.concatenate([[0], np.cumsum(a.pstart[rows + 1] - a.pstart[rows])]))
        return flat, [self.names[i] for i in np.flatnonzero(keep)]

    def has_text(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` have a passage to score (an empty reply has none)."""
        return self.all.pstart[rows + 1] > self.all.pstart[rows]


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The concatenation of range(start, end) for each pair."""
    lens = ends - starts
    before = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return np.repeat(starts - before, lens) + np.arange(lens.sum())


@dataclass(frozen=True)
class FitSettings:
    """How the weights are fitted: l2 is the squared-norm penalty on the weights, added to a
    batch's mean balanced loss; epochs, the passes over the data (this module's docstring
    has what 4 to 24 of them catch on the folds)."""

    l2: float = 1e-6
    min_df: int = 2
    epochs: int = 14
    lr: float = 0.01
    batch: int = 512
    seed: int = 0


def fit(flat: _Flat, labels: np.ndarray, columns: int, s: FitSettings) -> tuple[np.ndarray, float]:
    """Weights and bias, fitted to each reply's label through its most leak-like passage (the
    max over its passages' logits, as LeakModel scores it): a leak need not be labelled to the
    sentence, and every passage of a clean reply is pushed down only where it is the reply's
    highest. Balanced classes; Adam, `s.epochs` passes; one thread, seeded, so a fit is
    repeatable. Every reply has at least one passage."""
    y = torch.tensor(labels, dtype=torch.float32)
    n, pos = len(y), float(labels.sum())
    weight = torch.where(y > 0, 0.5 / pos, 0.5 / (n - pos)) * n
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(s.seed)
        lin = torch.nn.EmbeddingBag(columns, 1, mode="sum")
        torch.nn.init.zeros_(lin.weight)
        bias = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([lin.weight, bias], lr=s.lr)
        order = torch.Generator().manual_seed(s.seed)
        for _ in range(s.epochs):
            perm = torch.randperm(n, generator=order).numpy()
            for k in range(0, n, s.batch):
                sel = np.sort(perm[k:k + s.batch])
                ids, wts, offsets, owner = flat.batch(sel)
                z = lin(ids, offsets, per_sample_weights=wts).squeeze(1) + bias
                z = torch.full((len(sel),), -1e9).scatter_reduce(0, owner, z, "amax")
                loss = (weight[sel] * F.binary_cross_entropy_with_logits(z, y[sel], reduction="none")).mean()
                opt.zero_grad()
                (loss + s.l2 * lin.weight.pow(2).sum()).backward()
                opt.step()
        return lin.weight.detach().squeeze(1).numpy().astype(np.float64), float(bias.item())
    finally:
        torch.set_num_threads(threads)


def train(rows: list[dict], s: FitSettings, feats: Featurised | None = None, at=None) -> LeakModel:
    """A model fitted to rows[at] (every row by default); `feats` is Featurised(rows), where
    the caller has it."""
    feats = Featurised(rows) if feats is None else feats
    at = np.arange(len(rows)) if at is None else np.asarray(at, dtype=np.int64)
    at = at[feats.has_text(at)]
    flat, names = feats.flat(at, s.min_df)
    w, b = fit(flat, np.array([1.0 if rows[i]["leak"] else 0.0 for i in at]), len(names), s)
    return LeakModel({f: round(float(x), 4) for f, x in zip(names, w) if abs(x) >= 1e-3}, round(b, 4), 0.5)


def pattern_hits(rows: list[dict]) -> list[bool]:
    from charbuild.recipe.quality import leak_by_patterns

    return [leak_by_patterns(r["text"]) is not None for r in rows]


# Where a pattern's hit stands: above which of the model's probabilities (LeakModel.pattern_floor).
PATTERN_FLOORS = (0.0, 0.05, 0.1, 0.2, 0.3)


def threshold_for(scores: list[float], patterns: list[bool], rows: list[dict], max_fa: float,
                  floor: float) -> float:
    """The lowest threshold at which the patterns' hits that stand above `floor`, or the model,
    fire on at most max_fa of clean replies."""
    clean = [(s, flagged_by(s, p, math.inf, floor) is not None) for s, p, r in zip(scores, patterns, rows)
             if not r["leak"]]
    budget = int(np.floor(max_fa * len(clean))) - sum(p for _, p in clean)
    model_only = sorted((s for s, p in clean if not p), reverse=True)
    if budget < 0:
        return 1.0
    return model_only[budget] if budget < len(model_only) else 0.0


def rates(scores, patterns, rows, t, floor) -> dict:
    hit = [flagged_by(s, p, t, floor) is not None for s, p in zip(scores, patterns)]
    leaks = [h for h, r in zip(hit, rows) if r["leak"]]
    clean = [h for h, r in zip(hit, rows) if not r["leak"]]
    return {"caught": round(sum(leaks) / len(leaks), 4), "false_alarms": round(sum(clean) / len(clean), 4),
            "leaks": len(leaks), "clean": len(clean)}


FOLDS = 5
MAX_FALSE_ALARMS = 0.02


def fold_of(row: dict, grouped: bool) -> str:
    """One of FOLDS folds: grouped, by the digest of the set the row was written in (each
    fold holds whole sets, so a fold's writers are new to the model scoring it); otherwise
    by the text's digest (every fold holds rows of every set and writer)."""
    return str(int(hashlib.sha256((row["set"] if grouped else row["text"]).encode()).hexdigest(), 16) % FOLDS)


_SHARED: dict = {}  # the rows and their features, handed to forked fold workers without pickling


def _fold(args) -> list[tuple[int, float]]:
    g, s, grouped = args
    rows, feats = _SHARED["rows"], _SHARED["feats"]
    model = train(rows, s, feats, [i for i, r in enumerate(rows) if fold_of(r, grouped) != g])
    print(f"  {_label(s)}: scored fold {g}", file=sys.stderr, flush=True)
    return [(i, model.best_passage(r["text"], r.get("request", ""))[0]) for i, r in enumerate(rows)
            if fold_of(r, grouped) == g]


def cross_validate(rows: list[dict], s: FitSettings, jobs: int = 1, grouped: bool = True,
                   feats: Featurised | None = None) -> list[float]:
    """Each row's score by a model trained without its fold."""
    _SHARED.update(rows=rows, feats=Featurised(rows) if feats is None else feats)
    folds = [(g, s, grouped) for g in sorted({fold_of(r, grouped) for r in rows})]
    try:
        if jobs > 1:
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                done = pool.map(_fold, folds)
        else:
            done = [_fold(f) for f in folds]
    finally:
        _SHARED.clear()
    scores = [0.0] * len(rows)
    for fold in done:
        for i, score in fold:
            scores[i] = score
    return scores


def _label(s: FitSettings) -> str:
    return f"l2={s.l2:g} epochs={s.epochs}"


def curve(scores: list[float], patterns: list[bool], rows: list[dict], floor: float) -> dict:
    """Leaks caught, patterns and model, at a few false-alarm rates, each at its own threshold
    (shown beside it)."""
    out = {}
    for fa in (0.02, 0.03, 0.04, 0.045, 0.05):
        t = threshold_for(scores, patterns, rows, fa, floor)
        out[f"{fa:.1%}"] = f"{rates(scores, patterns, rows, t, floor)['caught']:.2%} at {t:.3f}"
    return out


def write(model: LeakModel, out: Path) -> str:
    raw = model.to_json()
    write_bytes_atomic(out, gzip.compress(raw, compresslevel=9, mtime=0))
    return hashlib.sha256(raw).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m charbuild.recipe.leak_training")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--l2", type=float, nargs="*", default=[FitSettings.l2])
    ap.add_argument("--epochs", type=int, nargs="*", default=[FitSettings.epochs])
    ap.add_argument("--min-df", type=int, default=FitSettings.min_df)
    ap.add_argument("--max-false-alarms", type=float, default=MAX_FALSE_ALARMS)
    ap.add_argument("--cv-only", action="store_true")
    ap.add_argument("--random-folds", dest="grouped", action="store_false",
                    help="cross-validate on folds drawn by each text's digest instead of folds of whole sets "
                         "(optimistic: a writer is scored by a model that saw the writer's other replies); the "
                         "threshold then comes from those folds")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="folds trained at once")
    args = ap.parse_args(argv)
    files = training_files()
    rows = load(files)
    feats = Featurised(rows)
    patterns = pattern_hits(rows)
    results = {}
    fresh = [i for i, r in enumerate(rows) if r["set"].startswith("train-")]  # sets no pattern was tuned on
    tried = [FitSettings(l2=l2, epochs=e, min_df=args.min_df) for l2 in args.l2 for e in args.epochs]
    how = "folds of whole sets" if args.grouped else "random folds"
    # The threshold is chosen on the replies written with the request they answer, as the
    # teacher stage screens every reply: the request's words move a reply's score, and a
    # threshold chosen where most have none is calibrated for replies the stage never sees.
    asked = [i for i, r in enumerate(rows) if r.get("request")]
    for s in tried:
        scores = cross_validate(rows, s, args.jobs, args.grouped, feats)
        with_request = [[x[i] for i in asked] for x in (scores, patterns, rows)]  # scores, patterns, rows
        for floor in PATTERN_FLOORS:
            t = threshold_for(*with_request, args.max_false_alarms, floor)
            results[s, floor] = (t, scores, rates(*with_request, t, floor))
            print(f"{_label(s)}, pattern floor {floor}: cross-validated ({how}), patterns and model, threshold "
                  f"{t:.4f}: the sets with requests {results[s, floor][2]}, all sets "
                  f"{rates(scores, patterns, rows, t, floor)}; caught at a false alarm rate of: all sets "
                  f"{curve(scores, patterns, rows, floor)}, the corpus' sets "
                  f"{curve(*([x[i] for i in fresh] for x in (scores, patterns, rows)), floor)}", flush=True)
    # the most caught within the budget; among equals, the lowest floor (patterns the most say)
    best, floor = max(results, key=lambda k: (results[k][2]["caught"] - results[k][2]["false_alarms"], -k[1]))
    t, scores, cv = results[best, floor]
    per_set = {}
    for g in sorted({r["set"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["set"] == g]
        per_set[g] = rates(*([x[i] for i in idx] for x in (scores, patterns, rows)), t, floor)
    print(f"chosen {_label(best)}, pattern floor {floor}, threshold {t:.4f}; per set, out of fold: "
          f"{json.dumps(per_set)}")
    if args.cv_only:
        return 0
    model = train(rows, best, feats)
    model.threshold = round(t, 4)
    model.pattern_floor = floor
    model.meta = {"featuriser": featuriser_digest(),
                  "trained_on": [str(p.relative_to(DATA)) for p in files], "rows": len(rows),
                  "fit": asdict(best), "max_false_alarms": args.max_false_alarms, "pattern_floors": PATTERN_FLOORS,
                  "cv": {"folds": f"{FOLDS} of whole sets" if args.grouped else f"{FOLDS} by text digest", **cv,
                         "per_set": per_set}}
    digest = write(model, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(model.weights)} weights); "
          f"WEIGHTS_SHA256 = {digest!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
