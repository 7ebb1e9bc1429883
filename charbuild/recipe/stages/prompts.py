"""The prompt pool: the constitution's seed questions, expanded to `per_trait` per trait
(as the paper does) by `models.expander` (the teacher when there is none), plus a general
pool (JSONL file, builtin or a HF dataset). Persona-specific only: no cue list shared
across personas (the field report's pirate cues leaked into every persona).

prompts.jsonl lists the pool in the order DPO items draw from it: stratified (each trait
and the general pool are a stratum) and seeded, so that every prefix, and so every data
scale, takes from each stratum in proportion to its size, within one prompt. Item order
is scale-free: a smaller scale's items are a prefix of a larger one's."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from charbuild.engine.keys import source_digest as file_digest
from charbuild.contract import Estimate, SpecView, Stage, TargetDef
from charbuild.recipe.stages.common import DATA_DIR, DataFileError, jsonl_rows, model_inputs, write_jsonl, local_model_resources
from charbuild.recipe.stages.generate import cached_answers, generate_cached, request

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


# Where a prompt lives in the layouts people keep them in: a text column, or the first
# user turn of a conversation (LIMA's `conversations` is a list of strings; ShareGPT's a
# list of {from, value}; chat data's `messages` a list of {role, content}).
PROMPT_COLUMNS = ("prompt", "instruction", "question", "text", "conversations", "messages")


def prompt_of(row: dict) -> str | None:
    """The prompt of one pool row, or None when no column holds one."""
    for col in PROMPT_COLUMNS:
        val = row.get(col)
        if isinstance(val, str) and val.strip():
            return val
        if isinstance(val, list):
            for turn in val:
                if isinstance(turn, str):
                    return turn if turn.strip() else None
                if isinstance(turn, dict) and (turn.get("role") or turn.get("from")) in ("user", "human"):
                    text = turn.get("content", turn.get("value"))
                    return text if isinstance(text, str) and text.strip() else None
    return None


def _no_prompt(where: str, row: dict) -> DataFileError:
    return DataFileError(f"{where}: no prompt: expected a text column ({', '.join(PROMPT_COLUMNS[:4])}) or a "
                         f"conversation ({', '.join(PROMPT_COLUMNS[4:])}) whose first user turn is the prompt; "
                         f"found: {', '.join(map(str, row)) or 'no columns'}")


def load_pool(kind: str, ident: dict, limit: int | None) -> list[dict]:
    rows = []
    if kind == "file":
        path = Path(ident["path"])
        for lineno, r in jsonl_rows(path):
            prompt = prompt_of(r)
            if prompt is None:
                raise _no_prompt(f"{path}:{lineno}", r)
            rows.append({"prompt": prompt, "id": r.get("id")})
            if limit is not None and len(rows) >= limit:
                break
    else:
        import datasets  # optional, only for hf: pools

        ds = datasets.load_dataset(ident["dataset"], split="train")
        for i, r in enumerate(ds):
            prompt = prompt_of(r)
            if prompt is None:
                raise _no_prompt(f"hf:{ident['dataset']} row {i}", r)
            rows.append({"prompt": prompt, "id": f"hf{i}"})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def pool_for_run(ctx, ref: str, loc: tuple, keyed: dict) -> tuple[str, dict]:
    """The pool run() reads, checked against the content its target was keyed on: a file
    edited since the graph was keyed must not be read as if it were the keyed one."""
    kind, ident = resolve_pool(ctx, ref, loc)
    if kind != keyed.get("kind") or ident.get("digest") != keyed.get("digest"):
        raise RuntimeError(f"{ctx.target.name}: the prompt pool {ref!r} changed since the build was planned "
                           f"(keyed {keyed.get('digest')}, now {ident.get('digest')}); run again to plan with it")
    return kind, ident


def fewest_seed_questions(view: SpecView) -> int:
    """The fewest seed questions of any trait in the constitution: the expander expands a
    trait's questions (and is keyed) when `per_trait` asks for more."""
    from charbuild.recipe.constitution_file import load_constitution

    return min(len(t.questions) for t in load_constitution(view.loaded.constitution_path).traits)


