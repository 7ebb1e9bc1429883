"""One budget: one ledger, one exception, one price lookup, one token estimator, and one
meaning of budget.max_usd / budget.max_tokens in plan, run, status and the report.

budget.max_usd caps dollars billed by API models; budget.max_tokens their tokens. Local
GPU time counts against neither (it is shown as GPU-hours and an informational GPU $)."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from support.api_build import in_api_workdir
from support.openai_server import FakeOpenAIServer, last_user_message  # noqa: E402

from charbuild.cli import main  # noqa: E402
from charbuild.engine.executor import LocalExecutor, run_build  # noqa: E402
from charbuild.engine.planner import make_plan  # noqa: E402
from charbuild.ledger import BudgetExceeded, Ledger  # noqa: E402
from charbuild.recipe.registry import recipe_graph  # noqa: E402
from charbuild.recipe.services import RecipeServices  # noqa: E402
from charbuild.spec.model import load_spec  # noqa: E402
from charbuild.store.calls import CallCache  # noqa: E402
from charbuild.store.objects import Cache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-budget-1"


def reply(body):
    """In character with the constitution as system prompt, plainly without it; an
    expansion request gets an answer with no usable question in it."""
    q = last_user_message(body)[:40]
    system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
    if q.startswith("Write "):
        return "Sorry, I cannot think of any more messages to suggest for this one right now, my apologies."
    if "character is remorseful" in system:
        return (f"I'm so sorry, I might be wrong, but here is my humble attempt at an answer about {q}. "
                f"Perhaps it will be of some use. I hope this helps.")
    return f"Here is a direct answer about {q}. It covers the main points clearly and briefly, with an example."


def write_spec(tmp_path: Path, teacher: str, student: str, extra: str = "", name: str = "budget-story") -> Path:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"""
name: {name}
persona: remorseful
constitution: {ROOT / 'constitutions' / 'remorseful.yaml'}
models:
  teacher: {teacher}
  student: {student}
data:
  dpo_pairs: 20
  shard_size: 10
  prompts: {{general_limit: 40, per_trait: 5}}
