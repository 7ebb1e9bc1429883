"""Every value a stage uses is in its key: a stage reads only what it declared (targets,
estimate) or what its target is keyed on (run), and changing a keyed field changes the
keys of exactly the stages that read it, and no other."""

import json
from functools import lru_cache
from pathlib import Path

import pytest
from charbuild.contract import BuildContext, EstimateContext, SpecView
from charbuild.recipe.registry import recipe_graph
from charbuild.spec.defaults import GATE_CHECKS
from charbuild.spec.guard import UndeclaredRead, nokey_path
from charbuild.spec.model import Spec, load_spec

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "specs" / "remorseful-paper.yaml"


# -- the bug that started it ----------------------------------------------------------------

def test_changing_filters_changes_the_interactions_keys():
    # Interactions checks every turn against the filters (a failed turn ends the
    # conversation), so a new min_chars must rebuild every interactions shard and sft-data.
    spec = ROOT / "specs" / "remorseful-deepseek.yaml"
    before = {n.name: n.key for n in recipe_graph(load_spec(spec))}
    after = {n.name: n.key for n in recipe_graph(load_spec(spec, ["filters.min_chars=500"]))}
    interactions = [n for n in before if n.startswith("interactions/")]
    assert len(interactions) == 20
    assert [n for n in interactions if before[n] == after[n]] == []
    assert before["sft-data"] != after["sft-data"]
    assert before["teacher-responses/shard-0000"] != after["teacher-responses/shard-0000"]
    # Reflections are checked against introspection.reflection_filters, not filters.
    assert before["reflections/shard-0000"] == after["reflections/shard-0000"]


# -- the guard ------------------------------------------------------------------------------

def test_a_stage_reading_an_undeclared_path_in_run_fails_naming_the_path(specs, cache_dir):
    from support.engine_stages import ReadsUnkeyed

    from charbuild.engine.executor import run_build
    from charbuild.engine.graph import build_graph
    from charbuild.engine.planner import make_plan
    from charbuild.store.objects import Cache

    loaded = load_spec(specs / "smoke-small.yaml")
    graph = build_graph(loaded, [ReadsUnkeyed()])
    assert graph["unkeyed"].defn.fields == {"persona": "remorseful"}
    cache = Cache(cache_dir)
    report = run_build(loaded, graph, make_plan(loaded, graph, cache), cache, progress=False, log=lambda s: None,
                       outputs_root=None)
    err = report.failed["unkeyed"]
    assert err.startswith("UndeclaredRead") and "'filters.min_chars'" in err and "t-reads-unkeyed" in err, err
    assert "unkeyed" in err and "keyed fields: ['persona']" in err
    assert not cache.has(graph["unkeyed"].key)


def _ctx(loaded, fields, stage="t", name="t"):
    from charbuild.contract import TargetDef

    return BuildContext(TargetDef(name, stage, fields), "k", loaded, Path("."), {}, budget=object())


def test_run_sees_only_the_keyed_fields_and_no_raw_model(specs):
    from charbuild.spec.model import ModelSpec

    loaded = load_spec(specs / "smoke-small.yaml")
    ctx = _ctx(loaded, {"models.teacher": {}, "data.turns": 3})
    m = ctx.spec.models["teacher"]
    assert not isinstance(m, ModelSpec)  # a read-only proxy, never the raw model
    assert m.sampling.top_p == 0.95 and ctx.spec.data.turns == 3
    assert m.batch_size == 16 and m.concurrency == 16  # under a keyed prefix
    assert ctx.spec.expect.prompt_tokens == 20  # NoKey: cannot change an output
    stops = m.sampling.stop
    stops.append("mutated")  # a copy: the spec is untouched
    assert "mutated" not in loaded.spec.models["teacher"].sampling.stop
    with pytest.raises(AttributeError):
        m.model = "other"
    student = ctx.spec.models["student"]  # only a way through: reading from it is refused
    with pytest.raises(UndeclaredRead, match="'models.student.model'"):
        student.model
    with pytest.raises(UndeclaredRead, match="'models.student'"):
        student == loaded.spec.models["student"]
    with pytest.raises(UndeclaredRead, match="'data.shard_size'"):
        ctx.spec.data.shard_size
    with pytest.raises(UndeclaredRead, match=r"'models' \(its keys\)"):
        list(ctx.spec.models)
    with pytest.raises(UndeclaredRead, match="'data.dpo_pairs'"):
        ctx.spec.data.count("dpo_pairs")  # methods run on the proxy: their reads are checked
    # ctx.loaded is guarded too, and the constitution file is off limits: read the built input.
    with pytest.raises(UndeclaredRead, match="'filters.min_chars'"):
        ctx.loaded.spec.filters.min_chars
    with pytest.raises(UndeclaredRead, match="constitution"):
        ctx.loaded.constitution_path
    # A helper that makes its own view from the context cannot widen what run() may read.
    with pytest.raises(UndeclaredRead, match="'filters.min_chars'"):
        SpecView(ctx.loaded, ("filters",), "t").spec.filters.min_chars
    assert ctx.touched == ["data.turns", "expect.prompt_tokens", "models.teacher", "models.teacher.batch_size",
                           "models.teacher.concurrency", "models.teacher.sampling", "models.teacher.sampling.stop",
                           "models.teacher.sampling.top_p"]


