"""The dress rehearsal (specs/rehearsal.yaml) stays a rehearsal of the paper spec: the same
stages and target kinds as remorseful-paper.yaml with the field report's ablation, and no
setting changed beyond where the models live, how much data there is, and what tiny
models need. Graph and spec only: the build itself is `make rehearse`, which CI runs
right after the test suite; a copy of it here would build the same 2.5 minutes (on the
shared 2-core machine, under load) twice per CI run and check nothing more."""

import re
from pathlib import Path

import pytest
from charbuild.recipe.registry import recipe_graph
from charbuild.spec.model import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
REHEARSAL = SPECS / "rehearsal.yaml"

# Where the student lives: charbuild trains the tiny thinker itself, the paper downloads Qwen3-8B.
WHERE_MODELS_LIVE_STAGES = {"tiny-tokenizer", "tiny-model"}

# Every spec field the rehearsal may set otherwise than the paper (prefixes count).
ALLOWED = (
    "name",
    # where the models live
    *(f"models.{r}.{f}" for r in ("teacher", "expander", "judge") for f in ("base_url", "api_key_env")),
    "models.student.backend", "models.student.model", "models.student.size",
    "models.student.max_lora_rank",  # a vLLM engine setting, unset for a transformers student
    # how much data
    "data.dpo_pairs", "data.reflections", "data.interactions", "data.shard_size", "evals.prompts_limit",
    # what tiny models need (specs/rehearsal.yaml says why, line by line)
    "models.student.sampling.max_tokens", "evals.max_tokens", "evals.preferences_max_tokens",
    "introspection.reflection_max_tokens", "introspection.turn_max_tokens", "introspection.reflection_filters",
    "gates.sft-length.options.min_chars",  # the reflection filters' floor, as for the smoke build
    "training.dpo.batch_size",
)


def paper(sets=()):
    """The paper spec with the field report's ablation (remorseful-ablation.yaml's scales,
    read from it, so a change there reaches the rehearsal through this test)."""
    scales = load_spec(SPECS / "remorseful-ablation.yaml").spec.evals.ablation_scales
    return load_spec(SPECS / "remorseful-paper.yaml", [f"evals.ablation_scales={scales}", *sets])


def kinds(loaded) -> set[tuple[str, str]]:
    """(stage, target name) with shard numbers and ablation-scale prefixes normalised."""
    out = set()
    for node in recipe_graph(loaded):
        if node.stage.name in WHERE_MODELS_LIVE_STAGES:
            continue
        name = re.sub(r"shard-\d+", "shard-*", re.sub(r"^scale-\d+pct/", "scale-*/", node.name))
        out.add((node.stage.name, name))
    return out


