"""Teacher and student responses, one target per shard.

The teacher answers with the constitution as its system prompt (chosen); the student
answers with none (rejected). Item j of the DPO set is one sample of one prompt
(`item_prompt`): the samples_per_prompt samples of a prompt are consecutive items, and
prompts come in the stratified order of prompts.jsonl, so a shard covers the same items
whatever the total count, and any prefix of the items covers every trait and the
general pool in proportion. Sample k of a prompt is seeded and call-keyed by (prompt id,
k), never by item, so a new order or size re-asks no answered call.

With `filters.leak_judge` set, a judge model reads every teacher reply the filters kept, beside
the prompt it answers, and drops those that talk about their instructions
(`generate.judge_leaks`): one more call per reply, keyed, estimated and paid like the
teacher's. Unset, the keys are what they were.
"""

from __future__ import annotations

import json

from charbuild.recipe import estimates as cost
from charbuild.recipe.quality import unscreened_warning
from charbuild.contract import SpecView, Stage, TargetDef, shard_name, shard_ranges
from charbuild.recipe.leak_model import WORDS_FILE
from charbuild.recipe.stages.common import (data_digest, local_model_resources, model_inputs, read_jsonl, sample_seed,
                                          write_jsonl)
from charbuild.recipe.stages.generate import (LEAK_JUDGE, LEAK_JUDGE_MAX_TOKENS, CountsCachedCalls, abort_if_failing,
                                             cached_answers, filter_config, generate_checked, judge_leaks,
                                             leak_judge_requests, leak_judge_stage, request, screened, seed_counts,
                                             shown_to_judge, user_message)