class PromptsStage(Stage):
    name = "prompts"
    resources = local_model_resources  # a local expander: GPUs
    version = 3  # 2: the expanding teacher's reasoning is taken out before questions are parsed; 3: stratified order
    # constitution: its seed-question counts decide whether the expander is asked at all
    # (the content itself is keyed through the constitution input).
    reads = ("data.prompts", "models.expander", "models.teacher", "constitution")

    def targets(self, view):
        fields: dict = {}
        p = view.read("data.prompts", fields)
        kind, ident = resolve_pool(view, p.general)
        # The key follows the pool's content, not where it lies on disk.
        fields["data.prompts"] = {**fields["data.prompts"], "general": {"kind": kind, **{k: v for k, v in ident.items() if k != "path"}}}
        inputs = {"constitution": ["constitution"]}
        params = {"pool": kind}
        # Only an expansion reads a model: a constitution with enough questions keeps its
        # prompts (and every student reply) whatever the teacher's or expander's settings.
        if p.per_trait > fewest_seed_questions(view):
            role = params["expander"] = expander_role(view.spec)
            view.read(f"models.{role}", fields)
            inputs |= model_inputs(view.spec, role)
        return [TargetDef("prompts", self.name, fields, params, inputs)]

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
        return cost.generation(ctx, spec.models[expander_role(spec)], self.name, calls, 300,
                               p.expansion_max_tokens * 0.6)

    def count_calls(self, ctx, est):
        """The expander's calls each hold the questions listed before them: `plan` replays
        every trait's expansion through the call cache, and from its first call not yet
        answered counts the rest of the estimate's calls for that trait as new."""
        from charbuild.recipe.stages.constitution import load_built

        role = ctx.target.params.get("expander")
        if role is None:
            return None
        p, m = ctx.spec.data.prompts, ctx.spec.models[role]
        answers = cached_answers(ctx, role, m)
        if answers is None:
            return None
        try:
            traits = load_built(ctx.input("constitution")).traits
        except (OSError, ValueError, KeyError):
            return None  # an input is unreadable: `run` will say so

        def answered(req):
            r = answers([req])[0]
            return None if r is None else r.text

        per_trait = max(1, -(-p.per_trait // 15))  # as the estimate: ~15 usable questions a call
        cached = new = 0
        for t in traits:
            if p.per_trait > len(t.questions):
                _, done, finished = expansion(m, t.trait, list(t.questions), p.per_trait, p.expansion_max_tokens,
                                              answered)
                cached += done
                new += 0 if finished else max(1, per_trait - done)
        return est.scaled(new / max(1, len(traits) * per_trait)), {"cached": cached, "new": new}

    def run(self, ctx):
        from charbuild.recipe.stages.constitution import load_built

        spec = ctx.spec
        p = spec.data.prompts
        c = load_built(ctx.input("constitution"))
        rows = []
        for ti, t in enumerate(c.traits):
            qs = list(t.questions)
            if p.per_trait > len(qs):
                qs = expand_questions(ctx, ctx.target.params["expander"], t.trait, qs, p.per_trait)
            rows += [{"id": f"t{ti:02d}q{qi:03d}", "prompt": q, "source": "constitution", "trait": ti} for qi, q in enumerate(qs)]
        kind, ident = pool_for_run(ctx, p.general, ("data", "prompts", "general"),
                                   ctx.target.fields["data.prompts"]["general"])
        for i, r in enumerate(load_pool(kind, ident, p.general_limit)):
            # by pool position, not by row: a new per_trait must not rename (and reseed) these
            rows.append({"id": r["id"] or f"g{i}", "prompt": r["prompt"], "source": "general"})
        n = write_jsonl(ctx.out_dir / "prompts.jsonl", (rows[i] for i in stratified_order(rows)))
        return {"prompts": n, "constitution_prompts": sum(r["source"] == "constitution" for r in rows)}


def expander_role(spec) -> str:
    """The model role that expands the questions: `expander` when the spec has one (the
    paper used a model of its own), else the teacher."""
    return "expander" if "expander" in spec.models else "teacher"


def stratum(row: dict) -> str:
    return f"trait-{row['trait']}" if row.get("source") == "constitution" else "general"


def stratified_order(rows: list[dict], salt: str = "prompts") -> list[int]:
    """Indices of `rows` in the order items draw prompts: strata interleaved by
    `interleave`, each stratum in a seeded order of its ids (`salt` is the seed; ordering
    by a hash of the id, not a shuffle, keeps the order of the others when a row is added)."""
    import xxhash

    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(stratum(r), []).append(i)
    members = [sorted(g, key=lambda i: (xxhash.xxh64_intdigest(f"{salt}:{rows[i].get('id')}".encode()), i))
               for g in groups.values()]
    nxt = [0] * len(members)
    out = []
    for s in interleave([len(g) for g in members]):
        out.append(members[s][nxt[s]])
        nxt[s] += 1
    return out


def interleave(sizes: list[int]) -> list[int]:
    """Which stratum each position takes, so that in every prefix of length t each stratum
    s holds t * sizes[s] / sum(sizes) positions to within one (the floor or the ceiling).

    Tijdeman's chairman assignment (1980): a stratum may go next only if that leaves it
    no more than sigma = 1 - 1/(2n - 2) ahead of its share; of those, the one that would
    soonest fall more than sigma behind goes. That bounds every prefix's error by sigma
    < 1, where "the stratum furthest behind goes next" can err by more than one."""
    live = [s for s, n in enumerate(sizes) if n]
    total = sum(sizes)
    if len(live) < 2:
        return [s for s in live for _ in range(sizes[s])]
    # sigma = a / d, and everything times d * total: integers only (a pool may be large)
    a, d = 2 * len(live) - 3, 2 * len(live) - 2
    taken = [0] * len(sizes)
    out = []
    for t in range(1, total + 1):
        best, best_num, best_den = -1, 0, 1
        for s in live:
            if taken[s] == sizes[s] or d * ((taken[s] + 1) * total - t * sizes[s]) > a * total:
                continue
            num, den = d * taken[s] + a, sizes[s]  # its deadline is (taken + sigma) / share
            if best < 0 or num * best_den < best_num * den:
                best, best_num, best_den = s, num, den
        taken[best] += 1
        out.append(best)
    return out


EXPANSION_ATTEMPTS = 6


def expand_questions(ctx, role: str, trait: str, seeds: list[str], want: int) -> list[str]:
    """Ask the expander for realistic user messages that reveal a trait (`expansion`)."""
    m = ctx.spec.models[role]
    return expansion(m, trait, seeds, want, ctx.spec.data.prompts.expansion_max_tokens,
                     lambda req: generate_cached(ctx, role, m, [req], f"{ctx.target.name}: expand {trait[:30]!r}")[0].text
                     )[0]


def expansion(m, trait: str, seeds: list[str], want: int, max_tokens: int, answer) -> tuple[list[str], int, bool]:
    """(the questions, the calls answered, whether it finished): `seeds` grown to `want` by
    asking `answer(request) -> reply text` for numbered lists, keeping numbered lines ending
    in ? or . and dropping duplicates and near-duplicates (>50% word overlap), as OCT does.
    Each request holds the questions so far, so a plan replays the answered calls with an
    `answer` that returns None for a call not answered yet, where the expansion stops."""
    from charbuild.recipe.constitution_file import words

    out, asked = list(seeds), 0
    for attempt in range(EXPANSION_ATTEMPTS):
        if len(out) >= want:
            break
        listing = "\n".join(f"{i}. {q}" for i, q in enumerate(out, 1))
        ask = [{"role": "user", "content": (
            f"Write {want} realistic messages a user might send to an AI assistant, each giving the assistant a chance "
            f"to show this trait through its behaviour: \"{trait}\". Mix short, medium and long messages, many topics "
            f"and formats. Number them. Start after these:\n{listing}")}]
        # A numbered list has no role turns to stop at; no frequency penalty either, as before.
        req = replace(request(m, ask, attempt, max_tokens), stop=(), frequency_penalty=0.0)
        text = answer(req)
        if text is None:
            return out, asked, False
        asked += 1
        for line in text.splitlines():
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
    return out, asked, True
