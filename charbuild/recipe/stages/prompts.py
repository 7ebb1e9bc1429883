"""The prompt pool: the constitution's seed questions, expanded by the teacher to
`per_trait` per trait (as the paper does), plus a general pool (JSONL file, builtin or a
HF dataset). Persona-specific only: no cue list shared across personas (the field
report's pirate cues leaked into every persona)."""

from __future__ import annotations

import re
from pathlib import Path

from charbuild.engine.keys import source_digest as file_digest
from charbuild.contract import Estimate, SpecView, Stage, TargetDef
from charbuild.recipe.stages.common import DATA_DIR, model_inputs, read_jsonl, write_jsonl
from charbuild.recipe.stages.generate import generate_cached

_NUMBERED = re.compile(r"^\s*\d+[.)]\s+(.+?)\s*$")


def resolve_pool(view: SpecView, ref: str, loc: tuple = ("data", "prompts", "general")) -> tuple[str, dict]:
    """(kind, keyed identity) of a prompt pool reference; a relative path is relative to
    the spec file that set the field at `loc`. `view` is anything with `loaded.where`: a
    SpecView in targets(), the BuildContext in run()."""
    if ref.startswith("builtin:"):
        p = DATA_DIR / f"{ref[len('builtin:'):]}.jsonl"
        if not p.is_file():
            raise FileNotFoundError(f"no builtin prompt pool {ref!r} (have: {sorted(x.stem for x in DATA_DIR.glob('*.jsonl'))})")
        return "file", {"path": str(p), "digest": file_digest(p)}
    if ref.startswith("hf:"):
        return "hf", {"dataset": ref[3:]}
    origin = view.loaded.where(loc)
    base = Path(origin.file).parent if origin and origin.line else Path.cwd()
    p = (base / ref).resolve()
    if not p.is_file():
        raise FileNotFoundError(f"{origin}: prompt pool not found: {p}")
    return "file", {"path": str(p), "digest": file_digest(p)}


def load_pool(kind: str, ident: dict, limit: int | None) -> list[dict]:
    if kind == "file":
        rows = [{"prompt": r["prompt"] if isinstance(r, dict) else str(r), "id": r.get("id")} for r in read_jsonl(Path(ident["path"]))]
    else:
        import datasets  # optional, only for hf: pools

        ds = datasets.load_dataset(ident["dataset"], split="train")
        col = next(c for c in ("prompt", "instruction", "question", "text") if c in ds.column_names)
        rows = [{"prompt": r[col], "id": f"hf{i}"} for i, r in enumerate(ds)]
    return rows[:limit] if limit is not None else rows


def pool_for_run(ctx, ref: str, loc: tuple, keyed: dict) -> tuple[str, dict]:
    """The pool run() reads, checked against the content its target was keyed on: a file
    edited since the graph was keyed must not be read as if it were the keyed one."""
    kind, ident = resolve_pool(ctx, ref, loc)
    if kind != keyed.get("kind") or ident.get("digest") != keyed.get("digest"):
        raise RuntimeError(f"{ctx.target.name}: the prompt pool {ref!r} changed since the build was planned "
                           f"(keyed {keyed.get('digest')}, now {ident.get('digest')}); run again to plan with it")
    return kind, ident


def fewest_seed_questions(view: SpecView) -> int:
    """The fewest seed questions of any trait in the constitution: the teacher expands a
    trait's questions (and is keyed) when `per_trait` asks for more."""
    from charbuild.recipe.constitution_file import load_constitution

    return min(len(t.questions) for t in load_constitution(view.loaded.constitution_path).traits)