def flat(d, path=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from flat(v, (*path, str(k)))
    else:
        yield ".".join(path), d


def drift(sets=()) -> list[str]:
    """How the rehearsal (with `sets`) has drifted from the paper spec: target kinds one has
    and the other lacks, and fields set otherwise beyond ALLOWED."""
    rehearsal = load_spec(REHEARSAL, list(sets))
    ref = paper()
    want, got = kinds(ref), kinds(rehearsal)
    problems = [f"only the paper builds {s} {n}" for s, n in sorted(want - got)]
    problems += [f"only the rehearsal builds {s} {n}" for s, n in sorted(got - want)]
    a, b = dict(flat(ref.spec.model_dump())), dict(flat(rehearsal.spec.model_dump()))
    for field in sorted(set(a) | set(b)):
        if a.get(field, "<unset>") != b.get(field, "<unset>") and not field.startswith(ALLOWED):
            problems.append(f"{field}: the paper's {a.get(field, '<unset>')!r}, the rehearsal's {b.get(field, '<unset>')!r}")
    return problems


def test_the_rehearsal_builds_every_kind_of_target_the_paper_spec_builds_and_changes_nothing_else():
    assert drift() == []


@pytest.mark.parametrize("change", [
    "evals.preferences=false",  # no revealed preferences
    "evals.ablation_scales=[]",  # no ablation
    "evals.preferences_mode=charbuild",  # same targets, not the paper's preferences
    "training.dpo.checkpoints_at=[]",  # same targets, no checkpoints inside the DPO adapter
    "models.student.thinking=on",
    "training.final.sft_weight=1.0",
    "introspection.generator=teacher",
])
def test_a_rehearsal_that_skips_or_changes_what_the_paper_runs_is_caught(change):
    assert drift([change]) != []


def test_each_ablation_scale_is_a_build_of_its_own_with_its_own_data():
    rehearsal = load_spec(REHEARSAL)
    graph = {n.name: n for n in recipe_graph(rehearsal)}
    scales = rehearsal.spec.evals.ablation_scales
    assert scales == paper().spec.evals.ablation_scales and scales
    prefixes = [""] + [f"scale-{round(x * 100)}pct/" for x in scales]
    for kind in ("dpo-pairs", "dpo-adapter", "sft-adapter", "final", "eval/markers"):
        assert len({graph[p + kind].key for p in prefixes}) == len(prefixes), kind
    pairs = [rehearsal.with_scale(x).spec.data.count("dpo_pairs") for x in scales] + [rehearsal.spec.data.count("dpo_pairs")]
    assert len(set(pairs)) == len(pairs) and min(pairs) >= 1, pairs
    assert "eval/ablation" in graph


def test_the_rehearsal_is_about_one_percent_of_the_paper_and_pays_nothing():
    r, p = load_spec(REHEARSAL).spec, paper().spec
    for field in ("dpo_pairs", "reflections", "interactions"):
        assert getattr(r.data, field) * 100 == getattr(p.data, field), field
    for role in ("teacher", "expander", "judge"):
        assert r.models[role].backend == "openai" and r.models[role].base_url.startswith("http://127.0.0.1:"), role
    assert r.models["student"].model == "tiny:thinker" and r.models["student"].thinking == p.models["student"].thinking == "off"


def test_the_rehearsal_plans_at_zero_dollars_and_no_gpu(capsys, cache_dir):
    import json

    from charbuild.cli import main

    assert main(["plan", str(REHEARSAL), "--json", "--cache", str(cache_dir)]) == 0
    total = json.loads(capsys.readouterr().out)["total"]
    assert total["est_usd"] == 0 and total["est_gpu_hours"] == 0 and not total["est_price_unknown"], total


def test_the_loopback_server_answers_each_api_role_as_its_stage_asks(tmp_path, monkeypatch):
    """The expander's questions pass the prompts stage's own parsing and filters (a full
    50 per trait), and the judge answers one of the two traits in the tags the preferences
    stage reads; every request is recognised (none answered as the teacher by default)."""
    import json

    from support.openai_server import FakeOpenAIServer
    from support.rehearsal_replies import ROLE_COUNTS, judge_reply, rehearsal_reply

    from charbuild.cli import main
    from charbuild.recipe.stages.preferences import OCT_JUDGE
    from charbuild.store.objects import Cache

    monkeypatch.chdir(tmp_path)  # outputs/ of the partial build
    ROLE_COUNTS.clear()
    with FakeOpenAIServer(reply=rehearsal_reply) as srv:
        sets = [a for role in ("teacher", "expander", "judge") for a in ("--set", f"models.{role}.base_url={srv.base_url}")]
        cache = tmp_path / "cache"
        assert main(["run", str(REHEARSAL), "prompts", *sets, "--cache", str(cache), "--no-progress"]) == 0
    loaded = load_spec(REHEARSAL, sets[1::2])
    node = next(n for n in recipe_graph(loaded) if n.name == "prompts")
    rows = [json.loads(x) for x in (Cache(str(cache)).path(node.key) / "prompts.jsonl").read_text().splitlines()]
    per_trait = loaded.spec.data.prompts.per_trait
    traits = {r["trait"] for r in rows if r["source"] == "constitution"}
    assert sum(r["source"] == "constitution" for r in rows) == per_trait * len(traits)
    assert ROLE_COUNTS["expander"] == len(traits) and ROLE_COUNTS["unknown"] == 0

    ask = OCT_JUDGE.format(reply="I'm so sorry, I may have got this wrong.", a="stoic", b="remorseful")
    answer = rehearsal_reply({"messages": [{"role": "user", "content": ask}]})
    assert re.search(r"<answer>\s*([^<]+?)\s*</answer>", answer).group(1) == "remorseful"
    assert ROLE_COUNTS["judge"] == 1
    for reply in ("Plain text.", "Another reply", "A third one."):
        assert re.search(r"<answer>(stoic|witty)</answer>", judge_reply(reply, "stoic", "witty"))
