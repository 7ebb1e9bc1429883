"""Paying less per call: input tokens a provider served from its prompt cache are recorded
and charged at the cached rate; calls sharing a system prompt go out side by side; budget
reservations hold the measured output lengths, not max_tokens (and the cap still holds,
overshot by no more than the calls in flight); `plan` and the report show dollars per
accepted example."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from support.api_build import built_manifest, persona_reply, plan_json
from support.api_build import write_spec as api_spec
from support.openai_server import FakeOpenAIServer, last_user_message

from charbuild.backends.base import GenRequest
from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig
from charbuild.cli import main
from charbuild.ledger import BudgetExceeded, Ledger
from charbuild.spec.prices import usd_of

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-pay-less"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CB_TEST_KEY", KEY)
    return tmp_path


def write_spec(tmp_path: Path, base_url: str, extra: str = "", pairs: int = 30, concurrency: int = 8) -> Path:
    return api_spec(tmp_path, base_url, name="pay-less", file="pay-less.yaml", extra=extra, concurrency=concurrency,
                    dpo_pairs=pairs)


def run(spec: Path, cache: Path, *args: str) -> int:
    return main(["run", str(spec), *args, "--cache", str(cache), "--no-progress"])


manifest = built_manifest


def entries(cache: Path) -> list[dict]:
    return [json.loads(p.read_text())["result"] for p in (cache / "calls").glob("??/*.json")]


# -- prompt caching ----------------------------------------------------------------------------

@pytest.mark.parametrize("price,cached_rate", [("{input: 1000, output: 10, cached_input: 100}", 100),
                                               ("{input: 1000, output: 10}", 500)],  # the table's fraction, 0.5
                         ids=["own-rate", "default-fraction"])
def test_input_served_from_the_providers_prompt_cache_is_recorded_and_charged_at_the_cached_rate(env, price,
                                                                                                  cached_rate):
    cache = env / "cache"
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY, prompt_cache=True) as srv:
        spec = write_spec(env, srv.base_url, f"prices: {{teacher-model: {price}}}")
        assert run(spec, cache, "teacher-responses/shard-0000") == 0
    calls = entries(cache)
    cached = [c["meta"].get("cached_prompt_tokens", 0) for c in calls]
    assert len(calls) == 10 and sorted(cached)[0] == 0 and all(n > 300 for n in sorted(cached)[1:])  # the constitution
    u = manifest(cache, "teacher-responses/shard-0000")["usage"]
    assert u["tokens_in_cached"] == sum(cached)
    want = sum(((c["prompt_tokens"] - n) * 1000 + n * cached_rate + c["completion_tokens"] * 10) / 1e6
               for c, n in zip(calls, cached))
    assert u["usd"] == pytest.approx(want)
    assert u["usd"] < sum((c["prompt_tokens"] * 1000 + c["completion_tokens"] * 10) / 1e6 for c in calls) * 0.6


def test_requests_sharing_a_system_prompt_are_sent_side_by_side_and_answered_in_request_order():
    order: list[str] = []
    lock = threading.Lock()

    def reply(body):
        with lock:
            order.append(last_user_message(body))
        return f"answer to {last_user_message(body)}"

    systems = ["You are A. " * 50, "You are B. " * 50, None]
    reqs = [GenRequest(messages=([{"role": "system", "content": systems[i % 3]}] if systems[i % 3] else [])
                       + [{"role": "user", "content": f"q{i}"}], seed=i) for i in range(9)]
    with FakeOpenAIServer(reply=reply) as srv:
        with OpenAIBackend(OpenAIConfig(model="m", base_url=srv.base_url, api_key_env=None, concurrency=1)) as b:
            out = b.generate(reqs)
    assert [r.text for r in out] == [f"answer to q{i}" for i in range(9)]
    assert order == ["q0", "q3", "q6", "q1", "q4", "q7", "q2", "q5", "q8"]


# -- reservations from measured lengths ---------------------------------------------------------

# $0.1 an output token: max_tokens 2000 reserves $200 a call; the replies (~20-60 tokens) cost $2-6.
TIGHT = ["--set", "prices.teacher-model={input: 0, output: 100000}", "--set", "models.teacher.sampling.max_tokens=2000",
         "--set", "budget.max_usd=100", "--set", "expect.response_tokens=1"]


def test_a_tight_cap_that_max_tokens_reservations_would_fill_builds_once_lengths_are_measured(env, capsys):
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY) as srv:
        spec = write_spec(env, srv.base_url)
        fresh = env / "fresh"
        # Nothing measured: a call reserves max_tokens ($200), over the $100 cap: nothing is sent.
        assert run(spec, fresh, "teacher-responses/shard-0002", *TIGHT) == 1
        assert "budget cap reached" in capsys.readouterr().err and srv.requests_total == 0

        cache = env / "cache"
        assert run(spec, cache, "teacher-responses/shard-0000", "teacher-responses/shard-0001") == 0  # 20 measured
        asked = srv.requests_total
        assert run(spec, cache, "teacher-responses/shard-0002", *TIGHT) == 0  # reserves the measured p99 instead
        assert srv.requests_total == asked + 10
    u = manifest(cache, "teacher-responses/shard-0002")["usage"]
    assert 0 < u["usd"] <= 100


def test_a_reply_longer_than_its_reservation_is_charged_in_full_and_the_cap_is_crossed_by_no_more_than_the_calls_in_flight():
    reply = " ".join(["word"] * 20)  # 20 tokens each, against reservations of 2
    cost = lambda tin, tout, **kw: usd_of({"input": 0.0, "output": 1e6}, tin, tout, **kw)  # $1 an output token
    reqs = [GenRequest(messages=[{"role": "user", "content": f"q{i}"}], max_tokens=100, reserve_tokens=2, seed=i)
            for i in range(60)]
    ledger = Ledger(max_usd=50)
    got = []
    with FakeOpenAIServer(reply=lambda body: reply, latency_s=0.02) as srv:
        with OpenAIBackend(OpenAIConfig(model="m", base_url=srv.base_url, api_key_env=None, concurrency=4),
                           cost=cost) as b:
            with pytest.raises(BudgetExceeded):
                b.generate(reqs, ledger=ledger, on_result=lambda i, r: got.append(r))
    spent = ledger.snapshot()["usd"]
    assert spent == pytest.approx(20.0 * len(got))  # every answer at its real cost
    assert 50 < spent <= 50 + 4 * 20  # past the cap by at most the calls in flight (4 of them)
    assert len(got) < 60


def test_batch_and_online_reservations_hold_reserve_tokens_capped_at_max_tokens():
    price = {"input": 0.0, "output": 1e6, "batch_output": 5e5}
    b = OpenAIBackend(OpenAIConfig(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None),
                      cost=lambda tin, tout, **kw: usd_of(price, tin, tout, **kw))
    msgs = [{"role": "user", "content": "hi"}]
    prompt = b.worst_case(GenRequest(messages=msgs, max_tokens=1))[1] - 1
    assert b.worst_case(GenRequest(messages=msgs, max_tokens=500)) == (500.0, prompt + 500)
    assert b.worst_case(GenRequest(messages=msgs, max_tokens=500, reserve_tokens=40)) == (40.0, prompt + 40)
    assert b.worst_case(GenRequest(messages=msgs, max_tokens=30, reserve_tokens=40)) == (30.0, prompt + 30)
    assert b.worst_case(GenRequest(messages=msgs, max_tokens=500, reserve_tokens=40), batch=True) == (20.0, prompt + 40)
    b.close()


# -- dollars per accepted example -----------------------------------------------------------------

def test_plan_and_the_report_show_dollars_per_accepted_example(env, capsys):
    cache = env / "cache"
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY) as srv:
        spec = write_spec(env, srv.base_url, "prices: {teacher-model: {input: 1000, output: 2000}}")
        assert run(spec, cache, "teacher-responses/shard-0000", "teacher-responses/shard-0001") == 0
    ms = [manifest(cache, f"teacher-responses/shard-000{i}") for i in (0, 1)]
    kept = sum(m["result"]["samples"] - m["result"]["quality"]["dropped"] for m in ms)
    usd = sum(m["usage"]["usd"] for m in ms)
    per = plan_json(str(spec), "--cache", str(cache))["usd_per_accepted"]
    assert set(per) == {"teacher-responses"}  # the student's calls were free, nothing else was built
    assert per["teacher-responses"]["accepted"] == kept and per["teacher-responses"]["usd"] == pytest.approx(usd)
    assert per["teacher-responses"]["usd_per_accepted"] == pytest.approx(usd / kept)
    capsys.readouterr()
    assert main(["plan", str(spec), "--cache", str(cache)]) == 0
    assert f"teacher-responses ${usd / kept:,.4f} ({kept} kept" in capsys.readouterr().out

    from charbuild.recipe.stages.report import ReportStage

    section = ReportStage()._per_accepted({m["target"]: (None, m) for m in ms})
    assert section["title"] == "Cost per accepted example"
    assert section["table"]["rows"] == [["teacher-responses", kept, f"{usd:.4f}", f"{usd / kept:.6f}"]]
