"""`openai` backend: any server speaking OpenAI chat completions (OpenAI, DeepSeek,
Together, vLLM's OpenAI server, ...), over plain aiohttp.

Why not the `openai` SDK: on this project's 2-core machines it reached only 85/60/20 %
of the concurrency/latency limit at concurrency 16/64/256 (plain aiohttp: 97/92/84 %),
and its retries do not cover truncated JSON bodies (see shared/measured-baselines.md).

Guarantees:
* one result per request, in request order; nothing lost, nothing duplicated;
* retries with exponential backoff and full jitter on 429, 5xx, 408, timeouts,
  connection errors and malformed / truncated bodies; `Retry-After` honoured (capped);
* other 4xx fail at once with the status and the server's message;
* the API key is read from an environment variable by *name* and never appears in
  logs, reprs or exception messages.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import aiohttp

from charbuild.backends.ratelimit import limiter_for
from charbuild.ledger import RESERVE_SAFETY, BudgetExceeded, Ledger, Reservation, estimate_chat_tokens
from charbuild.backends.base import BackendError, GenRequest, GenResult, Progress

log = logging.getLogger(__name__)

MAX_API_STOPS = 4  # OpenAI accepts at most 4 stop sequences
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass
class OpenAIConfig:
    model: str
    base_url: str  # e.g. https://api.deepseek.com/v1 or http://127.0.0.1:8000/v1
    api_key_env: str | None = "OPENAI_API_KEY"  # NAME of the env var holding the key
    concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 8  # retries after the first attempt
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    rpm: int | None = None  # requests per minute (shared by every user of this endpoint+model); None = unlimited
    tpm: int | None = None  # tokens per minute (estimated prompt + max_tokens per request); None = unlimited


Cost = Callable[[int, int], float]  # (prompt tokens, completion tokens) -> USD: the price table's, for this model


class _Retryable(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(self, why: str, retry_after: float | None = None):
        super().__init__(why)
        self.why = why
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def apply_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest occurrence of any stop string; (text, was_cut)."""
    cut = -1
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i != -1 and (cut == -1 or i < cut):
            cut = i
    if cut == -1:
        return text, False
    return text[:cut], True


def build_payload(model: str, req: GenRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "messages": list(req.messages),
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
    }
    stops = [s for s in req.stop if s]
    if stops:
        payload["stop"] = stops[:MAX_API_STOPS]
    if req.seed is not None:
        payload["seed"] = req.seed
    if req.frequency_penalty != 0:
        payload["frequency_penalty"] = req.frequency_penalty
    if req.repetition_penalty != 1.0:
        payload["repetition_penalty"] = req.repetition_penalty  # vLLM / Together extension
    return payload


class _LoopState:
    """Session + semaphore bound to one event loop."""

    def __init__(self, concurrency: int):
        self.connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(connector=self.connector, json_serialize=json.dumps)
        self.sem = asyncio.Semaphore(concurrency)


