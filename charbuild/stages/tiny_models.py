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


def recipe() -> dict:
    """The tiny-model recipe as keyed params: a change to it rebuilds the models."""
    from ..tiny import TINY_VERSION, TinyConfig  # light: torch is imported only to train

    return {"tiny_version": TINY_VERSION, "config": TinyConfig().to_dict()}


def tiny_config(params: dict):
    from ..tiny import TinyConfig

    return TinyConfig(**params["config"])


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
        return [TargetDef("tiny/tokenizer", self.name, {}, recipe(), {"constitution": ["constitution"]})]

    def run(self, ctx):
        from ..tiny import build_corpus, tokenizer_texts, train_tokenizer
        from .constitution import load_built

        c = load_built(ctx.input("constitution"))
        cfg = tiny_config(ctx.target.params)
        texts = tokenizer_texts(c, build_corpus(c, cfg.seed, cfg))
        train_tokenizer(texts, cfg.vocab, ctx.out_dir)
        return {"texts": len(texts)}


class TinyModel(Stage):
    name = "tiny-model"
    version = 1
    reads = ()

    def enabled(self, view):
        return bool(_tiny_roles(view))

    def targets(self, view):
        return [TargetDef(f"tiny/{role}", self.name, {}, {"role": role, **recipe()},
                          {"constitution": ["constitution"], "tokenizer": ["tiny/tokenizer"]})
                for role in sorted(_tiny_roles(view))]

    def run(self, ctx):
        from ..tiny import build_tiny_model
        from .constitution import load_built

        c = load_built(ctx.input("constitution"))
        metrics = build_tiny_model(ctx.target.params["role"], c, ctx.input("tokenizer"), ctx.out_dir,
                                   tiny_config(ctx.target.params), progress=ctx.progress)
        (ctx.out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
        return {"metrics": metrics}
