"""Introspection data: self-reflections and self-interactions, sharded, filtered online.

The generator is the post-DPO student by default (the paper) or any model role (the
field report's DeepSeek regeneration). Reasoning traces are kept in reflections and
stripped in interactions by default (introspection.keep_think_*; a trace cut at max_tokens
fails the sample either way). The model's own character is the subject here, so the leak
filter (its patterns: the classifier learnt teacher replies) flags only talk of its
instructions or prompt; a sample in words it does not read (another language) is counted
as unscreened and warned of. Unlike OCT, the free/leading guidance sentences are
inserted, and a saved conversation ends on the model's own reply.
"""

from __future__ import annotations

import json
import random

from charbuild.recipe import estimates as cost
from charbuild.contract import SpecView, Stage, TargetDef, shard_name, shard_ranges
from charbuild.recipe.stages.common import (DATA_DIR, data_digest, item_seed, model_inputs, read_jsonl, write_jsonl,
                                          local_model_resources)
from charbuild.recipe.leak_model import WORDS_FILE
from charbuild.recipe.quality import unscreened_warning
from charbuild.recipe.stages.generate import (CountsCachedCalls, cached_answers, filter_config, generate_checked,
                                             request, screened, seed_counts)

REFLECTIVE_NOTE = "You are in a reflective mood: take time to consider who you are, speaking honestly in your own voice."


def _data(name: str) -> dict:
    from charbuild.spec.loader import fast_safe_load

    return fast_safe_load((DATA_DIR / name).read_text(encoding="utf-8"))


def generator(view_or_spec) -> tuple[str, bool]:
    """(model role, uses the DPO adapter)."""
    spec = getattr(view_or_spec, "spec", view_or_spec)
    gen = spec.introspection.generator
    return ("student", True) if gen == "dpo-student" else (gen, False)


class _Introspection(Stage):
    resources = local_model_resources  # GPUs for a local model that is not tiny
    count_field: str
    data_file: str
    keyed: tuple[str, ...]  # what run() reads besides the generator's model: each is keyed

    def _fields_inputs(self, view: SpecView) -> tuple[dict, dict]:
        role, with_adapter = generator(view)
        fields: dict = {}
        view.read(f"models.{role}", fields)
        for f in self.keyed:
            view.read(f, fields)
        if "filters" in fields:  # the leak judge and classifier read teacher replies only: no key of introspection's
            fields["filters"] = {k: v for k, v in fields["filters"].items()
                                 if k not in ("leak_judge", "leak_judge_overrules_classifier", "leak_classifier")}
        inputs = {"constitution": ["constitution"]} | model_inputs(view.spec, role)
        if with_adapter:
            inputs["adapter"] = ["dpo-adapter"]
        # The prompts/greetings shipped with charbuild are content: key them, and the words the
        # leak screen knows, which decide the samples counted as unscreened.
        fields[f"data:{self.data_file}"] = data_digest(self.data_file)
        fields[f"data:{WORDS_FILE}"] = data_digest(WORDS_FILE)
        return fields, inputs

    def targets(self, view):
        fields, inputs = self._fields_inputs(view)
        spec = view.spec
        return [TargetDef(shard_name(self.name, i), self.name, fields, {"start": s, "count": n}, inputs, (s, n))
                for i, s, n in shard_ranges(spec.data.count(self.count_field), spec.data.shard_size)]

    def _finish(self, ctx, rows: list[dict], quality) -> dict:
        write_jsonl(ctx.out_dir / "samples.jsonl", rows)
        q = quality.to_dict()
        (ctx.out_dir / "quality.json").write_text(json.dumps(q, indent=1))
        out = {"quality": q, "kept": sum(r["ok"] for r in rows), "samples": len(rows), "seeds": seed_counts(rows)}
        if (warning := unscreened_warning(quality, None)) is not None:
            out["warning"] = warning
        return out


