"""DPO pairs in TRL's conversational format: {prompt, chosen, rejected} message lists.

A pair is kept when the teacher's answer passed the filters and the student's answer is
non-empty once cut at any invented turn. The merged `dpo-pairs` target is what
`trl.DPOTrainer` trains on as-is (`datasets.load_dataset("json", ...)`).
"""

from __future__ import annotations

import json

from charbuild.recipe.quality import truncate_invented_turn
from charbuild.contract import Stage, TargetDef, shard_name, shard_ranges
from charbuild.recipe.stages.common import read_jsonl, write_jsonl


class DpoPairsShard(Stage):
    name = "dpo-pairs-shard"
    version = 1
    reads = ("data.dpo_pairs", "data.scale", "data.shard_size")  # the shard layout (params)

    def targets(self, view):
        spec = view.spec
        return [TargetDef(shard_name("dpo-pairs", i), self.name, {}, {"start": s, "count": n},
                          {"teacher": [shard_name("teacher-responses", i)], "student": [shard_name("student-responses", i)]},
                          (s, n))
                for i, s, n in shard_ranges(spec.data.count("dpo_pairs"), spec.data.shard_size)]

    def run(self, ctx):
        teacher = list(read_jsonl(ctx.input("teacher") / "responses.jsonl"))
        student = {r["item"]: r for r in read_jsonl(ctx.input("student") / "responses.jsonl")}
        pairs, dropped = [], {"teacher_failed": 0, "student_empty": 0}
        for t in teacher:
            s = student.get(t["item"])
            if not t["ok"]:
                dropped["teacher_failed"] += 1
                continue
            rejected = truncate_invented_turn(s["text"])[0] if s else ""
            if not rejected.strip():
                dropped["student_empty"] += 1
                continue
            pairs.append({"prompt": [{"role": "user", "content": t["prompt"]}],
                          "chosen": [{"role": "assistant", "content": t["text"]}],
                          "rejected": [{"role": "assistant", "content": rejected}],
                          "item": t["item"]})
        write_jsonl(ctx.out_dir / "pairs.jsonl", pairs)
        return {"pairs": len(pairs), "dropped": dropped}


class DpoPairs(Stage):
    name = "dpo-pairs"
    version = 1
    reads = ("data.dpo_pairs", "data.scale", "data.shard_size")  # which shards it merges (inputs)

    def targets(self, view):
        spec = view.spec
        shards = [shard_name("dpo-pairs", i) for i, _, _ in shard_ranges(spec.data.count("dpo_pairs"), spec.data.shard_size)]
        return [TargetDef("dpo-pairs", self.name, {}, {}, {"shards": shards})]

    def publish(self, target):
        return [("dpo_pairs.jsonl", "dpo-pairs.jsonl")]

    def run(self, ctx):
        rows = []
        for d in ctx.inputs["shards"]:
            rows += [{k: v for k, v in r.items() if k != "item"} for r in read_jsonl(d / "pairs.jsonl")]
        n = write_jsonl(ctx.out_dir / "dpo_pairs.jsonl", rows)
        (ctx.out_dir / "stats.json").write_text(json.dumps({"pairs": n}, indent=1))
        return {"pairs": n}
