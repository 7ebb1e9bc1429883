"""Rate and budget governor: what may be sent, and when.

Rate limits: one `RateLimiter` (token buckets for requests/minute and tokens/minute)
per (backend, endpoint, model), shared by every stage, thread and coroutine of the
process that talks to that model (`limiter_for`).  Buckets are reserved up front
(GCRA style): a caller takes its tokens at once and sleeps until the bucket would have
held them, so waiters are served in arrival order without polling.  A request larger
than a bucket's burst is allowed when the bucket is full and drives it into debt, so
the long-run rate still holds.

Budget: `Budget.reserve(worst_case_usd, worst_case_tokens)` before a call is sent;
`BudgetExceeded` when the cap would be crossed (the build stops at that call
boundary), `Reservation.settle(actual_usd, actual_tokens)` once the answer is in.

Both take an injectable clock (and sleep) so tests can run on a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)

Clock = Callable[[], float]

DEFAULT_BURST_S = 1.0  # a bucket holds this many seconds' worth of its rate (at least one request)


def estimate_prompt_tokens(messages) -> int:
    """A cheap, deliberately high estimate of a chat prompt's tokens: one token per
    3 UTF-8 bytes of content (real tokenizers average ~4 for English) plus a few per
    message for the chat template.  Used for rate limits and worst-case budget
    reservations, never for accounting (that uses the server's usage)."""
    n = 3
    for m in messages or ():
        content = m.get("content", "") if isinstance(m, dict) else m
        if not isinstance(content, str):
            content = str(content)
        n += 4 + math.ceil(len(content.encode("utf-8", "replace")) / 3)
    return n


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


class RateLimiter:
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

    def acquire_sync(self, tokens: int = 0) -> float:
        if self.unlimited:
            return 0.0
        wait = self.reserve(tokens)
        if wait > 0:
            self._sleep(wait)
        return wait


_REGISTRY: dict[tuple, RateLimiter] = {}
_REGISTRY_LOCK = threading.Lock()


def limiter_for(backend: str, model: str, rpm: int | None, tpm: int | None, endpoint: str | None = None,
                **kw) -> RateLimiter:
    """The process-wide limiter of (backend, endpoint, model): every caller shares its buckets.
    A later call with other limits reconfigures it (last configured wins)."""
    key = (backend, endpoint, model)
    with _REGISTRY_LOCK:
        lim = _REGISTRY.get(key)
        if lim is None:
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


# -- budget ----------------------------------------------------------------------------------

class BudgetExceeded(RuntimeError):
    """The next call could cross the run's cap; nothing more is sent."""


@dataclass
class Reservation:
    budget: "Budget"
    usd: float
    tokens: int
    settled: bool = False

    def settle(self, actual_usd: float, actual_tokens: int) -> tuple[float, int]:
        """Record what the call really cost; returns the unused part (usd, tokens) given back."""
        return self.budget._settle(self, float(actual_usd), int(actual_tokens))

    def release(self) -> tuple[float, int]:
        """The call was not made (or not billed): give the whole reservation back."""
        return self.settle(0.0, 0)


class Budget:
    """A hard cap in dollars and/or tokens for one run; thread-safe.

    `prices`: model id -> {"input": usd per million tokens, "output": ...}; a "default"
    entry applies to models not listed.
    """

    def __init__(self, max_usd: float | None = None, max_tokens: int | None = None,
                 prices: Mapping[str, Mapping[str, float]] | None = None):
        self.max_usd = max_usd
        self.max_tokens = max_tokens
        self.prices = dict(prices or {})
        self._lock = threading.Lock()
        self.spent_usd = 0.0
        self.spent_tokens = 0
        self.reserved_usd = 0.0
        self.reserved_tokens = 0
        self.calls = 0

    # prices
    def price(self, model: str) -> Mapping[str, float] | None:
        return self.prices.get(model) or self.prices.get("default")

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        p = self.price(model)
        if p is None:
            if self.max_usd is not None:
                raise ValueError(f"budget: no price for model {model!r} (add it, or a 'default', to the prices)")
            return 0.0
        return (prompt_tokens * float(p.get("input", 0.0)) + completion_tokens * float(p.get("output", 0.0))) / 1e6

    def reserve_call(self, model: str, prompt_tokens_est: int, max_tokens: int) -> "Reservation":
        """Reserve the worst case of one call: estimated prompt plus every allowed output token."""
        return self.reserve(self.cost(model, prompt_tokens_est, max_tokens), prompt_tokens_est + max_tokens)

    # reservations
    def reserve(self, worst_case_usd: float, worst_case_tokens: int) -> Reservation:
        with self._lock:
            if self.max_usd is not None and self.spent_usd + self.reserved_usd + worst_case_usd > self.max_usd + 1e-12:
                raise BudgetExceeded(
                    f"budget cap reached: budget.max_usd is ${self.max_usd:,.4f}; spent ${self.spent_usd:,.4f} "
                    f"in {self.calls} calls (+${self.reserved_usd:,.4f} reserved by calls in flight), and the next call "
                    f"could cost up to ${worst_case_usd:,.4f}. Every answered call is stored: raise budget.max_usd "
                    f"and `charbuild run` continues from here.")
            if self.max_tokens is not None and \
                    self.spent_tokens + self.reserved_tokens + worst_case_tokens > self.max_tokens:
                raise BudgetExceeded(
                    f"budget cap reached: budget.max_tokens is {self.max_tokens:,}; spent {self.spent_tokens:,} tokens "
                    f"in {self.calls} calls (+{self.reserved_tokens:,} reserved by calls in flight), and the next call "
                    f"could use up to {worst_case_tokens:,}. Every answered call is stored: raise budget.max_tokens "
                    f"and `charbuild run` continues from here.")
            self.reserved_usd += worst_case_usd
            self.reserved_tokens += worst_case_tokens
            return Reservation(self, worst_case_usd, int(worst_case_tokens))

    def fits_once_settled(self, worst_case_usd: float, worst_case_tokens: int) -> bool:
        """Would this reservation fit once the calls in flight have settled? (Then wait, don't stop.)"""
        with self._lock:
            return (self.max_usd is None or self.spent_usd + worst_case_usd <= self.max_usd + 1e-12) and \
                (self.max_tokens is None or self.spent_tokens + worst_case_tokens <= self.max_tokens)

    def _settle(self, r: Reservation, usd: float, tokens: int) -> tuple[float, int]:
        with self._lock:
            if r.settled:
                raise RuntimeError("reservation settled twice")
            r.settled = True
            self.reserved_usd = max(0.0, self.reserved_usd - r.usd)
            self.reserved_tokens = max(0, self.reserved_tokens - r.tokens)
            self.spent_usd += usd
            self.spent_tokens += tokens
            if usd or tokens:
                self.calls += 1
            return max(0.0, r.usd - usd), max(0, r.tokens - tokens)

    def snapshot(self) -> dict:
        with self._lock:
            return {"spent_usd": self.spent_usd, "spent_tokens": self.spent_tokens, "calls": self.calls,
                    "reserved_usd": self.reserved_usd, "reserved_tokens": self.reserved_tokens,
                    "max_usd": self.max_usd, "max_tokens": self.max_tokens}
