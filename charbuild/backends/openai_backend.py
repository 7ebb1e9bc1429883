"""`openai` backend: any server speaking OpenAI chat completions (OpenAI, DeepSeek,
Together, vLLM's OpenAI server, ...), over plain aiohttp.

Why not the `openai` SDK: on this project's 2-core machines it reached only 85/60/20 %
of the concurrency/latency limit at concurrency 16/64/256 (plain aiohttp: 97/92/84 %),
and its retries do not cover truncated JSON bodies (see shared/measured-baselines.md).

Guarantees:
* one result per request, in request order; nothing lost, nothing duplicated;
* requests that share a system prompt are sent side by side (`prefix_order`), so the
  server's prefix cache keeps it; cached prompt tokens it reports are charged at the
  cached rate;
* `generate_batch` asks requests through the server's batch API instead, at the batch
  rate (charbuild.backends.batch);
* retries with exponential backoff and full jitter on 429, 5xx, 408, timeouts,
  connection errors and malformed / truncated bodies; `Retry-After` honoured (capped);
* other 4xx fail at once with the status and the server's message;
* the API key is read from an environment variable by *name* and never appears in
  logs, reprs or exception messages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import email.utils
import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import aiohttp

from charbuild.backends.ratelimit import limiter_for
from charbuild.ledger import RESERVE_SAFETY, BudgetExceeded, Ledger, Reservation, estimate_chat_tokens
from charbuild.backends.base import (SEED_UNVERIFIED, BackendError, GenRequest, GenResult, Interrupted, Progress,
                                     template_kwargs)

log = logging.getLogger(__name__)

MAX_API_STOPS = 4  # OpenAI accepts at most 4 stop sequences
# After Ctrl-C the calls in flight may still answer for this long: they are paid for either
# way, and an answer that arrives is stored; a slower one is dropped so the run ends soon.
INTERRUPT_GRACE_S = 5.0
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
    role: str | None = None  # the spec's role for this model (teacher, judge...), named in errors


# (prompt tokens, completion tokens, cached_in=prompt tokens served from the provider's cache,
# batch=made through the batch API) -> USD: the price table's, for this model. A plain
# (prompt, completion) function is accepted too, and then charges every token at full price.
Cost = Callable[..., float]


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


def cached_prompt_tokens(usage: Mapping[str, Any]) -> int:
    """Prompt tokens the server says it served from its prefix cache: OpenAI's (and vLLM's)
    `prompt_tokens_details.cached_tokens`, or DeepSeek's `prompt_cache_hit_tokens`."""
    details = usage.get("prompt_tokens_details")
    n = details.get("cached_tokens") if isinstance(details, dict) else None
    if n is None:
        n = usage.get("prompt_cache_hit_tokens")
    try:
        return max(0, int(n or 0))
    except (TypeError, ValueError):
        return 0


def result_of(data: Mapping[str, Any], stops: Sequence[str]) -> GenResult:
    """A chat.completion body as a GenResult (the online answer and a batch line's alike);
    `cached_prompt_tokens` lands in meta when the server reports any."""
    choice = data["choices"][0]
    text = choice["message"].get("content") or ""
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    text, cut = apply_stops(text, stops)
    if cut:
        finish = "stop"
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    prompt = int(usage.get("prompt_tokens") or 0)
    meta: dict[str, Any] = {"seed": SEED_UNVERIFIED}  # the server's to honour (see SEED_UNVERIFIED)
    cached = min(cached_prompt_tokens(usage), prompt)
    if cached:
        meta["cached_prompt_tokens"] = cached
    return GenResult(text=text, finish_reason=finish, prompt_tokens=prompt,
                     completion_tokens=int(usage.get("completion_tokens") or 0), meta=meta)


def prefix_order(requests: Sequence[GenRequest]) -> list[int]:
    """The order to send requests in: those with the same system prompt next to each other
    (groups in order of first appearance, request order within a group), so a provider's or
    vLLM's prefix cache holds the shared prefix (the constitution) while its calls go out,
    instead of evicting it between interleaved groups."""
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(requests):
        first = r.messages[0] if r.messages else None
        prefix = first.get("content") if isinstance(first, dict) and first.get("role") == "system" else None
        groups.setdefault(prefix if isinstance(prefix, str) else None, []).append(i)
    return [i for g in groups.values() for i in g]


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
    if req.repetition_penalty is not None:
        # Not an OpenAI parameter: sent only when the spec sets it (vLLM and Together take it;
        # `transformers serve` answers 422).
        payload["repetition_penalty"] = req.repetition_penalty
    if req.extra_body:
        payload.update(req.extra_body)  # the spec refuses keys that would override the above
    if req.thinking is not None:  # vLLM and SGLang servers pass it to the chat template
        payload["chat_template_kwargs"] = template_kwargs(req)  # the spec refuses it in extra_body then
    return payload


