"""Rate limits: what may be sent, and when.

One `RateLimiter` (token buckets for requests/minute and tokens/minute) per (backend,
endpoint, model), shared by every stage, thread and coroutine of the process that talks
to that model (`limiter_for`).  Buckets are reserved up front (GCRA style): a caller
takes its tokens at once and sleeps until the bucket would have held them, so waiters are
served in arrival order without polling.  A request larger than a bucket's burst is
allowed when the bucket is full and drives it into debt, so the long-run rate still holds.
A request's tokens are guessed with the one estimator, `charbuild.ledger.estimate_chat_tokens`
(prompt) plus its max_tokens.

The budget cap is not here: it is the run's `charbuild.ledger.Ledger`.

Takes an injectable clock (and sleep) so tests can run on a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Awaitable, Callable

from charbuild.contract import shared_answer

log = logging.getLogger(__name__)

Clock = Callable[[], float]

DEFAULT_BURST_S = 1.0  # a bucket holds this many seconds' worth of its rate (at least one request)


# -- rate limits ---------------------------------------------------------------------------

class TokenBucket:
    """`rate` units per second, holding at most `capacity`; not locked (RateLimiter locks)."""

    def __init__(self, rate_per_s: float, capacity: float, now: float):
        if rate_per_s <= 0:
            raise ValueError(f"rate must be > 0, got {rate_per_s}")
        self.rate = float(rate_per_s)
        self.capacity = max(1.0, float(capacity))
        self.level = self.capacity
        self.t = now

    def _refill(self, now: float) -> None:
        if now > self.t:
            self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
            self.t = now

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until `n` units may go, if taken now (no side effect)."""
        self._refill(now)
        need = min(float(n), self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, n: float) -> None:
        self.level -= float(n)


class _Waits:
    """A thread's side of a reservation: take it, then sleep out the wait it was given."""

    _sleep: Callable[[float], None] = staticmethod(time.sleep)

    def acquire_sync(self, tokens: int = 0) -> float:
        if self.unlimited:
            return 0.0
        wait = self.reserve(tokens)
        if wait > 0:
            self._sleep(wait)
        return wait


class RateLimiter(_Waits):
    """Requests-per-minute and tokens-per-minute buckets for one model; None = unlimited.

    Thread-safe (`acquire_sync`) and asyncio-friendly (`await acquire`); one instance may
    serve several threads and event loops at once.
    """

    def __init__(self, rpm: int | None = None, tpm: int | None = None, burst_s: float = DEFAULT_BURST_S,
                 clock: Clock = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 async_sleep: Callable[[float], Awaitable] = asyncio.sleep):
        self._lock = threading.Lock()
        self.clock = clock
        self._sleep = sleep
        self._async_sleep = async_sleep
        self.burst_s = burst_s
        self.rpm = self.tpm = None
        self._req: TokenBucket | None = None
        self._tok: TokenBucket | None = None
        self.configure(rpm, tpm)
        self.waited_s = 0.0  # total time callers were told to wait (stats)
        self.acquired = 0

    def configure(self, rpm: int | None, tpm: int | None) -> None:
        for name, v in (("rpm", rpm), ("tpm", tpm)):
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be a positive integer or None, got {v}")
        with self._lock:
            now = self.clock()
            if rpm != self.rpm:
                self._req = None if rpm is None else TokenBucket(rpm / 60.0, rpm / 60.0 * self.burst_s, now)
            if tpm != self.tpm:
                self._tok = None if tpm is None else TokenBucket(tpm / 60.0, tpm / 60.0 * self.burst_s, now)
            self.rpm, self.tpm = rpm, tpm

    @property
    def unlimited(self) -> bool:
        return self._req is None and self._tok is None

    def reserve(self, tokens: int = 0) -> float:
        """Take one request and `tokens` tokens now; returns the seconds to wait before sending."""
        with self._lock:
            now = self.clock()
            wait = 0.0
            if self._req is not None:
                wait = max(wait, self._req.wait_for(1, now))
            if self._tok is not None and tokens > 0:
                wait = max(wait, self._tok.wait_for(tokens, now))
            if self._req is not None:
                self._req.take(1)
            if self._tok is not None and tokens > 0:
                self._tok.take(tokens)
            self.acquired += 1
            self.waited_s += wait
            return wait

    async def acquire(self, tokens: int = 0) -> float:
        if self.unlimited:
            return 0.0
        wait = self.reserve(tokens)
        if wait > 0:
            await self._async_sleep(wait)
        return wait


class SharedRateLimiter(_Waits):
    """A `RateLimiter` kept once for a whole run that spans processes (the workers of a Ray
    build): its buckets live where the run's shared state does (`contract.Shared`), so
    every worker draws from the same ones. Reservations are taken there; the waiting is
    done here, as locally (GCRA: the wait is known when the tokens are taken)."""

    def __init__(self, call: Callable, rpm: int | None, tpm: int | None):
        self._call = call  # call(method, *args) -> concurrent.futures.Future, on the shared RateLimiter
        self.rpm, self.tpm = rpm, tpm

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None

    def configure(self, rpm: int | None, tpm: int | None) -> None:
        shared_answer(self._call, "configure", rpm, tpm)
        self.rpm, self.tpm = rpm, tpm

    def reserve(self, tokens: int = 0) -> float:
        return shared_answer(self._call, "reserve", tokens)

    async def acquire(self, tokens: int = 0) -> float:
        if self.unlimited:
            return 0.0
        # Awaited, not blocked on: the event loop has other requests to send meanwhile.
        wait = await asyncio.wrap_future(self._call("reserve", tokens))
        if wait > 0:
            await asyncio.sleep(wait)
        return wait


_REGISTRY: dict[tuple, RateLimiter] = {}
_REGISTRY_LOCK = threading.Lock()
_SHARED = None  # contract.Shared of the run this process works for, if its limits span processes


def share_limiters(shared) -> None:
    """From now on `limiter_for` gives limiters kept in `shared` (a run's `contract.Shared`),
    one per (backend, endpoint, model) for every process of the run; None: back to this
    process's own. Limiters handed out before keep what they were."""
    global _SHARED
    with _REGISTRY_LOCK:
        _SHARED = shared
        _REGISTRY.clear()


def limiter_for(backend: str, model: str, rpm: int | None, tpm: int | None, endpoint: str | None = None,
                **kw) -> RateLimiter:
    """The process-wide limiter of (backend, endpoint, model): every caller shares its buckets
    (every process of the run, after `share_limiters`). A later call with other limits
    reconfigures it (last configured wins)."""
    key = (backend, endpoint, model)
    with _REGISTRY_LOCK:
        lim = _REGISTRY.get(key)
        if lim is None:
            if _SHARED is not None:
                import functools

                call = _SHARED.get(f"ratelimit/{backend}/{endpoint}/{model}", functools.partial(RateLimiter, rpm, tpm))
                lim = _REGISTRY[key] = SharedRateLimiter(call, rpm, tpm)  # type: ignore[assignment]
            else:
                lim = _REGISTRY[key] = RateLimiter(rpm, tpm, **kw)
            return lim
    if (lim.rpm, lim.tpm) != (rpm, tpm):
        log.info("rate limits of %s/%s changed: rpm %s -> %s, tpm %s -> %s", backend, model, lim.rpm, rpm, lim.tpm, tpm)
        lim.configure(rpm, tpm)
    return lim


def reset_limiters() -> None:
    """Forget every shared limiter (tests)."""
    with _REGISTRY_LOCK:
        _REGISTRY.clear()