class OpenAIBackend:
    """`Backend` over an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, cfg: OpenAIConfig, env: Mapping[str, str] | None = None, ledger: Ledger | None = None,
                 cost: Cost | None = None):
        """`ledger` (or one given to `generate`): each request reserves its worst case on it
        before it is sent and settles its actual usage after; a request that could cross a cap
        is not sent, the requests in flight finish (their answers reach `on_result`), and
        `BudgetExceeded` is raised. `cost`: this model's dollars for tokens, from the one
        price lookup (`PriceTable.usd`); each answer's dollars land in `meta["usd"]`."""
        if cfg.concurrency < 1:
            raise BackendError(f"openai backend: concurrency must be >= 1, got {cfg.concurrency}")
        self.cfg = cfg
        env = os.environ if env is None else env
        key: str | None = None
        if cfg.api_key_env:
            key = env.get(cfg.api_key_env) or None
            if key is None:
                raise BackendError(
                    f"openai backend: environment variable {cfg.api_key_env} is not set "
                    f"(it must hold the API key for {cfg.base_url})"
                )
        self.__key = key  # never logged, never in repr or messages
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._states_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # private loop for the sync API
        self._thread: threading.Thread | None = None
        self._closed = False
        self.ledger = ledger
        self.cost = cost
        self._limiter = (limiter_for("openai", cfg.model, cfg.rpm, cfg.tpm, endpoint=cfg.base_url.rstrip("/"))
                         if (cfg.rpm or cfg.tpm) else None)

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(model={self.cfg.model!r}, base_url={self.cfg.base_url!r}, "
            f"api_key_env={self.cfg.api_key_env!r}, concurrency={self.cfg.concurrency})"
        )

    # -- helpers -----------------------------------------------------------------
    def _redact(self, text: str) -> str:
        if self.__key:
            text = text.replace(self.__key, "***")
        return text

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        with self._states_lock:
            st = self._states.get(loop)
            if st is None:
                # forget states of loops that are gone
                for old in [lp for lp in self._states if lp.is_closed()]:
                    del self._states[old]
                st = self._states[loop] = _LoopState(self.cfg.concurrency)
        return st

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = self.cfg.backoff_max_s
        if retry_after is not None:
            return min(cap, retry_after)
        return random.uniform(0.0, min(cap, self.cfg.backoff_base_s * (2 ** (attempt - 1))))

    # -- one request --------------------------------------------------------------
    async def _attempt(self, st: _LoopState, body: bytes, headers: dict) -> dict:
        try:
            async with st.session.post(self._url, data=body, headers=headers, timeout=self._timeout) as resp:
                status = resp.status
                raw = await resp.read()
                retry_after_hdr = resp.headers.get("Retry-After")
        except asyncio.TimeoutError:
            raise _Retryable(f"timeout after {self.cfg.timeout_s:g}s") from None
        except aiohttp.ClientError as e:  # dropped connection, payload error, connect error
            raise _Retryable(f"{type(e).__name__}: {self._redact(str(e))[:200]}") from None
        except OSError as e:
            raise _Retryable(f"{type(e).__name__}: {self._redact(str(e))[:200]}") from None

        if status != 200:
            msg = self._server_message(raw)
            if status in _RETRY_STATUSES or status >= 500:
                ra = parse_retry_after(retry_after_hdr) if status in (429, 503) else None
                raise _Retryable(f"HTTP {status}: {msg}", retry_after=ra)
            raise BackendError(f"openai backend: HTTP {status} from {self._url}: {msg}")
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
                raise KeyError("message")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed body ({type(e).__name__}, {len(raw)} bytes)") from None
        return data

    def _server_message(self, raw: bytes) -> str:
        text = raw.decode("utf-8", "replace")
        try:
            data = json.loads(text)
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict) and err.get("message"):
                text = str(err["message"])
            elif isinstance(err, str):
                text = err
            elif isinstance(data, dict) and data.get("message"):
                text = str(data["message"])
        except ValueError:
            pass
        text = " ".join(text.split())
        return self._redact(text)[:500] or "(empty body)"

    def _usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self.cost(prompt_tokens, completion_tokens) if self.cost is not None else 0.0

    def _worst_case(self, req: GenRequest) -> tuple[float, int]:
        """What a request reserves: its prompt by the one token estimator, with the
        reservation safety factor, plus every allowed output token (and their dollars)."""
        est = estimate_chat_tokens(req.messages, RESERVE_SAFETY)
        return self._usd(est, req.max_tokens), est + req.max_tokens

    async def _one(self, st: _LoopState, idx: int, req: GenRequest, abort: asyncio.Event,
                   ledger: Ledger | None = None) -> tuple[GenResult, Reservation | None]:
        """One request, retried as needed; with a `ledger`, its worst case is reserved in the
        same concurrency slot as its first send, just before it (while only the calls in
        flight stand in the way, it waits for them to settle without holding a slot; else
        BudgetExceeded). The caller settles the reservation; it is released here on failure."""
        body = json.dumps(build_payload(self.cfg.model, req)).encode()
        headers = self._headers
        t0: float | None = None
        attempts = 0
        rate_tokens = self.rate_tokens(req) if self._limiter is not None else 0
        worst = self._worst_case(req) if ledger is not None else None
        reservation: Reservation | None = None
        try:
            while True:
                try:
                    async with st.sem:
                        if abort.is_set():  # another request failed for good: send nothing more
                            raise BackendError("openai backend: aborted")
                        if worst is not None and reservation is None:
                            try:
                                reservation = ledger.reserve(*worst)
                            except BudgetExceeded:
                                if not ledger.fits_once_settled(*worst):
                                    raise
                        if worst is None or reservation is not None:
                            attempts += 1
                            if self._limiter is not None:  # every attempt counts against the provider's limits
                                await self._limiter.acquire(rate_tokens)
                            if t0 is None:
                                t0 = time.monotonic()  # latency: first send to answer, retries included
                            data = await self._attempt(st, body, headers)
                            break
                except _Retryable as r:
                    if attempts > self.cfg.max_retries:
                        raise BackendError(
                            f"openai backend: request {idx} failed after {attempts} attempts; last error: {r.why}"
                        ) from None
                    delay = self._backoff(attempts, r.retry_after)
                    log.debug("openai backend: request %d attempt %d: %s; retrying in %.2fs", idx, attempts, r.why,
                              delay)
                    await asyncio.sleep(delay)
                    continue
                await asyncio.sleep(0.01)  # the budget is held by calls in flight: wait for them to settle

            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            text, cut = apply_stops(text, req.stop)
            if cut:
                finish = "stop"
            usage = data.get("usage")
            usage = usage if isinstance(usage, dict) else {}
            return GenResult(
                text=text,
                finish_reason=finish,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                meta={"attempts": attempts, "latency_s": time.monotonic() - (t0 or 0.0)},
            ), reservation
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise

    @staticmethod
    def rate_tokens(req: GenRequest) -> int:
        """What a request takes from the tokens-per-minute bucket: the one estimator's
        count of its prompt plus its max_tokens."""
        return estimate_chat_tokens(req.messages) + req.max_tokens

    async def _one_budgeted(self, st: _LoopState, idx: int, req: GenRequest, abort: asyncio.Event,
                            ledger: Ledger | None) -> GenResult:
        """`_one` within the budget: worst case reserved before, actual usage settled after."""
        result, reservation = await self._one(st, idx, req, abort, ledger)
        if reservation is not None:
            reservation.settle(self._usd(result.prompt_tokens, result.completion_tokens), result.prompt_tokens,
                               result.completion_tokens)
        if self.cost is not None:
            result.meta["usd"] = self._usd(result.prompt_tokens, result.completion_tokens)
        return result

    # -- public API -----------------------------------------------------------------
    async def agenerate(self, requests: Sequence[GenRequest], progress: Progress | None = None,
                        on_result: Callable[[int, GenResult], None] | None = None,
                        ledger: Ledger | None = None) -> list[GenResult]:
        """`on_result(index, result)` is called as each request completes (before `progress`),
        so a caller can store answers one by one: a kill mid-batch loses only those in flight.
        `ledger`: the one these calls are reserved on and charged to (default: the backend's)."""
        if self._closed:
            raise BackendError("openai backend: used after close()")
        ledger = ledger if ledger is not None else self.ledger
        if ledger is not None and ledger.max_usd is not None and self.cost is None:
            raise BackendError(f"openai backend: budget.max_usd is set but no price was given for {self.cfg.model!r}")
        requests = list(requests)
        if not requests:
            return []
        st = self._state()
        abort = asyncio.Event()
        halt: list[BudgetExceeded] = []  # the budget stopped the batch: let calls in flight finish
        results: list[GenResult | None] = [None] * len(requests)
        # Requests become tasks in order, at most 2 x concurrency at a time: enough that every
        # slot freed finds a task waiting for it even with as many again sleeping in backoff,
        # without building thousands of payloads and tasks up front (measured: that held the
        # first 256 answers back ~0.1 s at concurrency 256).
        window = asyncio.Semaphore(2 * self.cfg.concurrency)

        async def run(i: int, r: GenRequest) -> None:
            try:
                try:
                    res = await self._one_budgeted(st, i, r, abort, ledger)
                except BudgetExceeded as e:
                    halt.append(e)
                    abort.set()
                    return
                except BackendError:
                    if halt:  # not sent because the budget stopped the batch
                        return
                    raise
                results[i] = res
                if on_result is not None:
                    on_result(i, res)
                if progress is not None:
                    progress(1)
            except BaseException:
                abort.set()  # failed for good (or its caller's callback did): send nothing more
                raise
            finally:
                window.release()

        tasks: list[asyncio.Future] = []
        try:
            for i, r in enumerate(requests):
                await window.acquire()
                if abort.is_set():  # failed for good or stopped by the budget: start nothing more
                    window.release()
                    break
                tasks.append(asyncio.ensure_future(run(i, r)))
            await asyncio.gather(*tasks)
            if halt:
                raise halt[0]
            return results
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._states_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                t = threading.Thread(target=loop.run_forever, name="openai-backend-loop", daemon=True)
                t.start()
                self._loop, self._thread = loop, t
            return self._loop

    def generate(self, requests: Sequence[GenRequest], progress: Progress | None = None,
                 on_result: Callable[[int, GenResult], None] | None = None,
                 ledger: Ledger | None = None) -> list[GenResult]:
        """Blocking; safe from any thread, including one running its own event loop.
        `on_result` runs on the backend's event-loop thread."""
        if self._closed:
            raise BackendError("openai backend: used after close()")
        loop = self._ensure_loop()
        fut = asyncio.run_coroutine_threadsafe(self.agenerate(requests, progress, on_result, ledger), loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    async def aclose(self) -> None:
        """Close the session bound to the running loop."""
        loop = asyncio.get_running_loop()
        with self._states_lock:
            st = self._states.pop(loop, None)
        if st is not None:
            await st.session.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout=10)
            except Exception:  # pragma: no cover - best effort
                pass
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = None
        # sessions bound to callers' own loops: close where still possible
        with self._states_lock:
            leftovers = list(self._states.items())
            self._states.clear()
        for lp, st in leftovers:
            if lp.is_closed():
                continue
            try:
                if lp.is_running():
                    asyncio.run_coroutine_threadsafe(st.session.close(), lp)
                else:
                    lp.run_until_complete(st.session.close())
            except Exception:  # pragma: no cover - best effort
                pass

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
