"""Evaluation statistics: marker rates, Bradley-Terry/Elo ratings with bootstrap
uncertainty, revealed-preference trait ratings and before/after comparisons.

Pure functions over plain Python data; no I/O, no model calls.

Why Bradley-Terry rather than only OCT's online Elo: OCT's notebooks run a single
K=32 pass over the judgements in data order (`elo_online` reproduces it), so the result
depends on the order of the matches and never converges on the strengths that best
explain them. The maximum-likelihood Bradley-Terry fit is order free and, with
`bootstrap_ratings`, gives the uncertainty the field report's "Variance-aware
evaluation" asks for (a small delta between checkpoints means nothing without it).

All ratings share the Elo scale: a gap of 400 points means 10:1 odds of winning,
rating = 1000 + 400 * log10(strength), centred so that the mean rating is 1000.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

ELO_SCALE = 400.0
ELO_CENTRE = 1000.0
_LN10 = math.log(10.0)


# --------------------------------------------------------------------------- markers

def _normalise(text: str) -> str:
    # Curly apostrophes/quotes are common in model output ("I’m sorry"); fold them so a
    # marker written with a straight apostrophe still counts.
    return (text.replace("\u2019", "'").replace("\u2018", "'")
            .replace("\u201c", '"').replace("\u201d", '"').casefold())


def marker_rate(texts: Sequence[str], markers: Sequence[str]) -> dict:
    """Share of `texts` that contain at least one of `markers` (case-insensitive,
    curly apostrophes folded), with a Wilson 95% interval.

    Returns {"n", "hits", "rate", "ci_low", "ci_high", "per_marker": {marker: count}}
    where per_marker counts the texts containing each marker (a text with two markers
    counts once in `hits` and once under each marker). With no texts, rate and the
    interval are None.
    """
    norm_markers = [(m, _normalise(m)) for m in markers]
    per_marker = {m: 0 for m in markers}
    hits = 0
    n = 0
    for t in texts:
        n += 1
        nt = _normalise(t or "")
        found = False
        for m, nm in norm_markers:
            if nm and nm in nt:
                per_marker[m] += 1
                found = True
        hits += found
    if n == 0:
        return {"n": 0, "hits": 0, "rate": None, "ci_low": None, "ci_high": None, "per_marker": per_marker}
    ci = stats.binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
    return {"n": n, "hits": hits, "rate": hits / n, "ci_low": float(ci.low), "ci_high": float(ci.high),
            "per_marker": per_marker}


# --------------------------------------------------------------------------- matches

@dataclass
class Match:
    """One pairwise judgement. `winner` is `a`, `b`, or None for a tie or an invalid
    verdict; such matches (and any whose winner names neither player, or a == b) are
    dropped by every rating function."""

    a: str
    b: str
    winner: str | None


def _valid(m: Match) -> bool:
    return m.a != m.b and m.winner is not None and m.winner in (m.a, m.b)


def valid_matches(matches: Sequence[Match]) -> list[Match]:
    """The matches that carry a decisive verdict."""
    return [m for m in matches if _valid(m)]


def _player_list(matches: Sequence[Match], players: Sequence[str] | None) -> list[str]:
    if players is not None:
        return list(dict.fromkeys(players))
    seen: dict[str, None] = {}
    for m in matches:
        seen.setdefault(m.a)
        seen.setdefault(m.b)
    return list(seen)


def _index(matches: Sequence[Match], players: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Winner and loser indices of the valid matches between known players."""
    pos = {p: i for i, p in enumerate(players)}
    win, lose = [], []
    for m in matches:
        if not _valid(m) or m.a not in pos or m.b not in pos:
            continue
        loser = m.b if m.winner == m.a else m.a
        win.append(pos[m.winner])
        lose.append(pos[loser])
    return np.asarray(win, dtype=int), np.asarray(lose, dtype=int)


