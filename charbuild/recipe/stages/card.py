"""The dataset card at the top of outputs/<run>/: its YAML names the published data files
as configs, so `datasets.load_dataset("outputs/<run>", "dpo")` reads the DPO pairs and
nothing else in the folder (adapters with their tokenizer files, plots, the report)."""

from __future__ import annotations

from charbuild.contract import Stage, TargetDef
from charbuild.recipe.export import dataset_card, filter_counts, spent

# config -> (the target that publishes it, its name in outputs/<run>/, its row count in the manifest)
PUBLISHED = {"dpo": ("dpo-pairs", "dpo-pairs.jsonl", "pairs"), "sft": ("sft-data", "sft-data.jsonl", "examples")}


class DatasetCard(Stage):
    name = "dataset-card"
    version = 1
    keyed = ("name", "persona", "models.teacher.model", "models.student.model")  # what the card prints
    reads = keyed
    reads_every_target = True  # filter counts and cost from every manifest

    def targets(self, view):
        fields: dict = {}
        for f in self.keyed:
            view.read(f, fields)
        return [TargetDef("card", self.name, fields, {}, {"all": []})]

    def publish(self, target):
        return [("README.md", "README.md")]

    def run(self, ctx):
        import json

        manifests = []
        for d in ctx.inputs["all"]:
            try:
                manifests.append(json.loads((d / "MANIFEST.json").read_text()))
            except (OSError, ValueError):
                continue
        by_target = {m["target"]: m for m in manifests}
        configs = [c for c, (t, _, _) in PUBLISHED.items() if t in by_target]
        rows = {c: (by_target[t].get("result") or {}).get(n, 0) for c, (t, _, n) in PUBLISHED.items() if t in by_target}
        card = dataset_card(ctx.spec, configs, filter_counts(manifests), spent(manifests), rows,
                            {c: PUBLISHED[c][1] for c in configs})
        (ctx.out_dir / "README.md").write_text(card, encoding="utf-8")
        return {"configs": configs}
