"""Defaults a spec starts from that are lists rather than single values: the stop strings
that end a hallucinated turn, and the gates every build runs unless a spec overrides them.

They live with the spec (the bottom layer) so validating a spec imports no backend and no
recipe module; the gate *checks* themselves are in charbuild.recipe.gate_checks.
"""

from __future__ import annotations

# A reply that starts writing the other side of the conversation is cut there.
ROLE_STOPS = ["\nUser:", "\nAssistant:", "\n\nUser:", "\n\nAssistant:", "\nuser:", "\nassistant:"]

# The checks a gate may name (implemented in charbuild.recipe.gate_checks.CHECKS).
GATE_CHECKS = ("marker_rate", "differ", "refusal_rate", "invented_turn_rate", "repetition_rate", "garbage_rate",
               "length_rate")


def default_gates() -> dict[str, dict]:
    """The field report's kill criteria as gates; a spec overrides them by name."""
    g: dict[str, dict] = {
        "dpo-markers": {"check": "marker_rate", "target": "dpo-pairs", "threshold": 0.8},
        "dpo-differ": {"check": "differ", "target": "dpo-pairs", "threshold": 0.8},
    }
    for target, short in (("dpo-pairs", "dpo"), ("sft-data", "sft")):
        g[f"{short}-refusals"] = {"check": "refusal_rate", "target": target, "threshold": 0.05}
        g[f"{short}-invented-turns"] = {"check": "invented_turn_rate", "target": target, "threshold": 0.02}
        g[f"{short}-repetition"] = {"check": "repetition_rate", "target": target, "threshold": 0.05}
        g[f"{short}-garbage"] = {"check": "garbage_rate", "target": target, "threshold": 0.05}
        g[f"{short}-length"] = {"check": "length_rate", "target": target, "threshold": 0.1}
    return g
