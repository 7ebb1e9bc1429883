"""The constitution as a target: keyed on its parsed content, not the file's bytes, so
comments and key order change nothing, and any change to a trait, question or marker
invalidates downstream (whichever layout the file has: constitution_file)."""

from __future__ import annotations

import json

from charbuild.errors import SpecError
from charbuild.recipe.constitution_file import from_content, load_constitution
from charbuild.contract import SpecView, Stage, TargetDef


class ConstitutionStage(Stage):
    name = "constitution"
    version = 1
    reads = ("constitution",)

    def targets(self, view: SpecView) -> list[TargetDef]:
        content = load_constitution(view.loaded.constitution_path).content()
        return [TargetDef("constitution", self.name, {"constitution": content})]

    def run(self, ctx) -> dict:
        content = ctx.target.fields["constitution"]
        (ctx.out_dir / "constitution.json").write_text(json.dumps(content, indent=1, ensure_ascii=False))
        # From the keyed content, not the file: it may have changed since the graph was keyed.
        c = from_content(content, "constitution")
        (ctx.out_dir / "system_prompt.txt").write_text(c.system_prompt())
        return {"traits": len(c.traits), "markers": len(c.markers)}


def load_built(path) -> "Constitution":  # noqa: F821
    return from_content(json.loads((path / "constitution.json").read_text()), str(path))


def require_markers(view: SpecView, loc: tuple, needed_by: str, remedy: str) -> None:
    """For a stage that counts marker phrases, when the graph is built: with none (the
    paper's layouts have none) it would pass or fail on nothing, so the plan stops there,
    naming the stage, the spec field that asks for it and the constitution. The stage
    declares `constitution` in its reads."""
    path = view.loaded.constitution_path
    if load_constitution(path).markers:
        return
    where = view.loaded.where(loc)
    raise SpecError([{"type": "markers_missing", "loc": loc, "where": str(where or view.loaded.path),
                      "msg": f"{needed_by} needs marker phrases; constitution {path} has none: add `markers:` "
                             f"(a YAML constitution, as in constitutions/*.yaml), or {remedy}"}])
