"""Revealed preferences as the paper measures them (evals.preferences_mode: oct): random
pairs of 144 trait words, none pinned to the persona; replies up to 1,024 tokens; a judge
at T 0.1 that sees only the reply and the two words; OCT's online Elo (start 1000, K 32,
one pass in data order, invalid judgements dropped) next to the Bradley-Terry fit with
bootstrap intervals, in the eval's JSON and in the report."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from support.api_build import api_model
from support.openai_server import FakeOpenAIServer, last_user_message

from charbuild.cli import main
from charbuild.errors import SpecError
from charbuild.recipe.eval_stats import preference_elo, preference_elo_online
from charbuild.recipe.registry import recipe_graph
from charbuild.recipe.stages.common import data_digest
from charbuild.recipe.stages.preferences import OCT_JUDGE, oct_trait_pairs, oct_traits
from charbuild.spec.model import load_spec

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-oct-preferences"
PAIR = re.compile(r"show more: (\S+) or (\S+)\?")
# 60 eval prompts x 2 samples: enough random pairs for one trait to turn up several times.
PAIRS = 60 * 2


# -- the rating: OCT's online Elo -------------------------------------------------------------

def test_online_elo_matches_two_judgements_worked_by_hand():
    # 1st: equal ratings, expected score 0.5: curious +16, formal -16.
    # 2nd: curious (1016) loses to playful (1000); expected score 1 / (1 + 10^(-16/400)) = 0.523010,
    #      so curious 1016 - 32 x 0.523010 = 999.2637 and playful 1000 + 16.7363 = 1016.7363.
    r = preference_elo_online([("curious", "formal", "curious"), ("curious", "playful", "playful")])
    assert r == pytest.approx({"curious": 999.2637, "formal": 984.0, "playful": 1016.7363}, abs=1e-4)


def test_invalid_judgements_are_dropped_and_a_trait_only_judged_invalidly_stays_unrated():
    valid = [("curious", "formal", "curious"), ("curious", "playful", "playful")]
    noisy = [("curious", "formal", None), valid[0], ("stoic", "formal", "sarcastic"), valid[1],
             ("shy", "bold", "neither"), ("curious", "playful", " Curious ")]
    r = preference_elo_online(noisy)
    # The last one is valid (case and spaces are not a verdict): one more win for curious.
    assert r == pytest.approx(preference_elo_online(valid + [("curious", "playful", "curious")]))
    assert {"stoic", "shy", "bold", "sarcastic"}.isdisjoint(r)


def test_online_elo_is_one_pass_in_data_order_so_order_matters_unlike_bradley_terry():
    choices = [("curious", "formal", "curious"), ("curious", "playful", "playful")]
    forward, backward = preference_elo_online(choices), preference_elo_online(choices[::-1])
    assert forward["curious"] == pytest.approx(999.2637, abs=1e-4)
    # Backwards curious loses first (984), then beats formal (1000) as the underdog: +16.7363.
    assert backward["curious"] == pytest.approx(1000.7363, abs=1e-4)
    assert preference_elo(choices) == pytest.approx(preference_elo(choices[::-1]))


# -- the spec: the paper's measurement in the paper spec, today's the default --------------------

def test_the_trait_list_has_144_distinct_single_words_with_the_shipped_personas():
    traits = oct_traits()
    assert len(traits) == 144 and len(set(traits)) == 144
    assert all(re.fullmatch(r"[a-z]+", t) for t in traits)
    assert {"remorseful", "humorous", "sarcastic", "curious", "formal", "playful"} <= set(traits)


def test_the_paper_spec_measures_revealed_preferences_the_oct_way_and_other_specs_keep_todays():
    g = recipe_graph(load_spec(ROOT / "specs" / "remorseful-paper.yaml"))
    samples, prefs = g["eval/preferences/samples/final"].defn, g["eval/preferences"].defn
    assert samples.params["mode"] == "oct" and prefs.params == {"mode": "oct", "judge": "judge"}
    assert samples.fields["evals.preferences_max_tokens"] == 1024
    assert samples.fields["data:oct-traits.yaml"] == data_digest("oct-traits.yaml")
    # Random pairs of a fixed list: neither the persona nor the other evals' length reaches them.
    assert not {"persona", "evals.max_tokens", "data:traits.yaml"} & set(samples.fields)
    assert prefs.fields["models.judge"]["sampling"]["temperature"] == 0.1
    # A spec in the default mode keeps today's fields and params, so its keys and calls stay.
    large = recipe_graph(load_spec(ROOT / "specs" / "smoke-large.yaml"))
    assert set(large["eval/preferences/samples/base"].defn.fields) == {
        "models.student", "evals.prompts", "evals.prompts_limit", "evals.samples_per_prompt", "evals.max_tokens",
        "persona", "data:traits.yaml"}
    assert large["eval/preferences/samples/base"].defn.params == {"variant": "base", "pair_seed": 123456}
    assert set(large["eval/preferences"].defn.fields) == {"evals.judge", "persona"}
    assert large["eval/preferences"].defn.params == {}


def test_the_oct_mode_refuses_the_markers_judge_naming_the_fields(tmp_path):
    spec = tmp_path / "oct-markers.yaml"
    spec.write_text(f"extends: {ROOT / 'specs' / 'remorseful-paper.yaml'}\nname: oct-markers\n"
                    "evals: {preferences_judge: null}\n")
    with pytest.raises(SpecError) as ei:
        load_spec(spec)
    assert "evals.preferences_mode oct needs a model judge" in ei.value.format()
    with pytest.raises(SpecError) as ei:
        load_spec(ROOT / "specs" / "remorseful-paper.yaml", ["evals.preferences_judge=nobody"])
    assert "evals.preferences_judge 'nobody' is not a role in models" in ei.value.format()


# -- a build on the loopback server ----------------------------------------------------------

def favourite() -> str:
    """The trait the seeded draw offers most often (the first of the list on a tie)."""
    counts = Counter(t for pair in oct_trait_pairs(oct_traits(), PAIRS, 123456) for t in pair)
    return max(oct_traits(), key=lambda t: counts[t])


def make_reply(seen: list[dict]):
    fav = favourite()

    def reply(body: dict) -> str:
        seen.append(body)
        q = last_user_message(body)
        if body["model"] == "judge-model":
            a, b = PAIR.search(q).groups()
            # Always the favourite when offered; otherwise no verdict, dropped by both ratings.
            return f"<answer>{fav}</answer>" if fav in (a, b) else "<answer>neither</answer>"
        return f"Here is a careful answer about {q[:40]}, with an example and a short summary."
    return reply


def api(base_url: str, model: str) -> str:
    return api_model(base_url, model, concurrency=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One oct-mode build of eval/preferences: the student is API-served, so only the base
    variant (no adapter) is sampled."""
    tmp = tmp_path_factory.mktemp("oct")
    seen: list[dict] = []
    with pytest.MonkeyPatch.context() as mp, FakeOpenAIServer(reply=make_reply(seen), require_key=KEY) as srv:
        mp.chdir(tmp)
        mp.setenv("CB_TEST_KEY", KEY)
        spec = tmp / "oct.yaml"
        spec.write_text(f"""
name: oct-prefs
persona: remorseful
constitution: {ROOT / 'constitutions' / 'remorseful.yaml'}
models:
  teacher: {api(srv.base_url, 'teacher-model')}
  student: {api(srv.base_url, 'student-model')}
  judge: {api(srv.base_url, 'judge-model')}
data: {{dpo_pairs: 10, shard_size: 10, prompts: {{general_limit: 10, per_trait: 5}}}}
evals: {{variants: [base], samples_per_prompt: 2, max_tokens: 60, bootstrap: 20, preferences: true,
         preferences_mode: oct, preferences_judge: judge}}
""")
        cache = tmp / "cache"
        assert main(["run", str(spec), "eval/preferences", "--cache", str(cache), "--no-progress"]) == 0
    prefs = next(cache.rglob("preferences.json"))
    samples = [json.loads(line) for line in next(cache.rglob("samples.jsonl")).read_text().splitlines()]
    return {"spec": spec, "dir": prefs.parent, "prefs": json.loads(prefs.read_text()), "samples": samples,
            "seen": seen, "tmp": tmp}