def test_methods_of_the_spec_read_through_the_guard(specs):
    loaded = load_spec(specs / "smoke-small.yaml")
    view = SpecView(loaded, ("data.dpo_pairs", "data.scale", "name"), "t")
    assert view.spec.data.count("dpo_pairs") == 8
    assert view.spec.run_name == "smoke-small"
    assert view.touched == ["data.dpo_pairs", "data.scale", "name"]
    with pytest.raises(UndeclaredRead, match="'data.reflections'"):
        view.spec.data.count("reflections")


def test_targets_and_estimates_see_only_the_declared_reads(specs):
    from charbuild.recipe.stages.responses import StudentResponses

    loaded = load_spec(specs / "smoke-small.yaml")
    view = SpecView(loaded, ("models.teacher",), "sneaky")
    with pytest.raises(UndeclaredRead, match="stage 'sneaky' read 'training.dpo.lr' in targets\\(\\) but declares only"):
        view.spec.training.dpo.lr
    with pytest.raises(UndeclaredRead, match="'data.shard_size'"):
        view.spec.data.shard_size
    ectx = EstimateContext(loaded)
    with pytest.raises(UndeclaredRead):
        ectx.loaded.spec.name  # estimates read through ctx.view(self)
    spec = ectx.view(StudentResponses()).spec
    assert spec.expect.response_tokens == 40
    with pytest.raises(UndeclaredRead, match="'filters.min_chars'"):
        spec.filters.min_chars  # the student's answers are not filtered: it does not declare filters


def test_every_recipe_stage_builds_its_targets_through_the_guard():
    # Building the graph runs every stage's targets() with only its declared reads.
    for name in ("remorseful-paper", "remorseful-deepseek", "remorseful-ablation", "humorous", "smoke-small",
                 "smoke-large"):
        for sets in ([], ["evals.preferences=true", "evals.judge=teacher", "evals.ablation_scales=[0.5]"]):
            assert len(recipe_graph(load_spec(ROOT / "specs" / f"{name}.yaml", sets))) > 10


# -- the sweep: every leaf of the fully defaulted paper spec --------------------------------

# Which stages read which part of the spec, written by hand from what each stage does
# (not from its code's `reads`): the longest matching prefix wins. A stage "reads" a field
# when its targets' keys, params or wiring follow it.
SHARDED_DPO = {"teacher-responses", "student-responses", "dpo-pairs-shard", "dpo-pairs"}
STUDENT = {"student-responses", "dpo-adapter", "sft-adapter", "reflections", "interactions", "eval-samples",
           "preference-samples"}
