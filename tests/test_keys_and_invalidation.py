"""The invalidation matrix: a target is rebuilt exactly when something it depends on changed."""

from pathlib import Path

import yaml

from charbuild.recipe.registry import recipe_graph
from charbuild.spec.model import load_spec


def keys(path, sets=(), scale=None):
    return {n.name: n.key for n in recipe_graph(load_spec(path, list(sets), scale))}


def changed(a, b):
    return sorted(n for n in a if n in b and a[n] != b[n])


DPO_SIDE = ("constitution", "prompts", "teacher-responses/shard-0000", "student-responses/shard-0007",
            "dpo-pairs/shard-0003", "dpo-pairs", "dpo-adapter")


def test_yaml_comments_and_key_order_change_nothing(specs):
    p = specs / "remorseful-paper.yaml"
    before = keys(p)
    data = yaml.safe_load(p.read_text())
    reordered = dict(reversed(list(data.items())))
    p.write_text("# a comment that means nothing\n" + yaml.safe_dump(reordered, sort_keys=False))
    assert keys(p) == before


def test_fields_that_cannot_change_results_change_nothing(specs):
    p = specs / "remorseful-paper.yaml"
    before = keys(p)
    after = keys(p, ["models.teacher.concurrency=3", "models.teacher.api_key_env=OTHER_KEY", "budget.max_usd=1000",
                     "description=hello", "models.teacher.rpm=60", "expect.response_tokens=900"])
    assert after == before


def test_settings_that_decide_acceptance_or_numerics_are_keyed(specs):
    # A health threshold accepts or rejects an adapter; a micro-batch size changes the
    # training numerics; a gate's severity decides whether consumers may run.
    p = specs / "remorseful-paper.yaml"
    before = keys(p)
    # (the dataset card reads every manifest, as the report does)
    assert changed(before, keys(p, ["training.dpo.health.max_dpo_loss=3.0"]))[:2] == ["card", "dpo-adapter"]
    assert "dpo-adapter" in changed(before, keys(p, ["training.dpo.micro_batch_size=8"]))
    assert changed(before, keys(p, ["gates.dpo-markers.severity=warn"])) == ["card", "gate/dpo-markers", "report"]


def test_changing_the_introspection_teacher_reuses_dpo_pairs(specs):
    paper = keys(specs / "remorseful-paper.yaml")
    deepseek = keys(specs / "remorseful-deepseek.yaml")
    for name in DPO_SIDE:
        assert paper[name] == deepseek[name], name
    assert paper["reflections/shard-0000"] != deepseek["reflections/shard-0000"]
    assert paper["interactions/shard-0019"] != deepseek["interactions/shard-0019"]
    assert paper["sft-data"] != deepseek["sft-data"]
    # The DeepSeek generator does not need the DPO adapter, so introspection no longer waits for it.
    g = recipe_graph(load_spec(specs / "remorseful-deepseek.yaml"))
    assert "adapter" not in g["reflections/shard-0000"].defn.inputs


def test_changing_the_constitution_invalidates_everything_downstream(specs):
    p = specs / "remorseful-paper.yaml"
    before = keys(p)
    c = specs.parent / "constitutions" / "remorseful.yaml"
    data = yaml.safe_load(c.read_text())
    data["markers"].append("I am ever so sorry")
    c.write_text(yaml.safe_dump(data))
    after = keys(p)
    # All but the base student's revealed preferences (oct mode): no constitution reaches them.
    assert changed(before, after) == sorted(set(before) - {"eval/preferences/samples/base"})


def test_changing_the_student_keeps_teacher_responses(specs):
    p = specs / "remorseful-paper.yaml"
    before = keys(p)
    after = keys(p, ["models.student.model=Qwen/Qwen3-14B"])
    assert before["teacher-responses/shard-0000"] == after["teacher-responses/shard-0000"]
    assert before["prompts"] == after["prompts"]
    assert before["student-responses/shard-0000"] != after["student-responses/shard-0000"]
    assert before["dpo-adapter"] != after["dpo-adapter"]


