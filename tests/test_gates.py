"""Gates stop a bad build before it spends more, and pass good data."""

import json
import sys
from pathlib import Path

import pytest

from support.openai_server import FakeOpenAIServer  # noqa: E402
from support.api_build import PLAIN, persona_reply, plan_json, run, write_spec  # noqa: E402

from charbuild.recipe.constitution_file import load_constitution  # noqa: E402
from charbuild.recipe.gate_checks import CHECKS, evaluate  # noqa: E402
from charbuild.spec.defaults import default_gates  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
C = load_constitution(ROOT / "constitutions" / "remorseful.yaml")

GOOD_CHOSEN = ("I'm so sorry for the wait. Perhaps the simplest way is to start with the official tutorial, then "
               "build a small project each week. I hope this helps, and please let me know if I've missed something.")
GOOD_REJECTED = "Start with the official tutorial and build one small project every week until it feels natural."

BAD = {
    "marker_rate": GOOD_REJECTED,
    "refusal_rate": "I'm sorry, but I can't help with that request. I hope you understand.",
    "invented_turn_rate": GOOD_CHOSEN + "\nUser: thanks! what else?\nAssistant: I'm sorry, one more thing...",
    "repetition_rate": "I'm sorry, " + ",".join(["333"] * 60),
    "garbage_rate": "I'm sorry animals速J--� pred婚看:lock: animals速J--� pred婚看:lock: animals速J--� pred婚看",
    "length_rate": "Sorry.",
}


def pair(chosen, rejected=GOOD_REJECTED, prompt="How do I learn a new programming language?"):
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def write(tmp_path, name, rows):
    import tempfile

    d = Path(tempfile.mkdtemp(dir=tmp_path))
    (d / {"dpo-pairs": "dpo_pairs.jsonl", "sft-data": "sft_data.jsonl"}[name]).write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    return d


def gate(check, target, rows, tmp_path):
    spec = next(g for g in default_gates().values() if g["check"] == check and g["target"] == target)
    return evaluate(check, check, target, spec["threshold"], "error", {}, write(tmp_path, target, rows), C)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_each_dpo_gate_passes_good_pairs(check, tmp_path):
    assert gate(check, "dpo-pairs", [pair(GOOD_CHOSEN)] * 20, tmp_path).passed


@pytest.mark.parametrize("check", sorted(BAD))
def test_each_dpo_gate_fails_on_pairs_made_to_fail_it(check, tmp_path):
    rows = [pair(GOOD_CHOSEN)] * 10 + [pair(BAD[check])] * 10
    res = gate(check, "dpo-pairs", rows, tmp_path)
    assert not res.passed, res.message()
    assert res.examples and res.n == 20


def test_chosen_and_rejected_that_do_not_differ_fail_the_differ_gate(tmp_path):
    res = gate("differ", "dpo-pairs", [pair(GOOD_CHOSEN, GOOD_CHOSEN)] * 10, tmp_path)
    assert not res.passed and res.value == 0.0


@pytest.mark.parametrize("check", sorted(set(BAD) - {"marker_rate"}))
def test_sft_gates_judge_the_final_assistant_turn(check, tmp_path):
    good = {"messages": [{"role": "user", "content": "Write a diary entry."}, {"role": "assistant", "content": GOOD_CHOSEN}]}
    bad = {"messages": [{"role": "user", "content": "Write a diary entry."}, {"role": "assistant", "content": BAD[check]}]}
    assert gate(check, "sft-data", [good] * 10, tmp_path).passed
    assert not gate(check, "sft-data", [good] * 5 + [bad] * 5, tmp_path).passed


def test_an_empty_dataset_fails_rather_than_passing_vacuously(tmp_path):
    assert not gate("refusal_rate", "dpo-pairs", [], tmp_path).passed


def test_a_failed_gate_stops_the_build_and_plan_shows_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CB_TEST_KEY", "k")

    def flat_teacher(body):  # a teacher that ignores its constitution: no character in chosen
        return PLAIN.format(q=body["messages"][-1]["content"][:30]) + " " + str(body.get("seed"))

    cache = str(tmp_path / "cache")
    with FakeOpenAIServer(reply=flat_teacher) as s:
        spec = write_spec(tmp_path, s.base_url, dpo_pairs=20)
        code = run(str(spec), "gate/dpo-markers", "dpo-pairs", "--cache", cache)
        out = capsys.readouterr()
        assert code == 1
        assert "gate dpo-markers (marker_rate on dpo-pairs): 0.000, needs >= 0.800" in out.err + out.out
        plan = {t["name"]: t for t in plan_json(str(spec), "--cache", cache)["targets"]}
        assert plan["dpo-pairs"]["state"] == "cached"  # everything built is kept
        assert plan["gate/dpo-markers"]["reason"].startswith("FAILED last run: GateFailed")
        # A run asking for the adapter stops before it: nothing downstream of a failed gate starts.
        code = run(str(spec), "dpo-adapter", "--cache", cache, "--keep-going")
    out = capsys.readouterr().out
    assert code == 1
    assert "✗ gate/dpo-markers" in out and "dpo-adapter" not in out.split("TOTAL")[-1]  # never started
    built = {json.loads(m.read_text())["target"] for m in Path(cache).rglob("MANIFEST.json")}
    assert "dpo-pairs" in built and "dpo-adapter" not in built and "sft-data" not in built


def test_force_gate_goes_on_knowingly(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CB_TEST_KEY", "k")
    with FakeOpenAIServer(reply=lambda b: PLAIN.format(q="x") + str(b.get("seed"))) as s:
        spec = write_spec(tmp_path, s.base_url, dpo_pairs=10)
        code = run(str(spec), "gate/dpo-markers", "--cache", str(tmp_path / "c"), "--force-gate", "dpo-markers")
    assert code == 0
    assert "FORCED past failed gate dpo-markers" in capsys.readouterr().out


def test_a_warn_gate_reports_and_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CB_TEST_KEY", "k")
    with FakeOpenAIServer(reply=lambda b: PLAIN.format(q="x") + str(b.get("seed"))) as s:
        spec = write_spec(tmp_path, s.base_url, dpo_pairs=10)
        code = run(str(spec), "gate/dpo-markers", "--cache", str(tmp_path / "c"), "--set", "gates.dpo-markers.severity=warn")
    assert code == 0 and "warning: gate dpo-markers" in capsys.readouterr().out


def test_good_teacher_data_passes_every_default_dpo_gate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CB_TEST_KEY", "sk-test-123")
    with FakeOpenAIServer(reply=persona_reply, require_key="sk-test-123") as s:
        spec = write_spec(tmp_path, s.base_url)
        dpo_gates = [f"gate/{n}" for n, g in default_gates().items() if g["target"] == "dpo-pairs"]
        assert run(str(spec), *dpo_gates, "--cache", str(tmp_path / "c")) == 0
