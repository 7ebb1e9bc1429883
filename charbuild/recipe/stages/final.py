"""The final model: the DPO and SFT adapters merged into one at training.final's weights
(paper: DPO 1.0 + SFT 0.25, PEFT's linear merge; charbuild.recipe.final_merge). What
evals, `sample` and `chat` use by default."""

from __future__ import annotations

from charbuild.contract import Stage, TargetDef
from charbuild.recipe.stages.adapters import base_model_path, gpu_for_training
from charbuild.recipe.stages.common import model_inputs


class FinalModel(Stage):
    name = "final"
    version = 1
    reads = ("models.student.model", "training.final")

    def targets(self, view):
        fields: dict = {}
        view.read("models.student.model", fields)  # the base the adapters are merged for
        view.read("training.final", fields)
        return [TargetDef("final", self.name, fields, {}, {"dpo": ["dpo-adapter"], "sft": ["sft-adapter"]}
                          | model_inputs(view.spec, "student"))]

    def publish(self, target):
        return [("adapter", "final")]

    def run(self, ctx):
        from charbuild.recipe.final_merge import merge_final

        f = ctx.spec.training.final
        with gpu_for_training(ctx):  # the merge loads the base: no generation engine beside it
            res = merge_final(base_model_path(ctx), str(ctx.input("dpo") / "adapter"), str(ctx.input("sft") / "adapter"),
                              str(ctx.out_dir), f.dpo_weight, f.sft_weight, f.method, f.merged_weights,
                              progress=ctx.progress)
        return {"metrics": res}
