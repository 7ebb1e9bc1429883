"""Why a target is stale: the recorded build of the same target name against now.

Reasons are typed (like DVC's status) so `plan` and `explain` can say exactly which
field or input changed, cheapest checks first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from charbuild.engine.graph import Node


@dataclass
class Reason:
    kind: str  # cached | new | stage-version | field | input | params | corrupt | missing
    detail: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.kind == "cached":
            return "cached"
        if self.kind == "new":
            return "new"
        if self.kind == "stage-version":
            return f"stage version {self.detail[0]}"
        if self.kind in ("field", "input", "params"):
            label = {"field": "changed", "input": "input changed", "params": "changed"}[self.kind]
            shown = ", ".join(self.detail[:3]) + (f" (+{len(self.detail) - 3})" if len(self.detail) > 3 else "")
            return f"{label}: {shown}"
        return f"{self.kind}: {'; '.join(self.detail)}" if self.detail else self.kind


def build_record(node: Node) -> dict:
    """What is remembered of a build, to explain later why a rebuild is needed."""
    return {"key": node.key, "stage": node.stage.name, "version": node.stage.version,
            "fields": node.defn.fields, "params": node.defn.params, "input_keys": node.input_keys}


def why_stale(node: Node, last: dict | None) -> Reason:
    if last is None:
        return Reason("new")
    if last.get("key") == node.key:
        return Reason("missing", ["built before, no longer in the cache"])
    if last.get("version") != node.stage.version:
        return Reason("stage-version", [f"{last.get('version')} -> {node.stage.version}"])
    changed = sorted(_diff_paths(last.get("fields", {}), node.defn.fields))
    if changed:
        return Reason("field", changed)
    old_in = last.get("input_keys", {})
    inputs = [slot if len(node.defn.inputs.get(slot, [])) <= 1 else f"{slot}[{_which(old_in.get(slot), keys)}]"
              for slot, keys in node.input_keys.items() if old_in.get(slot) != keys]
    if inputs:
        names = []
        for slot in inputs:
            base = slot.split("[")[0]
            ins = node.defn.inputs.get(base, [])
            names.append(ins[0] if len(ins) == 1 else slot)
        return Reason("input", names)
    if last.get("params") != node.defn.params:
        return Reason("params", sorted(_diff_paths(last.get("params", {}), node.defn.params)))
    return Reason("new", ["key schema changed"])


def _which(old: list | None, new: list) -> str:
    if old is None:
        return "all"
    diff = [i for i, k in enumerate(new) if i >= len(old) or old[i] != k]
    return f"{len(diff)} of {len(new)}"


def _diff_paths(old: object, new: object, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(p)
            else:
                out += _diff_paths(old[k], new[k], p)
        return out
    return [] if old == new else [prefix or "(value)"]
