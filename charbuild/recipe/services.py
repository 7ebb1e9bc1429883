"""What the recipe's stages need from outside the engine, made once per command.

The engine hands this object to every stage context untouched (`contract.Services`):
generation backends (one per model and adapter, charging every call to the run's ledger,
the context's `budget`), the call cache, the one price table and measured lengths for
estimates. Everything is created on first use, so a `plan` that builds nothing opens no
backend.
"""

from __future__ import annotations

from charbuild.contract import EstimateContext, TargetDef
from charbuild.store.objects import Cache


class RecipeServices:
    def __init__(self, cache: Cache, loaded=None):
        self.cache = cache
        self.loaded = loaded
        self._backends = None
        self._call_cache = None
        self._calibration = None
        self._prices: dict[int, tuple] = {}

    # -- estimates --------------------------------------------------------------------------
    def estimate_context(self, loaded) -> EstimateContext:
        from charbuild.recipe.constitution_file import load_constitution
        from charbuild.ledger import estimate_tokens
        from charbuild.recipe.estimates import Calibration

        if self._calibration is None:
            self._calibration = Calibration.from_cache(self.cache)
        c = load_constitution(loaded.constitution_path)
        return EstimateContext(loaded, self, self.price_table(loaded.spec), self._calibration,
                               estimate_tokens(c.system_prompt()))

    def price_table(self, spec):
        """The one price lookup: the dated table with the spec's overrides (one per spec,
        parsed once); estimates and the backends' per-call charges both use it."""
        from charbuild.spec.prices import PriceTable

        if id(spec) not in self._prices:
            self._prices[id(spec)] = (spec, PriceTable.load(spec))  # the spec is kept so its id stays its own
        return self._prices[id(spec)][1]

    def record_lengths(self, stage: str, model: str, calls: int, tokens_in: int, tokens_out: int,
                       outs: list[int]) -> None:
        """Measured tokens per call, so later plans quote measured lengths."""
        from charbuild.recipe.estimates import Calibration

        Calibration.record(self.cache, stage, model, calls, tokens_in, tokens_out, outs)

    # -- building ---------------------------------------------------------------------------
    def preflight(self, loaded, targets: list[TargetDef]) -> list[str]:
        from charbuild.backends.pool import missing_keys

        spec = loaded.spec
        roles = {k.split(".", 1)[1] for t in targets for k in t.fields if k.startswith("models.")}
        missing = missing_keys({r: spec.models[r] for r in roles if r in spec.models})
        return [f"missing API key: {m}" for m in missing]

    @property
    def backends(self):
        if self._backends is None:
            from charbuild.backends.pool import BackendPool

            self._backends = BackendPool(self.price_table)
        return self._backends

    @property
    def call_cache(self):
        if self._call_cache is None:
            from charbuild.store.calls import CallCache

            self._call_cache = CallCache(self.cache.root)
        return self._call_cache

    def versions(self) -> dict[str, str]:
        import sys

        out = {}
        for mod in ("torch", "transformers", "trl", "peft", "pydantic", "vllm", "aiohttp"):
            m = sys.modules.get(mod)
            if m is not None:
                out[mod] = getattr(m, "__version__", "?")
        return out

    def close(self) -> None:
        if self._backends is not None:
            self._backends.close()
            self._backends = None
