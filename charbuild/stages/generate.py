"""Generation with online quality filtering, shared by the data stages.

Requests go out in chunks so a stage whose first samples are mostly garbage stops
before it spends the rest (the humorous run should have died after 100 samples).
"""

from __future__ import annotations

from typing import Sequence

from ..backends.base import GenRequest
from ..quality import FilterConfig, QualityAbort, StageQuality, check_text, should_abort
from ..spec import FilterSpec, ModelSpec


def filter_config(f: FilterSpec, language: str, system_prompt: str | None) -> FilterConfig:
    return FilterConfig(min_chars=f.min_chars, max_chars=f.max_chars, language=language,
                        system_prompt=system_prompt, truncate_turns=f.truncate_turns, check_refusal=f.check_refusal)


def request(m: ModelSpec, messages: list[dict], seed: int, max_tokens: int | None = None) -> GenRequest:
    s = m.sampling
    return GenRequest(messages=messages, max_tokens=max_tokens or s.max_tokens, temperature=s.temperature,
                      top_p=s.top_p, stop=tuple(s.stop), seed=seed, repetition_penalty=s.repetition_penalty,
                      frequency_penalty=s.frequency_penalty)


def generate_checked(ctx, role: str, m: ModelSpec, reqs: Sequence[GenRequest], cfg: FilterConfig | None,
                     f: FilterSpec, label: str, chunk: int = 32,
                     sample_indices: Sequence[int] | None = None) -> tuple[list[dict], StageQuality]:
    """One record per request: text (truncated at invented turns), verdict, usage.

    With a call cache on the context, every call is looked up first and stored as it is
    answered; cached calls are not counted as spend. `sample_indices` (one per request)
    tell identical requests apart; by default the n-th occurrence of a request is sample n."""
    backend = ctx.backends.get(role, ctx)
    call_cache = getattr(ctx, "call_cache", None)
    if call_cache is not None:
        from ..callcache import cached_backend_for, occurrence_indices

        backend = cached_backend_for(ctx, role, m, backend, call_cache)
        sample_indices = list(sample_indices) if sample_indices is not None else occurrence_indices(reqs)
    quality = StageQuality()
    out: list[dict] = []
    bar = _bar(len(reqs), label, ctx.progress)
    try:
        for start in range(0, len(reqs), chunk):
            batch = list(reqs[start:start + chunk])
            if call_cache is not None:
                results = backend.generate(batch, sample_indices=sample_indices[start:start + chunk])
            else:
                results = backend.generate(batch)
            for r in results:
                if not r.meta.get("cached"):
                    ctx.budget.add_usage(m, r.prompt_tokens, r.completion_tokens)
                rec = {"raw_chars": len(r.text), "finish_reason": r.finish_reason,
                       "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}
                if cfg is None:
                    rec.update(text=r.text, ok=bool(r.text.strip()), reasons=[] if r.text.strip() else ["empty"])
                else:
                    v = check_text(r.text, cfg, finish_reason=r.finish_reason)
                    quality.add(v)
                    rec.update(text=v.text, ok=v.ok, reasons=list(v.reasons), truncated=v.truncated)
                out.append(rec)
            if bar:
                bar.update(len(batch))
            if cfg is not None and should_abort(quality, f.first_n, f.max_failure_rate):
                raise QualityAbort(
                    f"{label}: {quality.dropped} of the first {quality.checked} samples failed the quality filters "
                    f"({quality.to_dict()['counts']}); stopping before spending the rest. Fix the constitution, "
                    f"sampling (repetition_penalty, stop strings) or model, or raise filters.max_failure_rate.")
    finally:
        if bar:
            bar.close()
    return out, quality


def _bar(total: int, label: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="sample", leave=False)
