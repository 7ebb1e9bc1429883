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


# Stages that train on the student rather than generate with it: what they need from a model
# role is its weights, which the stages before them loaded (or downloaded) to generate.
TRAINING_STAGES = frozenset({"dpo-adapter", "sft-adapter", "final"})


def unservable_variants(spec, targets: list[TargetDef]) -> list[str]:
    """The student variants these targets generate from that the student's backend would
    refuse, one line per variant: decided from the spec (which trained targets will hold
    merged weights) as the pool decides it from their folders once built."""
    from charbuild.backends.pool import refusal
    from charbuild.backends.weights import student_weights
    from charbuild.recipe.stages.adapters import merged_targets

    m = spec.models["student"]
    saves = merged_targets(spec)

    def merged(name) -> bool:
        return saves.get(str(name).rsplit("/", 1)[-1], False)  # a sub-build's targets carry a prefix

    by_variant: dict[tuple, list[str]] = {}
    for t in targets:
        if "models.student" not in t.fields or not ({"adapter", "merge"} & set(t.inputs)):
            continue
        adapter = t.inputs.get("adapter", [None])[0]
        _, on_top, folded = student_weights(m.model, adapter, t.inputs.get("merge", []), merged=merged)
        why = refusal(m.backend, on_top, folded)
        if why:
            made_of = " + ".join([*t.inputs.get("merge", []), *t.inputs.get("adapter", [])])
            by_variant.setdefault((made_of, why), []).append(t.name)
    return [f"student ({m.model}, backend {m.backend}) with {made_of}, for {names[0]}"
            + (f" and {len(names) - 1} more" if len(names) > 1 else "") + f": {why}"
            for (made_of, why), names in by_variant.items()]


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
                               estimate_tokens(c.system_prompt()), loaded.spec.budget.deadline_hours)

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

    def reserve_tokens(self, stage: str, model: str) -> int | None:
        """Output tokens a call's budget reservation holds for this stage and model: the
        measured p99 (read afresh: earlier targets of this run measured more), or None for
        max_tokens while too little is measured."""
        from charbuild.recipe.estimates import Calibration

        return Calibration.from_cache(self.cache).out_high(stage, model)

    # -- building ---------------------------------------------------------------------------
    def preflight(self, loaded, targets: list[TargetDef]) -> list[str]:
        """Every problem with the models the plan generates with, before anything is spent:
        API keys, endpoints, packages, GPUs, weights (charbuild.backends.preflight), and a
        student variant its backend would refuse (vllm with two adapters, say)."""
        from charbuild.backends.pool import missing_keys
        from charbuild.backends.preflight import model_problems

        spec = loaded.spec
        generating = [t for t in targets if t.stage not in TRAINING_STAGES]
        roles = {k.split(".", 1)[1] for t in generating for k in t.fields if k.startswith("models.")}
        models = {r: spec.models[r] for r in sorted(roles) if r in spec.models}
        return ([f"missing API key: {m}" for m in missing_keys(models)] + model_problems(models)
                + unservable_variants(spec, generating))

    def gpu_for_training(self):
        """For a training stage: the GPU to itself (`BackendPool.for_training`)."""
        return self.backends.for_training()

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

            self._call_cache = CallCache(self.cache.root, remote=getattr(self.cache, "remote", None))
        return self._call_cache

    def versions(self) -> dict[str, str]:
        import sys

        out = {}
        for mod in ("torch", "transformers", "trl", "peft", "pydantic", "vllm", "aiohttp"):
            m = sys.modules.get(mod)
            if m is not None:
                out[mod] = getattr(m, "__version__", "?")
        return out

    def for_workers(self):
        """How a worker process of a remote build makes these services again (contract.Services):
        its own backends and call cache, with the rate limits of the run's `shared` state."""
        import functools

        return functools.partial(_worker_services, self.loaded)

    def interrupt(self, now: bool = False) -> None:
        backends = self._backends
        if backends is not None:
            backends.interrupt(now)

    def preload(self) -> None:
        """Import the model libraries once, before targets build on several threads:
        transformers' lazy imports are not thread-safe (two threads importing its auto
        classes at once got `cannot import name 'AutoModelForCausalLM'`)."""
        models = self.loaded.spec.models.values() if self.loaded is not None else ()
        if any(m.backend != "openai" for m in models):
            from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig,  # noqa: F401
                                      LogitsProcessorList, PreTrainedTokenizerFast)

    def close(self) -> None:
        if self._backends is not None:
            self._backends.close()
            self._backends = None
        if getattr(self, "_shared", None) is not None:
            from charbuild.backends.ratelimit import share_limiters

            share_limiters(None)
            self._shared = None


def _worker_services(loaded, cache: Cache, shared) -> RecipeServices:
    """`RecipeServices.for_workers`' factory: every rate limit of this worker is the run's
    (one bucket per endpoint and model across the cluster); the ledger is already the
    run's, as each target's context carries it."""
    from charbuild.backends.ratelimit import share_limiters

    share_limiters(shared)
    services = RecipeServices(cache, loaded)
    services._shared = shared
    return services
