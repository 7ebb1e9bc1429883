"""Dollars per accepted example: what each stage's built targets were charged, over the
examples they kept after the quality filters. Read from manifests alone (no pydantic, no
stage modules), so a null `plan` can show it and stay fast."""

from __future__ import annotations


def accepted_of(result) -> int | None:
    """How many examples a built target kept after its filters, from its manifest's result:
    `kept`, `pairs` or `examples` where the stage counts them, else its `samples` less those
    its quality filters dropped; None for a target that makes no examples."""
    if not isinstance(result, dict):
        return None
    for k in ("kept", "pairs", "examples"):
        if isinstance(result.get(k), int) and not isinstance(result.get(k), bool):
            return result[k]
    n = result.get("samples")
    if not isinstance(n, int) or isinstance(n, bool):
        return None
    q = result.get("quality")
    return max(0, n - int(q.get("dropped") or 0)) if isinstance(q, dict) else n


def usd_per_accepted(manifests) -> dict[str, dict]:
    """Per stage, over built targets' manifests: API dollars their builds were charged, the
    examples they kept, and dollars per kept example. Only targets whose build paid count:
    one answered from the call cache (or by a local model) says nothing of the price."""
    per: dict[str, dict] = {}
    for m in manifests:
        if not isinstance(m, dict):
            continue
        accepted = accepted_of(m.get("result"))
        usd = float((m.get("usage") or {}).get("usd") or 0.0)
        if accepted is None or usd <= 0:  # a build that paid nothing (answers from the call cache) says nothing
            continue
        g = per.setdefault(str(m.get("stage", "?")), {"usd": 0.0, "accepted": 0, "targets": 0})
        g["usd"] += usd
        g["accepted"] += accepted
        g["targets"] += 1
    return {s: {**g, "usd_per_accepted": g["usd"] / g["accepted"]} for s, g in per.items()
            if g["accepted"] and g["usd"] > 0}