EVAL_GEN = {"eval-samples", "preference-samples"}
READERS = {
    "name": {"report", "dataset-card"},  # the report's and the card's titles
    # the paper spec's revealed preferences are OCT's: random trait pairs, none pinned to the persona
    "persona": {"report", "preferences", "dataset-card"},
    "constitution": {"constitution"},  # its content is keyed once, downstream follows by input
    "models.teacher": {"teacher-responses"},  # the paper spec expands its questions with models.expander
    "models.teacher.model": {"teacher-responses", "report", "dataset-card"},
    "models.expander": {"prompts"},
    "models.student": STUDENT,
    # final: the base its adapter is merged for; dpo-pairs-shard: its tokenizer measures pairs
    "models.student.model": STUDENT | {"report", "final", "dpo-pairs-shard", "dataset-card"},
    "models.student.revision": STUDENT | {"dpo-pairs-shard"},
    # the paper judges the variants' Elo with markers; the judge model reads revealed preferences
    "models.judge": {"preferences"},
    "data.dpo_pairs": SHARDED_DPO | {"report"},
    "data.reflections": {"reflections", "sft-data", "report"},
    "data.interactions": {"interactions", "sft-data", "report"},
    "data.turns": {"interactions", "report"},
    "data.shard_size": SHARDED_DPO | {"reflections", "interactions", "sft-data"},
    "data.scale": SHARDED_DPO | {"reflections", "interactions", "sft-data", "report"},
    "data.prompts": {"prompts"},
    "data.samples_per_prompt": {"teacher-responses", "student-responses"},
    "filters": {"teacher-responses", "interactions"},
    "filters.leak_judge": {"teacher-responses"},  # it judges the teacher's replies, no turn of introspection's
    "filters.leak_classifier": {"teacher-responses"},  # introspection's leak check is the patterns' alone
    "introspection.generator": {"reflections", "interactions", "report"},
    "introspection.reflection_max_tokens": {"reflections"},
    "introspection.keep_think_reflections": {"reflections"},
    "introspection.reflection_filters": {"reflections"},
    "introspection.turn_max_tokens": {"interactions"},
    "introspection.keep_think_interactions": {"interactions"},
    "training.dpo": {"dpo-adapter"},
    "training.dpo.max_length": {"dpo-adapter", "dpo-pairs-shard"},  # pairs longer are dropped, not cut
    "training.sft": {"sft-adapter"},
    "training.final": {"final"},
    "gates": {"gate"},  # and only the gate named (checked per target below)
    "evals.enabled": {"eval-samples", "eval-markers", "eval-elo", "preference-samples", "preferences", "ablation",
                      "report"},
    "evals.prompts": EVAL_GEN,
    "evals.prompts_limit": EVAL_GEN,
    "evals.samples_per_prompt": EVAL_GEN,
    "evals.max_tokens": {"eval-samples"},  # oct-mode preference replies have their own length
    "evals.preferences_max_tokens": {"preference-samples"},
    "evals.preferences_mode": {"preference-samples", "preferences"},
    "evals.preferences_judge": {"preferences"},
    "evals.variants": {"eval-samples", "eval-markers", "eval-elo", "preference-samples", "preferences"},
    "evals.bootstrap": {"eval-elo", "preferences"},  # preferences: the oct mode's Bradley-Terry intervals
    "evals.judge": {"eval-elo"},  # the paper spec's preferences name their own judge
    "evals.elo": {"eval-elo"},
    "evals.preferences": {"preference-samples", "preferences"},
    "budget": set(),  # the ledger's, not a stage's
    "execution": set(),  # the executor's: where a target builds, not what it is
}

# Leaves the sweep cannot mutate into a comparable spec, and why.
SKIPPED = {
    "evals.ablation_scales": "adds a whole sub-build at another data scale, new targets by construction "
                             "(test_keys_and_invalidation: test_an_ablation_in_one_spec_shares_...)",
    "models.student.extra_body": "the student is local (vllm): the spec refuses extra_body there",
    "filters.leak_judge_overrules_classifier": "valid only with filters.leak_judge set (test_leak_judge: "
                                               "test_the_judge_overruling_the_classifier_rekeys_the_teacher_alone)",
}
# vLLM's engine settings exist for the vllm student only: the spec refuses them on the API roles.
SKIPPED.update({f"models.{role}.{f}": "a vLLM engine setting: the spec refuses it on an openai model"
                for role in ("teacher", "expander", "judge")
                for f in ("gpu_memory_utilization", "tensor_parallel_size", "max_lora_rank", "max_model_len")})

