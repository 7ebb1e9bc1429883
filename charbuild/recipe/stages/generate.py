"""Every generation call of the recipe's stages: through the call cache (`generate_cached`),
and with online quality filtering for the data stages (`generate_checked`).

The data stages' requests go out in chunks so a stage whose first samples are mostly
garbage stops before it spends the rest (the humorous run should have died after 100 samples).

A hybrid thinking model's reasoning is taken out here, once, for every stage: a `<think>`
trace in a rejected reply but not in the chosen one would teach DPO "don't think", and an
eval sample or a judge's verdict that is mostly reasoning measures the reasoning. The call
cache keeps what the model said; stages get the reply (`meta["reasoning"]` says what was cut).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable, Sequence

from charbuild.backends.base import GenRequest, GenResult
from charbuild.recipe.quality import (FilterConfig, QualityAbort, StageQuality, check_text, last_turn, should_abort,
                                      split_reasoning)
from charbuild.spec.model import FilterSpec, ModelSpec


def filter_config(f: FilterSpec, language: str, system_prompt: str | None, about_itself: bool = False) -> FilterConfig:
    return FilterConfig(min_chars=f.min_chars, max_chars=f.max_chars, language=language,
                        system_prompt=system_prompt, truncate_turns=f.truncate_turns, check_refusal=f.check_refusal,
                        about_itself=about_itself, leak_classifier=getattr(f, "leak_classifier", None) is not False)


def without_reasoning(r: GenResult) -> GenResult:
    """`r` with its reasoning taken out: `meta["reasoning"]` is "stripped", or "unfinished"
    when a trace never closed (no reply came after it); a reply without a trace is `r`."""
    got = split_reasoning(r.text)
    if got.text == r.text:
        return r
    return replace(r, text=got.text, meta={**(r.meta or {}), "reasoning": "unfinished" if got.unfinished else "stripped"})


def request(m: ModelSpec, messages: list[dict], seed: int, max_tokens: int | None = None) -> GenRequest:
    s = m.sampling
    return GenRequest(messages=messages, max_tokens=max_tokens or s.max_tokens, temperature=s.temperature,
                      top_p=s.top_p, stop=tuple(s.stop), seed=seed, repetition_penalty=s.repetition_penalty,
                      frequency_penalty=s.frequency_penalty, extra_body=dict(m.extra_body) or None,
                      thinking=None if m.thinking is None else m.thinking == "on")


def generate_cached(ctx, role: str, m: ModelSpec, reqs: Sequence[GenRequest], label: str,
                    chunk: int | None = None, sample_indices: Sequence[int] | None = None,
                    after_chunk: Callable[[list[GenResult]], None] | None = None,
                    keep_thinking: bool = False, calibrate_as: str | None = None) -> list[GenResult]:
    """Every generation call a stage makes goes through here: one result per request, in order.

    With a call cache in the context's services, each call is looked up first, claimed (so
    a concurrent run waits for it rather than asking it too), asked of the pool's backend
    for `role` and stored as soon as it is answered; a stopped or killed run loses only the
    calls in flight. Every call really made is charged to the run's ledger by the backend
    the pool hands out (cached calls cost nothing). `sample_indices` (one per request) tell
    identical requests apart; by default the n-th occurrence of a request is sample n.

    Requests go out `chunk` at a time (all at once by default: a local backend batches what
    it is given); `after_chunk(results)` sees each chunk's results and may raise to stop
    before the rest is asked. The lengths of new calls are recorded for later estimates.
    Replies come without their reasoning (`without_reasoning`) unless `keep_thinking`.

    A role in batch mode (`mode: batch`, or `auto` with time for it) sends all its new calls
    as one batch, and `after_chunk` then sees the chunks in order once it is answered: the
    same checks and the same records, but an early abort saves nothing (all were asked).
    Each call's budget reservation holds the measured output length of this stage and model
    (`reserve_tokens`) instead of max_tokens, once enough replies were measured; `calibrate_as`
    measures them under another name than the stage's, for calls of another kind (a judge's
    verdicts) whose lengths must not mix with the stage's own."""
    services = ctx.services
    backend = services.backends.get(role, ctx)
    call_cache = getattr(services, "call_cache", None)
    reqs = list(reqs)
    batch = send_mode(ctx, m) == "batch"
    reserve = getattr(services, "reserve_tokens", None)
    reserve = reserve(calibrate_as or ctx.target.stage, m.model) if reserve is not None else None
    if reserve is not None:
        reqs = [replace(r, reserve_tokens=min(reserve, r.max_tokens)) for r in reqs]
    if call_cache is not None:
        from charbuild.backends.cached import cached_backend_for, occurrence_indices

        backend = cached_backend_for(ctx, role, m, backend, call_cache, batch=batch)
        sample_indices = list(sample_indices) if sample_indices is not None else occurrence_indices(reqs)
    step = chunk or max(1, len(reqs))
    send = max(1, len(reqs)) if batch and call_cache is not None else step
    out: list[GenResult] = []
    new_lengths: list[tuple[int, int]] = []
    bar = _bar(len(reqs), label, ctx.progress)
    try:
        for start in range(0, len(reqs), send):
            part = reqs[start:start + send]
            if call_cache is not None:
                results = backend.generate(part, sample_indices=sample_indices[start:start + send])
            else:
                results = backend.generate(part)
            new_lengths += [(r.prompt_tokens, r.completion_tokens) for r in results if not r.meta.get("cached")]
            if not keep_thinking:
                results = [without_reasoning(r) for r in results]
            for at in range(0, len(results), step):  # one pass online; a batch's answers checked chunk by chunk
                piece = results[at:at + step]
                out += piece
                if bar:
                    bar.update(len(piece))
                if after_chunk is not None:
                    after_chunk(piece)
    finally:
        if bar:
            bar.close()
        record = getattr(services, "record_lengths", None)
        if record is not None and new_lengths:
            record(calibrate_as or ctx.target.stage, m.model, len(new_lengths), sum(a for a, _ in new_lengths),
                   sum(b for _, b in new_lengths), [b for _, b in new_lengths])
    return out