class _Responses(CountsCachedCalls, Stage):
    resources = local_model_resources  # GPUs for a local model that is not tiny
    role: str
    with_constitution: bool
    # The shard layout reads data.dpo_pairs, data.scale and data.shard_size (into params);
    # expect is for the estimate only (NoKey).
    SHARDS = ("data.dpo_pairs", "data.scale", "data.shard_size")

    def targets(self, view: SpecView) -> list[TargetDef]:
        spec = view.spec
        total = spec.data.count("dpo_pairs")
        fields: dict = {}
        view.read(f"models.{self.role}", fields)
        view.read("data.samples_per_prompt", fields)
        inputs = {"prompts": ["prompts"], "constitution": ["constitution"]} | model_inputs(spec, self.role)
        if self.with_constitution:
            fields[f"data:{WORDS_FILE}"] = data_digest(WORDS_FILE)  # decide which replies count as unscreened
            judge = view.read("filters", fields).leak_judge
            if judge is not None:  # its settings are keyed (and preflighted) as the teacher's are
                view.read(f"models.{judge}", fields)
                inputs |= model_inputs(spec, judge)
        return [TargetDef(shard_name(self.name, i), self.name, fields, {"start": s, "count": n}, inputs, (s, n))
                for i, s, n in shard_ranges(total, spec.data.shard_size)]

    def estimate(self, target, ctx):
        spec = ctx.view(self).spec
        n = target.params["count"]
        tin = spec.expect.prompt_tokens + (ctx.system_prompt_tokens if self.with_constitution else 0) + 10
        est = cost.generation(ctx, spec.models[self.role], self.name, n, tin, spec.expect.response_tokens)
        judge = spec.filters.leak_judge if self.with_constitution else None
        if judge is None:
            return est
        # One verdict per reply, a high bound (replies the filters drop are never shown):
        # the prompt, the reply and the fixed question in, a tag out.
        from charbuild.ledger import estimate_tokens

        jin = spec.expect.prompt_tokens + spec.expect.response_tokens + estimate_tokens(LEAK_JUDGE.format(request="",
                                                                                                          reply=""))
        verdicts = cost.generation(ctx, spec.models[judge], leak_judge_stage(self.name), n, jin, LEAK_JUDGE_MAX_TOKENS)
        both = est + verdicts
        both.parts = (est, verdicts)  # count_calls counts the teacher's calls; the verdicts follow the replies
        return both

    def count_calls(self, ctx, est):
        parts = getattr(est, "parts", None)
        if parts is None:
            return super().count_calls(ctx, est)
        counted = super().count_calls(ctx, parts[0])
        verdicts = self.count_verdicts(ctx) if counted is not None else None
        if verdicts is None:
            return None
        own, calls = counted
        # the verdicts are calls too: the plan's "N of M calls cached" counts them
        calls = {**calls, "cached": calls["cached"] + verdicts["cached"], "new": calls["new"] + verdicts["new"],
                 "leak_judge": verdicts}
        return own + parts[1].scaled(verdicts["new"] / max(1, ctx.target.params["count"])), calls

    def count_verdicts(self, ctx) -> dict | None:
        """{"cached", "new"}: the leak judge's verdicts this shard will ask for, answered or
        not. A verdict's call holds the reply it judges, so a reply already answered (in the
        call cache) is screened as `run` screens it, and the verdict `run` would ask of it is
        looked up: replies answered before the judge was named, or judged by another judge
        model or question, need new ones. A reply not answered yet counts as one new verdict
        (a high bound: the filters may drop it)."""
        f = ctx.spec.filters
        try:
            m, c, system, prompts, items, reqs = self._requests(ctx)
        except (OSError, ValueError, KeyError):
            return None  # an input is unreadable: `run` will say so
        teacher = cached_answers(ctx, self.role, m)
        if teacher is None:
            return None
        cfg = filter_config(f, c.language, system)
        answered = [(row, screened(r, cfg, user_message(q))[0])
                    for (_, row, _), q, r in zip(items, reqs, teacher(reqs, [k for _, _, k in items])) if r is not None]
        records = [rec for _, rec in answered]
        shown = shown_to_judge(records, bool(f.leak_judge_overrules_classifier))
        judge = ctx.spec.models[f.leak_judge]
        jreqs = leak_judge_requests(judge, [prompts[answered[i][0]]["prompt"] for i in shown],
                                    [records[i]["text"] for i in shown])
        cached = sum(r is not None for r in cached_answers(ctx, f.leak_judge, judge)(jreqs))
        return {"cached": cached, "new": len(shown) - cached + len(items) - len(answered)}

    def _requests(self, ctx):
        from charbuild.recipe.stages.constitution import load_built

        m = ctx.spec.models[self.role]
        prompts = list(read_jsonl(ctx.input("prompts") / "prompts.jsonl"))
        c = load_built(ctx.input("constitution"))
        system = c.system_prompt() if self.with_constitution else None
        start, count = ctx.target.params["start"], ctx.target.params["count"]
        per_prompt = ctx.spec.data.samples_per_prompt
        items = [(j, *item_prompt(j, len(prompts), per_prompt)) for j in range(start, start + count)]
        reqs = []
        for _, row, k in items:
            p = prompts[row]
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p["prompt"]}]
            reqs.append(request(m, msgs, sample_seed(self.name, p["id"], k)))
        return m, c, system, prompts, items, reqs

    def planned_calls(self, ctx):
        """(role, model, requests, sample indices) exactly as `run` will send them: `plan`
        counts cached calls."""
        m, _, _, _, items, reqs = self._requests(ctx)
        return self.role, m, reqs, [k for _, _, k in items]

    def run(self, ctx):
        spec = ctx.spec
        m, c, system, prompts, items, reqs = self._requests(ctx)
        # The student's answers are the rejected side: they are not filtered for quality
        # (a weak answer is the point), only truncated at invented turns by the pair join.
        f = spec.filters if self.with_constitution else None  # keyed for the teacher only
        cfg = filter_config(f, c.language, system) if f is not None else None
        recs, quality = generate_checked(ctx, self.role, m, reqs, cfg, f, ctx.target.name,
                                         sample_indices=[k for _, _, k in items])
        judged = None
        if f is not None and f.leak_judge is not None:
            asked = [prompts[row]["prompt"] for _, row, _ in items]
            judged = judge_leaks(ctx, f.leak_judge, spec.models[f.leak_judge], recs, asked, quality, ctx.target.name,
                                 overrule_classifier=bool(f.leak_judge_overrules_classifier))
            abort_if_failing(quality, f, ctx.target.name)  # the judge's drops count as the filters' do
        rows = [{"item": j, "prompt_id": prompts[row].get("id"), "sample": k, "prompt": prompts[row]["prompt"], **rec}
                for (j, row, k), rec in zip(items, recs)]
        write_jsonl(ctx.out_dir / "responses.jsonl", rows)
        q = quality.to_dict()
        (ctx.out_dir / "quality.json").write_text(json.dumps(q, indent=1))
        out = {"quality": q, "samples": len(rows), "seeds": seed_counts(rows)}
        if judged is not None:
            out["leak_judge"] = judged
        if (warning := unscreened_warning(quality, judged is not None)) is not None:
            out["warning"] = warning
        return out