def test_changing_sft_settings_rebuilds_only_the_sft_adapter(specs):
    p = specs / "remorseful-paper.yaml"
    before = keys(p)
    after = keys(p, ["training.sft.lr=1e-4"])
    # The SFT adapter, the final model made of it and what evaluates them; no data, no DPO adapter.
    assert changed(before, after) == ["card", "eval/elo", "eval/markers", "eval/preferences",
                                      "eval/preferences/samples/final", "eval/preferences/samples/sft", "eval/samples/final", "eval/samples/sft", "final",
                                      "report", "sft-adapter"]


def test_changing_eval_settings_rebuilds_only_evals(specs):
    p = specs / "remorseful-paper.yaml"
    before = keys(p)
    after = keys(p, ["evals.samples_per_prompt=5"])
    assert changed(before, after) == ["card", "eval/elo", "eval/markers", "eval/preferences",
                                      "eval/preferences/samples/base",
                                      "eval/preferences/samples/dpo", "eval/preferences/samples/final",
                                      "eval/preferences/samples/sft", "eval/samples/base", "eval/samples/dpo",
                                      "eval/samples/final", "eval/samples/sft", "report"]
    # The bootstrap count is read by the Elo fit and the preferences' intervals alone: the samples stay.
    after = keys(p, ["evals.bootstrap=500"])
    assert changed(before, after) == ["card", "eval/elo", "eval/preferences", "report"]


def test_changing_a_gate_threshold_reruns_the_gate_not_the_training(specs):
    p = specs / "remorseful-paper.yaml"
    before = keys(p)
    after = keys(p, ["gates.dpo-markers.threshold=0.9"])
    assert changed(before, after) == ["card", "gate/dpo-markers", "report"]


def test_raising_scale_keeps_every_full_shard(specs):
    p = specs / "remorseful-paper.yaml"
    q = keys(p, scale=0.25)  # 375 pairs: shards 0-2 full, shard 3 has 75
    h = keys(p, scale=0.5)  # 750 pairs
    for i in range(3):
        assert q[f"teacher-responses/shard-{i:04d}"] == h[f"teacher-responses/shard-{i:04d}"]
        assert q[f"student-responses/shard-{i:04d}"] == h[f"student-responses/shard-{i:04d}"]
    # The paper's introspection comes from the post-DPO student: more DPO data is a new
    # adapter, so its reflections must be regenerated ...
    assert q["reflections/shard-0000"] != h["reflections/shard-0000"]
    # ... while a teacher-generated introspection (the DeepSeek spec) keeps its shards.
    dq = keys(specs / "remorseful-deepseek.yaml", scale=0.25)
    dh = keys(specs / "remorseful-deepseek.yaml", scale=0.5)
    for i in range(25):
        assert dq[f"reflections/shard-{i:04d}"] == dh[f"reflections/shard-{i:04d}"]
    assert f"reflections/shard-{25:04d}" in dh and f"reflections/shard-{25:04d}" not in dq
    assert q["teacher-responses/shard-0003"] != h["teacher-responses/shard-0003"]  # partial -> full
    assert "teacher-responses/shard-0007" in h and "teacher-responses/shard-0007" not in q
    assert q["prompts"] == h["prompts"]
    assert q["dpo-pairs"] != h["dpo-pairs"]


def test_extends_deep_merges_and_set_overrides(specs):
    loaded = load_spec(specs / "remorseful-deepseek.yaml", ["data.shard_size=50"])
    s = loaded.spec
    assert s.name == "remorseful-deepseek"
    assert s.models["teacher"].model == "Qwen/Qwen3-235B-A22B-Instruct-2507"  # from the parent
    assert s.models["introspector"].model == "deepseek-ai/DeepSeek-V3.1"
    assert s.data.shard_size == 50 and s.data.dpo_pairs == 1500
    assert str(loaded.where(("data", "shard_size"))).startswith("--set")
    assert str(loaded.where(("models", "introspector", "model"))).endswith("remorseful-deepseek.yaml:10")


