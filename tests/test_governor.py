"""Rate limits (token buckets, measured on the loopback server's clock) and the budget cap
(the run's one ledger, reserved call by call by the openai backend)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest


from support.openai_server import FakeOpenAIServer  # noqa: E402

from charbuild.backends.base import GenRequest  # noqa: E402
from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig  # noqa: E402
from charbuild.backends.cached import CachedBackend
from charbuild.store.calls import CallCache  # noqa: E402
from charbuild.backends.ratelimit import RateLimiter, limiter_for, reset_limiters  # noqa: E402
from charbuild.ledger import BudgetExceeded, Ledger, estimate_chat_tokens  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_limiters():
    reset_limiters()
    yield
    reset_limiters()


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def ask(i: int, max_tokens: int = 64) -> GenRequest:
    return GenRequest(messages=[{"role": "user", "content": f"question-{i}"}], seed=i, max_tokens=max_tokens)


def backend(srv, concurrency=16, ledger=None, cost=None, **kw) -> OpenAIBackend:
    return OpenAIBackend(OpenAIConfig(model="fake-model", base_url=srv.base_url, api_key_env=None,
                                      concurrency=concurrency, timeout_s=10, **kw), ledger=ledger, cost=cost)


def max_in_window(arrivals: list[float], window: float) -> int:
    a = sorted(arrivals)
    best, j = 0, 0
    for i in range(len(a)):
        while a[i] - a[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


# -- token buckets on a fake clock ------------------------------------------------------------

def test_requests_per_minute_bucket_spaces_requests_after_its_burst():
    clk = FakeClock()
    lim = RateLimiter(rpm=120, clock=clk, sleep=clk.sleep)  # 2/s, burst of one second = 2
    waits = [lim.reserve() for _ in range(6)]  # all at one instant
    assert waits == pytest.approx([0, 0, 0.5, 1.0, 1.5, 2.0])
    clk.t += 10  # idle: the bucket refills to its burst, not beyond
    assert [lim.acquire_sync() for _ in range(3)] == pytest.approx([0, 0, 0.5])


def test_tokens_per_minute_bucket_lets_a_big_request_through_and_then_pays_its_debt():
    clk = FakeClock()
    lim = RateLimiter(tpm=6000, clock=clk, sleep=clk.sleep)  # 100 tokens/s, burst 100
    assert lim.reserve(60) == 0
    assert lim.reserve(60) == pytest.approx(0.2)  # 40 left, 60 needed: 0.2 s
    clk.t += 10
    assert lim.reserve(500) == 0  # bigger than the burst: allowed when full...
    assert lim.reserve(50) == pytest.approx(4.5)  # ...and the next one waits for the debt (-400 -> 50)


def test_a_limiter_is_thread_safe_and_asyncio_friendly():
    clk = FakeClock()
    lim = RateLimiter(rpm=600, clock=clk, sleep=lambda s: None)  # 10/s, burst 10; clock frozen
    waits: list[float] = []
    lock = threading.Lock()

    def worker():
        for _ in range(50):
            w = lim.acquire_sync()
            with lock:
                waits.append(w)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 400 reservations at one instant: exactly one slot each, 0.1 s apart after the burst
    assert sorted(waits) == pytest.approx([max(0.0, (k - 9) / 10) for k in range(400)])

    slept: list[float] = []

    async def fake_sleep(s: float) -> None:  # concurrent sleepers on a frozen clock
        slept.append(s)
        await asyncio.sleep(0)

    alim = RateLimiter(rpm=60, tpm=None, clock=FakeClock(), async_sleep=fake_sleep)

    async def many():
        return await asyncio.gather(*(alim.acquire(10) for _ in range(4)))

    assert asyncio.run(many()) == pytest.approx([0, 1, 2, 3])
    assert slept == pytest.approx([1, 2, 3])


def test_the_registry_shares_one_limiter_per_backend_endpoint_and_model():
    a = limiter_for("openai", "m", 60, None, endpoint="http://x")
    assert limiter_for("openai", "m", 60, None, endpoint="http://x") is a
    assert limiter_for("openai", "m", 60, None, endpoint="http://y") is not a
    assert limiter_for("openai", "m2", 60, None, endpoint="http://x") is not a
    assert limiter_for("openai", "m", 120, 1000, endpoint="http://x") is a and (a.rpm, a.tpm) == (120, 1000)
    assert estimate_chat_tokens([{"role": "user", "content": "x" * 30}]) == 4 + 8  # framing + 30 chars / 4


# -- limits measured on the server's clock ----------------------------------------------------

def test_rpm_holds_on_the_servers_clock_across_backends_sharing_the_model():
    rpm, n = 600, 26  # 10/s, burst 10
    with FakeOpenAIServer() as srv:
        b1, b2 = backend(srv, rpm=rpm), backend(srv, rpm=rpm)  # two stages, one model: one bucket
        out: dict = {}
        ts = [threading.Thread(target=lambda b=b, k=k: out.__setitem__(k, b.generate([ask(k * 100 + i) for i in range(n // 2)])))
              for k, b in enumerate((b1, b2))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        b1.close(), b2.close()
        arr = list(srv.arrivals)
    assert len(arr) == n and all(len(v) == n // 2 for v in out.values())
    span = max(arr) - min(arr)
    assert span >= (n - 10) / 10 * 0.9  # without the limit: ~0 s
    for w in (0.5, 1.0, 1.5):
        assert max_in_window(arr, w) <= 10 * w + 10 + 1, (w, max_in_window(arr, w))


def test_tpm_holds_on_the_servers_clock():
    per_req = estimate_chat_tokens(ask(10).messages) + 40  # what the backend reserves per request
    tpm = 60 * per_req * 8  # 8 requests per second, burst 8
    n = 24
    with FakeOpenAIServer() as srv:
        with backend(srv, tpm=tpm) as be:
            be.generate([ask(10 + i, max_tokens=40) for i in range(n)])
        arr = list(srv.arrivals)
    assert len(arr) == n
    assert max(arr) - min(arr) >= (n - 8) / 8 * 0.9
    for w in (0.5, 1.0):
        assert max_in_window(arr, w) <= 8 * w + 8 + 1


def test_no_limits_means_no_waiting():
    with FakeOpenAIServer() as srv, backend(srv) as be:
        assert be._limiter is None
        be.generate([ask(i) for i in range(20)])
        assert max(srv.arrivals) - min(srv.arrivals) < 1.0


# -- budget -------------------------------------------------------------------------------------

def test_ledger_reservations_settle_and_refuse_to_cross_the_cap():
    b = Ledger(max_usd=1.0)
    r = b.reserve(0.2, 2)
    r2 = b.reserve(0.7, 10)
    with pytest.raises(BudgetExceeded) as e:
        b.reserve(0.2, 1)
    msg = str(e.value)
    assert "$1.0000" in msg and "spent $0.0000" in msg and "`charbuild run` continues" in msg
    assert r.settle(0.1, 1, 0) == (pytest.approx(0.1), 1)  # the unused part comes back
    assert r2.release() == (pytest.approx(0.7), 10)
    b.reserve(0.8, 1)  # now fits: spent 0.1 + 0.8
    with pytest.raises(RuntimeError):
        r.settle(0, 0, 0)
    assert b.snapshot()["api_calls"] == 1  # a released reservation is no call

    t = Ledger(max_tokens=100)
    t.reserve(0, 60).settle(0, 20, 30)
    with pytest.raises(BudgetExceeded, match="max_tokens is 100; spent 50 tokens"):
        t.reserve(0, 51)
    t.charge(0, 500, 500, calls=3)  # a local model's tokens: recorded, never capped
    assert t.snapshot() == {"usd": 0, "tokens_in": 520, "tokens_out": 530, "calls": 4, "api_tokens": 50, "api_calls": 1,
                            "tokens_in_cached": 0, "batch_calls": 0}
    t.reserve(0, 50)

    # many threads never over-commit
    c = Ledger(max_usd=10.0)
    got = []

    def grab():
        for _ in range(100):
            try:
                got.append(c.reserve(0.1, 0))
            except BudgetExceeded:
                pass

    ts = [threading.Thread(target=grab) for _ in range(8)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    assert len(got) == 100


def test_an_api_backend_needs_a_price_when_dollars_are_capped():
    from charbuild.backends.base import BackendError

    with FakeOpenAIServer() as srv, backend(srv, ledger=Ledger(max_usd=1.0)) as be:
        with pytest.raises(BackendError, match="no price"):
            be.generate([ask(1)])
        assert srv.requests_total == 0


def per_output_token(tokens_in: int, tokens_out: int) -> float:
    return tokens_out * 0.01  # $0.01 per output token, nothing for input


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_dollar_cap_stops_at_a_call_boundary_and_a_higher_cap_finishes_without_repeats(cache_dir, concurrency):
    n = 40
    reqs = [ask(i, max_tokens=100) for i in range(n)]  # worst case $1 per call, ~14 tokens = $0.14 real
    with FakeOpenAIServer(latency_s=0.01) as srv:
        ledger = Ledger(max_usd=4.0)
        with backend(srv, concurrency=concurrency, ledger=ledger, cost=per_output_token) as be:
            with pytest.raises(BudgetExceeded, match=r"max_usd is \$4.0000.*charbuild run"):
                CachedBackend(be, CallCache(cache_dir), "openai", "fake-model").generate(reqs)
        first = srv.completed
        assert 10 < first < n
        assert ledger.usd <= 4.0 and ledger.reserved_usd == 0  # stopped before crossing
        assert len(CallCache(cache_dir)) == first  # every answered call is stored
        assert srv.requests_total == first  # nothing was sent past the boundary

        ledger2 = Ledger(max_usd=100.0)
        with backend(srv, concurrency=concurrency, ledger=ledger2, cost=per_output_token) as be:
            out = CachedBackend(be, CallCache(cache_dir), "openai", "fake-model").generate(reqs)
        assert srv.completed == n and all(c == 1 for c in srv.answered.values())  # no call repeated
        assert sum(not r.meta["cached"] for r in out) == n - first
        assert ledger2.api_calls == n - first  # cached calls cost nothing
