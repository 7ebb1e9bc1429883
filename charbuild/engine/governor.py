"""The run's shared state when its targets build in many processes: one spend ledger and
one set of rate limiters for the whole run, whichever worker sends a call.

`Governor` holds it, once per run (a remote executor hosts it: on Ray, a named actor);
every worker reaches it through a transport, `call(method, *args) -> Future`. Workers see
`SharedLedger`, which has the `Ledger`'s interface (the engine gives each target an
`Account` of it, as locally), and the objects `SharedState.get` returns (the backends keep
their rate limiters there). Nothing here knows Ray: `in_process` is the transport of the
tests, and charbuild.engine.ray_executor wraps the Governor in an actor.

A budget stop (`stop`) is the run's, not a target's: from then on every reservation fails
at once, so each worker stops at its next call boundary.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
from dataclasses import dataclass
from typing import Any, Callable

from charbuild.contract import shared_answer
from charbuild.ledger import Account, BudgetExceeded, Ledger, Reservation

Call = Callable[..., cf.Future]  # call(method, *args) -> Future of the Governor's answer


class Governor:
    """The one ledger and the shared objects of a run. Its methods answer in plain values
    (a refusal is a message, not an exception), so any transport carries them."""

    def __init__(self, max_usd: float | None = None, max_tokens: int | None = None):
        self.ledger = Ledger(max_usd, max_tokens)
        self._held: dict[int, Reservation] = {}
        self._ids = itertools.count(1)
        self._objects: dict[str, Any] = {}
        self.stopped: str | None = None

    def reserve(self, usd: float, tokens: int) -> tuple[int | None, str | None]:
        """(reservation id, None), or (None, why not): the call must not be sent."""
        if self.stopped is not None:
            return None, self.stopped
        try:
            r = self.ledger.reserve(usd, tokens)
        except BudgetExceeded as exc:
            return None, str(exc)
        rid = next(self._ids)
        self._held[rid] = r
        return rid, None

    def settle(self, rid: int, usd: float, tokens_in: int, tokens_out: int, cached_in: int = 0,
               batch: bool = False) -> tuple[float, int]:
        return self._held.pop(rid).settle(usd, tokens_in, tokens_out, cached_in, batch)

    def release(self, rid: int) -> tuple[float, int]:
        return self._held.pop(rid).release()

    def fits_once_settled(self, usd: float, tokens: int) -> bool:
        # Stopped, nothing fits: a worker waiting for calls in flight to settle stops too.
        return self.stopped is None and self.ledger.fits_once_settled(usd, tokens)

    def charge(self, usd: float, tokens_in: int, tokens_out: int, calls: int, api: bool) -> str | None:
        try:
            self.ledger.charge(usd, tokens_in, tokens_out, calls, api)
        except BudgetExceeded as exc:
            return str(exc)
        return None

    def snapshot(self) -> dict:
        return self.ledger.snapshot()

    def stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason

    def make(self, key: str, make: Callable[[], Any]) -> None:
        if key not in self._objects:
            self._objects[key] = make()

    def invoke(self, key: str, method: str, *args) -> Any:
        return getattr(self._objects[key], method)(*args)


def in_process(governor: Governor) -> Call:
    """A transport that calls the Governor directly, in this process (tests)."""

    def call(method: str, *args) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(getattr(governor, method)(*args))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut

    return call


@dataclass
class _Held(Reservation):
    rid: int = 0


class SharedLedger:
    """The run's one ledger, seen from any process: `Ledger`'s interface, every reservation,
    settlement and charge made on the Governor. Picklable (its transport is), so a worker
    gets it with its task. Each call costs a round trip to the Governor; the local executor
    never uses this class."""

    def __init__(self, call: Call, max_usd: float | None = None, max_tokens: int | None = None):
        self._call = call
        self.max_usd = max_usd
        self.max_tokens = max_tokens

    def account(self) -> Account:
        return Account(self)

    def reserve(self, usd: float, tokens: int, accounts: tuple = ()) -> Reservation:
        rid, refused = shared_answer(self._call, "reserve", float(usd), int(tokens))
        if refused is not None:
            raise BudgetExceeded(refused)
        return _Held(self, float(usd), int(tokens), accounts=tuple(accounts), rid=rid)

    def fits_once_settled(self, usd: float, tokens: int) -> bool:
        return shared_answer(self._call, "fits_once_settled", float(usd), int(tokens))

    def _settle(self, r: _Held, usd: float, tokens_in: int, tokens_out: int, answered: bool,
                cached_in: int = 0, batch: bool = False) -> tuple[float, int]:
        if r.settled:
            raise RuntimeError("reservation settled twice")
        r.settled = True
        if answered:
            back = shared_answer(self._call, "settle", r.rid, usd, tokens_in, tokens_out, cached_in, batch)
            for a in r.accounts:
                with a._lock:
                    a._add(usd, tokens_in, tokens_out, 1, api=True, cached_in=cached_in, batch=batch)
        else:
            back = shared_answer(self._call, "release", r.rid)
        return tuple(back)

    def charge(self, usd: float, tokens_in: int, tokens_out: int, calls: int = 1, api: bool = False) -> None:
        over = shared_answer(self._call, "charge", float(usd), int(tokens_in), int(tokens_out), int(calls), bool(api))
        if over is not None:
            raise BudgetExceeded(over)

    def snapshot(self) -> dict:
        return shared_answer(self._call, "snapshot")

    def stop(self, reason: str) -> None:
        """End the run's spending: every worker's next reservation fails with `reason`."""
        shared_answer(self._call, "stop", reason)


class SharedState:
    """`contract.Shared` over a Governor's transport: what a remote executor hands the
    services factory on each worker."""

    def __init__(self, call: Call, max_usd: float | None = None, max_tokens: int | None = None):
        self._call = call
        self.ledger = SharedLedger(call, max_usd, max_tokens)

    def get(self, key: str, make: Callable[[], Any]) -> Call:
        shared_answer(self._call, "make", key, make)
        call = self._call

        def invoke(method: str, *args) -> cf.Future:
            return call("invoke", key, method, *args)

        return invoke

    def __reduce__(self):
        # Always as this class: a driver's handle (which may end the run) reaches a worker as a
        # plain one.
        return (SharedState, (self._call, self.ledger.max_usd, self.ledger.max_tokens))
