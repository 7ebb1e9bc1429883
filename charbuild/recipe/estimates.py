"""Cost estimates: counts x lengths x the price table, recalibrated from manifests.

Before anything is built, lengths come from the spec's `expect` block and the rendered
constitution; once a target of the same stage and model has been built, the measured
tokens per call replace the expectation (`calibrated` in the plan).

An estimate's `usd` is API dollars only (what `budget.max_usd` caps) and `api_tokens`
the API calls' tokens (what `budget.max_tokens` caps); local models are estimated in
GPU-hours, with an informational `gpu_usd` that no budget counts (see charbuild.ledger).
Prices come from the one lookup, `charbuild.spec.prices.PriceTable`; token counts that
are guessed come from the one estimator, `charbuild.ledger.estimate_chat_tokens`.
"""

from __future__ import annotations

from pathlib import Path

from charbuild.contract import Estimate
from charbuild.ledger import estimate_chat_tokens
from charbuild.spec.model import ModelSpec
from charbuild.spec.prices import size_class

MAX_OUTS = 5000  # per-call output lengths kept per (stage, model)
# Reservations from measured lengths: the p99 of the recent ones, once there are enough of
# them for a p99 to mean something (with 20, it is about their longest).
RESERVE_PERCENTILE = 99
RESERVE_MIN_MEASURED = 20

# Rough training throughput (tokens/s on one GPU incl. backward) relative to generation.
TRAIN_SLOWDOWN = 3.0


class Calibration:
    """Measured tokens per call, by (stage, model), from the manifests of built targets."""

    def __init__(self, stats: dict | None = None):
        self.stats = stats or {}

    @classmethod
    def from_cache(cls, cache) -> "Calibration":
        try:
            return cls(cache.index.get(("calibration",), {}) or {})
        except Exception:  # an unreadable index must not stop a plan
            return cls()

    def per_call(self, stage: str, model: str) -> tuple[float, float] | None:
        s = self.stats.get(f"{stage}|{model}")
        if not s or not s.get("calls"):
            return None
        return s["tokens_in"] / s["calls"], s["tokens_out"] / s["calls"]

    def out_range(self, stage: str, model: str) -> tuple[float, float] | None:
        """p50 and p90 of the output tokens per call measured for this stage and model."""
        outs = (self.stats.get(f"{stage}|{model}") or {}).get("outs")
        if not outs:
            return None
        import numpy as np

        return float(np.percentile(outs, 50)), float(np.percentile(outs, 90))

    def out_high(self, stage: str, model: str) -> int | None:
        """A high bound on one call's output tokens for this stage and model: the p99 of the
        recent measured lengths, rounded up; None until RESERVE_MIN_MEASURED were measured
        (too few to say where the tail is). Budget reservations hold this instead of
        max_tokens (charbuild.ledger)."""
        outs = (self.stats.get(f"{stage}|{model}") or {}).get("outs")
        if not outs or len(outs) < RESERVE_MIN_MEASURED:
            return None
        import math

        import numpy as np

        return max(1, math.ceil(float(np.percentile(outs, RESERVE_PERCENTILE))))

    @staticmethod
    def record(cache, stage: str, model: str, calls: int, tokens_in: int, tokens_out: int,
               outs: list[int] = ()) -> None:
        if not calls:
            return
        with cache.index.transact():
            stats = cache.index.get(("calibration",), {}) or {}
            s = stats.setdefault(f"{stage}|{model}", {"calls": 0, "tokens_in": 0, "tokens_out": 0})
            s["calls"] += calls
            s["tokens_in"] += tokens_in
            s["tokens_out"] += tokens_out
            s["outs"] = (s.get("outs", []) + list(outs))[-MAX_OUTS:]  # the recent distribution
            cache.index.set(("calibration",), stats)


def prompt_tokens(requests, tokenizer_json: Path | None) -> tuple[int, bool]:
    """Input tokens of rendered requests: with the model's own tokenizer when it is on disk
    (`tokenizers` only: no transformers import), else the one estimator (~4 characters a
    token). Returns (tokens, exact). Chat-template framing is counted as the estimator
    counts it (`MESSAGE_FRAMING_TOKENS` a message) either way."""
    if tokenizer_json is not None and Path(tokenizer_json).is_file():
        from collections import Counter

        from tokenizers import Tokenizer

        from charbuild.ledger import MESSAGE_FRAMING_TOKENS

        texts = [msg["content"] for r in requests for msg in r.messages]
        counts = Counter(texts)  # the system prompt every request carries is tokenized once
        tok = Tokenizer.from_file(str(tokenizer_json))
        tok.no_padding()
        tok.no_truncation()
        encoded = tok.encode_batch(list(counts), add_special_tokens=False)
        return sum(len(e) * n for e, n in zip(encoded, counts.values())) + MESSAGE_FRAMING_TOKENS * len(texts), True
    return sum(estimate_chat_tokens(r.messages) for r in requests), False


def generation(ctx, m: ModelSpec, stage: str, calls: int, tin_per_call: float, tout_per_call: float) -> Estimate:
    """Estimate `calls` generations on model `m`: API dollars and tokens, or GPU-hours for
    local models."""
    calibrated = False
    measured = ctx.calibration.per_call(stage, m.model)
    if measured:
        tin_per_call, tout_per_call = measured
        calibrated = True
    tin, tout = int(calls * tin_per_call), int(calls * tout_per_call)
    est = Estimate(tin, tout, calls=calls, calibrated=calibrated)
    rng = ctx.calibration.out_range(stage, m.model)
    est.tokens_out_p50, est.tokens_out_p90 = (int(calls * rng[0]), int(calls * rng[1])) if rng else (tout, tout)
    # A skewed length distribution can put its mean (the point estimate) above the p90 of
    # a few samples; the range shown and budgeted must still contain the point estimate.
    est.tokens_out_p90 = max(est.tokens_out_p90, tout)
    if m.backend == "openai":
        # Priced as if no prompt was cached: a provider's cache is a saving, never a promise.
        est.batch = ctx.prices.mode(m, getattr(ctx, "deadline_hours", None)) == "batch"
        est.usd_online = ctx.prices.usd(m, tin, tout)
        est.usd_batch = ctx.prices.usd(m, tin, tout, batch=True)
        est.usd = est.usd_batch if est.batch else est.usd_online
        est.usd_p90 = ctx.prices.usd(m, tin, est.tokens_out_p90, batch=est.batch)
        est.api_tokens = tin + tout
        est.price_unknown = not ctx.prices.known(m)
    elif size_class(m) != "tiny":  # tiny models run on CPU: no GPU-hours
        # Prefill is ~10x cheaper per token than decoding.
        est.gpu_hours = (tin * 0.1 + tout) / ctx.prices.throughput(m) / 3600
        est.gpu_usd = est.gpu_hours * ctx.prices.gpu_usd_per_hour
    return est


def training(ctx, m: ModelSpec, tokens: int, epochs: float) -> Estimate:
    est = Estimate()
    if size_class(m) != "tiny":
        est.gpu_hours = tokens * epochs * TRAIN_SLOWDOWN / ctx.prices.throughput(m) / 3600
        est.gpu_usd = est.gpu_hours * ctx.prices.gpu_usd_per_hour
    return est

