"""One backend per (model, adapter) for the length of a build, created on first use.

Every call a stage makes through the pool is charged to the run's one ledger (the
context's `budget`, see charbuild.ledger): API calls reserve their worst case before
they are sent and settle at the price table's price (`PriceTable.price`, `usd_of`); local calls are
recorded after each batch (tokens, no dollars, never capped). Stages charge nothing
themselves, and calls answered from the call cache never reach the pool's backends.

One GPU holds generation and training in turn: local backends (transformers, vllm) generate
inside a turn (`Metered`), a training stage takes the GPU with `for_training()`, which waits
for the local calls in flight, closes every local backend and holds new ones back until it
ends, and a vLLM engine, which takes most of the GPU's memory, never starts beside another
local backend: the others are closed first. A closed backend loads again when next asked.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
from typing import Callable, Iterator, Sequence

from charbuild.spec.model import ModelSpec, vllm_lora_rank
from charbuild.spec.prices import usd_of
from charbuild.backends.base import Backend, BackendError, GenRequest, GenResult, Progress
from charbuild.backends.weights import adapter_rank, student_weights


class BackendPool:
    def __init__(self, price_table: Callable | None = None) -> None:
        """`price_table(spec) -> PriceTable`: the one price lookup (default: loaded per spec)."""
        self._backends: dict[tuple, Backend] = {}
        self._price_table = price_table or self._load_prices
        self._tables: dict[int, tuple] = {}
        self._lock = threading.RLock()  # targets building in parallel share the pool
        self._turns = threading.Condition(self._lock)
        self._in_use: collections.Counter = collections.Counter()  # local backends generating now, by key
        self._training = False

    def get(self, role: str, ctx) -> Backend:
        """The backend of `role`, charging every call to `ctx.budget` (the run's ledger) when
        the context has one."""
        m: ModelSpec = ctx.spec.models[role]
        model_slot = f"model:{role}"
        path = str(ctx.input(model_slot)) if model_slot in ctx.inputs else m.model
        adapter, merged = None, ()
        if role == "student":  # adapters are trained on the student only
            path, adapter, merged = student_weights(path, ctx.input("adapter") if "adapter" in ctx.inputs else None,
                                                    ctx.inputs.get("merge", []))
        k = (m.backend, path, adapter, merged, m.base_url)
        with self._lock:
            if k not in self._backends:
                # This model's price, read once from the one lookup; dollars by the one formula.
                cost = functools.partial(usd_of, self._price_table(ctx.spec).price(m)) if m.backend == "openai" else None
                self._backends[k] = make_backend(m, path, adapter, merged, cost, role=role)
            backend = self._backends[k]
        ledger = getattr(ctx, "budget", None)
        if ledger is None:
            return backend
        api = m.backend == "openai"
        return Metered(backend, ledger, api, turn=None if api else functools.partial(self._turn, k, backend))

    @contextlib.contextmanager
    def _turn(self, k: tuple, backend: Backend) -> Iterator[Backend]:
        """A local generate call's hold on the GPU: none while a training stage has it, and a
        vLLM engine alone (the other local backends are closed once their calls end). Yields
        the pool's backend for `k`, put back if it was closed meanwhile."""
        with self._turns:
            while self._training or any(self._in_use[o] for o in self._rivals(k)):
                self._turns.wait()
            for o in self._rivals(k):
                self._backends.pop(o).close()
            backend = self._backends.setdefault(k, backend)
            self._in_use[k] += 1
        try:
            yield backend
        finally:
            with self._turns:
                self._in_use[k] -= 1
                self._turns.notify_all()

    def _rivals(self, k: tuple) -> list[tuple]:
        return [o for o in self._backends if o != k and o[0] != "openai" and "vllm" in (o[0], k[0])]

    def local(self) -> list[tuple]:
        """The local backends held now, as (backend, model path, adapter, folded adapters, url) keys."""
        with self._lock:
            return [k for k in self._backends if k[0] != "openai"]

    @contextlib.contextmanager
    def for_training(self) -> Iterator[None]:
        """The GPU for a training stage: waits for the local calls in flight, closes every
        local backend (its model leaves the GPU) and starts none until the stage ends."""
        with self._turns:
            while self._training or any(self._in_use.values()):
                self._turns.wait()
            self._training = True
        try:
            self.release_local()
            yield
        finally:
            with self._turns:
                self._training = False
                self._turns.notify_all()

    def release_local(self) -> None:
        """Close every local backend no call is using; the next call loads its model again."""
        with self._turns:
            for k in [k for k in self._backends if k[0] != "openai" and not self._in_use[k]]:
                self._backends.pop(k).close()

    def _load_prices(self, spec):
        from charbuild.spec.prices import PriceTable

        if id(spec) not in self._tables:
            self._tables[id(spec)] = (spec, PriceTable.load(spec))  # the spec is kept so its id stays its own
        return self._tables[id(spec)][1]

    def interrupt(self, now: bool = False) -> None:
        """Ctrl-C: the backends that can stop their calls in flight do (after a grace period
        in which answers may still arrive; `now`: at once). No lock: a signal handler calls it."""
        for b in list(self._backends.values()):
            stop = getattr(b, "interrupt", None)
            if stop is not None:
                stop(0) if now else stop()

    def close(self) -> None:
        for b in self._backends.values():
            b.close()
        self._backends.clear()


class Metered:
    """A pooled backend bound to one ledger (one target's account of the run's ledger).
    API backends reserve and settle each call on it; local ones are charged per batch and
    generate inside the pool's `turn` on the GPU."""

    def __init__(self, inner: Backend, ledger, api: bool, turn: Callable | None = None):
        self.inner = inner
        self.ledger = ledger
        self.api = api
        self.turn = turn

    def generate(self, requests: Sequence[GenRequest], progress: Progress | None = None,
                 on_result: Callable[[int, GenResult], None] | None = None) -> list[GenResult]:
        if self.api:
            return self.inner.generate(requests, progress, on_result, ledger=self.ledger)
        with self.turn() if self.turn is not None else contextlib.nullcontext(self.inner) as inner:
            results = inner.generate(requests, progress)
        self.ledger.charge(0.0, sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results),
                           calls=len(results), api=False)
        if on_result is not None:
            for i, r in enumerate(results):
                on_result(i, r)
        return results

    @property
    def generate_batch(self):
        """The inner backend's batch API bound to this ledger, or None where there is none
        (a local backend): `CachedBackend` then asks online."""
        inner = getattr(self.inner, "generate_batch", None)
        if inner is None or not self.api:
            return None
        return functools.partial(inner, ledger=self.ledger)

    def close(self) -> None:
        pass  # the pool closes its backends when the build ends


