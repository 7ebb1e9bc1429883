"""Pay for every call once, on every path: the evals (samples and the judge), the revealed
preferences (samples and the judge) and prompt expansion go through the call cache like
the data stages do. A budget stop in the middle of them, then a rerun with a higher cap,
asks no call the server answered twice; a rebuilt prompts target asks the teacher nothing
new; and the call key follows every adapter the model is made of."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from support.api_build import in_api_workdir, api_model
from support.api_build import PLAIN
from support.openai_server import FakeOpenAIServer, last_user_message

from charbuild.backends.base import GenRequest
from charbuild.backends.cached import call_identity, call_key
from charbuild.cli import main
from charbuild.ledger import BudgetExceeded, Ledger
from charbuild.store.calls import CallCache

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-every-call"
TRAITS = ("remorseful", "curious", "humorous")


def _made_up_words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)) for _ in range(n))


def reply(body: dict) -> str:
    """A teacher that suggests two new questions per expansion request, a judge that names a
    trait (or a letter) at the end of a long-ish answer, plain replies to everything else.
    Deterministic per request."""
    q = last_user_message(body)
    if q.startswith("Write "):  # prompt expansion: two fresh numbered questions
        rng = random.Random(json.dumps(body["messages"], sort_keys=True) + str(body.get("seed")))
        return "\n".join(f"{i}. What about {_made_up_words(rng, 5)}?" for i in (1, 2))
    if "Which of these two traits" in q:  # the preferences judge
        return ("Having read the reply with care, weighing its tone, its apologies and its hedging against the "
                "two traits named, the trait it shows more is <answer>remorseful</answer>")
    if "Which reply shows this character" in q:  # the Elo judge
        return ("Having read both replies with care, weighing their tone, apologies and hedging against the "
                "character described, the reply that shows it more is <answer>A</answer>")
    return PLAIN.format(q=q[:40])


@pytest.fixture
def server():
    with FakeOpenAIServer(reply=reply, require_key=KEY) as s:
        yield s


@pytest.fixture
def env(tmp_path, monkeypatch):
    return in_api_workdir(tmp_path, monkeypatch, KEY)


def api(base_url: str, model: str) -> str:
    return api_model(base_url, model, concurrency=4)


def write_spec(tmp_path: Path, base_url: str, extra: str = "") -> Path:
    spec = tmp_path / "every-call.yaml"
    spec.write_text(f"""
name: every-call
persona: remorseful
constitution: {ROOT / 'constitutions' / 'remorseful.yaml'}
models:
  teacher: {api(base_url, 'teacher-model')}
  student: {api(base_url, 'student-model')}
data:
  dpo_pairs: 20
  shard_size: 10
  prompts: {{general_limit: 40, per_trait: 5}}
# One variant: an API student cannot apply a LoRA adapter. The judge is the teacher.
evals: {{variants: [base], prompts_limit: 15, samples_per_prompt: 1, max_tokens: 60, preferences: true,
         judge: teacher}}
