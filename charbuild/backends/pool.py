"""One backend per (model, adapter) for the length of a build, created on first use.

Every call a stage makes through the pool is charged to the run's one ledger (the
context's `budget`, see charbuild.ledger): API calls reserve their worst case before
they are sent and settle at the price table's price (`PriceTable.price`, `usd_of`); local calls are
recorded after each batch (tokens, no dollars, never capped). Stages charge nothing
themselves, and calls answered from the call cache never reach the pool's backends.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Callable, Sequence

from charbuild.spec.model import ModelSpec
from charbuild.spec.prices import usd_of
from charbuild.backends.base import Backend, BackendError, GenRequest, GenResult, Progress


class BackendPool:
    def __init__(self, price_table: Callable | None = None) -> None:
        """`price_table(spec) -> PriceTable`: the one price lookup (default: loaded per spec)."""
        self._backends: dict[tuple, Backend] = {}
        self._price_table = price_table or self._load_prices
        self._tables: dict[int, tuple] = {}
        self._lock = threading.Lock()  # targets building in parallel share the pool

    def get(self, role: str, ctx) -> Backend:
        """The backend of `role`, charging every call to `ctx.budget` (the run's ledger) when
        the context has one."""
        m: ModelSpec = ctx.spec.models[role]
        model_slot = f"model:{role}"
        path = str(ctx.input(model_slot)) if model_slot in ctx.inputs else m.model
        adapter, merged = None, ()
        if role == "student":  # adapters are trained on the student only
            if "adapter" in ctx.inputs:
                adapter = str(ctx.input("adapter") / "adapter")
            merged = tuple(str(p / "adapter") for p in ctx.inputs.get("merge", []))
        k = (m.backend, path, adapter, merged, m.base_url)
        with self._lock:
            if k not in self._backends:
                # This model's price, read once from the one lookup; dollars by the one formula.
                cost = functools.partial(usd_of, self._price_table(ctx.spec).price(m)) if m.backend == "openai" else None
                self._backends[k] = make_backend(m, path, adapter, merged, cost)
        ledger = getattr(ctx, "budget", None)
        return self._backends[k] if ledger is None else Metered(self._backends[k], ledger, m.backend == "openai")

    def _load_prices(self, spec):
        from charbuild.spec.prices import PriceTable

        if id(spec) not in self._tables:
            self._tables[id(spec)] = (spec, PriceTable.load(spec))  # the spec is kept so its id stays its own
        return self._tables[id(spec)][1]

    def close(self) -> None:
        for b in self._backends.values():
            b.close()
        self._backends.clear()


class Metered:
    """A pooled backend bound to one ledger (one target's account of the run's ledger).
    API backends reserve and settle each call on it; local ones are charged per batch."""

    def __init__(self, inner: Backend, ledger, api: bool):
        self.inner = inner
        self.ledger = ledger
        self.api = api

    def generate(self, requests: Sequence[GenRequest], progress: Progress | None = None,
                 on_result: Callable[[int, GenResult], None] | None = None) -> list[GenResult]:
        if self.api:
            return self.inner.generate(requests, progress, on_result, ledger=self.ledger)
        results = self.inner.generate(requests, progress)
        self.ledger.charge(0.0, sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results),
                           calls=len(results), api=False)
        if on_result is not None:
            for i, r in enumerate(results):
                on_result(i, r)
        return results

    def close(self) -> None:
        pass  # the pool closes its backends when the build ends


def make_backend(m: ModelSpec, path: str, adapter: str | None, merged: tuple[str, ...] = (), cost=None) -> Backend:
    """`cost(tokens_in, tokens_out) -> usd`: an API model's dollars (the pool gives `usd_of` at its price)."""
    if m.backend == "openai":
        from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig

        if adapter or merged:
            raise BackendError("the openai backend cannot apply a local LoRA adapter; serve it (vllm serve --lora-modules) instead")
        return OpenAIBackend(OpenAIConfig(model=m.model, base_url=m.base_url, api_key_env=m.api_key_env,
                                          concurrency=m.concurrency, rpm=m.rpm, tpm=m.tpm), cost=cost)
    if m.backend == "transformers":
        from charbuild.backends.transformers_backend import TransformersBackend, TransformersConfig

        return TransformersBackend(TransformersConfig(model=path, adapter=adapter, merged_adapters=merged,
                                                      batch_size=m.batch_size))
    if m.backend == "vllm":
        from charbuild.backends.vllm_backend import VllmBackend

        if merged:
            raise BackendError("vllm serves one LoRA per request: fold the DPO adapter first (training.dpo.merge: true)")
        return VllmBackend(path, adapter=adapter)
    raise BackendError(f"unknown backend {m.backend!r}")


def missing_keys(models: dict[str, ModelSpec], env=os.environ) -> list[str]:
    """Roles whose API key variable is unset: checked before anything is spent."""
    return [f"{role} ({m.model}) needs the environment variable {m.api_key_env}"
            for role, m in models.items() if m.backend == "openai" and m.api_key_env and not env.get(m.api_key_env)]