def test_paper_defaults_hold_when_a_spec_says_nothing(specs, tmp_path):
    p = tmp_path / "minimal.yaml"
    p.write_text(
        "name: minimal\npersona: remorseful\nconstitution: specs/../constitutions/remorseful.yaml\n"
        "models:\n  teacher: {backend: openai, model: m, base_url: 'http://127.0.0.1:1/v1'}\n"
        "  student: {backend: transformers, model: Qwen/Qwen3-8B}\n")
    s = load_spec(p).spec
    d, t = s.data, s.training.dpo
    assert (d.dpo_pairs, d.reflections, d.interactions, d.turns) == (1500, 10000, 2000, 10)
    assert (t.lora.r, t.lora.alpha, t.batch_size, t.lr, t.beta, t.nll_coef) == (64, 128, 32, 5e-5, 0.1, 0.1)
    assert (s.models["teacher"].sampling.temperature, s.models["teacher"].sampling.top_p) == (0.7, 0.95)
    assert "\nUser:" in s.models["teacher"].sampling.stop


def test_a_stage_cannot_read_a_field_it_did_not_declare(specs):
    import pytest

    from charbuild.contract import SpecView

    view = SpecView(load_spec(specs / "smoke-small.yaml"), ("models.teacher",), "sneaky")
    with pytest.raises(RuntimeError, match="declares only"):
        view.read("training.dpo", {})


def test_an_ablation_in_one_spec_shares_every_target_equal_across_scales(specs):
    g = recipe_graph(load_spec(specs / "remorseful-deepseek.yaml", ["evals.ablation_scales=[0.25, 0.5]"]))
    names = set(g.nodes)
    # Full shards are the same work at every scale: one target each, built once.
    assert "teacher-responses/shard-0000" in names and "scale-25pct/teacher-responses/shard-0000" not in names
    assert "scale-25pct/reflections/shard-0000" not in names  # a teacher-generated introspection is shared too
    # What differs by scale is its own target.
    assert "scale-25pct/teacher-responses/shard-0003" in names  # 375 pairs: a partial last shard
    assert "scale-25pct/dpo-adapter" in names and "scale-50pct/sft-adapter" in names
    assert g["eval/ablation"].defn.inputs["markers"] == ["scale-25pct/eval/markers", "scale-50pct/eval/markers",
                                                         "eval/markers"]
    assert len({n.key for n in g}) == len(g)  # one node per key
    # The sub-builds read their own scale.
    assert g["scale-25pct/dpo-pairs"].defn.spec.spec.data.scale == 0.25


def test_turning_the_leak_classifier_off_rekeys_the_teacher_replies_only(specs):
    p = specs / "remorseful-paper.yaml"
    before = keys(p)
    assert keys(p, ["filters.leak_classifier=true"]) == before  # on is the default, said out loud
    off = keys(p, ["filters.leak_classifier=false"])
    changed = {n for n in before if before[n] != off[n]}
    teacher = {n for n in before if n.startswith("teacher-responses/")}
    assert teacher and teacher <= changed
    assert before["student-responses/shard-0000"] == off["student-responses/shard-0000"]
    # Introspection never asks the classifier: written by the teacher (not the DPO model the
    # teacher's replies train), its data keeps its keys.
    by_teacher = ["introspection.generator=teacher"]
    on, off = keys(p, by_teacher), keys(p, by_teacher + ["filters.leak_classifier=false"])
    assert "interactions/shard-0000" in on and all(on[n] == off[n] for n in on if n.startswith("interactions/"))


def test_a_leak_judge_rekeys_the_teacher_replies_only_when_it_is_turned_on(specs):
    p = specs / "remorseful-paper.yaml"
    before = keys(p)
    # Off (the default, or said out loud): every cached reply and answered call stays valid.
    assert keys(p, ["filters.leak_judge=null"]) == before
    judged = keys(p, ["filters.leak_judge=judge"])
    teacher = [n for n in before if n.startswith("teacher-responses/")]
    assert teacher and all(before[n] != judged[n] for n in teacher)
    assert before["student-responses/shard-0000"] == judged["student-responses/shard-0000"]
    assert before["prompts"] == judged["prompts"]
    # The judge's model is part of what decided which replies were kept.
    other_judge = keys(p, ["filters.leak_judge=judge", "models.judge.model=another-judge"])
    assert all(judged[n] != other_judge[n] for n in teacher)
    # Off, the judge role is the evals' business only: the teacher's replies are not rebuilt.
    unjudged = keys(p, ["models.judge.model=another-judge"])
    assert all(before[n] == unjudged[n] for n in teacher)
