"""The one price lookup: what an API model's tokens cost, and how fast a local GPU runs.

Prices come, in order, from the model's own `price:` in the spec, the spec's `prices:`
table, the dated table `charbuild/data/prices.yaml`, and its conservative `default`; all
in USD per million tokens, input and output apart. `PriceTable.usd` turns tokens into
dollars: the plan's estimates, the per-call budget reservations and the ledger's
accounting all use it. GPU figures (usd_per_hour, tokens_per_second) are for local
models' GPU-hour estimates, which are informational: `budget.max_usd` caps API dollars
only (see charbuild.ledger).

Bottom layer: the backends, the engine's callers and the recipe import it; it imports no
recipe, backend or engine module (and no pydantic: the spec is only read).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from charbuild.spec.model import ModelSpec, Spec

PRICES_FILE = Path(__file__).resolve().parents[1] / "data" / "prices.yaml"


def usd_of(price: dict, tokens_in: int, tokens_out: int) -> float:
    """Dollars for tokens at a price {"input": usd per 1M tokens, "output": ...}."""
    return (tokens_in * float(price.get("input", 0.0)) + tokens_out * float(price.get("output", 0.0))) / 1e6


@dataclass
class PriceTable:
    models: dict
    default: dict
    gpu_usd_per_hour: float
    tokens_per_second: dict
    as_of: str

    @classmethod
    def load(cls, spec: "Spec | None" = None, path: Path = PRICES_FILE) -> "PriceTable":
        from charbuild.spec.loader import fast_safe_load

        data = fast_safe_load(path.read_text()) if path.exists() else {}
        models = dict(data.get("models") or {})
        if spec is not None:
            for mid, p in spec.prices.items():
                models[mid] = {"input": p.input, "output": p.output, "source": "spec"}
        gpu = data.get("gpu") or {}
        return cls(models, data.get("default") or {"input": 1.0, "output": 3.0},
                   float(gpu.get("usd_per_hour", 2.5)), dict(gpu.get("tokens_per_second") or {"8b": 2500}),
                   str(data.get("as_of", "unknown")))

    def price(self, m: "ModelSpec") -> dict:
        """{"input", "output"}: USD per million tokens of model `m`."""
        if m.price is not None:
            return {"input": m.price.input, "output": m.price.output}
        p = self.models.get(m.model) or self.default
        return {"input": float(p.get("input", 0.0)), "output": float(p.get("output", 0.0))}

    def usd(self, m: "ModelSpec", tokens_in: int, tokens_out: int) -> float:
        """API dollars for tokens of model `m`; 0 for local models (their cost is GPU time)."""
        if getattr(m, "backend", None) != "openai":
            return 0.0
        return usd_of(self.price(m), tokens_in, tokens_out)

    def throughput(self, m: "ModelSpec") -> float:
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


def size_class(m: "ModelSpec") -> str:
    if m.size:
        return m.size
    if m.model.startswith("tiny:"):
        return "tiny"
    b = re.findall(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", m.model)
    return f"{b[0]}b" if b else "8b"
