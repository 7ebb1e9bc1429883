"""The build graph: targets from every enabled stage, wired by name, keyed in order.

Pure: building a graph reads the spec and the constitution, never the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from typing import TYPE_CHECKING

from charbuild.engine.keys import action_key
from charbuild.contract import SpecView, Stage, TargetDef
from charbuild.spec.model import MAX_TARGETS

if TYPE_CHECKING:
    from charbuild.spec.model import LoadedSpec


class GraphError(Exception):
    pass


@dataclass
class Node:
    defn: TargetDef
    stage: Stage
    key: str
    input_keys: dict[str, list[str]]

    @property
    def name(self) -> str:
        return self.defn.name


class Graph:
    def __init__(self, nodes: dict[str, Node]):
        self.nodes = nodes  # in topological order

    def __iter__(self):
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            close = [n for n in self.nodes if n.startswith(name)]
            hint = f"; did you mean {close[0]}?" if close else ""
            raise GraphError(f"no target named {name!r}{hint}") from None

    def upstream(self, names: list[str]) -> list[str]:
        """The targets named and everything they need, in build order."""
        want: set[str] = set()
        stack = list(names)
        while stack:
            n = stack.pop()
            if n in want:
                continue
            want.add(n)
            stack += [i for ins in self[n].defn.inputs.values() for i in ins] + self[n].defn.after
        return [n for n in self.nodes if n in want]

    def downstream(self, name: str) -> list[str]:
        out: set[str] = {name}
        for n, node in self.nodes.items():
            if any(i in out for ins in node.defn.inputs.values() for i in ins):
                out.add(n)
        out.discard(name)
        return [n for n in self.nodes if n in out]


def collect_targets(loaded: LoadedSpec, stages: list[Stage], before: int = 0) -> list[tuple[TargetDef, Stage]]:
    """Every enabled stage's targets; `before` targets were collected already (sub-builds)."""
    out = []
    for stage in stages:
        view = SpecView(loaded, stage.reads, stage.name)
        if stage.enabled(view):
            out += [(t, stage) for t in stage.targets(view)]
            _check_count(before + len(out), stage.name)
    return out


def _check_count(n: int, stage: str) -> None:
    """Keying, planning and scheduling grow with the target count: refuse a graph past
    MAX_TARGETS as it is collected, before anything is keyed."""
    if n > MAX_TARGETS:
        raise GraphError(f"the build graph would have more than {MAX_TARGETS:,} targets ({n:,} by stage {stage}, "
                         "sub-builds included): raise data.shard_size, or lower the data sizes, gates or "
                         "evals.ablation_scales")


def _prefixed(t: TargetDef, prefix: str, sub) -> TargetDef:
    t.name = f"{prefix}/{t.name}"
    t.inputs = {slot: [f"{prefix}/{i}" for i in ins] for slot, ins in t.inputs.items()}
    t.spec = sub
    return t


def build_graph(loaded: LoadedSpec, stages: list[Stage]) -> Graph:
    defs: dict[str, tuple[TargetDef, Stage]] = {}
    found = collect_targets(loaded, stages)
    # Sub-builds (the same recipe at other data scales, for ablations): their targets join
    # this graph under a prefix; any that equal a main target by key are merged below.
    subs = {st.name: st.sub_builds(SpecView(loaded, st.reads, st.name)) for st in stages}
    plain = [st for st in stages if not st.reads_every_target and not subs[st.name]]
    for st in stages:
        for prefix, sub in subs[st.name]:
            found += [(_prefixed(t, prefix, sub), stage) for t, stage in collect_targets(sub, plain, len(found))]
    for t, stage in found:
        if t.name in defs:
            raise GraphError(f"two stages define target {t.name!r} ({defs[t.name][1].name}, {stage.name})")
        defs[t.name] = (t, stage)
    for name, (t, stage) in defs.items():
        if stage.reads_every_target:
            t.inputs["all"] = [n for n, (_, st) in defs.items() if n != name and not st.reads_every_target]
    # Gates sit on edges: whatever consumes a gated target waits for the gate, without the
    # gate entering its key (a new threshold must not retrain an adapter).
    for name, (t, stage) in defs.items():
        for checked in stage.gated(t):
            for other, (o, ostage) in defs.items():
                if ostage.gated(o):
                    continue  # gates on the same target run side by side
                if any(checked in ins for ins in o.inputs.values()):
                    o.after.append(name)
    deps = {}
    for name, (t, _) in defs.items():
        for slot, ins in t.inputs.items():
            for i in ins:
                if i not in defs:
                    raise GraphError(f"target {name!r} needs {i!r} (slot {slot}), which no stage defines")
        deps[name] = {i for ins in t.inputs.values() for i in ins} | set(t.after)
    try:
        order = list(TopologicalSorter(deps).static_order())
    except CycleError as exc:
        raise GraphError(f"cycle in the build graph: {' -> '.join(exc.args[1])}") from None
    nodes: dict[str, Node] = {}
    for name in order:
        t, stage = defs[name]
        input_keys = {slot: [nodes[i].key for i in ins] for slot, ins in sorted(t.inputs.items())}
        key = action_key(stage.name, stage.version, t.fields, t.params, input_keys)
        nodes[name] = Node(t, stage, key, input_keys)
    return Graph(_merge_same_keys(nodes))


def _merge_same_keys(nodes: dict[str, Node]) -> dict[str, Node]:
    """One node per key: a sub-build target identical to a main one is the main one."""
    first: dict[str, str] = {}
    alias: dict[str, str] = {}
    for name, node in sorted(nodes.items(), key=lambda kv: (kv[1].defn.spec is not None, list(nodes).index(kv[0]))):
        if node.key in first:
            alias[name] = first[node.key]
        else:
            first[node.key] = name
    if not alias:
        return nodes
    out = {}
    for name, node in nodes.items():
        if name in alias:
            continue
        d = node.defn
        d.inputs = {slot: list(dict.fromkeys(alias.get(i, i) for i in ins)) if slot == "all" else [alias.get(i, i) for i in ins]
                    for slot, ins in d.inputs.items()}
        d.after = list(dict.fromkeys(alias.get(a, a) for a in d.after))
        out[name] = node
    return out