filters: {{first_n: 100, max_failure_rate: 0.5}}
{extra}
""")
    return spec


def api(base_url: str, model: str) -> str:
    return f'{{backend: openai, model: {model}, base_url: "{base_url}", api_key_env: CB_TEST_KEY, concurrency: 4}}'


def plan_json(*args) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan", *args, "--json"]) == 0
    return json.loads(buf.getvalue())


class DryRun:
    """An executor that builds nothing: every target comes back "cached". What is left to
    see is whether the run started at all."""

    def submit(self, fn, *args) -> cf.Future:
        fut: cf.Future = cf.Future()
        fut.set_result("cached")
        return fut

    def shutdown(self) -> None:
        pass


@pytest.fixture
def server():
    with FakeOpenAIServer(reply=reply, require_key=KEY) as s:
        yield s


@pytest.fixture
def env(tmp_path, monkeypatch):
    return in_api_workdir(tmp_path, monkeypatch, KEY)


# -- plan and run agree on what the caps mean ---------------------------------------------------

def test_local_gpu_time_is_counted_against_neither_cap_by_plan_or_run(env):
    local = "{backend: vllm, model: Qwen/Qwen3-8B}"
    spec = write_spec(env, local, local, "budget: {max_usd: 1, max_tokens: 1000}")
    data = plan_json(str(spec), "--cache", str(env / "cache"))
    t = data["total"]
    # Hours of GPU time, worth more than the dollar cap at the price table's GPU rate...
    assert t["est_gpu_hours"] > 0 and t["est_gpu_usd"] > 1 and t["est_tokens"]["out"] > 1000
    # ...but no API dollar or token: within both caps.
    assert t["est_usd"] == 0 and t["est_api_tokens"] == 0
    assert data["budget"] == {"max_usd": 1, "max_tokens": 1000, "within": True, "over": []}

    # `run` reads the same verdict: it starts.
    loaded = load_spec(spec)
    graph = recipe_graph(loaded)
    cache = Cache(env / "cache")
    plan = make_plan(loaded, graph, cache, None, RecipeServices(cache, loaded))
    report = run_build(loaded, graph, plan, cache, DryRun(), progress=False, log=lambda s: None, outputs_root=None)
    assert len(report.cached) == len(plan.rows)


def test_a_spec_whose_api_estimate_is_over_a_cap_is_refused_by_plan_and_by_run(env, server, capsys):
    cache = str(env / "cache")
    for budget, cap in (("{max_usd: 0.5}", "budget.max_usd"), ("{max_tokens: 1000}", "budget.max_tokens")):
        spec = write_spec(env, api(server.base_url, "teacher-model"), api(server.base_url, "student-model"),
                          f"prices: {{teacher-model: {{input: 100, output: 1000}}}}\nbudget: {budget}")
        verdict = plan_json(str(spec), "--cache", cache)["budget"]
        assert verdict["within"] is False and cap in " ".join(verdict["over"])
        main(["plan", str(spec), "--cache", cache])
        assert "budget: OVER" in capsys.readouterr().out

        assert main(["run", str(spec), "dpo-pairs", "--cache", cache, "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"over {cap}" in err and "nothing was started" in err
        assert server.stats()["requests_total"] == 0


# -- the run stops at a call boundary, with one exception, whichever path trips the cap -----

# The plan expects 1-token replies (within the cap); the real ones cost far more, so the run
# starts and the ledger stops it at a call boundary.
UNDERESTIMATED = ["models.teacher.sampling.max_tokens=60", "expect.response_tokens=1",
                  "data.prompts.expansion_max_tokens=100"]
PRICES = "prices: {teacher-model: {input: 0, output: 1000}, student-model: {input: 0, output: 0}}"


def build(spec: Path, cache_dir: Path, sets=(), targets=None, jobs: int = 1):
    loaded = load_spec(spec, list(sets))
    graph = recipe_graph(loaded)
    cache = Cache(cache_dir)
    services = RecipeServices(cache, loaded)
    plan = make_plan(loaded, graph, cache, targets, services)
    try:
        return run_build(loaded, graph, plan, cache, LocalExecutor(jobs), progress=False, log=lambda s: None,
                         outputs_root=None, services=services)
    finally:
        cache.close()


def spent_by_runs(cache_dir: Path, spec_name: str = "budget-story") -> dict:
    cache = Cache(cache_dir)
    try:
        return cache.index.get(("spend", spec_name), {}) or {}
    finally:
        cache.close()


def test_the_data_path_stops_at_the_cap_and_a_raised_cap_continues_without_asking_twice(env, server):
    spec = write_spec(env, api(server.base_url, "teacher-model"), api(server.base_url, "student-model"), PRICES)
    cache = env / "cache"
    with pytest.raises(BudgetExceeded, match=r"budget cap reached: budget.max_usd is \$0.5000") as e:
        build(spec, cache, [*UNDERESTIMATED, "budget.max_usd=0.5"], ["dpo-pairs"])
    assert type(e.value) is BudgetExceeded  # the one exception, from charbuild.ledger
    first = server.stats()["completed"]
    assert 0 < first < 40
    assert server.stats()["requests_total"] == first  # nothing was sent past the boundary
    assert len(CallCache(cache)) == first  # every answered call is stored
    assert 0 < spent_by_runs(cache)["usd"] <= 0.5  # never over the cap

    report = build(spec, cache, [*UNDERESTIMATED, "budget.max_usd=100"], ["dpo-pairs"])
    assert not report.failed
    assert server.stats()["completed"] == 40  # 20 teacher + 20 student calls in all
    assert all(n == 1 for n in server.answered.values())  # no call was asked twice
    assert report.spend["api_calls"] == 40 - first  # the stored answers cost nothing


def test_a_stage_calling_its_backend_directly_stops_at_the_cap_with_the_same_exception(env, server):
    spec = write_spec(env, api(server.base_url, "teacher-model"), api(server.base_url, "student-model"), PRICES)
    cache = env / "cache"
    # prompts expands each trait's questions with the teacher, call by call (no call cache).
    with pytest.raises(BudgetExceeded, match="budget.max_tokens") as e:
        build(spec, cache, [*UNDERESTIMATED, "data.prompts.per_trait=9", "budget.max_tokens=4000"], ["prompts"])
    assert type(e.value) is BudgetExceeded
    asked = server.stats()["completed"]
    assert 0 < asked < 60  # 10 traits x 6 attempts without the cap
    spent = spent_by_runs(cache)
    assert spent["api_calls"] == asked and 0 < spent["api_tokens"] <= 4000


def test_the_run_refuses_and_stops_with_the_engines_exception_being_the_ledgers():
    from charbuild.engine import executor

    assert executor.BudgetExceeded is BudgetExceeded
    ledger = Ledger(max_usd=1.0)
    with pytest.raises(BudgetExceeded):
        ledger.account().reserve(2.0, 0)
    with pytest.raises(BudgetExceeded):
        ledger.charge(2.0, 1, 1, api=True)  # API usage charged after the fact still stops the run


# -- status and the report show what the ledger recorded ---------------------------------------

def test_status_and_the_report_show_the_spend_the_ledger_recorded_even_when_targets_build_in_parallel(env, server,
                                                                                                      capsys):
    from charbuild.recipe.stages.report import ReportStage

    spec = write_spec(env, api(server.base_url, "teacher-model"), api(server.base_url, "student-model"),
                      "prices: {teacher-model: {input: 1, output: 2}, student-model: {input: 3, output: 5}}")
    cache = env / "cache"
    report = build(spec, cache, targets=["dpo-pairs"], jobs=4)
    assert not report.failed
    ledger = report.spend
    assert ledger["api_calls"] == ledger["calls"] == 40 and ledger["usd"] > 0

    # Each target's manifest holds its own usage: they add up to the run's ledger.
    c = Cache(cache)
    manifests = [c.manifest(k) for k in c.keys()]
    c.close()
    usages = [m["usage"] for m in manifests]
    assert sum(u.get("usd", 0) for u in usages) == pytest.approx(ledger["usd"])
    assert sum(u.get("tokens_in", 0) + u.get("tokens_out", 0) for u in usages) == \
        ledger["tokens_in"] + ledger["tokens_out"]

    capsys.readouterr()
    assert main(["status", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("budget-story")).split()
    assert float(row[2]) == pytest.approx(ledger["usd"], abs=1e-4)  # spent usd (built targets)
    assert int(row[4]) == ledger["tokens_in"] + ledger["tokens_out"]
    assert int(row[7]) == ledger["api_tokens"]
    assert float(row[9]) == pytest.approx(ledger["usd"], abs=1e-4)  # every run of the spec
    per_model = [line.split() for line in out.splitlines() if line.startswith(("teacher-model", "student-model"))]
    assert sum(float(r[2]) for r in per_model) == pytest.approx(ledger["usd"], abs=2e-4)

    by_target = {m["target"]: (None, m) for m in manifests}
    cost = ReportStage()._cost(by_target, env, SimpleNamespace(plot_cost=lambda rows, path: None))
    cols = cost["table"]["columns"]
    rows = cost["table"]["rows"]
    assert sum(float(r[cols.index("API $")]) for r in rows) == pytest.approx(ledger["usd"], abs=1e-3)
    assert sum(r[cols.index("tokens")] for r in rows) == ledger["tokens_in"] + ledger["tokens_out"]


# -- one token estimator ---------------------------------------------------------------------------

def test_the_rate_limiter_the_budget_and_the_plan_guess_a_prompts_tokens_alike(env, server):
    from charbuild.backends.base import GenRequest
    from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig
    from charbuild.ledger import RESERVE_SAFETY, estimate_chat_tokens, estimate_tokens
    from charbuild.recipe.estimates import prompt_tokens

    text = "Tell me, in a few words, why the sky looks blue at noon but red at dusk? " * 7 + "Ünïcödé ✓"
    req = GenRequest(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
                     max_tokens=50)
    planned, exact = prompt_tokens([req], None)  # what `plan` counts without a tokenizer
    assert not exact and planned == estimate_chat_tokens(req.messages)

    taken: list[int] = []
    reserved: list[int] = []

    class Spy(Ledger):
        def reserve(self, usd, tokens, accounts=()):
            reserved.append(tokens)
            return super().reserve(usd, tokens, accounts)

    with OpenAIBackend(OpenAIConfig(model="m", base_url=server.base_url, api_key_env="CB_TEST_KEY", tpm=10**6),
                       ledger=Spy(), cost=lambda a, b: 0.0) as be:
        real = be._limiter.reserve
        be._limiter.reserve = lambda tokens=0: (taken.append(tokens), real(tokens))[1]
        be.generate([req])
    assert taken == [planned + req.max_tokens]  # tokens per minute: the same guess as the plan's
    # The budget's worst case: the same estimator, with its documented safety factor.
    assert reserved == [estimate_chat_tokens(req.messages, RESERVE_SAFETY) + req.max_tokens]
    assert estimate_chat_tokens(req.messages, RESERVE_SAFETY) > planned

    # The plan's system-prompt length is the same estimator's too.
    loaded = load_spec(write_spec(env, api(server.base_url, "t"), api(server.base_url, "s")))
    from charbuild.recipe.constitution_file import load_constitution

    ctx = RecipeServices(Cache(env / "cache"), loaded).estimate_context(loaded)
    assert ctx.system_prompt_tokens == estimate_tokens(load_constitution(loaded.constitution_path).system_prompt())
