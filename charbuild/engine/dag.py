"""The graph drawn as a text tree, Mermaid or Graphviz dot. Shards of one stage are
folded into one line so a paper-scale graph stays readable."""

from __future__ import annotations

from charbuild.contract import shard_group
from charbuild.engine.graph import Graph


def _folded(graph: Graph) -> tuple[dict[str, int], dict[str, set[str]]]:
    counts: dict[str, int] = {}
    edges: dict[str, set[str]] = {}
    for node in graph:
        g = shard_group(node.name)
        counts[g] = counts.get(g, 0) + 1
        for ins in node.defn.inputs.values():
            for i in ins:
                edges.setdefault(g, set()).add(shard_group(i))
    return counts, edges


def render(graph: Graph, fmt: str = "text") -> str:
    counts, edges = _folded(graph)
    label = {g: f"{g} (x{n})" if n > 1 else g for g, n in counts.items()}
    if fmt == "mermaid":
        ids = {g: f"n{i}" for i, g in enumerate(counts)}
        lines = ["graph TD"] + [f'  {ids[g]}["{label[g]}"]' for g in counts]
        lines += [f"  {ids[d]} --> {ids[g]}" for g in counts for d in sorted(edges.get(g, ()))]
        return "\n".join(lines)
    if fmt == "dot":
        lines = ["digraph charbuild {", "  rankdir=LR;"] + [f'  "{g}" [label="{label[g]}"];' for g in counts]
        lines += [f'  "{d}" -> "{g}";' for g in counts for d in sorted(edges.get(g, ()))]
        return "\n".join(lines + ["}"])
    lines = []
    for g in counts:
        deps = sorted(edges.get(g, ()))
        lines.append(f"{label[g]}" + (f"  <- {', '.join(deps)}" if deps else ""))
    return "\n".join(lines)