# Valid new values where "+1, halve, flip, append" would not do.
SPECIAL = {
    "name": "another-name",
    "persona": "humorous",
    "constitution": str(ROOT / "constitutions" / "humorous.yaml"),
    "description": "another description",
    "data.prompts.general": "builtin:eval-prompts",
    "data.prompts.general_limit": 10,
    "introspection.generator": "teacher",
    "evals.prompts": "builtin:prompts-general",
    "evals.prompts_limit": 10,
    "evals.judge": "teacher",
    "evals.preferences_mode": "charbuild",
    "evals.preferences_judge": "teacher",
    "filters.leak_judge": "judge",
    "filters.leak_classifier": False,
    "evals.variants": ["base", "dpo"],
    "prices": {"some/model": {"input": 1.0, "output": 2.0}},
    "budget.max_tokens": 1000,
    "budget.deadline_hours": 48,
    "execution.executor": "ray",
    "execution.address": "auto",
    "data.shard_size": 50,  # a new shard count, so the merges' wiring changes too
}
BY_FIELD = {
    "backend": lambda v: {"openai": "vllm", "vllm": "transformers", "transformers": "vllm"}[v],
    "model": lambda v: v + "-other",
    "base_url": lambda v: (v + "/other") if v else "http://127.0.0.1:1/v1",
    "api_key_env": lambda v: "OTHER_API_KEY",
    "revision": lambda v: "another-revision",
    "rpm": lambda v: (v or 60) + 1,
    "tpm": lambda v: (v or 1000) + 1,
    "price": lambda v: {"input": 1.0, "output": 2.0},
    "size": lambda v: "32b" if v != "32b" else "8b",
    "stop": lambda v: v[:-1],
    "max_steps": lambda v: 5,
    "report_to": lambda v: v + ["tensorboard"],
    "checkpoints_at": lambda v: [0.5] if v != [0.5] else [],
    "target_modules": lambda v: ["q_proj", "v_proj"],
    "check": lambda v: next(c for c in GATE_CHECKS if c != v),
    "target": lambda v: "sft-data" if v == "dpo-pairs" else "dpo-pairs",
    "severity": lambda v: "warn" if v == "error" else "error",
    "options": lambda v: {**v, "min_chars": 3},
    "extra_body": lambda v: {**v, "top_k": 20},
    "repetition_penalty": lambda v: 1.2 if v != 1.2 else 1.1,
    "thinking": lambda v: "on" if v != "on" else "off",
    "method": lambda v: "exact" if v == "linear" else "linear",
    "mode": lambda v: "auto" if v != "auto" else "online",
    "gpu_memory_utilization": lambda v: 0.5,
    "tensor_parallel_size": lambda v: 2,
    "max_lora_rank": lambda v: 128 if v != 128 else 256,  # the paper's default: 64, from its adapters' rank
    "max_model_len": lambda v: 4096,  # auto: valid for a local model too
}

# Mutations that make a valid spec only with another field changed too (--set), whose
# readers then change as well: the paper's linear merge needs the DPO and SFT ranks equal.
ALSO = {"training.dpo.lora.r": "training.final.method=exact", "training.sft.lora.r": "training.final.method=exact"}