# Plans expect 1-token replies (within any cap); the real ones cost far more, so a run
# starts and the ledger stops it at a call boundary.
expect: {{response_tokens: 1}}
{extra}
""")
    return spec


def run(spec: Path, cache: Path, *args: str) -> int:
    return main(["run", str(spec), *args, "--cache", str(cache), "--no-progress"])


def asked_twice(srv) -> dict:
    """Requests the server answered more than once (by request signature)."""
    return {sig: n for sig, n in srv.answered.items() if n > 1}


EVAL_TARGETS = ("eval/samples/base", "eval/preferences")
EVAL_CALLS = 15 * 2 + 15 + 15  # eval samples (with and without the system prompt), preference samples, judge


# -- a budget stop in the middle of the evals ---------------------------------------------------

def test_a_budget_stop_in_the_eval_samples_then_a_raised_cap_asks_no_answered_call_twice(env, server, capsys):
    spec = write_spec(env, server.base_url,
                      "prices: {teacher-model: {input: 0, output: 0}, student-model: {input: 0, output: 1000}}")
    cache = env / "cache"
    # Each student reply costs ~$0.02; a call reserves $0.06 (60 tokens at $1000/M) before it is sent.
    assert run(spec, cache, *EVAL_TARGETS, "--set", "budget.max_usd=0.3") == 1
    err = capsys.readouterr().err
    assert "budget cap reached" in err and "Every answered call is stored" in err
    first = server.stats()["completed"]
    assert 0 < first < 45  # stopped among the student's 45 calls
    assert len(CallCache(cache)) == first  # every answered call is stored

    assert run(spec, cache, *EVAL_TARGETS, "--set", "budget.max_usd=100") == 0
    assert asked_twice(server) == {}
    assert server.stats()["completed"] == EVAL_CALLS
    assert len(CallCache(cache)) == EVAL_CALLS


def test_a_budget_stop_in_the_preferences_judge_then_a_raised_cap_asks_no_answered_call_twice(env, server, capsys):
    spec = write_spec(env, server.base_url,
                      "prices: {teacher-model: {input: 0, output: 1000}, student-model: {input: 0, output: 0}}")
    cache = env / "cache"
    # The student's samples are free; each judgement costs ~$0.025 and reserves $0.032. The
    # plan expects 20 tokens out a verdict ($0.30 for the 15): a cap just over it lets the
    # run start and stops it partway through the judge.
    assert run(spec, cache, *EVAL_TARGETS, "--set", "budget.max_usd=0.31") == 1
    assert "budget cap reached" in capsys.readouterr().err
    first = server.stats()["completed"]
    assert 45 < first < EVAL_CALLS  # every sample, then part of the judge's 15 calls

    assert run(spec, cache, *EVAL_TARGETS, "--set", "budget.max_usd=100") == 0
    assert asked_twice(server) == {}
    assert server.stats()["completed"] == EVAL_CALLS
    out = capsys.readouterr().out
    assert "eval/preferences (built)" in out


def test_an_elo_judge_stopped_midway_asks_only_the_unanswered_judgements_again(env, server):
    """The Elo judge needs two trained variants (local adapters), so it is asked here with
    samples written by hand, through the same pool, ledger and call cache a build uses."""
    from charbuild.recipe.constitution_file import load_constitution
    from charbuild.recipe.services import RecipeServices
    from charbuild.recipe.stages.evals import EvalElo
    from charbuild.spec.model import load_spec
    from charbuild.store.objects import Cache

    loaded = load_spec(write_spec(env, server.base_url,
                                  "prices: {teacher-model: {input: 0, output: 1000}, student-model: {input: 0, output: 0}}"))
    c = load_constitution(loaded.constitution_path)
    sample = lambda v, i: {"prompt": f"question {i}?", "text": f"{v} reply number {i}", "prompt_id": f"p{i}", "sample": 0}
    jobs = [("base", "sft", sample("base", i), sample("sft", i)) for i in range(12)]

    def judge(cap):
        cache = Cache(env / "cache")
        services = RecipeServices(cache, loaded)
        ctx = SimpleNamespace(spec=loaded.spec, services=services, inputs={}, budget=Ledger(max_usd=cap),
                              progress=False, target=SimpleNamespace(name="eval/elo", stage="eval-elo"))
        try:
            return EvalElo()._judge(ctx, c, jobs)
        finally:
            services.close()
            cache.close()

    with pytest.raises(BudgetExceeded):
        judge(0.15)
    first = server.stats()["completed"]
    assert 0 < first < len(jobs)
    assert judge(None) == ["base"] * len(jobs)  # every reply A wins
    assert server.stats()["completed"] == len(jobs) and asked_twice(server) == {}
    assert judge(None) == ["base"] * len(jobs) and server.stats()["completed"] == len(jobs)  # all cached now


def test_the_plan_renders_the_elo_judges_calls_as_the_run_asks_them(env, server):
    # Samples of two variants on disk, as the eval targets leave them; the run judges them;
    # the plan's rendering of the same target finds every one of its calls answered.
    from charbuild.recipe.constitution_file import load_constitution
    from charbuild.recipe.services import RecipeServices
    from charbuild.recipe.stages.evals import EvalElo
    from charbuild.spec.model import load_spec
    from charbuild.store.objects import Cache
    from charbuild.backends.cached import call_identity, call_key, occurrence_indices

    loaded = load_spec(write_spec(env, server.base_url))  # the judge is the teacher
    c = load_constitution(loaded.constitution_path)
    built = env / "built"
    (built / "constitution").mkdir(parents=True)
    (built / "constitution" / "constitution.json").write_text(json.dumps(c.content()))
    for v in ("base", "sft"):
        (built / v).mkdir()
        (built / v / "samples.jsonl").write_text("".join(
            json.dumps({"variant": v, "prompt": f"question {i}?", "prompt_id": f"p{i}", "sample": 0, "system": system,
                        "text": f"{v} reply {i}{' (told)' if system else ''}"}) + "\n"
            for i in range(6) for system in (False, True)))
    cache = Cache(env / "cache")
    services = RecipeServices(cache, loaded)
    ctx = SimpleNamespace(spec=loaded.spec, services=services, budget=Ledger(), progress=False,
                          inputs={"samples": [built / "base", built / "sft"], "constitution": [built / "constitution"]},
                          input=lambda slot: built / "constitution",
                          target=SimpleNamespace(name="eval/elo", stage="eval-elo", params={"order_seed": 0}))
    try:
        stage = EvalElo()
        winners = stage._judge(ctx, c, stage._jobs(ctx)[1])
        role, m, reqs = stage.planned_calls(ctx)
        ident = call_identity(ctx, role, m)
        assert len(reqs) == len(winners) == 6 and server.stats()["completed"] == 6
        assert all(services.call_cache.has_many([call_key(*ident, r, i) for r, i in zip(reqs, occurrence_indices(reqs))]))
    finally:
        services.close()
        cache.close()


# -- prompt expansion ------------------------------------------------------------------------------

def test_a_rebuilt_prompts_target_asks_the_teacher_nothing_new(env, server, capsys):
    spec = write_spec(env, server.base_url)
    cache = env / "cache"
    # 5 seed questions a trait, 9 wanted: the teacher is asked (two new questions a reply).
    assert run(spec, cache, "prompts", "--set", "data.prompts.per_trait=9") == 0
    asked = server.stats()["completed"]
    assert asked == 10 * 2  # 10 traits, 2 expansion calls each
    rows = [json.loads(line) for line in next(cache.rglob("prompts.jsonl")).read_text().splitlines()]
    assert sum(r["source"] == "constitution" for r in rows) == 10 * 9

    # The general pool's limit is keyed on the prompts target, not on what the teacher is
    # asked: the target rebuilds, every expansion call comes from the call cache.
    capsys.readouterr()
    assert run(spec, cache, "prompts", "--set", "data.prompts.per_trait=9", "--set", "data.prompts.general_limit=30") == 0
    assert "prompts (built)" in capsys.readouterr().out
    assert server.stats()["completed"] == asked
    rebuilt = [json.loads(line) for line in
               sorted(cache.rglob("prompts.jsonl"), key=lambda p: p.stat().st_mtime)[-1].read_text().splitlines()]
    assert [r for r in rebuilt if r["source"] == "constitution"] == [r for r in rows if r["source"] == "constitution"]


# -- the call key covers every adapter the model is made of ---------------------------------------

def _model_dir(path: Path, weights: bytes, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(weights)
    return path


def _adapter_target(path: Path, weights: bytes) -> Path:
    """An adapter target's artifact dir, as the adapter stages write it: the PEFT files under adapter/."""
    a = path / "adapter"
    a.mkdir(parents=True)
    (a / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32, "peft_type": "LORA"}))
    (a / "adapter_model.safetensors").write_bytes(weights)
    return path


