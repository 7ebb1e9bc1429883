"""Validation gates: declarative checks that run between targets and stop a bad build
before it spends more (the field report's kill criteria, 10.1-10.3).

A gate measures one number on a built target's data and compares it with a threshold.
Each check is a small pure function from rows to (value, failing examples); results
take pydantic's error shape (type, loc, msg, input) so they read like spec errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from charbuild.recipe.constitution_file import Constitution, words
from charbuild.recipe.quality import FilterConfig, check_text
from charbuild.spec.defaults import GATE_CHECKS

# Which file of a target holds its rows, and how to get (text, other) out of a row.
DATA_FILES = {"dpo-pairs": "dpo_pairs.jsonl", "sft-data": "sft_data.jsonl"}


class GateFailed(RuntimeError):
    def __init__(self, result: "GateResult"):
        self.result = result
        super().__init__(result.message())


@dataclass
class GateResult:
    name: str
    check: str
    target: str
    value: float
    threshold: float
    direction: str  # "min": value must be >= threshold; "max": value must be <= threshold
    passed: bool
    severity: str
    n: int
    examples: list[str] = field(default_factory=list)
    forced: bool = False

    def message(self) -> str:
        op = ">=" if self.direction == "min" else "<="
        head = (f"gate {self.name} ({self.check} on {self.target}): {self.value:.3f}, needs {op} {self.threshold:.3f} "
                f"over {self.n} samples")
        ex = "".join(f"\n    e.g. {e[:160]!r}" for e in self.examples[:3])
        return head + ex

    def to_dict(self) -> dict:
        return {"type": f"gate_{self.check}", "loc": (self.target, self.name), "msg": self.message(),
                "input": self.value, "ctx": {"threshold": self.threshold, "direction": self.direction},
                "passed": self.passed, "severity": self.severity, "n": self.n, "examples": self.examples[:5],
                "forced": self.forced}


def _assistant_texts(row: dict) -> tuple[str, str | None]:
    """(the text the gate judges, the rejected text where there is one)."""
    if "chosen" in row:
        return row["chosen"][-1]["content"], row["rejected"][-1]["content"]
    msgs = [m for m in row["messages"] if m["role"] == "assistant"]
    return (msgs[-1]["content"] if msgs else ""), None


def _marker_rate(rows, c: Constitution, opts) -> tuple[float, list[str], str]:
    texts = [_assistant_texts(r)[0] for r in rows]
    missing = [t for t in texts if not c.marker_hits(t)]
    return 1 - len(missing) / max(1, len(texts)), missing, "min"


def _jaccard(a: str, b: str) -> float:
    wa, wb = set(words(a)), set(words(b))
    return len(wa & wb) / max(1, len(wa | wb))


def _differ(rows, c: Constitution, opts) -> tuple[float, list[str], str]:
    """Share of pairs whose chosen and rejected answers clearly differ: different words
    (Jaccard < max_similarity) and the character's markers in chosen but not rejected.
    Without markers (the paper's constitutions) the words alone decide."""
    max_sim = float(opts.get("max_similarity", 0.8))
    same = []
    for r in rows:
        chosen, rejected = _assistant_texts(r)
        if rejected is None:
            continue
        if _jaccard(chosen, rejected) >= max_sim or (c.marker_hits(rejected) and not c.marker_hits(chosen)):
            same.append(f"chosen: {chosen[:70]} | rejected: {rejected[:70]}")
    n = sum(1 for r in rows if "rejected" in r)
    return 1 - len(same) / max(1, n), same, "min"


def _reason_rate(*reasons: str) -> Callable:
    def check(rows, c: Constitution, opts) -> tuple[float, list[str], str]:
        cfg = FilterConfig(language=c.language, min_chars=int(opts.get("min_chars", 20)),
                           max_chars=int(opts.get("max_chars", 20000)))
        bad = []
        for r in rows:
            text = _assistant_texts(r)[0]
            v = check_text(text, cfg)
            if v.truncated and "invented_turn" in reasons:
                bad.append(text)
            elif any(x in v.reasons for x in reasons):
                bad.append(text)
        return len(bad) / max(1, len(rows)), bad, "max"

    return check


CHECKS: dict[str, Callable] = {
    "marker_rate": _marker_rate,
    "differ": _differ,
    "refusal_rate": _reason_rate("refusal"),
    "invented_turn_rate": _reason_rate("invented_turn"),
    "repetition_rate": _reason_rate("repetition"),
    "garbage_rate": _reason_rate("garbage"),
    "length_rate": _reason_rate("too_short", "too_long", "max_tokens", "empty"),
}
assert tuple(CHECKS) == GATE_CHECKS, "the spec's list of gate checks and their implementations differ"

# Checks that measure nothing without marker phrases: refused at plan time on a
# constitution that has none (stages.constitution.require_markers).
MARKER_CHECKS = frozenset({"marker_rate"})


def evaluate(name: str, check: str, target: str, threshold: float, severity: str, options: dict,
             data_dir: Path, constitution: Constitution) -> GateResult:
    if check not in CHECKS:
        raise ValueError(f"gate {name}: unknown check {check!r} (known: {', '.join(CHECKS)})")
    fname = DATA_FILES.get(target)
    if fname is None:
        raise ValueError(f"gate {name}: target {target!r} has no gateable data (gateable: {', '.join(DATA_FILES)})")
    rows = [json.loads(line) for line in (data_dir / fname).read_text(encoding="utf-8").splitlines() if line.strip()]
    value, examples, direction = CHECKS[check](rows, constitution, options)
    passed = bool(rows) and (value >= threshold if direction == "min" else value <= threshold)
    if not rows:
        examples = ["(no rows: every sample was filtered out)"]
    return GateResult(name, check, target, value, threshold, direction, passed, severity, len(rows), examples[:5])