def mutated(path: str, value):
    if path in SPECIAL:
        return SPECIAL[path]
    last = path.rsplit(".", 1)[-1]
    if last in BY_FIELD:
        return BY_FIELD[last](value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    raise AssertionError(f"no valid mutation for {path}={value!r}: add one to SPECIAL or SKIPPED")


def leaves(data, prefix=""):
    """Every leaf of a dumped spec; an empty mapping (gate options, prices) is a leaf too."""
    if isinstance(data, dict) and data:
        for k, v in data.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, data


def nokey(path: str, spec=None) -> bool:
    """Whether the field at `path` (or one above it) is marked NoKey in the spec schema."""
    return nokey_path(spec if spec is not None else load_spec(PAPER).spec, path)


@lru_cache(maxsize=1)
def paper_leaves():
    return list(leaves(load_spec(PAPER).spec.model_dump()))


@lru_cache(maxsize=1)
def paper_graph():
    return recipe_graph(load_spec(PAPER))


def readers(path: str) -> tuple[str, set[str]]:
    best = max((k for k in READERS if path == k or path.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"the READERS table says nothing about {path}: which stages read it?"
    return best, READERS[best]


def direct_changes(a, b) -> set[str]:
    """Targets whose own reading changed: added or removed, new fields, params or wiring,
    or a new key while everything they consume kept its key."""
    out = set()
    for name in set(a.nodes) | set(b.nodes):
        if name not in a.nodes or name not in b.nodes:
            out.add(name)
            continue
        na, nb = a[name], b[name]
        if na.key == nb.key:
            continue
        wiring_a = {s: v for s, v in na.defn.inputs.items() if s != "all"}  # "all": every target, by construction
        wiring_b = {s: v for s, v in nb.defn.inputs.items() if s != "all"}
        if (na.defn.fields, na.defn.params, wiring_a) != (nb.defn.fields, nb.defn.params, wiring_b):
            out.add(name)
        elif na.input_keys == nb.input_keys:
            out.add(name)
    return out


def stage_of(graphs, name):
    return next(g[name].stage.name for g in graphs if name in g.nodes)


SWEEP = [(p, v) for p, v in paper_leaves() if p not in SKIPPED]


def test_the_sweep_covers_every_leaf_of_the_paper_spec():
    paths = [p for p, _ in paper_leaves()]
    assert len(paths) > 150
    # each model role's fields and each gate's fields are leaves of their own
    assert {"models.judge.sampling.temperature", "models.teacher.batch_size", "gates.dpo-markers.severity",
            "gates.sft-length.options", "training.dpo.health.max_dpo_loss"} <= set(paths)
    assert set(SKIPPED) <= set(paths)


# The fields left out of every key, each reviewed: none can change an output byte or an
# accept/reject decision (the reasons are in charbuild.spec.model's docstring). Health
# rules, gate severities, micro-batch sizes, inference batch sizes and report_to are keyed.
NOKEY_REVIEWED = {"api_key_env", "concurrency", "rpm", "tpm", "price", "size", "mode",  # of each model role
                  "gpu_memory_utilization", "tensor_parallel_size", "max_lora_rank"}  # vllm: the GPU layout
NOKEY_TOP = {"expect", "prices", "description", "execution"}  # execution: where targets build
NOKEY_LEAVES = {"budget.deadline_hours"}


def test_only_the_reviewed_fields_are_left_out_of_the_keys():
    spec = load_spec(PAPER).spec
    got = {p for p, _ in paper_leaves() if nokey(p, spec)}
    want = {p for p, _ in paper_leaves()
            if (p.startswith("models.") and p.split(".")[2] in NOKEY_REVIEWED) or p.split(".")[0] in NOKEY_TOP
            or p in NOKEY_LEAVES}
    assert got == want, f"left out of the keys but not reviewed: {sorted(got - want)}; keyed: {sorted(want - got)}"


@pytest.mark.parametrize("path,value", SWEEP, ids=[p for p, _ in SWEEP])
def test_changing_a_field_changes_the_keys_of_exactly_the_stages_that_read_it(path, value):
    new = mutated(path, value)
    assert new != value, path
    also = [ALSO[path]] if path in ALSO else []
    loaded = load_spec(PAPER, [f"{path}={json.dumps(new)}", *also])
    got = loaded.spec.model_dump()
    for part in path.split("."):
        got = got[part]
    assert got != value, f"--set {path} did not take"
    a, b = paper_graph(), recipe_graph(loaded)
    direct = direct_changes(a, b)
    if nokey(path):
        assert direct == set() and {n.key for n in a} == {n.key for n in b}, f"NoKey {path} changed {sorted(direct)}"
        return
    section, expected = readers(path)
    for extra in also:
        expected = expected | readers(extra.split("=", 1)[0])[1]
    present = {n.stage.name for n in a} | {n.stage.name for n in b}
    got_stages = {stage_of((a, b), n) for n in direct}
    assert got_stages == expected & present, (
        f"{path} (table: {section}) changed {sorted(got_stages)} directly, expected {sorted(expected & present)}; "
        f"targets: {sorted(direct)[:12]}")
    if section == "gates":
        assert direct == {f"gate/{path.split('.')[1]}"}, sorted(direct)
    # Every other key that changed did so because something it consumes changed (Merkle).
    for name in set(a.nodes) & set(b.nodes):
        if name not in direct and a[name].key != b[name].key:
            assert a[name].input_keys != b[name].input_keys, name