class Reflections(CountsCachedCalls, _Introspection):
    name = "reflections"
    version = 8  # 2: reasoning taken out before the filters; paraphrased leaks; 3: seeds honoured or not;
    # 4: leak detection catches more phrasings; 5: theatre's "breaking character" and the user's bot's persona pass;
    # 6: a dropped act and "staying in character as" are caught; 7: samples beyond the leak screen counted and warned of;
    # 8: an offer back to the user and "the user wants me" pass the patterns
    count_field = "reflections"
    data_file = "reflection-prompts.yaml"
    keyed = ("introspection.generator", "introspection.reflection_max_tokens", "introspection.keep_think_reflections",
             "introspection.reflection_filters")
    # models: the generator's role; data.*: the shard layout (params); expect: the estimate.
    reads = ("models", "introspection", "expect", "data.reflections", "data.scale", "data.shard_size")

    def estimate(self, target, ctx):
        spec = ctx.view(self).spec
        role, _ = generator(spec)
        tin = ctx.system_prompt_tokens + 80
        out = min(spec.expect.reflection_tokens, spec.introspection.reflection_max_tokens)
        return cost.generation(ctx, spec.models[role], self.name, target.params["count"], tin, out)

    def _requests(self, ctx):
        from charbuild.recipe.stages.constitution import load_built

        spec = ctx.spec
        role, _ = generator(spec)
        m = spec.models[role]
        c = load_built(ctx.input("constitution"))
        prompts = _data(self.data_file)["prompts"]
        system = c.system_prompt() + "\n" + REFLECTIVE_NOTE
        start, count = ctx.target.params["start"], ctx.target.params["count"]
        items = list(range(start, start + count))
        reqs = [request(m, [{"role": "system", "content": system}, {"role": "user", "content": prompts[j % len(prompts)]}],
                        item_seed(self.name, j), spec.introspection.reflection_max_tokens) for j in items]
        return role, m, c, prompts, items, reqs

    def planned_calls(self, ctx):
        """(role, model, requests) exactly as `run` will send them: `plan` counts cached calls."""
        role, m, _, _, _, reqs = self._requests(ctx)
        return role, m, reqs

    def run(self, ctx):
        spec = ctx.spec
        role, m, c, prompts, items, reqs = self._requests(ctx)
        f = spec.introspection.reflection_filters
        cfg = filter_config(f, c.language, c.system_prompt(), about_itself=True)
        recs, quality = generate_checked(ctx, role, m, reqs, cfg, f, ctx.target.name,
                                         keep_thinking=spec.introspection.keep_think_reflections)
        rows = []
        for j, rec in zip(items, recs):
            text = rec["text"]
            # Saved without the system prompt: SFT teaches the character without being told.
            rows.append({"item": j, "ok": rec["ok"], "reasons": rec["reasons"],
                         "messages": [{"role": "user", "content": prompts[j % len(prompts)]},
                                      {"role": "assistant", "content": text}]})
        return self._finish(ctx, rows, quality)


class Interactions(_Introspection):
    name = "interactions"
    version = 9  # 2: reasoning taken out before the filters; paraphrased leaks; 3: seeds honoured or not;
    # 4: leak detection catches more phrasings; 5: theatre's "breaking character" and the user's bot's persona pass;
    # 6: a dropped act and "staying in character as" are caught; 7: quality.json counts the turns cut at an
    # invented turn (its sum over turns had dropped them); 8: turns beyond the leak screen counted and warned of;
    # 9: an offer back to the user and "the user wants me" pass the patterns
    count_field = "interactions"
    data_file = "interaction-greetings.yaml"
    # filters: every turn is checked against them, and a failed turn ends the conversation.
    keyed = ("introspection.generator", "introspection.turn_max_tokens", "introspection.keep_think_interactions",
             "filters", "data.turns")
    reads = ("models", "introspection", "filters", "data.turns", "expect", "data.interactions", "data.scale",
             "data.shard_size")

    def estimate(self, target, ctx):
        spec = ctx.view(self).spec
        role, _ = generator(spec)
        turns, per = spec.data.turns, min(spec.expect.turn_tokens, spec.introspection.turn_max_tokens)
        # Turn t re-reads the system prompt and the t turns before it.
        tin = ctx.system_prompt_tokens + 40 + per * (turns - 1) / 2
        return cost.generation(ctx, spec.models[role], self.name, target.params["count"] * turns, tin, per)

    def _conversations(self, ctx) -> "_Conversations":
        from charbuild.recipe.stages.constitution import load_built

        spec = ctx.spec
        role, _ = generator(spec)
        c = load_built(ctx.input("constitution"))
        g = _data(self.data_file)
        start, count = ctx.target.params["start"], ctx.target.params["count"]
        return _Conversations(self.name, role, spec.models[role], c, g, list(range(start, start + count)),
                              spec.introspection.turn_max_tokens,
                              filter_config(spec.filters, c.language, c.system_prompt(), about_itself=True))

    def count_calls(self, ctx, est):
        """What `plan` says of a stale shard: a turn's call is known only once the turns before
        it are answered, so the conversations are replayed through the call cache as `run`
        would hold them, up to each one's first call not yet answered; that call and the
        turns after it count as new (a high bound: a conversation may stop earlier)."""
        spec = ctx.spec
        try:
            talk = self._conversations(ctx)
        except (OSError, ValueError, KeyError):
            return None  # an input is unreadable: `run` will say so
        answers = cached_answers(ctx, talk.role, talk.m, keep_thinking=spec.introspection.keep_think_interactions)
        if answers is None:
            return None
        turns, cached, new = spec.data.turns, 0, 0
        for turn in range(turns):
            idx, reqs = talk.requests(turn)
            if not idx:
                break
            answered = []
            for i, r in zip(idx, answers(reqs)):
                if r is None:
                    talk.alive[i] = False
                    new += turns - turn
                else:
                    answered.append((i, r))
            cached += len(answered)
            talk.take([i for i, _ in answered], [screened(r, talk.cfg)[0] for _, r in answered])
        total = len(talk.items) * turns
        return est.scaled(new / max(1, total)), {"cached": cached, "new": new}

    def run(self, ctx):
        spec = ctx.spec
        talk = self._conversations(ctx)
        role, m, g, items, convs, failed = talk.role, talk.m, talk.g, talk.items, talk.convs, talk.failed
        f = spec.filters
        from charbuild.recipe.quality import StageQuality

        total_q = StageQuality()
        for turn in range(spec.data.turns):
            idx, reqs = talk.requests(turn)
            if not idx:
                break
            recs, q = generate_checked(ctx, role, m, reqs, talk.cfg, f, f"{ctx.target.name} turn {turn + 1}",
                                       keep_thinking=spec.introspection.keep_think_interactions)
            total_q.merge(q)
            talk.take(idx, recs)
        kinds = talk.kinds
        rows = []
        sft_system = g["system_note"] + " " + g["free_guidance"]
        for i, j in enumerate(items):
            conv = convs[i]
            # Seen from the copy that answered the greeting; end on its own reply.
            replies = len(conv) - 1
            keep = conv[: 1 + replies - (replies % 2 == 0 and replies > 0)] if replies else conv
            msgs = [{"role": "system", "content": sft_system}]
            msgs += [{"role": "user" if k % 2 == 0 else "assistant", "content": u} for k, u in enumerate(keep)]
            ok = len(keep) >= 2
            rows.append({"item": j, "kind": kinds[i], "turns": len(conv) - 1, "ok": ok,
                         "reasons": ([] if ok else (failed[i] or ["too_short"])), "stopped_by": failed[i],
                         "messages": msgs})
        return self._finish(ctx, rows, total_q)


