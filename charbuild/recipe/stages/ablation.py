"""Ablation across data scales in one spec (the field report's question: does 25% of the
data give a recognisable character, and where do returns diminish?). The recipe is built
again at each scale as a sub-build; shards and targets equal by key are shared, so a
25% build is mostly reused by 50%. The comparison reads each scale's marker rates."""

from __future__ import annotations

import json

from charbuild.spec.model import LoadedSpec
from charbuild.contract import SpecView, Stage, TargetDef


def scale_prefix(scale: float) -> str:
    return f"scale-{round(scale * 100)}pct"


def scaled(loaded: LoadedSpec, scale: float) -> LoadedSpec:
    return loaded.with_scale(scale)


class Ablation(Stage):
    name = "ablation"
    version = 1
    reads = ("evals.ablation_scales", "evals.enabled", "data.scale")  # which scales: sub-builds and params

    def enabled(self, view):
        return view.spec.evals.enabled and bool(view.spec.evals.ablation_scales)

    def sub_builds(self, view: SpecView) -> list[tuple[str, LoadedSpec]]:
        if not self.enabled(view):
            return []
        here = view.spec.data.scale
        return [(scale_prefix(x), view.loaded.with_scale(x)) for x in view.spec.evals.ablation_scales if x != here]

    def targets(self, view):
        here = view.spec.data.scale
        scales = sorted(set(view.spec.evals.ablation_scales) | {here})
        markers = [("eval/markers" if x == here else f"{scale_prefix(x)}/eval/markers") for x in scales]
        return [TargetDef("eval/ablation", self.name, {}, {"scales": scales}, {"markers": markers})]

    def run(self, ctx):
        rows = []
        for scale, d in zip(ctx.target.params["scales"], ctx.inputs["markers"]):
            for r in json.loads((d / "markers.json").read_text()):
                rows.append({**{k: r[k] for k in ("model", "system_prompt", "rate", "ci_low", "ci_high", "n")}, "scale": scale})
        (ctx.out_dir / "ablation.json").write_text(json.dumps(rows, indent=1))
        return {"rows": len(rows)}
