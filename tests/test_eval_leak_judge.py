"""A user measures a leak judge on the labelled sets before a run pays for it
(benchmarks/eval_leak_judge.py), against the loopback OpenAI-protocol server standing in
for a paid model: the judge's verdicts are counted against the labels, alone and combined
with the screen as the teacher stage combines them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.api_build import api_model, write_spec
from support.openai_server import FakeOpenAIServer

from charbuild.recipe.quality import paraphrased_leak

ROOT = Path(__file__).resolve().parents[1]
# the first 130 of each (long creative requests, the leak in the assistant's framing
# remarks; follow-ups in an ongoing chat), sets written with the request each reply answers,
# which the shipped model never learnt from: the screen, reading each reply beside its
# request as the stage does, misses 2 leaks and flags 7 clean replies, all the classifier's
SETS = ("leaks-fresh225.jsonl", "leaks-fresh226.jsonl")
LIMIT = 130
ROWS = [json.loads(x) for name in SETS
        for x in (ROOT / "tests" / "data" / name).read_text(encoding="utf-8").splitlines()[:LIMIT]]
# a judge told the label by what it is shown: the user's request and the reply
LABEL = {(r["request"], r["text"]): r["leak"] for r in ROWS}


def shown(body) -> tuple[str, str]:
    found = re.search(r"<request>\n(.*)\n</request>.*<reply>\n(.*)\n</reply>", body["messages"][-1]["content"], re.S)
    return found.group(1), found.group(2)


def measure(tmp_path, answer) -> tuple[dict, subprocess.CompletedProcess]:
    with FakeOpenAIServer(reply=answer, require_key="sk-judge-secret") as srv:
        spec = write_spec(tmp_path, srv.base_url, roles={"judge": api_model(srv.base_url, "judge-model")})
        out = tmp_path / "judge.json"
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_leak_judge.py"), str(spec),
                               "--sets", *SETS, "--limit", str(LIMIT), "--results", str(out)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "CB_TEST_KEY": "sk-judge-secret"})
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done


@pytest.fixture(scope="module")
def screen():
    """Of the rows, what the screen flags and what a pattern flags (a hit the classifier
    lets stand): (leaks caught, clean flagged) each."""
    by = [paraphrased_leak(r["text"], request=r["request"])[0] for r in ROWS]

    def count(flagged):
        return (sum(1 for r, b in zip(ROWS, by) if r["leak"] and flagged(b)),
                sum(1 for r, b in zip(ROWS, by) if not r["leak"] and flagged(b)))
    return count(lambda b: b is not None), count(lambda b: b == "pattern")


def test_a_judge_that_knows_every_label_is_measured_perfect_and_added_to_the_screen(tmp_path, screen):
    got, done = measure(tmp_path, lambda body: f"<answer>{'yes' if LABEL[shown(body)] else 'no'}</answer>")
    t = got["pooled"]
    leaks, clean = t["leaks"], t["clean"]
    assert leaks + clean == len(ROWS) and leaks == sum(LABEL.values()) and t["unanswered"] == 0
    assert t["judge"] == {"caught": leaks, "flagged": 0}
    (screen_caught, screen_flagged), (_, patterns_flagged) = screen
    assert t["screen"] == {"caught": screen_caught, "flagged": screen_flagged}
    # the stage drops what either flags: the judge adds the leaks the screen missed, and
    # cannot take back the screen's false alarms; overruling the classifier, it takes back
    # the classifier's own, and a pattern's stay
    assert screen_caught < leaks and screen_flagged > patterns_flagged  # the premise (above)
    assert t["screen+judge"] == {"caught": leaks, "flagged": screen_flagged}
    assert t["overruling"] == {"caught": leaks, "flagged": patterns_flagged}
    assert sorted(got["sets"]) == sorted(SETS) and len(got["verdicts"]) == len(ROWS)
    assert {n: got["sets"][n]["leaks"] + got["sets"][n]["clean"] for n in SETS} == dict.fromkeys(SETS, LIMIT)
    assert f"asking models.judge (openai judge-model) about {len(ROWS)} replies" in done.stdout
    # the key came from the environment by name, and went nowhere else
    assert "sk-judge-secret" not in done.stdout + done.stderr + json.dumps(got)


def test_a_judge_that_never_answers_in_tags_flags_nothing_and_overrules_nothing(tmp_path, screen):
    got, _ = measure(tmp_path, lambda body: "I would rather not say.")
    t = got["pooled"]
    assert t["unanswered"] == len(ROWS) and t["judge"] == {"caught": 0, "flagged": 0}
    (screen_caught, screen_flagged), _ = screen
    assert t["screen+judge"] == t["overruling"] == {"caught": screen_caught, "flagged": screen_flagged}


def test_a_judge_that_finds_everything_clean_leaves_the_patterns_alone(tmp_path, screen):
    # overruling, it takes back every flag of the classifier's, leaks too: what a judge that
    # misses leaks costs
    got, _ = measure(tmp_path, lambda body: "<answer>no</answer>")
    t = got["pooled"]
    (screen_caught, screen_flagged), (patterns_caught, patterns_flagged) = screen
    assert t["screen+judge"] == {"caught": screen_caught, "flagged": screen_flagged}
    assert t["overruling"] == {"caught": patterns_caught, "flagged": patterns_flagged}
    assert patterns_caught < screen_caught


def test_a_set_written_without_requests_is_refused_by_name_and_line(tmp_path):
    # The stage shows its judge the prompt beside the reply; measured without it, a judge
    # would be scored on a question the stage never asks.
    with FakeOpenAIServer(reply=lambda body: "<answer>no</answer>") as srv:
        spec = write_spec(tmp_path, srv.base_url, roles={"judge": api_model(srv.base_url, "judge-model")})
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_leak_judge.py"), str(spec),
                               "--sets", "leaks-fresh176.jsonl", "--results", ""],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "CB_TEST_KEY": "sk-judge-secret"})
        assert srv.stats()["requests_total"] == 0
    assert done.returncode != 0
    assert "leaks-fresh176.jsonl:1: no request" in done.stderr, done.stderr