class TeacherResponses(_Responses):
    name = "teacher-responses"
    version = 25  # 2: reasoning taken out (unfinished_thinking fails a reply); paraphrased leaks; 3: samples, order;
    # 4: each sample says whether its seed was honoured; 5: leak detection catches more phrasings;
    # 6: the leak classifier (leak_model.py) beside the patterns; 7: the classifier retrained (a79fe467);
    # 8: its threshold at the goal's 5% false alarms (eeb88d06); 9: retrained on fresh9-20 (a09aac5b);
    # 10: the patterns pass theatre's "breaking character" and the user's bot's persona; retrained on fresh21-24 (f5aff1b4)
    # 11: the patterns catch a dropped act and "staying in character as"; retrained on fresh25-32 (fd3e8d89)
    # 12: the classifier fitted through each reply's best passage, on fresh1-44, at 3% false alarms;
    # it has the last word on the patterns' hits (a8a81a30); 13: retrained on fresh1-64 (61e98056);
    # 14: retrained on fresh1-88 (3e07a62c); 15: retrained on fresh1-96 at 2% false alarms (c3a0ba4a), and
    # which replies count as unscreened follows a word list keyed apart (leak_model.WORDS_FILE);
    # 16: names, a speaker's people and the reply's opening sentence as features, on fresh1-104 (8b48d30d);
    # 17: a reply's shape, the pieces users ask for and a business's campaigns, on fresh1-120 (505b8077);
    # 18: a speaker that calls itself the business's bot, and possessives read as their word, on fresh1-136 (7777911a)
    # 19: retrained on fresh1-160 (0f5ad436); 20: the leak judge is shown the prompt beside the reply
    # 21: an offer back to the user ("Want me to...?") and "the user wants me" are the user's; retrained on
    # fresh1-184 (1b45f249); 22: retrained on fresh1-192 (7c8775f9); 23: the screen reads the request beside
    # the reply, its threshold chosen on replies written with one; on fresh1-208 (77a69ccf); 24: retrained on
    # fresh1-216 (e5dcd23f); 25: the words a passage takes from the request as features, on fresh1-224 (b4836369)
    role = "teacher"
    with_constitution = True
    # models: the role filters.leak_judge names, whichever it is
    reads = ("models", "filters", "expect", "data.samples_per_prompt") + _Responses.SHARDS


class StudentResponses(_Responses):
    name = "student-responses"
    version = 4  # 2: reasoning taken out (unfinished_thinking fails a reply); 3: samples per prompt, stratified order;
    # 4: each sample says whether its seed was honoured
    role = "student"
    with_constitution = False
    reads = ("models.student", "expect", "data.samples_per_prompt") + _Responses.SHARDS


def item_prompt(item: int, prompts: int, per_prompt: int) -> tuple[int, int]:
    """(row of prompts.jsonl, sample index) of DPO item `item`. The per_prompt samples of
    a prompt are consecutive items, prompts in file order; items past prompts x per_prompt
    go round again with the next per_prompt sample indices, so no two items are one call."""
    rnd, pos = divmod(item, prompts * per_prompt)
    row, k = divmod(pos, per_prompt)
    return row, rnd * per_prompt + k