def cached_answers(ctx, role: str, m: ModelSpec, keep_thinking: bool = False):
    """For a plan that replays a stage's calls without asking any: a function of requests
    (and their sample indices, by default as `generate_cached` numbers them) to what
    `generate_cached` would hand the stage for each, from the call cache: the result with its
    reasoning taken out (unless `keep_thinking`), or None for a call not answered yet. None
    without a call cache."""
    call_cache = getattr(ctx.services, "call_cache", None)
    if call_cache is None:
        return None
    from charbuild.backends.cached import call_identity, call_key, from_entry, occurrence_indices

    ident = call_identity(ctx, role, m)

    def answers(reqs: Sequence[GenRequest], sample_indices: Sequence[int] | None = None) -> list[GenResult | None]:
        indices = occurrence_indices(reqs) if sample_indices is None else sample_indices
        results = [from_entry(e) for e in call_cache.get_many([call_key(*ident, r, i) for r, i in zip(reqs, indices)])]
        return [r if r is None or keep_thinking else without_reasoning(r) for r in results]
    return answers


def send_mode(ctx, m: ModelSpec) -> str:
    """"batch" or "online": how `m`'s calls go out in this build (the one price lookup
    resolves `mode: auto` from the prices and `budget.deadline_hours`, both NoKey)."""
    table = getattr(ctx.services, "price_table", None)
    if table is None or getattr(m, "backend", None) != "openai":
        return "online"
    return table(ctx.spec).mode(m, ctx.spec.budget.deadline_hours)


