"""The constitution as a target: keyed on its parsed content, so comments and key order
in the YAML change nothing, and any change to a trait or marker invalidates downstream."""

from __future__ import annotations

import json

from charbuild.recipe.constitution_file import load_constitution, parse_constitution
from charbuild.contract import SpecView, Stage, TargetDef


class ConstitutionStage(Stage):
    name = "constitution"
    version = 1
    reads = ("constitution",)

    def targets(self, view: SpecView) -> list[TargetDef]:
        c = load_constitution(view.loaded.constitution_path)
        content = {"persona": c.persona, "language": c.language, "markers": list(c.markers),
                   "traits": [{"trait": t.trait, "questions": list(t.questions)} for t in c.traits]}
        return [TargetDef("constitution", self.name, {"constitution": content})]

    def run(self, ctx) -> dict:
        content = ctx.target.fields["constitution"]
        (ctx.out_dir / "constitution.json").write_text(json.dumps(content, indent=1, ensure_ascii=False))
        # From the keyed content, not the file: it may have changed since the graph was keyed.
        c = parse_constitution(content, "constitution")
        (ctx.out_dir / "system_prompt.txt").write_text(c.system_prompt())
        return {"traits": len(c.traits), "markers": len(c.markers)}


def load_built(path) -> "Constitution":  # noqa: F821
    from charbuild.recipe.constitution_file import parse_constitution

    return parse_constitution(json.loads((path / "constitution.json").read_text()), str(path))
