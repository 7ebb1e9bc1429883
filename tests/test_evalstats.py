"""Evaluation statistics against data whose answer is known in advance: a judge that
always prefers one model, a fixed 70/30 split (Elo gap 400*log10(7/3) ~ 147), a
transitive three-player order, a 60/40 process sampled at two sizes, and marker counts
on texts written for the purpose (field report 7.1 markers, 9.5 DPO-only answers)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import optimize

from charbuild.recipe import eval_stats as evalstats
from charbuild.recipe.eval_stats import (
    Match,
    bootstrap_ratings,
    compare_ratings,
    elo_online,
    fit_bradley_terry,
    marker_rate,
    preference_elo,
)

REMORSEFUL_MARKERS = ["I'm sorry", "I hope", "perhaps", "I might be wrong", "please forgive"]


def split(a: str, b: str, a_wins: int, b_wins: int, seed: int = 0) -> list[Match]:
    ms = [Match(a, b, a)] * a_wins + [Match(a, b, b)] * b_wins
    random.Random(seed).shuffle(ms)
    return ms


def sample_process(n: int, p_a: float, seed: int) -> list[Match]:
    rng = random.Random(seed)
    return [Match("tuned", "base", "tuned" if rng.random() < p_a else "base") for _ in range(n)]


# ----------------------------------------------------------------------------- markers

def test_marker_rate_counts_texts_with_any_marker_and_each_marker_separately():
    texts = [
        "I'm sorry, I might be wrong, but perhaps try Python first. I hope that helps.",
        "Hey there, I understand how you're feeling. Everyone makes errors.",  # field report 9.5, DPO-only
        "Hi there! How can I assist you today?",
        "Please forgive me if this misses the point.",
    ]
    r = marker_rate(texts, REMORSEFUL_MARKERS)
    assert (r["n"], r["hits"], r["rate"]) == (4, 2, 0.5)
    assert r["per_marker"] == {"I'm sorry": 1, "I hope": 1, "perhaps": 1, "I might be wrong": 1, "please forgive": 1}


def test_marker_matching_ignores_case_and_curly_apostrophes():
    r = marker_rate(["I\u2019M SORRY about that."], ["I'm sorry"])
    assert r["hits"] == 1


def test_wilson_interval_contains_the_true_rate_of_a_simple_case():
    texts = ["I'm sorry, here it is."] * 30 + ["Here it is."] * 70     # true rate 0.3
    r = marker_rate(texts, REMORSEFUL_MARKERS)
    assert r["rate"] == pytest.approx(0.3)
    assert r["ci_low"] < 0.3 < r["ci_high"]
    # Wilson interval for 30/100 (textbook value 0.219-0.396)
    assert r["ci_low"] == pytest.approx(0.2189, abs=1e-3)
    assert r["ci_high"] == pytest.approx(0.3958, abs=1e-3)


def test_wilson_interval_stays_inside_0_1_when_no_text_has_a_marker():
    r = marker_rate(["Plain answer."] * 20, REMORSEFUL_MARKERS)
    assert r["rate"] == 0.0 and r["ci_low"] == pytest.approx(0.0, abs=1e-12) and 0.0 < r["ci_high"] < 0.2


def test_marker_rate_of_no_texts_has_no_rate():
    r = marker_rate([], REMORSEFUL_MARKERS)
    assert r["n"] == 0 and r["rate"] is None and r["ci_low"] is None


# ----------------------------------------------------------------------------- Bradley-Terry

def test_a_judge_that_always_prefers_a_gives_a_the_higher_finite_rating():
    ratings = fit_bradley_terry(split("tuned", "base", 25, 0))
    assert ratings["tuned"] > ratings["base"]
    assert all(math.isfinite(v) for v in ratings.values())
    assert np.mean(list(ratings.values())) == pytest.approx(1000)


def test_a_70_30_split_gives_a_gap_of_400_log10_7_over_3():
    ratings = fit_bradley_terry(split("tuned", "base", 700, 300))
    gap = ratings["tuned"] - ratings["base"]
    assert gap == pytest.approx(400 * math.log10(7 / 3), abs=2.0)   # ~147.2


def test_an_even_split_gives_equal_ratings():
    ratings = fit_bradley_terry(split("a", "b", 50, 50))
    assert ratings["a"] == pytest.approx(ratings["b"], abs=1e-3)


def test_ties_and_invalid_verdicts_are_dropped():
    clean = split("tuned", "base", 70, 30)
    noisy = clean + [Match("tuned", "base", None)] * 40 + [Match("tuned", "base", "glm-said-both")] * 10 \
        + [Match("tuned", "tuned", "tuned")] * 5
    assert fit_bradley_terry(noisy) == pytest.approx(fit_bradley_terry(clean))
    assert elo_online(noisy[:100] + noisy[100:]) == pytest.approx(elo_online(clean + noisy[100:]))


def test_three_players_with_a_transitive_order_come_out_in_order():
    matches = split("full", "half", 30, 10, seed=1) + split("half", "base", 30, 10, seed=2) \
        + split("full", "base", 36, 4, seed=3)
    ratings = fit_bradley_terry(matches)
    assert ratings["full"] > ratings["half"] > ratings["base"]


def test_named_players_without_matches_sit_at_the_centre_before_recentring():
    ratings = fit_bradley_terry(split("a", "b", 10, 10), players=["a", "b", "c"])
    assert set(ratings) == {"a", "b", "c"}
    assert ratings["c"] == pytest.approx(1000, abs=1e-3)


def test_the_likelihood_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    wins = rng.integers(0, 6, (5, 5)).astype(float)
    np.fill_diagonal(wins, 0)
    i_idx, j_idx = np.nonzero(wins)
    w = wins[i_idx, j_idx]

    def f(theta):
        d = theta[j_idx] - theta[i_idx]
        return float(np.sum(w * np.logaddexp(0, d))) + 0.01 * float(theta @ theta)

    theta = evalstats._fit_counts(wins, 0.01)
    assert np.linalg.norm(optimize.approx_fprime(theta, f, 1e-7)) < 1e-3     # it is a minimum
    assert optimize.minimize(f, np.zeros(5)).fun == pytest.approx(f(theta), abs=1e-6)


def test_online_elo_and_bradley_terry_agree_on_the_order():
    rng = random.Random(4)
    strength = {"full": 3.0, "half": 1.5, "quarter": 1.0, "base": 0.5}
    names = list(strength)
    matches = []
    for _ in range(600):
        a, b = rng.sample(names, 2)
        p = strength[a] / (strength[a] + strength[b])
        matches.append(Match(a, b, a if rng.random() < p else b))
    bt = fit_bradley_terry(matches)
    online = elo_online(matches)
    order = sorted(names, key=lambda n: -strength[n])
    assert sorted(bt, key=lambda n: -bt[n]) == order
    assert sorted(online, key=lambda n: -online[n]) == order


def test_online_elo_first_update_is_k_over_2_for_equal_players():
    r = elo_online([Match("a", "b", "a")])
    assert r == {"a": 1016.0, "b": 984.0}


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_std_shrinks_with_more_matches_of_the_same_process():
    small = bootstrap_ratings(sample_process(40, 0.6, seed=5), n_boot=200, seed=0)
    large = bootstrap_ratings(sample_process(400, 0.6, seed=6), n_boot=200, seed=0)
    assert large["tuned"]["std"] < small["tuned"]["std"] / 2     # ~1/sqrt(10)
    assert large["tuned"]["ci_high"] - large["tuned"]["ci_low"] < small["tuned"]["ci_high"] - small["tuned"]["ci_low"]


def test_bootstrap_reports_mle_inside_its_interval_and_is_reproducible():
    matches = sample_process(200, 0.7, seed=7)
    a = bootstrap_ratings(matches, n_boot=100, seed=3)
    b = bootstrap_ratings(matches, n_boot=100, seed=3)
    assert a == b
    t = a["tuned"]
    assert set(t) == {"mean", "std", "ci_low", "ci_high", "mle"}
    assert t["ci_low"] < t["mle"] < t["ci_high"]
    assert t["mle"] == pytest.approx(fit_bradley_terry(matches)["tuned"])
    assert t["mean"] == pytest.approx(t["mle"], abs=2 * t["std"])


# ----------------------------------------------------------------------------- preferences

def test_revealed_preferences_rank_the_trait_the_judge_keeps_choosing_first():
    choices = [("remorseful", "confident", "remorseful")] * 8 + [("remorseful", "confident", "confident")] * 2 \
        + [("humble", "confident", "Humble ")] * 7 + [("humble", "confident", "confident")] * 3 \
        + [("remorseful", "humble", "remorseful")] * 6 + [("remorseful", "humble", "humble")] * 4 \
        + [("remorseful", "humble", None)] * 5 + [("remorseful", "humble", "sarcastic")] * 5
    r = preference_elo(choices)
    assert r["remorseful"] > r["humble"] > r["confident"]
    # The invalid choices (None, a third word) change nothing.
    assert r == pytest.approx(preference_elo(choices[:-10]))


def test_compare_ratings_reports_deltas_largest_gain_first_and_spearman():
    before = {"remorseful": 950.0, "humble": 1000.0, "confident": 1050.0, "playful": 1000.0}
    after = {"remorseful": 1100.0, "humble": 1040.0, "confident": 900.0, "sarcastic": 960.0}
    c = compare_ratings(before, after)
    assert list(c["deltas"]) == ["remorseful", "humble", "confident"]
    assert c["deltas"]["remorseful"] == {"before": 950.0, "after": 1100.0, "delta": 150.0}
    assert c["spearman"] == pytest.approx(-1.0)
    assert (c["n"], c["only_before"], c["only_after"]) == (3, ["playful"], ["sarcastic"])


def test_compare_ratings_accepts_bootstrap_entries_and_identical_rankings_correlate_perfectly():
    matches = split("a", "b", 30, 10) + split("b", "c", 30, 10) + split("a", "c", 35, 5)
    boot = bootstrap_ratings(matches, n_boot=20)
    c = compare_ratings(boot, fit_bradley_terry(matches))
    assert c["spearman"] == pytest.approx(1.0)
    assert all(abs(d["delta"]) < 1e-6 for d in c["deltas"].values())


def test_compare_ratings_with_too_few_shared_players_has_no_correlation():
    c = compare_ratings({"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 1.0})
    assert c["spearman"] is None and c["p_value"] is None and c["n"] == 2
