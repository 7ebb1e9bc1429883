"""DPO pairs in TRL's conversational format: {prompt, chosen, rejected} message lists.

A pair is kept when the teacher's answer passed the filters and the student's answer is
non-empty once cut at any invented turn, and finished: a student trace cut at max_tokens
left no answer to reject (both sides come without their reasoning, see stages.generate).
The merged `dpo-pairs` target is what `trl.DPOTrainer` trains on as-is
(`datasets.load_dataset("json", ...)`).

Also dropped, as OCT drops them: a student reply that stopped at max_tokens (its answer
never ended: DPO would teach the model to stop mid-sentence less than the teacher does),
and a pair longer than training.dpo.max_length once the student's chat template is
applied (training would cut it, and a cut chosen reply teaches the wrong ending). Each
shard's manifest counts its drops per reason; the merged target adds them up.
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import Callable

from charbuild.recipe.quality import truncate_invented_turn
from charbuild.contract import Stage, TargetDef, shard_name, shard_ranges
from charbuild.recipe.stages.common import model_inputs, read_jsonl, write_jsonl

# What backends report for a reply cut at max_tokens (as charbuild.recipe.quality reads it)
MAX_TOKEN_FINISH = frozenset({"length", "max_tokens", "max_length"})


class DpoPairsShard(Stage):
    name = "dpo-pairs-shard"
    version = 3  # 2: a student reply whose reasoning never finished is dropped; 3: too long, student at max_tokens
    # the shard layout (params), the length limit and the student whose tokenizer measures it
    reads = ("data.dpo_pairs", "data.scale", "data.shard_size", "training.dpo.max_length", "models.student.model",
             "models.student.revision")

    def targets(self, view):
        spec = view.spec
        fields: dict = {}
        for path in ("training.dpo.max_length", "models.student.model", "models.student.revision"):
            view.read(path, fields)
        return [TargetDef(shard_name("dpo-pairs", i), self.name, fields, {"start": s, "count": n},
                          {"teacher": [shard_name("teacher-responses", i)], "student": [shard_name("student-responses", i)]}
                          | model_inputs(spec, "student"), (s, n))
                for i, s, n in shard_ranges(spec.data.count("dpo_pairs"), spec.data.shard_size)]

    def run(self, ctx):
        teacher = list(read_jsonl(ctx.input("teacher") / "responses.jsonl"))
        student = {r["item"]: r for r in read_jsonl(ctx.input("student") / "responses.jsonl")}
        max_length = ctx.spec.training.dpo.max_length
        tokens, counted_with = conversation_tokens(student_tokenizer_dir(ctx))
        pairs, dropped = [], {"teacher_failed": 0, "student_empty": 0, "student_unfinished_thinking": 0,
                              "student_max_tokens": 0, "too_long": 0}
        for t in teacher:
            s = student.get(t["item"])
            if not t["ok"]:
                dropped["teacher_failed"] += 1
                continue
            if s and "unfinished_thinking" in s.get("reasons", ()):
                dropped["student_unfinished_thinking"] += 1
                continue
            rejected, cut = truncate_invented_turn(s["text"]) if s else ("", False)
            if not rejected.strip():
                dropped["student_empty"] += 1
                continue
            # A reply cut at an invented turn had ended its answer: only the invented tail ran on.
            if (s.get("finish_reason") or "").lower() in MAX_TOKEN_FINISH and not cut:
                dropped["student_max_tokens"] += 1
                continue
            pair = {"prompt": [{"role": "user", "content": t["prompt"]}],
                    "chosen": [{"role": "assistant", "content": t["text"]}],
                    "rejected": [{"role": "assistant", "content": rejected}]}
            if max(tokens(pair["prompt"] + pair[side]) for side in ("chosen", "rejected")) > max_length:
                dropped["too_long"] += 1
                continue
            pairs.append({**pair, "item": t["item"]})
        write_jsonl(ctx.out_dir / "pairs.jsonl", pairs)
        stats = {"pairs": len(pairs), "dropped": dropped, "lengths": counted_with}
        (ctx.out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
        return stats


def student_tokenizer_dir(ctx) -> Path | None:
    """Where the student's tokenizer lies on disk: a model charbuild built (tiny), or a
    local model directory; None for a hub id (nothing is downloaded to count tokens)."""
    slot = next(iter(model_inputs(ctx.spec, "student")), None)
    path = Path(ctx.input(slot)) if slot else Path(ctx.spec.models["student"].model)
    return path if (path / "tokenizer_config.json").is_file() else None


def conversation_tokens(tokenizer_dir: Path | None) -> tuple[Callable[[list[dict]], int], str]:
    """(tokens of a conversation as training sees it, how they are counted): the student's
    chat template and tokenizer when they are on disk, else the one estimator."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        if tok.chat_template:
            def count(messages: list[dict]) -> int:
                text = tok.apply_chat_template(messages, tokenize=False)
                return len(tok(text, add_special_tokens=False)["input_ids"])

            return count, "tokenizer"
    from charbuild.ledger import estimate_chat_tokens

    return estimate_chat_tokens, "estimate"


class DpoPairs(Stage):
    name = "dpo-pairs"
    version = 2  # 2: the shards' drops, per reason
    reads = ("data.dpo_pairs", "data.scale", "data.shard_size")  # which shards it merges (inputs)

    def targets(self, view):
        spec = view.spec
        shards = [shard_name("dpo-pairs", i) for i, _, _ in shard_ranges(spec.data.count("dpo_pairs"), spec.data.shard_size)]
        return [TargetDef("dpo-pairs", self.name, {}, {}, {"shards": shards})]

    def publish(self, target):
        return [("dpo_pairs.jsonl", "dpo-pairs.jsonl")]

    def run(self, ctx):
        rows, dropped = [], {}
        for d in ctx.inputs["shards"]:
            rows += [{k: v for k, v in r.items() if k != "item"} for r in read_jsonl(d / "pairs.jsonl")]
            for reason, n in json.loads((d / "stats.json").read_text())["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + n
        n = write_jsonl(ctx.out_dir / "dpo_pairs.jsonl", rows)
        (ctx.out_dir / "stats.json").write_text(json.dumps({"pairs": n, "dropped": dropped}, indent=1))
        return {"pairs": n, "dropped": dropped}