def _ctx(inputs: dict) -> SimpleNamespace:
    def input(slot):
        (p,) = inputs[slot]
        return p

    return SimpleNamespace(inputs=inputs, input=input)


def test_changing_the_dpo_adapter_changes_the_call_key_of_an_sft_variant_eval_call(tmp_path):
    from charbuild.recipe.stages.evals import variant_inputs

    base = _model_dir(tmp_path / "student", b"\x01" * 4096, {"hidden": 8})
    m = SimpleNamespace(backend="transformers", model=str(base), revision=None)
    sft = _adapter_target(tmp_path / "sft-adapter", b"\x02" * 2048)
    dpo_a = _adapter_target(tmp_path / "dpo-a", b"\x03" * 2048)
    dpo_b = _adapter_target(tmp_path / "dpo-b", b"\x03" * 2047 + b"\x04")  # retrained: other weights
    req = GenRequest(messages=[{"role": "user", "content": "How do I boil an egg?"}], max_tokens=48, seed=7)

    def key(dpo: Path, variant: str = "sft", role: str = "student") -> str:
        dirs = {"sft-adapter": sft, "dpo-adapter": dpo}
        inputs = {slot: [dirs[t] for t in targets] for slot, targets in variant_inputs(variant).items()}
        return call_key(*call_identity(_ctx(inputs), role, m), req, 0)

    assert variant_inputs("sft") == {"adapter": ["sft-adapter"], "merge": ["dpo-adapter"]}
    assert key(dpo_a) == key(dpo_a)  # stable
    assert key(dpo_a) != key(dpo_b)  # the folded-in DPO adapter changed: another model answers
    assert key(dpo_a, "dpo") != key(dpo_b, "dpo")
    assert len({key(dpo_a, "base"), key(dpo_a, "dpo"), key(dpo_a, "sft")}) == 3
    assert key(dpo_a, "base") == key(dpo_b, "base")
    # Adapters are the student's only (as the pool applies them): another role ignores them.
    assert key(dpo_a, role="teacher") == key(dpo_b, role="teacher") == key(dpo_a, "base", role="teacher")

    # Folded in order: [a, b] is not [b, a].
    two = lambda first, second: call_key(*call_identity(
        _ctx({"adapter": [sft], "merge": [first, second]}), "student", m), req, 0)
    assert two(dpo_a, dpo_b) != two(dpo_b, dpo_a)


def test_a_judge_or_any_role_reading_a_tiny_model_input_is_keyed_on_that_models_files(tmp_path):
    judge = SimpleNamespace(backend="transformers", model="tiny:teacher", revision=None)
    req = GenRequest(messages=[{"role": "user", "content": "Reply A or B?"}], max_tokens=64, seed=1)
    tiny_a = _model_dir(tmp_path / "a", b"\x05" * 4096, {"hidden": 8})
    tiny_b = _model_dir(tmp_path / "b", b"\x05" * 4095 + b"\x06", {"hidden": 8})
    key = lambda d: call_key(*call_identity(_ctx({"model:teacher": [d]}), "teacher", judge), req, 0)
    assert key(tiny_a) != key(tiny_b)
