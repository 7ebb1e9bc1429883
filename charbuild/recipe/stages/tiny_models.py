"""Tiny models that charbuild builds itself (tokenizer, teacher, student), so smoke builds
and CI run the real recipe offline on a CPU. Enabled when a model is `tiny:teacher`,
`tiny:student` or `tiny:thinker` (a hybrid thinking student whose chat template honours
`enable_thinking`, for testing `thinking:`). Cached like any target: the teacher is most of
a smoke build's time."""

from __future__ import annotations

import json

from charbuild.contract import SpecView, Stage, TargetDef
from charbuild.recipe.stages.common import TINY_PREFIX

ROLES = ("teacher", "student", "thinker")  # what charbuild.recipe.tiny.model builds


def _tiny_roles(view: SpecView) -> set[str]:
    return {m.model[len(TINY_PREFIX):] for m in view.spec.models.values() if m.model.startswith(TINY_PREFIX)}


def recipe() -> dict:
    """The tiny-model recipe as keyed params: a change to it rebuilds the models."""
    from charbuild.recipe.tiny.config import TINY_VERSION, TinyConfig  # light: torch is imported only to train

    return {"tiny_version": TINY_VERSION, "config": TinyConfig().to_dict()}


def tiny_config(params: dict):
    from charbuild.recipe.tiny.config import TinyConfig

    return TinyConfig(**params["config"])


class TinyTokenizer(Stage):
    name = "tiny-tokenizer"
    version = 1
    # models: which roles are tiny, whether the stage runs, not what it builds; constitution:
    # whether it has the marker phrases the toy corpus is written with
    reads = ("models", "constitution")

    def enabled(self, view):
        roles = _tiny_roles(view)
        unknown = roles - set(ROLES)
        if unknown:
            raise ValueError(f"unknown tiny model(s) {sorted(unknown)}: use tiny:teacher, tiny:student or tiny:thinker")
        return bool(roles)

    def targets(self, view):
        from charbuild.recipe.stages.constitution import require_markers

        role = min(r for r, m in view.spec.models.items() if m.model.startswith(TINY_PREFIX))
        require_markers(view, ("models", role, "model"), "the tiny models (their training text is made of the markers)",
                        "use real models")
        return [TargetDef("tiny/tokenizer", self.name, {}, recipe(), {"constitution": ["constitution"]})]

    def run(self, ctx):
        from charbuild.recipe.tiny.corpus import build_corpus, tokenizer_texts
        from charbuild.recipe.tiny.tokenizer import train_tokenizer
        from charbuild.recipe.stages.constitution import load_built

        c = load_built(ctx.input("constitution"))
        cfg = tiny_config(ctx.target.params)
        texts = tokenizer_texts(c, build_corpus(c, cfg.seed, cfg))
        train_tokenizer(texts, cfg.vocab, ctx.out_dir)
        return {"texts": len(texts)}


class TinyModel(Stage):
    name = "tiny-model"
    version = 1
    reads = ("models",)  # which roles are tiny (one target per role, named by it)

    def enabled(self, view):
        return bool(_tiny_roles(view))

    def targets(self, view):
        return [TargetDef(f"tiny/{role}", self.name, {}, {"role": role, **recipe()},
                          {"constitution": ["constitution"], "tokenizer": ["tiny/tokenizer"]})
                for role in sorted(_tiny_roles(view))]

    def run(self, ctx):
        from charbuild.recipe.tiny.model import build_tiny_model
        from charbuild.recipe.stages.constitution import load_built

        c = load_built(ctx.input("constitution"))
        metrics = build_tiny_model(ctx.target.params["role"], c, ctx.input("tokenizer"), ctx.out_dir,
                                   tiny_config(ctx.target.params), progress=ctx.progress)
        (ctx.out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
        return {"metrics": metrics}
