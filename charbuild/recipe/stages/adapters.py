"""Training targets: the DPO adapter on dpo-pairs, the SFT adapter on sft-data on top of
the DPO result. TRL and PEFT do the work (charbuild.training); this module only wires
spec fields to them and records what they report."""

from __future__ import annotations

from charbuild.recipe import estimates as cost
from charbuild.contract import Estimate, Stage, TargetDef
from charbuild.recipe.stages.common import model_inputs, training_resources


def train_config(t) -> "TrainConfig":  # noqa: F821
    from charbuild.recipe.trainers import TrainConfig

    kw = dict(lora_r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout, target_modules=t.lora.target_modules,
              batch_size=t.batch_size, micro_batch_size=t.micro_batch_size, lr=t.lr, epochs=t.epochs, max_steps=t.max_steps,
              max_length=t.max_length, warmup_ratio=t.warmup_ratio, seed=t.seed, report_to=list(t.report_to), merge=t.merge)
    if hasattr(t, "beta"):
        kw.update(beta=t.beta, nll_coef=t.nll_coef, checkpoints_at=list(t.checkpoints_at))
    return TrainConfig(**kw)


def health(t) -> "Health":  # noqa: F821
    from charbuild.recipe.trainers import Health

    h = t.health
    return Health(max_dpo_loss=h.max_dpo_loss, min_reward_accuracy=h.min_reward_accuracy, warmup_steps=h.warmup_steps,
                  flat_steps=h.flat_steps, enabled=h.enabled)


def dpo_saves_merged(spec) -> bool:
    """training.dpo.merge, and always for a vllm student: vLLM applies one LoRA per request,
    so the SFT variant (the SFT adapter on the DPO model) is served as the SFT LoRA on the
    DPO model's merged weights. Both fields are in the DPO adapter's key (models.student)."""
    return spec.training.dpo.merge or spec.models["student"].backend == "vllm"


def merged_targets(spec) -> dict[str, bool]:
    """Which trained targets save merged weights (`merged/`) that the next stage loads
    instead of applying their adapters (charbuild.backends.weights)."""
    return {"dpo-adapter": dpo_saves_merged(spec), "sft-adapter": spec.training.sft.merge,
            "final": spec.training.final.merged_weights}


def gpu_for_training(ctx):
    """The one GPU for this training stage: every local generation engine closed first, and
    none started until the stage ends (services without a pool, as in tests: nothing to do)."""
    import contextlib

    hold = getattr(ctx.services, "gpu_for_training", None)
    return hold() if hold is not None else contextlib.nullcontext()


def base_model_path(ctx) -> str:
    inputs = model_inputs(ctx.spec, "student")
    if inputs:
        return str(ctx.input(next(iter(inputs))))
    return ctx.spec.models["student"].model


class DpoAdapter(Stage):
    name = "dpo-adapter"
    resources = training_resources  # training: a GPU unless the student is tiny
    version = 1
    reads = ("models.student", "training.dpo", "data.dpo_pairs", "data.scale", "expect")  # data, expect: the estimate

    def targets(self, view):
        fields: dict = {}
        view.read("models.student", fields)
        view.read("training.dpo", fields)
        return [TargetDef("dpo-adapter", self.name, fields, {},
                          {"pairs": ["dpo-pairs"]} | model_inputs(view.spec, "student"))]

    def estimate(self, target, ctx):
        spec = ctx.view(self).spec
        n = spec.data.count("dpo_pairs")
        # Policy and reference see prompt + chosen + rejected.
        tokens = n * (spec.expect.prompt_tokens + 2 * spec.expect.response_tokens) * 2
        return cost.training(ctx, spec.models["student"], tokens, spec.training.dpo.epochs)

    def publish(self, target):
        return [("adapter", "dpo-adapter")]

    def run(self, ctx):
        from dataclasses import replace

        from charbuild.recipe.trainers import train_dpo

        cfg = replace(train_config(ctx.spec.training.dpo), merge=dpo_saves_merged(ctx.spec))
        with gpu_for_training(ctx):
            res = train_dpo(base_model_path(ctx), str(ctx.input("pairs") / "dpo_pairs.jsonl"), str(ctx.out_dir),
                            cfg, health(ctx.spec.training.dpo), progress=ctx.progress)
        return {"metrics": res}


class SftAdapter(Stage):
    name = "sft-adapter"
    resources = training_resources  # training: a GPU unless the student is tiny
    version = 1
    reads = ("models.student", "training.sft", "data.reflections", "data.interactions", "data.turns", "data.scale",
             "expect")  # data, expect: the estimate

    def targets(self, view):
        fields: dict = {}
        view.read("models.student", fields)
        view.read("training.sft", fields)
        return [TargetDef("sft-adapter", self.name, fields, {},
                          {"data": ["sft-data"], "dpo": ["dpo-adapter"]} | model_inputs(view.spec, "student"))]

    def estimate(self, target, ctx):
        spec = ctx.view(self).spec
        n = spec.data.count("reflections") + spec.data.count("interactions")
        per = (spec.expect.reflection_tokens * spec.data.count("reflections")
               + spec.expect.turn_tokens * spec.data.turns * spec.data.count("interactions")) / max(1, n)
        return cost.training(ctx, spec.models["student"], int(n * per), spec.training.sft.epochs) if n else Estimate()

    def publish(self, target):
        return [("adapter", "sft-adapter")]

    def run(self, ctx):
        from charbuild.backends.weights import student_weights
        from charbuild.recipe.trainers import train_sft

        # On the DPO model: its saved merged weights (training.dpo.merge), else the base with the adapter folded in.
        model, _, folded = student_weights(base_model_path(ctx), merge=[ctx.input("dpo")])
        with gpu_for_training(ctx):
            res = train_sft(model, str(ctx.input("data") / "sft_data.jsonl"), str(ctx.out_dir),
                            train_config(ctx.spec.training.sft), health(ctx.spec.training.sft),
                            adapter=next(iter(folded), None), progress=ctx.progress)
        return {"metrics": res}