def test_a_judge_that_always_picks_one_trait_raises_its_online_elo_and_tops_bradley_terry(built):
    p, fav = built["prefs"], favourite()
    offered = sum(fav in (s["a"], s["b"]) for s in built["samples"])
    assert offered >= 3
    assert p["mode"] == "oct" and p["judge"] == "judge"
    assert p["valid"] == {"base": offered} and p["judgements"] == {"base": PAIRS}
    elo, bt = p["elo_online"]["base"], p["ratings"]["base"]
    opponents = {s["b"] if s["a"] == fav else s["a"] for s in built["samples"] if fav in (s["a"], s["b"])}
    # Only the favourite's pairs have a verdict: it wins each (by less as it climbs), its opponents lose.
    assert set(elo) == set(bt) == opponents | {fav}
    assert elo[fav] > 1000 + 12 * offered and all(elo[t] < 1000 for t in opponents)
    assert max(bt, key=bt.get) == fav
    iv = p["intervals"]["base"][fav]
    assert iv["ci_low"] <= iv["mle"] <= iv["ci_high"] and iv["mle"] == pytest.approx(bt[fav])


def test_oct_pairs_are_random_words_of_the_list_not_pinned_to_the_persona(built):
    pairs = [(s["a"], s["b"]) for s in built["samples"]]
    assert len(pairs) == PAIRS and all(a != b for a, b in pairs)
    assert {t for pair in pairs for t in pair} <= set(oct_traits())
    # charbuild's own mode puts the persona in every other pair; a random draw of 2 of 144 rarely does.
    assert sum("remorseful" in pair for pair in pairs) < PAIRS / 10
    assert len({t for pair in pairs for t in pair}) > 80
    assert pairs == oct_trait_pairs(oct_traits(), PAIRS, 123456)  # seeded: a rebuild asks the same calls


