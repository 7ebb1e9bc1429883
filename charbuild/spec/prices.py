"""The one price lookup: what an API model's tokens cost, and how fast a local GPU runs.

Prices come, in order, from the model's own `price:` in the spec, the spec's `prices:`
table, the dated table `charbuild/data/prices.yaml`, and its conservative `default`; all
in USD per million tokens, input and output apart. `PriceTable.usd` turns tokens into
dollars: the plan's estimates, the per-call budget reservations and the ledger's
accounting all use it. GPU figures (usd_per_hour, tokens_per_second) are for local
models' GPU-hour estimates, which are informational: `budget.max_usd` caps API dollars
only (see charbuild.ledger).

Two cheaper rates besides: input tokens the provider served from its prompt cache
(`cached_input`, else `input` x the table's `cached_input_fraction`), and calls made through
a batch API (`batch_input`/`batch_output`, else the online rates x `batch_discount`). Both
default from the table, so a spec that prices a model with just `input`/`output` gets them.

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


# The table's defaults for the cheaper rates, where prices.yaml does not say.
BATCH_DISCOUNT = 0.5  # OpenAI's and Together's batch APIs bill half the online rates
CACHED_INPUT_FRACTION = 0.5  # the highest cached-input rate among the shipped providers: errs high
# `mode: auto` sends a role's calls through the batch API only when the build may take this
# long: providers promise a batch within a 24-hour completion window, not sooner.
BATCH_WINDOW_HOURS = 24.0


def usd_of(price: dict, tokens_in: int, tokens_out: int, cached_in: int = 0, batch: bool = False) -> float:
    """Dollars for tokens at a price {"input": usd per 1M tokens, "output": ..., and the
    optional "cached_input", "batch_input", "batch_output"}. `cached_in` of the `tokens_in`
    were served from the provider's prompt cache; `batch`: the call went through a batch API.
    A price without the optional rates charges them at the online ones (never less)."""
    tin, tout = (("batch_input", "batch_output") if batch else ("input", "output"))
    p_in = float(price.get(tin, price.get("input", 0.0)))
    p_out = float(price.get(tout, price.get("output", 0.0)))
    cached_in = max(0, min(int(cached_in), int(tokens_in)))
    p_cached = float(price.get("cached_input", price.get("input", 0.0)))
    # Discounts do not stack (no provider promises they do): a cached token in a batch costs
    # the lower of the two rates.
    p_cached = min(p_in, p_cached)
    return ((tokens_in - cached_in) * p_in + cached_in * p_cached + tokens_out * p_out) / 1e6


@dataclass
class PriceTable:
    models: dict
    default: dict
    gpu_usd_per_hour: float
    tokens_per_second: dict
    as_of: str
    batch_discount: float = BATCH_DISCOUNT
    cached_input_fraction: float = CACHED_INPUT_FRACTION

    @classmethod
    def load(cls, spec: "Spec | None" = None, path: Path = PRICES_FILE) -> "PriceTable":
        from charbuild.spec.loader import fast_safe_load

        data = fast_safe_load(path.read_text()) if path.exists() else {}
        models = dict(data.get("models") or {})
        if spec is not None:
            for mid, p in spec.prices.items():
                models[mid] = {**_rates(p), "source": "spec"}
        gpu = data.get("gpu") or {}
        return cls(models, data.get("default") or {"input": 1.0, "output": 3.0},
                   float(gpu.get("usd_per_hour", 2.5)), dict(gpu.get("tokens_per_second") or {"8b": 2500}),
                   str(data.get("as_of", "unknown")), float(data.get("batch_discount", BATCH_DISCOUNT)),
                   float(data.get("cached_input_fraction", CACHED_INPUT_FRACTION)))

    def price(self, m: "ModelSpec") -> dict:
        """{"input", "output"}: USD per million tokens of model `m`. A model served on your
        own machines (a loopback or private endpoint) costs nothing per token unless the
        spec prices it (its `price:` or the spec's `prices:`): the shipped table's price for
        the same model id is a provider's. A model nobody priced is charged the table's
        conservative `default`, so that a budget cap still holds (`known` tells the plan)."""
        if m.price is not None:
            return self._complete(_rates(m.price))
        p = self.models.get(m.model)
        if (p is None or p.get("source") != "spec") and is_local_endpoint(getattr(m, "base_url", None)):
            return self._complete({"input": 0.0, "output": 0.0})
        return self._complete(p or self.default)

    def _complete(self, p: dict) -> dict:
        """Every rate of a price: the cheaper ones from the table's fractions where not given."""
        out = {"input": float(p.get("input") or 0.0), "output": float(p.get("output") or 0.0)}
        out["cached_input"] = float(p["cached_input"] if p.get("cached_input") is not None
                                    else out["input"] * self.cached_input_fraction)
        out["batch_input"] = float(p["batch_input"] if p.get("batch_input") is not None
                                   else out["input"] * self.batch_discount)
        out["batch_output"] = float(p["batch_output"] if p.get("batch_output") is not None
                                    else out["output"] * self.batch_discount)
        return out

    def known(self, m: "ModelSpec") -> bool:
        """Whether `price(m)` is a real price rather than the fallback default."""
        return (getattr(m, "backend", None) != "openai" or m.price is not None or m.model in self.models
                or is_local_endpoint(getattr(m, "base_url", None)))

    def usd(self, m: "ModelSpec", tokens_in: int, tokens_out: int, cached_in: int = 0, batch: bool = False) -> float:
        """API dollars for tokens of model `m`; 0 for local models (their cost is GPU time)."""
        if getattr(m, "backend", None) != "openai":
            return 0.0
        return usd_of(self.price(m), tokens_in, tokens_out, cached_in, batch)

    def mode(self, m: "ModelSpec", deadline_hours: float | None) -> str:
        """"online" or "batch": how model `m`'s calls are sent. `mode: auto` picks batch when
        it pays and there is time: an API model whose batch rate is below its online rate,
        and a `budget.deadline_hours` of at least BATCH_WINDOW_HOURS (a batch may take its
        whole 24-hour window); online otherwise. Local backends are always online."""
        if getattr(m, "backend", None) != "openai":
            return "online"
        mode = getattr(m, "mode", "online") or "online"
        if mode != "auto":
            return mode
        p = self.price(m)
        cheaper = p["batch_input"] < p["input"] or p["batch_output"] < p["output"]
        return "batch" if cheaper and deadline_hours is not None and deadline_hours >= BATCH_WINDOW_HOURS else "online"

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


def _rates(p) -> dict:
    """A spec's `Price` as a price dict: the rates it gives, the optional ones left out."""
    out = {"input": p.input, "output": p.output}
    for k in ("cached_input", "batch_input", "batch_output"):
        v = getattr(p, k, None)
        if v is not None:
            out[k] = v
    return out


def is_local_endpoint(base_url: str | None) -> bool:
    """An endpoint on your own machines: loopback, a private or link-local address, localhost,
    a `.local`/`.internal` name, or a bare host name (a container or cluster service such as
    `http://vllm:8000`); no public API lives at one."""
    if not base_url:
        return False
    from urllib.parse import urlsplit
    import ipaddress

    try:
        host = (urlsplit(base_url.strip()).hostname or "").rstrip(".").lower()
    except ValueError:
        return False
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (host == "localhost" or host.endswith((".localhost", ".local", ".internal", ".svc", ".cluster.local"))
                or "." not in host)
    return ip.is_loopback or ip.is_private or ip.is_link_local


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