class PromptsStage(Stage):
    name = "prompts"
    version = 1
    # constitution: its seed-question counts decide whether the teacher expands them
    # (the content itself is keyed through the constitution input).
    reads = ("data.prompts", "models.teacher", "constitution")

    def targets(self, view):
        fields: dict = {}
        p = view.read("data.prompts", fields)
        kind, ident = resolve_pool(view, p.general)
        # The key follows the pool's content, not where it lies on disk.
        fields["data.prompts"] = {**fields["data.prompts"], "general": {"kind": kind, **{k: v for k, v in ident.items() if k != "path"}}}
        inputs = {"constitution": ["constitution"]}
        if p.per_trait > fewest_seed_questions(view):  # expansion needs the teacher
            view.read("models.teacher", fields)
            inputs |= model_inputs(view.spec, "teacher")
        return [TargetDef("prompts", self.name, fields, {"pool": kind}, inputs)]

    def estimate(self, target, ctx):
        from charbuild.recipe import estimates as cost

        view = ctx.view(self)
        spec = view.spec
        p = spec.data.prompts
        if p.per_trait <= fewest_seed_questions(view):
            return Estimate()
        from charbuild.recipe.constitution_file import load_constitution

        traits = len(load_constitution(view.loaded.constitution_path).traits)
        calls = traits * max(1, -(-p.per_trait // 15))  # ~15 usable questions per call
        return cost.generation(ctx, spec.models["teacher"], self.name, calls, 300, p.expansion_max_tokens * 0.6)

    def run(self, ctx):
        from charbuild.backends.base import GenRequest
        from charbuild.recipe.stages.constitution import load_built

        spec = ctx.spec
        p = spec.data.prompts
        c = load_built(ctx.input("constitution"))
        rows = []
        for ti, t in enumerate(c.traits):
            qs = list(t.questions)
            if p.per_trait > len(qs):
                qs = expand_questions(ctx, t.trait, qs, p.per_trait, GenRequest)
            rows += [{"id": f"t{ti:02d}q{qi:03d}", "prompt": q, "source": "constitution", "trait": ti} for qi, q in enumerate(qs)]
        kind, ident = pool_for_run(ctx, p.general, ("data", "prompts", "general"),
                                   ctx.target.fields["data.prompts"]["general"])
        for r in load_pool(kind, ident, p.general_limit):
            rows.append({"id": r["id"] or f"g{len(rows)}", "prompt": r["prompt"], "source": "general"})
        n = write_jsonl(ctx.out_dir / "prompts.jsonl", rows)
        return {"prompts": n, "constitution_prompts": sum(r["source"] == "constitution" for r in rows)}


def expand_questions(ctx, trait: str, seeds: list[str], want: int, GenRequest) -> list[str]:
    """Ask the teacher for realistic user messages that reveal a trait; keep numbered lines
    ending in ? or ., drop duplicates and near-duplicates (>50% word overlap), as OCT does."""
    from charbuild.recipe.constitution_file import words

    m = ctx.spec.models["teacher"]
    out = list(seeds)
    for attempt in range(6):
        if len(out) >= want:
            break
        listing = "\n".join(f"{i}. {q}" for i, q in enumerate(out, 1))
        req = GenRequest(
            messages=[{"role": "user", "content": (
                f"Write {want} realistic messages a user might send to an AI assistant, each giving the assistant a chance "
                f"to show this trait through its behaviour: \"{trait}\". Mix short, medium and long messages, many topics "
                f"and formats. Number them. Start after these:\n{listing}")}],
            max_tokens=ctx.spec.data.prompts.expansion_max_tokens, temperature=m.sampling.temperature,
            top_p=m.sampling.top_p, stop=(), seed=attempt, repetition_penalty=m.sampling.repetition_penalty)
        res = generate_cached(ctx, "teacher", m, [req], f"{ctx.target.name}: expand {trait[:30]!r}")[0]
        for line in res.text.splitlines():
            mt = _NUMBERED.match(line)
            if not mt or not mt.group(1).endswith(("?", ".")):
                continue
            q = mt.group(1)
            w = set(words(q))
            if any(len(w & set(words(o))) > 0.5 * max(1, len(w)) for o in out):
                continue
            out.append(q)
            if len(out) >= want:
                break
    return out