def _fit_counts(wins: np.ndarray, prior: float, x0: np.ndarray | None = None) -> np.ndarray:
    """Log-strengths maximising the Bradley-Terry likelihood of the win-count matrix
    `wins[i, j]` (times i beat j) minus `prior * sum(theta**2)`."""
    n = wins.shape[0]
    if n == 0:
        return np.zeros(0)
    i_idx, j_idx = np.nonzero(wins)
    w = wins[i_idx, j_idx]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        d = theta[j_idx] - theta[i_idx]              # -log P(i beats j) = log(1 + e^d)
        nll = float(np.sum(w * np.logaddexp(0.0, d))) + prior * float(theta @ theta)
        g_pair = w * special.expit(d)                # d nll / d theta_j ; minus for theta_i
        grad = np.bincount(j_idx, g_pair, n) - np.bincount(i_idx, g_pair, n) + 2.0 * prior * theta
        return nll, grad

    res = optimize.minimize(objective, np.zeros(n) if x0 is None else x0, jac=True, method="BFGS",
                            options={"gtol": 1e-8})
    return res.x


def _to_elo(theta: np.ndarray) -> np.ndarray:
    r = ELO_SCALE * theta / _LN10
    return r - r.mean() + ELO_CENTRE if r.size else r


def fit_bradley_terry(matches: Sequence[Match], players: Sequence[str] | None = None,
                      prior: float = 0.01) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings on the Elo scale (mean 1000).

    Fitted with scipy.optimize.minimize on log-strengths; the L2 `prior` on the
    log-strengths keeps an undefeated player finite. Ties and invalid verdicts are
    dropped. `players` fixes the set (and order) of players; by default every player
    named in `matches` is rated (one who only tied sits at the prior's centre).
    """
    plist = _player_list(matches, players)
    win, lose = _index(matches, plist)
    wins = np.zeros((len(plist), len(plist)))
    np.add.at(wins, (win, lose), 1.0)
    return dict(zip(plist, (float(r) for r in _to_elo(_fit_counts(wins, prior)))))


def elo_online(matches: Sequence[Match], k: float = 32, start: float = 1000,
               scale: float = 400) -> dict[str, float]:
    """OCT's notebook Elo: one pass in data order, every player starting at `start`,
    invalid/tied judgements dropped (the players still get a rating)."""
    ratings: dict[str, float] = {}
    for m in matches:
        ra = ratings.setdefault(m.a, float(start))
        rb = ratings.setdefault(m.b, float(start))
        if not _valid(m):
            continue
        expected_a = 1.0 / (1.0 + 10.0 ** ((rb - ra) / scale))
        score_a = 1.0 if m.winner == m.a else 0.0
        ratings[m.a] = ra + k * (score_a - expected_a)
        ratings[m.b] = rb - k * (score_a - expected_a)
    return ratings


def bootstrap_ratings(matches: Sequence[Match], n_boot: int = 200, seed: int = 0,
                      players: Sequence[str] | None = None, prior: float = 0.01) -> dict[str, dict]:
    """Bradley-Terry ratings with bootstrap uncertainty.

    The valid matches are resampled with replacement `n_boot` times and refitted.
    Returns {player: {"mean", "std", "ci_low", "ci_high", "mle"}}: the bootstrap mean and
    standard deviation (ddof=1), the 2.5/97.5 percentiles, and the fit on all matches.
    """
    plist = _player_list(matches, players)
    n = len(plist)
    win, lose = _index(matches, plist)
    wins = np.zeros((n, n))
    np.add.at(wins, (win, lose), 1.0)
    theta_mle = _fit_counts(wins, prior)
    mle = _to_elo(theta_mle)
    rng = np.random.default_rng(seed)
    boots = np.empty((max(n_boot, 0), n))
    for b in range(boots.shape[0]):
        pick = rng.integers(0, len(win), size=len(win))
        wb = np.zeros((n, n))
        np.add.at(wb, (win[pick], lose[pick]), 1.0)
        boots[b] = _to_elo(_fit_counts(wb, prior, x0=theta_mle))
    out: dict[str, dict] = {}
    for i, p in enumerate(plist):
        col = boots[:, i]
        if col.size:
            lo, hi = np.percentile(col, [2.5, 97.5])
            out[p] = {"mean": float(col.mean()), "std": float(col.std(ddof=1)) if col.size > 1 else 0.0,
                      "ci_low": float(lo), "ci_high": float(hi), "mle": float(mle[i])}
        else:
            out[p] = {"mean": float(mle[i]), "std": 0.0, "ci_low": float(mle[i]), "ci_high": float(mle[i]),
                      "mle": float(mle[i])}
    return out


# --------------------------------------------------------------------------- preferences

def choice_matches(choices: Sequence[tuple[str, str, str | None]]) -> list[Match]:
    """Revealed-preference choices (trait_a, trait_b, chosen) as matches: `chosen` is matched
    to a trait case-insensitively after stripping; None or a word that is neither trait
    makes a match without a winner."""
    matches = []
    for a, b, chosen in choices:
        winner = None
        if chosen is not None:
            c = chosen.strip().casefold()
            if c == a.strip().casefold():
                winner = a
            elif c == b.strip().casefold():
                winner = b
        matches.append(Match(a, b, winner))
    return matches


def preference_elo(choices: Sequence[tuple[str, str, str | None]], prior: float = 0.01) -> dict[str, float]:
    """Revealed-preference trait ratings (OCT section 5): each choice is
    (trait_a, trait_b, chosen) where `chosen` is the trait the judge read in the
    response. `chosen` is matched case-insensitively after stripping; None or a word
    that is neither trait is dropped. Returns {trait: rating} on the Elo scale, fitted
    with Bradley-Terry (order free, unlike OCT's single online pass)."""
    matches = choice_matches(choices)
    # A trait never judged has no rating: left in, it would float on the prior alone.
    judged = _player_list(valid_matches(matches), None)
    return fit_bradley_terry(valid_matches(matches), judged, prior=prior) if judged else {}


def preference_elo_online(choices: Sequence[tuple[str, str, str | None]], k: float = 32, start: float = 1000,
                          scale: float = 400) -> dict[str, float]:
    """Revealed-preference trait ratings as OCT's notebooks compute them: online Elo, every
    trait starting at `start`, one pass over the choices in data order (so, unlike
    `preference_elo`, the order matters), K `k`, `scale` points for 10:1 odds. Invalid
    judgements (None, a word that is neither trait) are dropped before the pass, so a trait
    only ever judged invalidly is left unrated, as in `preference_elo`."""
    return elo_online(valid_matches(choice_matches(choices)), k=k, start=start, scale=scale)


def _point(v) -> float:
    if isinstance(v, dict):
        return float(v["mle"] if "mle" in v else v["mean"])
    return float(v)


def compare_ratings(before: dict, after: dict) -> dict:
    """Per-player (or per-trait) change between two rating sets, and the Spearman rank
    correlation of the players rated in both.

    Values may be plain ratings or `bootstrap_ratings` entries (their "mle", else
    "mean", is used). Returns {"deltas": {p: {"before", "after", "delta"}} ordered by
    delta, largest gain first; "spearman" and "p_value" (None with fewer than three
    shared players or a constant ranking); "n"; "only_before"; "only_after"}.
    """
    common = [p for p in before if p in after]
    deltas = {p: {"before": _point(before[p]), "after": _point(after[p]),
                  "delta": _point(after[p]) - _point(before[p])} for p in common}
    deltas = dict(sorted(deltas.items(), key=lambda kv: -kv[1]["delta"]))
    rho = pval = None
    if len(common) >= 3:
        x = [deltas[p]["before"] for p in common]
        y = [deltas[p]["after"] for p in common]
        if len(set(x)) > 1 and len(set(y)) > 1:
            r = stats.spearmanr(x, y)
            rho, pval = float(r.statistic), float(r.pvalue)
    return {"deltas": deltas, "spearman": rho, "p_value": pval, "n": len(common),
            "only_before": [p for p in before if p not in after],
            "only_after": [p for p in after if p not in before]}
