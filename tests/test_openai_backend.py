"""The `openai` backend against a fake OpenAI server on a real loopback socket.

Sync tests only: the server runs in its own thread and event loop, the backend's
`generate` runs its own loop in another.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import sys
import threading
import time
import urllib.request
from email.utils import formatdate

import pytest


from support.openai_server import FakeOpenAIServer, Faults, signature  # noqa: E402

from charbuild.backends.base import ROLE_STOPS, BackendError, GenRequest  # noqa: E402
from charbuild.backends.openai_backend import (  # noqa: E402
    OpenAIBackend,
    OpenAIConfig,
    build_payload,
    parse_retry_after,
)

KEY_ENV = "CHARBUILD_TEST_OPENAI_KEY"


def make_backend(srv: FakeOpenAIServer, key: str | None = None, **kw) -> OpenAIBackend:
    cfg_kw = dict(concurrency=16, timeout_s=5.0, max_retries=8, backoff_base_s=0.01, backoff_max_s=0.2)
    cfg_kw.update(kw)
    cfg = OpenAIConfig(model="fake-model", base_url=srv.base_url, api_key_env=KEY_ENV if key else None, **cfg_kw)
    return OpenAIBackend(cfg, env={KEY_ENV: key} if key else {})


def ask(i: int, **kw) -> GenRequest:
    return GenRequest(messages=[{"role": "user", "content": f"question-{i}"}], seed=i, **kw)


def test_every_sample_arrives_exactly_once_through_a_storm_of_faults():
    faults = Faults(p_429=0.08, retry_after_s=0.05, p_500=0.08, p_slow=0.04, slow_s=1.0,
                    p_malformed=0.08, p_drop=0.08, seed=7)
    n = 200
    ticks: list[int] = []
    arrived: collections.Counter = collections.Counter()  # request index -> results handed to the caller
    with FakeOpenAIServer(latency_s=0.01, faults=faults) as srv:
        # 36 % of attempts fail: 20 retries make losing a sample a ~1e-9 event, not a flake
        with make_backend(srv, concurrency=16, timeout_s=0.5, max_retries=20) as be:
            reqs = [ask(i) for i in range(n)]
            results = be.generate(reqs, progress=ticks.append, on_result=lambda i, r: arrived.update([i]))

        # One result per request, and each request's result handed over exactly once.
        assert len(results) == n and sum(ticks) == n
        assert arrived == collections.Counter(range(n))
        for i, r in enumerate(results):  # order preserved, each answer is its own request's
            assert r.text.startswith(f"reply to [question-{i}] seed={i} "), r.text
            assert r.finish_reason == "stop"
            assert r.meta["attempts"] >= 1 and r.meta["latency_s"] > 0
        # every kind of fault really happened, and the client rode them out
        assert set(srv.faults_injected) == {"429", "500", "slow", "malformed", "drop"}
        assert sum(r.meta["attempts"] for r in results) > n
        # Counted on the server: every request was answered to the client exactly once. A
        # retry after an answer had arrived (a paid call asked twice) would show as a 2.
        sigs = [signature(build_payload("fake-model", r)) for r in reqs]
        assert len(set(sigs)) == n
        assert {s: srv.delivered[s] for s in sigs} == dict.fromkeys(sigs, 1)
        assert sum(srv.delivered.values()) == n
        assert srv.completed == sum(srv.answered.values()) >= n


def test_timeouts_are_retried_and_the_slow_answer_is_not_lost():
    with FakeOpenAIServer(faults=Faults(script=["slow"], slow_s=2.0)) as srv:
        with make_backend(srv, timeout_s=0.5) as be:
            [r] = be.generate([ask(1)])
        assert srv.faults_injected["slow"] == 1
    assert r.meta["attempts"] >= 2 and r.text.startswith("reply to [question-1]")


def test_retry_after_is_honoured_on_the_servers_clock():
    with FakeOpenAIServer(faults=Faults(script=["429", "429"], retry_after_s=0.3)) as srv:
        with make_backend(srv, backoff_base_s=0.001, backoff_max_s=5.0) as be:
            [r] = be.generate([ask(0)])
        [times] = srv.arrivals_by_sig.values()
    assert r.meta["attempts"] == 3 and srv.by_status[429] == 2
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 2 and all(g >= 0.29 for g in gaps), gaps


def test_retry_after_accepts_seconds_or_an_http_date_and_is_capped():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    assert 9 <= parse_retry_after(formatdate(now + 10, usegmt=True), now=now) <= 10
    assert parse_retry_after(formatdate(now - 10, usegmt=True), now=now) == 0.0
    be = OpenAIBackend(OpenAIConfig(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None, backoff_max_s=5))
    assert be._backoff(1, retry_after=3600) == 5
    be.close()


def test_missing_api_key_env_var_fails_before_any_request():
    with FakeOpenAIServer() as srv:
        cfg = OpenAIConfig(model="m", base_url=srv.base_url, api_key_env="CHARBUILD_NO_SUCH_KEY")
        with pytest.raises(BackendError, match="CHARBUILD_NO_SUCH_KEY"):
            OpenAIBackend(cfg, env={})
        assert srv.requests_total == 0


def test_wrong_key_fails_fast_and_the_key_never_leaks(caplog):
    secret = "sk-wrong-0123456789-SECRET"
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(require_key="sk-right", latency_s=0.01) as srv:
        be = make_backend(srv, key=secret, concurrency=4)
        t0 = time.monotonic()
        with pytest.raises(BackendError) as ei:
            be.generate([ask(i) for i in range(50)])
        elapsed = time.monotonic() - t0
        be.close()
        assert elapsed < 2.0
        assert srv.requests_total <= 4 and srv.by_status[401] >= 1  # 401 is not retried
    text = str(ei.value)
    assert "401" in text and "Incorrect API key" in text  # the server's own message, redacted
    for where in (text, repr(ei.value), repr(be.cfg), repr(be), caplog.text):
        assert secret not in where


def test_the_right_key_is_sent_as_a_bearer_token():
    with FakeOpenAIServer(require_key="sk-right") as srv:
        with make_backend(srv, key="sk-right") as be:
            [r] = be.generate([ask(3)])
    assert r.text.startswith("reply to [question-3]") and srv.by_status == {200: 1}


def test_concurrency_limit_is_respected():
    with FakeOpenAIServer(latency_s=0.05) as srv:
        with make_backend(srv, concurrency=8) as be:
            results = be.generate([ask(i) for i in range(80)])
    assert len(results) == 80
    assert srv.peak_in_flight == 8  # reached, never exceeded


def test_stop_strings_are_enforced_client_side_even_beyond_the_first_four():
    stops = ("<s1>", "<s2>", "<s3>", "<s4>", "\nUser:", "<s6>")
    reply = lambda body: "Gladly. Here is the plan <s6> and then \nUser: more <s1> tail"  # noqa: E731
    with FakeOpenAIServer(reply=reply) as srv:
        with make_backend(srv) as be:
            [r] = be.generate([ask(0, stop=stops)])
        sent = srv.last_request
    assert sent["stop"] == list(stops[:4])  # the API takes at most 4
    assert r.text == "Gladly. Here is the plan " and r.finish_reason == "stop"
    # the default role stops are 6 long too: all of them hold
    reply2 = lambda body: "An answer.\n\nAssistant: I continue as the assistant"  # noqa: E731
    with FakeOpenAIServer(reply=reply2) as srv:
        with make_backend(srv) as be:
            [r2] = be.generate([ask(1)])
    assert len(ROLE_STOPS) > 4 and r2.text == "An answer."


def test_usage_tokens_and_length_finish_are_recorded():
    with FakeOpenAIServer() as srv:
        with make_backend(srv) as be:
            full, short = be.generate([ask(5), ask(5, max_tokens=3)])
    assert full.prompt_tokens == 1 and full.completion_tokens == len(full.text.split()) > 3
    assert full.finish_reason == "stop"
    assert short.finish_reason == "length" and short.completion_tokens == 3
    assert short.text == " ".join(full.text.split()[:3])


def test_payload_sends_sampling_options_only_when_set():
    plain = build_payload("m", GenRequest(messages=[{"role": "user", "content": "hi"}], stop=()))
    assert plain == {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 512, "temperature": 0.7, "top_p": 0.95}
    rich = build_payload("m", GenRequest(messages=[], seed=3, frequency_penalty=0.5, repetition_penalty=1.1))
    assert rich["seed"] == 3 and rich["frequency_penalty"] == 0.5 and rich["repetition_penalty"] == 1.1
    assert rich["stop"] == ROLE_STOPS[:4]


def test_client_errors_fail_at_once_with_the_servers_message():
    with FakeOpenAIServer() as srv:
        with make_backend(srv) as be:
            with pytest.raises(BackendError, match=r"HTTP 400.*non-empty 'messages'"):
                be.generate([GenRequest(messages=[])])
        assert srv.requests_total == 1


def test_gives_up_after_max_retries():
    with FakeOpenAIServer(faults=Faults(p_500=1.0)) as srv:
        with make_backend(srv, max_retries=2) as be:
            with pytest.raises(BackendError, match="after 3 attempts.*HTTP 500"):
                be.generate([ask(0)])
        assert srv.requests_total == 3


def test_generate_works_from_another_thread_inside_a_running_loop_and_async():
    with FakeOpenAIServer() as srv:
        with make_backend(srv) as be:
            out: dict = {}

            def in_thread():
                out["thread"] = be.generate([ask(1)])

            t = threading.Thread(target=in_thread)
            t.start()
            t.join(10)

            async def inside_loop():
                return be.generate([ask(2)])  # blocking call from a coroutine still works

            out["loop"] = asyncio.run(inside_loop())

            async def native():
                res = await be.agenerate([ask(3), ask(4)])
                await be.aclose()
                return res

            out["async"] = asyncio.run(native())
    assert out["thread"][0].text.startswith("reply to [question-1]")
    assert out["loop"][0].text.startswith("reply to [question-2]")
    assert [r.text.split("]")[0] for r in out["async"]] == ["reply to [question-3", "reply to [question-4"]


def test_fake_server_lists_models():
    with FakeOpenAIServer() as srv:
        with urllib.request.urlopen(srv.base_url + "/models", timeout=5) as resp:
            data = json.load(resp)
    assert data["object"] == "list" and data["data"][0]["id"] == "fake-model"