def make_backend(m: ModelSpec, path: str, adapter: str | None, merged: tuple[str, ...] = (), cost=None,
                 role: str | None = None) -> Backend:
    """`cost(tokens_in, tokens_out) -> usd`: an API model's dollars (the pool gives `usd_of` at its price);
    `role`: the spec's name for the model, for errors that say which spec field to change."""
    if m.backend == "openai":
        from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig

        why = refusal(m.backend, adapter, merged)
        if why:
            raise BackendError(why)
        return OpenAIBackend(OpenAIConfig(model=m.model, base_url=m.base_url, api_key_env=m.api_key_env,
                                          concurrency=m.concurrency, rpm=m.rpm, tpm=m.tpm, role=role), cost=cost)
    if m.backend == "transformers":
        from charbuild.backends.transformers_backend import TransformersBackend, TransformersConfig

        return TransformersBackend(TransformersConfig(model=path, adapter=adapter, merged_adapters=merged,
                                                      batch_size=m.batch_size))
    if m.backend == "vllm":
        from charbuild.backends.vllm_backend import VllmBackend

        why = refusal(m.backend, adapter, merged)
        if why:
            raise BackendError(why)
        return VllmBackend(path, adapter=adapter, **vllm_engine_args(m, adapter))
    raise BackendError(f"unknown backend {m.backend!r}")


def vllm_engine_args(m: ModelSpec, adapter: str | None) -> dict:
    """What `vllm.LLM` is started with besides the model: the spec's engine settings, and a
    LoRA rank that fits the adapter served. The spec's rank (the student's adapters', rounded
    up) or this adapter's, if larger: an exact final merge has rank r_dpo + r_sft (128 for
    the paper's)."""
    rank = max(getattr(m, "max_lora_rank", None) or 0, adapter_rank(adapter) if adapter else 0)
    engine = {f: getattr(m, f, None) for f in ("gpu_memory_utilization", "max_model_len", "tensor_parallel_size")}
    return {"max_lora_rank": vllm_lora_rank(rank) if rank else 64, **{f: v for f, v in engine.items() if v is not None}}


def refusal(backend: str, adapter: str | None, merged: Sequence[str] = ()) -> str | None:
    """Why `backend` cannot serve a model with `adapter` applied on top and the `merged`
    adapters folded in first (`student_weights` says which), or None. Pure, so a plan can
    ask it of every student variant before anything runs (the recipe's preflight)."""
    if backend == "openai" and (adapter or merged):
        return "the openai backend cannot apply a local LoRA adapter; serve it (vllm serve --lora-modules) instead"
    if backend == "vllm" and merged:
        return ("vllm applies one LoRA per request and this model needs the DPO adapter folded in under another: "
                "save the DPO model's merged weights (training.dpo.merge: true), or evaluate the final model "
                "(one adapter)")
    return None


def api_key_names(models: dict[str, ModelSpec]) -> list[str]:
    """The environment variables the models' API keys are read from (names, never values)."""
    return sorted({m.api_key_env for m in models.values() if m.backend == "openai" and m.api_key_env})


def missing_keys(models: dict[str, ModelSpec], env=os.environ) -> list[str]:
    """Roles whose API key variable is unset: checked before anything is spent."""
    return [f"{role} ({m.model}) needs the environment variable {m.api_key_env}"
            for role, m in models.items() if m.backend == "openai" and m.api_key_env and not env.get(m.api_key_env)]