# Where each request field comes from in a model's spec, for a server that refuses one.
_SPEC_FIELD = {"max_tokens": "sampling.max_tokens", "temperature": "sampling.temperature", "top_p": "sampling.top_p",
               "stop": "sampling.stop", "frequency_penalty": "sampling.frequency_penalty",
               "repetition_penalty": "sampling.repetition_penalty", "model": "model",
               "chat_template_kwargs": "thinking (or extra_body.chat_template_kwargs, whichever is set)"}


def refused_field(raw: str, payload: Mapping[str, Any]) -> str | None:
    """The request field a 4xx body names, among the fields this request sent: FastAPI's
    `detail[].loc` (transformers serve, vLLM), OpenAI's `error.param`, else a bare mention
    in the message; None when it names none."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    named = []
    if isinstance(data, dict):
        for d in data.get("detail") if isinstance(data.get("detail"), list) else ():
            loc = d.get("loc") if isinstance(d, dict) else None
            if isinstance(loc, list) and loc:
                named.append(loc[1] if len(loc) > 1 and loc[0] == "body" else loc[-1])
        err = data.get("error")
        if isinstance(err, dict) and err.get("param"):
            named.append(err["param"])
    for name in named:
        if isinstance(name, str) and name in payload:
            return name
    for name in sorted(payload, key=len, reverse=True):
        if name != "messages" and re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", raw):
            return name
    return None


def spec_field_hint(field: str) -> str:
    """The spec field that sent `field`: charbuild's own fields come from sampling (the spec
    refuses them in extra_body), so anything else came from extra_body."""
    if field == "seed":
        return "nothing: this server takes no per-request seed, which charbuild sends for every sample; use a server that does"
    return _SPEC_FIELD.get(field, f"extra_body.{field}")


class NotFound(BackendError):
    """A batch or file the provider does not know (any more): expired from its storage, or
    made with another account's key."""


class _Stopped(BackendError):
    """A batch ended by `interrupt`: raised on the event loop (a KeyboardInterrupt there would
    stop the loop itself); `generate` turns it into `Interrupted` for its caller."""