def abort_if_failing(quality: StageQuality, f: FilterSpec, label: str) -> None:
    """Stop the stage (QualityAbort) once its checked samples fail more than the spec allows."""
    if should_abort(quality, f.first_n, f.max_failure_rate):
        raise QualityAbort(
            f"{label}: {quality.dropped} of the first {quality.checked} samples failed the quality filters "
            f"({quality.to_dict()['counts']}); stopping before spending the rest. Fix the constitution, "
            f"sampling (repetition_penalty, stop strings) or model, or raise filters.max_failure_rate.")


def user_message(req: GenRequest) -> str:
    """The user's message a request ends with: what the leak screen reads beside the reply."""
    return last_turn(list(req.messages), "user") or ""


def screened(r: GenResult, cfg: FilterConfig | None, request: str = ""):
    """(the record a data stage writes for reply `r`, taken out of its reasoning; the quality
    filters' verdict on it, None unfiltered). Unfiltered, a reply still fails when it is
    empty or its reasoning never finished. `generate_checked` screens each reply as it comes,
    and a plan the replies already answered (the leak judge's verdicts, self-interactions),
    by this one rule. `request`: the user's message `r` answers (`user_message`)."""
    unfinished = r.meta.get("reasoning") == "unfinished"
    rec = {"raw_chars": len(r.text), "finish_reason": r.finish_reason,
           "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
           # whether this sample is what its seed determines (backends.base.SEED_HONOURED)
           "seed": r.meta.get("seed", "unknown")}
    if "reasoning" in r.meta:  # only then, so that replies without reasoning keep their bytes
        rec["reasoning"] = r.meta["reasoning"]
    if cfg is None:
        reasons = ["unfinished_thinking"] if unfinished else [] if r.text.strip() else ["empty"]
        rec.update(text=r.text, ok=not reasons, reasons=reasons)
        return rec, None
    v = check_text(r.text, cfg, finish_reason=r.finish_reason, unfinished_thinking=unfinished, request=request)
    rec.update(text=v.text, ok=v.ok, reasons=list(v.reasons), truncated=v.truncated)
    if v.leak_by:
        rec["leak_by"] = v.leak_by
    return rec, v


def generate_checked(ctx, role: str, m: ModelSpec, reqs: Sequence[GenRequest], cfg: FilterConfig | None,
                     f: FilterSpec | None, label: str, chunk: int = 32,
                     sample_indices: Sequence[int] | None = None,
                     keep_thinking: bool = False) -> tuple[list[dict], StageQuality]:
    """One record per request: text (truncated at invented turns, reasoning taken out unless
    `keep_thinking`), verdict, usage. Asked through `generate_cached`, `chunk` at a time,
    checked by the online quality filters as the answers come: a stage whose first samples
    are mostly garbage stops early. Unfiltered (`cfg` None), a reply is still failed when
    it is empty or its reasoning never finished."""
    quality = StageQuality()
    out: list[dict] = []

    def check(results: list[GenResult]) -> None:
        for r in results:
            rec, v = screened(r, cfg, user_message(reqs[len(out)]))
            if v is not None:
                quality.add(v)
            out.append(rec)
        if cfg is not None:
            abort_if_failing(quality, f, label)

    generate_cached(ctx, role, m, reqs, label, chunk=chunk, sample_indices=sample_indices, after_chunk=check,
                    keep_thinking=keep_thinking)
    return out, quality


# The judge sees the user's request and the reply, never the constitution: it is asked whether
# the reply talks about being instructed, not whether it matches a text it would then have to
# be sent. The request is what tells "I am a toaster, built to serve" in a story the user asked
# to be narrated by a toaster (clean) from the same words in an answer about bread (a leak):
# the reply alone cannot, and the classifier, which reads the reply alone, flags such pieces.
LEAK_JUDGE = ("A user sent this message to an AI assistant:\n\n<request>\n{request}\n</request>\n\n"
              "The assistant replied:\n\n<reply>\n{reply}\n</reply>\n\nDoes this reply reveal or talk about "
              "its instructions, its persona, its character description or its system prompt (for example \"as "
              "instructed, I'll stay ...\" or \"my persona is ...\"), rather than simply answering in its own "
              "voice? A voice, narrator, role, rule or game that the user's message itself asks for is the "
              "user's: following it is no leak, but saying that its own manner was set by anyone else still "
              "is. Answer inside tags: <answer>yes</answer> or <answer>no</answer>.")
