"""Tiny models that charbuild builds itself (tokenizer, teacher, student), so smoke builds
and CI run the real recipe offline on a CPU. Enabled when a model is `tiny:teacher` or
`tiny:student`. Cached like any target: the teacher is most of a smoke build's time."""

from __future__ import annotations

import json

from .base import SpecView, Stage, TargetDef
from .common import TINY_PREFIX

ROLES = ("teacher", "student")


def _tiny_roles(view: SpecView) -> set[str]:
    return {m.model[len(TINY_PREFIX):] for m in view.spec.models.values() if m.model.startswith(TINY_PREFIX)}


class TinyTokenizer(Stage):
    name = "tiny-tokenizer"
    version = 1
    reads = ()

    def enabled(self, view):
        roles = _tiny_roles(view)
        unknown = roles - set(ROLES)
        if unknown:
            raise ValueError(f"unknown tiny model(s) {sorted(unknown)}: use tiny:teacher or tiny:student")
        return bool(roles)

    def targets(self, view):
        return [TargetDef("tiny/tokenizer", self.name, {}, {"vocab": 1024, "seed": 0},
                          {"constitution": ["constitution"]})]

    def run(self, ctx):
        from ..tiny import TinyConfig, build_corpus, train_tokenizer
        from .constitution import load_built

        c = load_built(ctx.input("constitution"))
        corpus = build_corpus(c, seed=ctx.target.params["seed"])
        texts = list(corpus["questions"]) + list(corpus["neutral"].values()) + list(corpus["persona"].values()) + list(corpus["narrative"])
        texts.append(c.system_prompt())
        train_tokenizer(texts, TinyConfig().vocab, ctx.out_dir)
        return {"texts": len(texts)}


class TinyModel(Stage):
    name = "tiny-model"
    version = 1
    reads = ()

    def enabled(self, view):
        return bool(_tiny_roles(view))

    def targets(self, view):
        # Both are built whenever one is used: the smoke recipe needs the pair, and the
        # student alone is cheap.
        return [TargetDef(f"tiny/{role}", self.name, {}, {"role": role},
                          {"constitution": ["constitution"], "tokenizer": ["tiny/tokenizer"]})
                for role in sorted(_tiny_roles(view))]

    def run(self, ctx):
        from ..tiny import build_tiny_model
        from .constitution import load_built

        c = load_built(ctx.input("constitution"))
        metrics = build_tiny_model(ctx.target.params["role"], c, ctx.input("tokenizer"), ctx.out_dir,
                                   progress=ctx.progress)
        (ctx.out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
        return {"metrics": metrics}
