"""Cost estimates: counts x lengths x a dated price table, recalibrated from manifests.

Before anything is built, lengths come from the spec's `expect` block and the rendered
constitution; once a target of the same stage and model has been built, the measured
tokens per call replace the expectation (`calibrated` in the plan).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .spec import ModelSpec, Spec
from .stages.base import Estimate

PRICES_FILE = Path(__file__).parent / "data" / "prices.yaml"

MAX_OUTS = 5000  # per-call output lengths kept per (stage, model)

# Rough training throughput (tokens/s on one GPU incl. backward) relative to generation.
TRAIN_SLOWDOWN = 3.0


def approx_tokens(text: str) -> int:
    """A documented heuristic: ~4 characters per token for English BPE vocabularies."""
    return max(1, math.ceil(len(text) / 4))


@dataclass
class PriceTable:
    models: dict
    default: dict
    gpu_usd_per_hour: float
    tokens_per_second: dict
    as_of: str

    @classmethod
    def load(cls, spec: Spec | None = None, path: Path = PRICES_FILE) -> "PriceTable":
        from .specloader import fast_safe_load

        data = fast_safe_load(path.read_text()) if path.exists() else {}
        models = dict(data.get("models") or {})
        if spec is not None:
            for mid, p in spec.prices.items():
                models[mid] = {"input": p.input, "output": p.output, "source": "spec"}
        gpu = data.get("gpu") or {}
        return cls(models, data.get("default") or {"input": 1.0, "output": 3.0},
                   float(gpu.get("usd_per_hour", 2.5)), dict(gpu.get("tokens_per_second") or {"8b": 2500}),
                   str(data.get("as_of", "unknown")))

    def price(self, m: ModelSpec) -> dict:
        if m.price is not None:
            return {"input": m.price.input, "output": m.price.output}
        return self.models.get(m.model) or self.default

    def throughput(self, m: ModelSpec) -> float:
        cls_ = size_class(m)
        if cls_ in self.tokens_per_second:
            return float(self.tokens_per_second[cls_])
        sizes = {k: _billions(k) for k in self.tokens_per_second if _billions(k)}
        if not sizes:
            return 1000.0
        want = _billions(cls_) or 8.0
        nearest = min(sizes, key=lambda k: abs(math.log(sizes[k] / want)))
        return float(self.tokens_per_second[nearest])


def _billions(s: str | None) -> float | None:
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB]\b", s or "")
    return float(m.group(1)) if m else None


def size_class(m: ModelSpec) -> str:
    if m.size:
        return m.size
    if m.model.startswith("tiny:"):
        return "tiny"
    b = re.findall(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", m.model)
    return f"{b[0]}b" if b else "8b"


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
    (`tokenizers` only: no transformers import), else the ~4 characters per token heuristic.
    Returns (tokens, exact). Chat-template framing is counted as 4 tokens per message."""
    texts = [msg["content"] for r in requests for msg in r.messages]
    framing = 4 * len(texts)
    if tokenizer_json is not None and Path(tokenizer_json).is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_json))
        return sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)) + framing, True
    return sum(approx_tokens(t) for t in texts) + framing, False


def generation(ctx, m: ModelSpec, stage: str, calls: int, tin_per_call: float, tout_per_call: float) -> Estimate:
    """Estimate `calls` generations on model `m`: API dollars, or GPU-hours for local models."""
    calibrated = False
    measured = ctx.calibration.per_call(stage, m.model)
    if measured:
        tin_per_call, tout_per_call = measured
        calibrated = True
    tin, tout = int(calls * tin_per_call), int(calls * tout_per_call)
    est = Estimate(tin, tout, calls=calls, calibrated=calibrated)
    rng = ctx.calibration.out_range(stage, m.model)
    est.tokens_out_p50, est.tokens_out_p90 = (int(calls * rng[0]), int(calls * rng[1])) if rng else (tout, tout)
    if m.backend == "openai":
        p = ctx.prices.price(m)
        est.usd = (tin * p["input"] + tout * p["output"]) / 1e6
        est.usd_p90 = (tin * p["input"] + est.tokens_out_p90 * p["output"]) / 1e6
    elif size_class(m) != "tiny":  # tiny models run on CPU: no GPU-hours
        # Prefill is ~10x cheaper per token than decoding.
        est.gpu_hours = (tin * 0.1 + tout) / ctx.prices.throughput(m) / 3600
        est.usd = est.gpu_hours * ctx.prices.gpu_usd_per_hour
    return est


def training(ctx, m: ModelSpec, tokens: int, epochs: float) -> Estimate:
    est = Estimate()
    if size_class(m) != "tiny":
        est.gpu_hours = tokens * epochs * TRAIN_SLOWDOWN / ctx.prices.throughput(m) / 3600
        est.usd = est.gpu_hours * ctx.prices.gpu_usd_per_hour
    return est