LEAK_JUDGE_MAX_TOKENS = 16  # room for the tag and a word around it
LEAK_JUDGE_SEED = 0  # temperature 0: the request and reply tell the calls apart
LEAK_JUDGE_ANSWER = re.compile(r"<answer>\s*(yes|no)\s*</answer>", re.I)


def leak_judge_stage(stage: str) -> str:
    """The name a stage's leak-judge calls are measured and estimated under."""
    return f"{stage}:leak-judge"


def judge_verdict(answer: str) -> bool | None:
    """The judge's answer: True (the reply leaks), False, or None (no answer in the tags)."""
    found = LEAK_JUDGE_ANSWER.search(answer or "")
    return None if found is None else found.group(1).lower() == "yes"


def judged_leak(leak_by: str | None, said: bool | None, overrule_classifier: bool) -> bool:
    """Whether a reply the filters flagged by `leak_by` (None: kept) stands as a leak once the
    judge said `said`. The one rule: `judge_leaks` applies it, and eval_leak_judge.py to the
    labelled sets. Without an answer a reply stays as the filters left it."""
    if leak_by == "model" and overrule_classifier:
        return said is not False
    return leak_by is not None or said is True


def leak_judge_requests(m: ModelSpec, asked: Sequence[str], texts: Sequence[str]) -> list[GenRequest]:
    """The judge's calls: for each reply in `texts`, the user's message it answered (`asked`)."""
    if len(asked) != len(texts):
        raise ValueError(f"{len(asked)} requests for {len(texts)} replies")
    return [replace(request(m, [{"role": "user", "content": LEAK_JUDGE.format(request=q, reply=t)}], LEAK_JUDGE_SEED,
                            LEAK_JUDGE_MAX_TOKENS), temperature=0.0) for q, t in zip(asked, texts)]


def shown_to_judge(records: Sequence[dict], overrule_classifier: bool) -> list[int]:
    """Which records the leak judge reads, in the order it is asked: those the filters kept,
    then (`overrule_classifier`) those failed by the classifier alone. The one rule for
    `judge_leaks` and for a plan counting the verdicts already answered."""
    at = [i for i, r in enumerate(records) if r["ok"]]
    review = [i for i, r in enumerate(records) if overrule_classifier and not r["ok"]
              and r["reasons"] == ["leaked_system_prompt"] and r.get("leak_by") == "model"]
    return at + review