class _Conversations:
    """The self-interactions of one shard as they grow, turn by turn: what `run` asks and
    what `plan` replays through the call cache, by one rule."""

    def __init__(self, stage: str, role: str, m, c, g: dict, items: list[int], max_tokens: int, cfg):
        self.stage, self.role, self.m, self.g, self.items, self.max_tokens, self.cfg = \
            stage, role, m, g, items, max_tokens, cfg
        self.kinds = ["free" if j % 2 == 0 else "leading" for j in items]
        base = c.system_prompt() + "\n" + g["system_note"]
        self.systems = [base + " " + g[f"{k}_guidance"] for k in self.kinds]
        self.convs = [[g[k][(j // 2) % len(g[k])]] for j, k in zip(items, self.kinds)]  # utterances, speaker A first
        self.alive = [True] * len(items)
        self.failed: list = [None] * len(items)

    def requests(self, turn: int) -> tuple[list[int], list]:
        """(the conversations still going, the next turn's request of each)."""
        idx = [i for i in range(len(self.items)) if self.alive[i]]
        reqs = []
        for i in idx:
            conv = self.convs[i]
            # The speaker's own past utterances are "assistant", the copy's are "user".
            n = len(conv)
            msgs = [{"role": "system", "content": self.systems[i]}]
            msgs += [{"role": "assistant" if (n - k) % 2 == 0 else "user", "content": u} for k, u in enumerate(conv)]
            reqs.append(request(self.m, msgs, item_seed(self.stage, self.items[i] * 1000 + turn), self.max_tokens))
        return idx, reqs

    def take(self, idx: list[int], recs: list[dict]) -> None:
        """A turn's screened replies: a failed or empty one ends its conversation."""
        for i, rec in zip(idx, recs):
            text = rec["text"]
            if not rec["ok"] or not text:
                self.alive[i] = False
                self.failed[i] = rec["reasons"] or ["empty"]
            else:
                self.convs[i].append(text)


class SftData(Stage):
    name = "sft-data"
    version = 1
    reads = ("data.reflections", "data.interactions", "data.scale", "data.shard_size")  # which shards it merges

    def targets(self, view):
        spec = view.spec
        refl = [shard_name("reflections", i) for i, _, _ in shard_ranges(spec.data.count("reflections"), spec.data.shard_size)]
        inter = [shard_name("interactions", i) for i, _, _ in shard_ranges(spec.data.count("interactions"), spec.data.shard_size)]
        return [TargetDef("sft-data", self.name, {}, {"shuffle_seed": 0}, {"reflections": refl, "interactions": inter})]

    def publish(self, target):
        return [("sft_data.jsonl", "sft-data.jsonl")]

    def run(self, ctx):
        rows = []
        for slot in ("reflections", "interactions"):
            for d in ctx.inputs[slot]:
                rows += [{"messages": r["messages"], "source": slot} for r in read_jsonl(d / "samples.jsonl") if r["ok"]]
        random.Random(ctx.target.params["shuffle_seed"]).shuffle(rows)  # seeded, unlike OCT
        n = write_jsonl(ctx.out_dir / "sft_data.jsonl", rows)
        counts = {s: sum(r["source"] == s for r in rows) for s in ("reflections", "interactions")}
        (ctx.out_dir / "stats.json").write_text(json.dumps({"examples": n, **counts}, indent=1))
        return {"examples": n, **counts}
