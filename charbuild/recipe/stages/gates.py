"""Gates as targets: cached on the checked data and the gate's settings, run before
anything that consumes the checked target (see graph.build_graph)."""

from __future__ import annotations

import json

from charbuild.recipe.gate_checks import MARKER_CHECKS, GateFailed, evaluate
from charbuild.contract import Stage, TargetDef


class GateStage(Stage):
    name = "gate"
    version = 1
    reads = ("gates", "constitution")  # constitution: whether it has the markers a gate counts

    def targets(self, view):
        from charbuild.recipe.stages.constitution import require_markers

        out = []
        for gname, g in view.spec.gates.items():
            if not g.enabled:
                continue
            if g.check in MARKER_CHECKS:
                require_markers(view, ("gates", gname), f"gate {gname} ({g.check})",
                                f"switch the gate off: gates.{gname}.enabled: false")
            fields: dict = {}
            view.read(f"gates.{gname}", fields)
            out.append(TargetDef(f"gate/{gname}", self.name, fields, {"gate": gname},
                                 {"data": [g.target], "constitution": ["constitution"]}))
        return out

    def gated(self, target: TargetDef) -> list[str]:
        return target.inputs["data"]

    def run(self, ctx):
        from charbuild.recipe.stages.constitution import load_built

        gname = ctx.target.params["gate"]
        g = ctx.spec.gates[gname]
        res = evaluate(gname, g.check, g.target, g.threshold, g.severity, g.options, ctx.input("data"),
                       load_built(ctx.input("constitution")))
        if not res.passed and g.severity == "error":
            if gname not in ctx.force_gates:
                raise GateFailed(res)
            res.forced = True
        (ctx.out_dir / "gate.json").write_text(json.dumps(res.to_dict(), indent=1, default=list))
        out = {"gate": res.to_dict()}
        if not res.passed:
            out["warning"] = ("FORCED past failed " if res.forced else "warning: ") + res.message()
        return out