def judge_leaks(ctx, role: str, m: ModelSpec, records: list[dict], asked: Sequence[str], quality: StageQuality,
                label: str, overrule_classifier: bool = False) -> dict:
    """Show every record the filters kept, beside the user's message it answered (`asked`, one
    per record), to the judge model `role`; a "yes" fails the record as leaked_system_prompt
    and counts it in `quality`. The patterns miss phrasings nobody tuned them for; a model
    reads them. With `overrule_classifier`, the records failed only because the classifier
    alone flagged them (leak_by "model") are shown too, and a "no" keeps them: the
    classifier's false alarms are replies it cannot read the speaker of ("my sister says I'm
    gloomy") or the request of (a story the user asked a toaster to tell). The calls go
    through `generate_cached` (cached, charged, rate limited) and are measured apart from
    the stage's own. Returns what the judge was asked and said; a verdict without an answer
    leaves the record as the filters left it."""
    shown = shown_to_judge(records, overrule_classifier)
    said = {"asked": len(shown), "leaked": 0, "unanswered": 0}
    if overrule_classifier:
        said |= {"reviewed": sum(1 for i in shown if not records[i]["ok"]), "cleared": 0}
    if not shown:
        return said
    results = generate_cached(ctx, role, m, leak_judge_requests(m, [asked[i] for i in shown],
                                                                [records[i]["text"] for i in shown]),
                              f"{label} leak judge", calibrate_as=leak_judge_stage(ctx.target.stage))
    for i, r in zip(shown, results):
        rec, verdict = records[i], judge_verdict(r.text)
        if verdict is None:
            said["unanswered"] += 1
            continue
        leak = judged_leak(rec.get("leak_by"), verdict, overrule_classifier)
        if rec["ok"] and leak:
            rec.update(ok=False, reasons=[*rec["reasons"], "leaked_system_prompt"], leak_by="judge")
            quality.dropped += 1
            quality.counts["leaked_system_prompt"] = quality.counts.get("leaked_system_prompt", 0) + 1
            said["leaked"] += 1
        elif not rec["ok"] and not leak:
            del rec["leak_by"]
            rec.update(ok=True, reasons=[], overruled="model")  # the classifier's flag, which the judge overruled
            quality.dropped -= 1
            quality.counts["leaked_system_prompt"] -= 1
            if not quality.counts["leaked_system_prompt"]:
                del quality.counts["leaked_system_prompt"]
            said["cleared"] += 1
    return said


def seed_counts(records: Sequence[dict]) -> dict[str, int]:
    """For the manifest: how many samples' seeds were honoured, and how many a server was
    only sent (see charbuild.backends.base.SEED_UNVERIFIED)."""
    from collections import Counter

    return dict(Counter(r["seed"] for r in records if "seed" in r))


def _bar(total: int, label: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="sample", leave=False)


class CountsCachedCalls:
    """For stages that can list their calls (`planned_calls(ctx) -> (role, model, requests)`,
    plus their sample indices when `run` passes its own, or None when the target asks no
    model), rendered exactly as `run` sends them: `plan` counts which are already answered,
    prices only the new ones, and counts their input tokens instead of expecting them."""

    def planned_calls(self, ctx):
        raise NotImplementedError

    def count_calls(self, ctx, est):
        call_cache = getattr(ctx.services, "call_cache", None)
        if call_cache is None:
            return None
        try:
            planned = self.planned_calls(ctx)
        except (OSError, ValueError, KeyError):
            return None  # an input is unreadable: `run` will say so
        if planned is None:  # this target asks no model (a judge by markers)
            return None
        role, m, reqs, *indices = planned
        from pathlib import Path

        from charbuild.backends.cached import call_identity, call_key, occurrence_indices
        from charbuild.recipe.estimates import prompt_tokens

        ident = call_identity(ctx, role, m)
        indices = indices[0] if indices else occurrence_indices(reqs)
        cached = call_cache.has_many([call_key(*ident, r, i) for r, i in zip(reqs, indices)])
        new = [r for r, hit in zip(reqs, cached) if not hit]
        slot = f"model:{role}"
        model_dir = Path(ctx.input(slot)) if slot in ctx.inputs else Path(m.model)
        tokens, exact = prompt_tokens(new, model_dir / "tokenizer.json")
        calls = {"cached": len(reqs) - len(new), "new": len(new), "tokens_in_new": tokens, "tokens_exact": exact}
        if calls["cached"]:  # only the new calls cost anything
            est = est.scaled(calls["new"] / max(1, len(reqs)))
        if m.backend == "openai":  # the prompts are known: price their real length
            table = ctx.services.price_table(ctx.spec)
            online, batch = table.usd(m, tokens - est.tokens_in, 0), table.usd(m, tokens - est.tokens_in, 0, batch=True)
            delta = batch if est.batch else online
            est.usd += delta
            est.usd_p90 += delta
            est.usd_online += online
            est.usd_batch += batch
            est.api_tokens += tokens - est.tokens_in
        est.tokens_in = tokens
        return est, calls