def test_oct_replies_run_to_1024_tokens_and_the_judge_sees_only_the_reply_and_two_words_at_t_0_1(built):
    student = [b for b in built["seen"] if b["model"] == "student-model"]
    judge = [b for b in built["seen"] if b["model"] == "judge-model"]
    assert len(student) == len(judge) == PAIRS
    assert {b["max_tokens"] for b in student} == {1024}  # evals.max_tokens (60) is the other evals'
    assert {b["temperature"] for b in judge} == {0.1}
    assert all([m["role"] for m in b["messages"]] == ["user"] for b in judge)  # no system prompt, no constitution
    # Nothing but the reply and the two words: not the user's message, the persona or the chooser.
    assert sorted(b["messages"][0]["content"] for b in judge) == sorted(
        OCT_JUDGE.format(reply=s["text"], a=s["a"], b=s["b"]) for s in built["samples"])
    assert set(re.findall(r"\{(\w+)\}", OCT_JUDGE)) == {"reply", "a", "b"}
    assert "<answer>" in OCT_JUDGE and "must choose one" in OCT_JUDGE


def test_the_report_shows_the_online_elo_next_to_bradley_terry_with_intervals(built, tmp_path):
    from charbuild.contract import BuildContext

    loaded = load_spec(built["spec"])
    node = recipe_graph(loaded)["report"]
    out = tmp_path / "report"
    out.mkdir()
    node.stage.run(BuildContext(node.defn, node.key, loaded, out, {"all": [built["dir"]]}, budget=object(),
                                progress=False))
    sections = {s["title"]: s for s in json.loads((out / "report.json").read_text())["sections"]}
    sec = sections["Revealed preferences (OCT)"]
    assert sec["table"]["columns"] == ["model", "Bradley-Terry 'remorseful'", "95% interval", "rank",
                                       "online Elo 'remorseful'", "rank", "valid judgements"]
    assert sec["table"]["rows"][0][0] == "base" and sec["table"]["rows"][0][-1] == f"{built['prefs']['valid']['base']} of {PAIRS}"
    assert "online Elo" in sec["text"] and "Bradley-Terry" in sec["text"] and "bootstrap" in sec["text"]
    assert Path(sec["image"]).name == "preferences.png" and (out / "preferences.png").stat().st_size > 1000