class _Batch:
    """One `agenerate` call, reachable by `interrupt` from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.abort = asyncio.Event()  # send nothing more: a request failed for good, or the batch was stopped
        self.tasks: list[asyncio.Future] = []
        self.stopped = False
        self._timer: asyncio.TimerHandle | None = None

    def stop(self, grace_s: float) -> None:
        """On the batch's loop: send nothing more; drop the calls in flight after `grace_s`."""
        self.stopped = True
        self.abort.set()
        if grace_s <= 0:
            for t in self.tasks:
                t.cancel()
        elif self._timer is None:
            self._timer = self.loop.call_later(grace_s, self.stop, 0)

    def stop_threadsafe(self, grace_s: float) -> None:
        try:
            self.loop.call_soon_threadsafe(self.stop, grace_s)
        except RuntimeError:
            pass  # its loop is closed: the batch is over

    def ended(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


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
        self._interrupted = False
        self._batches: set[_Batch] = set()  # running batches, on any loop
        self.ledger = ledger
        self.cost = cost
        self._cost_kw = _takes_kw(cost, "cached_in")
        self._limiter = (limiter_for("openai", cfg.model, cfg.rpm, cfg.tpm, endpoint=cfg.base_url.rstrip("/"))
                         if (cfg.rpm or cfg.tpm) else None)

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(model={self.cfg.model!r}, base_url={self.cfg.base_url!r}, "
            f"api_key_env={self.cfg.api_key_env!r}, concurrency={self.cfg.concurrency})"
        )

    # -- helpers -----------------------------------------------------------------
    def _redact(self, text: str) -> str:
        # The key's exact value as a whole token, never as a substring: a short dummy key
        # ("x") must not turn every "x" of a server's message into ***.
        if self.__key:
            text = re.sub(rf"(?<![A-Za-z0-9_\-.]){re.escape(self.__key)}(?![A-Za-z0-9_\-])", "***", text)
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
            raise BackendError(self._refusal(status, msg, raw, body))
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
                raise KeyError("message")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed body ({type(e).__name__}, {len(raw)} bytes)") from None
        return data

    def _refusal(self, status: int, msg: str, raw: bytes, body: bytes) -> str:
        """A 4xx that will not change on retry; when it names a field this request sent,
        which spec field to change."""
        text = f"openai backend: HTTP {status} from {self._url}: {msg}"
        try:
            payload = json.loads(body)
        except ValueError:
            return text
        field = refused_field(raw.decode("utf-8", "replace"), payload) if isinstance(payload, dict) else None
        if field is None:
            return text
        where = f"models.{self.cfg.role}." if self.cfg.role else ""
        hint = spec_field_hint(field)
        if hint.startswith("nothing"):
            return f"{text}\n  the server refused `{field}`: {hint}"
        return f"{text}\n  the server refused `{field}`: change {where}{hint} in the spec"

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

    def _usd(self, prompt_tokens: int, completion_tokens: int, cached_in: int = 0, batch: bool = False) -> float:
        if self.cost is None:
            return 0.0
        if self._cost_kw:
            return self.cost(prompt_tokens, completion_tokens, cached_in=cached_in, batch=batch)
        return self.cost(prompt_tokens, completion_tokens)

    def usd_of_result(self, r: GenResult, batch: bool = False) -> float:
        """An answer's dollars: its cached prompt tokens at the cached rate, a batch line's at the batch rate."""
        return self._usd(r.prompt_tokens, r.completion_tokens, int(r.meta.get("cached_prompt_tokens") or 0), batch)

    def worst_case(self, req: GenRequest, batch: bool = False) -> tuple[float, int]:
        """What a request reserves: its prompt by the one token estimator, with the
        reservation safety factor, at the uncached rate, plus the output tokens it may use:
        `req.reserve_tokens` (sized from measured lengths) or else every allowed one."""
        est = estimate_chat_tokens(req.messages, RESERVE_SAFETY)
        out = req.max_tokens if req.reserve_tokens is None else max(1, min(req.reserve_tokens, req.max_tokens))
        return self._usd(est, out, 0, batch), est + out

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
        worst = self.worst_case(req) if ledger is not None else None
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

            result = result_of(data, req.stop)
            result.meta.update(attempts=attempts, latency_s=time.monotonic() - (t0 or 0.0))
            return result, reservation
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
        usd = self.usd_of_result(result)
        if reservation is not None:
            reservation.settle(usd, result.prompt_tokens, result.completion_tokens,
                               cached_in=int(result.meta.get("cached_prompt_tokens") or 0))
        if self.cost is not None:
            result.meta["usd"] = usd
        return result

    # -- public API -----------------------------------------------------------------
    async def agenerate(self, requests: Sequence[GenRequest], progress: Progress | None = None,
                        on_result: Callable[[int, GenResult], None] | None = None,
                        ledger: Ledger | None = None) -> list[GenResult]:
        """`on_result(index, result)` is called as each request completes (before `progress`),
        so a caller can store answers one by one: a kill mid-batch loses only those in flight.
        `ledger`: the one these calls are reserved on and charged to (default: the backend's).
        After `interrupt`, raises BackendError once the calls in flight have ended."""
        return await self._agenerate(requests, progress, on_result, ledger, _Batch(asyncio.get_running_loop()))

    async def _agenerate(self, requests: Sequence[GenRequest], progress: Progress | None,
                         on_result: Callable[[int, GenResult], None] | None, ledger: Ledger | None,
                         batch: _Batch) -> list[GenResult]:
        if self._closed:
            raise BackendError("openai backend: used after close()")
        ledger = ledger if ledger is not None else self.ledger
        if ledger is not None and ledger.max_usd is not None and self.cost is None:
            raise BackendError(f"openai backend: budget.max_usd is set but no price was given for {self.cfg.model!r}")
        requests = list(requests)
        if not requests:
            return []
        st = self._state()
        abort = batch.abort
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
                    if halt or batch.stopped:  # not sent because the budget or an interrupt stopped the batch
                        return
                    raise
                except asyncio.CancelledError:
                    if batch.stopped:  # dropped in flight by an interrupt: unanswered, asked again next run
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

        tasks = batch.tasks
        self._batches.add(batch)
        try:
            if self._interrupted:  # checked after joining _batches: an interrupt sees the batch or it sees this
                batch.stopped = True
                abort.set()
            for i in prefix_order(requests):  # results still land at their request's index
                r = requests[i]
                await window.acquire()
                if abort.is_set():  # failed for good, stopped by the budget or interrupted: start nothing more
                    window.release()
                    break
                tasks.append(asyncio.ensure_future(run(i, r)))
            await asyncio.gather(*tasks)
            if batch.stopped:
                answered = sum(r is not None for r in results)
                raise _Stopped(f"openai backend: interrupted; {answered} of {len(requests)} answers had arrived")
            if halt:
                raise halt[0]
            return results
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            batch.ended()
            self._batches.discard(batch)

    # -- the batch API (mode: batch; the flow is charbuild.backends.batch) -------------------
    @property
    def interrupted(self) -> bool:
        return self._interrupted

    async def _api(self, method: str, path: str, *, json_body: Any = None,
                   form: Callable[[], aiohttp.FormData] | None = None, raw: bool = False) -> Any:
        """One request to the files or batches API, retried as a chat call is (429, 5xx,
        timeouts, dropped connections, malformed bodies); any other status fails at once."""
        st = self._state()
        url = self.cfg.base_url.rstrip("/") + path
        headers = {k: v for k, v in self._headers.items() if k != "Content-Type"}  # aiohttp sets it per body
        attempts = 0
        while True:
            attempts += 1
            retry_after = None
            try:
                async with st.session.request(method, url, json=json_body, data=form() if form else None,
                                              headers=headers, timeout=self._timeout) as resp:
                    status, body = resp.status, await resp.read()
                    retry_after = parse_retry_after(resp.headers.get("Retry-After")) if status in (429, 503) else None
            except asyncio.TimeoutError:
                why = f"timeout after {self.cfg.timeout_s:g}s"
            except (aiohttp.ClientError, OSError) as e:
                why = f"{type(e).__name__}: {self._redact(str(e))[:200]}"
            else:
                if status == 200:
                    if raw:
                        return body
                    try:
                        data = json.loads(body)
                        if isinstance(data, dict):
                            return data
                    except ValueError:
                        pass
                    why = f"malformed body ({len(body)} bytes)"
                elif status in _RETRY_STATUSES or status >= 500:
                    why = f"HTTP {status}: {self._server_message(body)}"
                else:
                    creating = method == "POST" and path in ("/files", "/batches")
                    hint = ("; this endpoint has no batch API: set the role's mode: online"
                            if status in (404, 405) and creating else "")
                    raise (NotFound if status == 404 and not creating else BackendError)(
                        f"openai backend: HTTP {status} from {method} {url}: {self._server_message(body)}{hint}")
            if attempts > self.cfg.max_retries:
                raise BackendError(f"openai backend: {method} {url} failed after {attempts} attempts; last error: {why}")
            await asyncio.sleep(self._backoff(attempts, retry_after))

    def _sync(self, make: Callable[[], Any], what: str) -> Any:
        """Run a coroutine on the backend's loop and wait for it in the calling thread. Ctrl-C
        here, or `interrupt` from another thread, ends the wait with `Interrupted`: a batch
        already created keeps running at the provider, and its journal lets the next run
        collect it."""
        if self._closed:
            raise BackendError("openai backend: used after close()")
        if self._interrupted:
            raise Interrupted(f"openai backend: interrupted before {what}")
        fut = asyncio.run_coroutine_threadsafe(make(), self._ensure_loop())
        try:
            while True:
                done, _ = cf.wait([fut], timeout=0.25)
                if done:
                    return fut.result()
                if self._interrupted:
                    raise Interrupted(f"openai backend: interrupted during {what}")
        except KeyboardInterrupt:
            fut.cancel()
            raise Interrupted(f"openai backend: interrupted during {what}") from None

    def batch_upload(self, jsonl: bytes) -> str:
        """Upload a batch input file (purpose "batch"); its file id."""
        def form() -> aiohttp.FormData:
            f = aiohttp.FormData()
            f.add_field("purpose", "batch")
            f.add_field("file", jsonl, filename="charbuild-batch.jsonl", content_type="application/jsonl")
            return f

        data = self._sync(lambda: self._api("POST", "/files", form=form), "a batch upload")
        if not isinstance(data.get("id"), str):
            raise BackendError(f"openai backend: the file upload answered no file id: {str(data)[:200]}")
        return data["id"]

    def batch_create(self, file_id: str, metadata: dict | None = None) -> dict:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        if metadata:
            body["metadata"] = metadata
        data = self._sync(lambda: self._api("POST", "/batches", json_body=body), "creating a batch")
        if not isinstance(data.get("id"), str):
            raise BackendError(f"openai backend: creating a batch answered no batch id: {str(data)[:200]}")
        return data

    def batch_get(self, batch_id: str) -> dict:
        return self._sync(lambda: self._api("GET", f"/batches/{batch_id}"), f"polling batch {batch_id}")

    def batch_find(self, file_id: str) -> dict | None:
        """The batch made from input file `file_id`, if any (among the most recent 100)."""
        data = self._sync(lambda: self._api("GET", "/batches?limit=100"), "listing batches")
        for b in data.get("data") or ():
            if isinstance(b, dict) and b.get("input_file_id") == file_id and isinstance(b.get("id"), str):
                return b
        return None

    def batch_file(self, file_id: str) -> bytes:
        return self._sync(lambda: self._api("GET", f"/files/{file_id}/content", raw=True), f"downloading {file_id}")

    def generate_batch(self, items: Mapping[str, GenRequest], journals, store: Callable[[str, GenResult], None],
                       ledger: Ledger | None = None) -> list[str]:
        """`items` (custom id -> request) through the batch API; see charbuild.backends.batch.run_batches."""
        from charbuild.backends.batch import run_batches

        ledger = ledger if ledger is not None else self.ledger
        if ledger is not None and ledger.max_usd is not None and self.cost is None:
            raise BackendError(f"openai backend: budget.max_usd is set but no price was given for {self.cfg.model!r}")
        return run_batches(self, items, journals, store, ledger)

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
        `on_result` runs on the backend's event-loop thread.

        Ctrl-C in the calling thread (or `interrupt` from another) stops the batch: nothing
        more is sent, the calls in flight may still answer for INTERRUPT_GRACE_S (a second
        Ctrl-C drops them at once), and `Interrupted` is raised once every answer that arrived
        has reached `on_result`."""
        if self._closed:
            raise BackendError("openai backend: used after close()")
        loop = self._ensure_loop()
        thread = self._thread
        batch = _Batch(loop)
        fut = asyncio.run_coroutine_threadsafe(self._agenerate(requests, progress, on_result, ledger, batch), loop)
        pressed = 0
        while True:
            try:
                done, _ = cf.wait([fut], timeout=0.25)
            except KeyboardInterrupt:  # Ctrl-C in this thread (the build's own at --jobs 1)
                pressed += 1
                batch.stop_threadsafe(INTERRUPT_GRACE_S if pressed == 1 else 0)
                continue
            except BaseException:
                batch.stop_threadsafe(0)
                raise
            if done:
                break
            # A batch on a loop that is gone never ends: fail rather than wait forever.
            if loop.is_closed() or thread is None or not thread.is_alive():
                raise (Interrupted if self._interrupted else BackendError)(
                    "openai backend: closed while a batch was running")
        try:
            results = fut.result()
        except _Stopped as e:
            raise Interrupted(str(e)) from None
        if pressed:  # every answer arrived before the stop took effect: still a Ctrl-C
            raise Interrupted("openai backend: interrupted")
        return results

    def interrupt(self, grace_s: float | None = None) -> None:
        """The run was interrupted: every running batch sends nothing more and drops its calls
        still in flight after `grace_s` (default INTERRUPT_GRACE_S; 0: at once), and later
        batches send nothing. Takes no lock, so a signal handler may call it."""
        self._interrupted = True
        for b in list(self._batches):
            b.stop_threadsafe(INTERRUPT_GRACE_S if grace_s is None else grace_s)

    async def aclose(self) -> None:
        """Close the session bound to the running loop."""
        loop = asyncio.get_running_loop()
        for _ in range(500):  # let batches that close() stopped end before their session goes
            if not any(b.loop is loop for b in list(self._batches)):
                break
            await asyncio.sleep(0.01)
        with self._states_lock:
            st = self._states.pop(loop, None)
        if st is not None:
            await st.session.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._batches:  # a caller still waits on one: end it, never leave it on a stopped loop
            self.interrupt(0)
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


def _takes_kw(fn, name: str) -> bool:
    """Whether `fn` accepts keyword `name` (or any keyword)."""
    import inspect

    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
