"""The paper's data mix at every scale: samples per prompt, a stratified prompt order whose
prefixes are every scale, question expansion by a role of its own, and pairs dropped (and
counted) when too long or cut at max_tokens. Built over the loopback OpenAI-protocol server."""

import json
import random
import threading
from pathlib import Path

import pytest

from support.api_build import in_api_workdir, PLAIN, SORRY, persona_reply, plan_json, run, sorry, write_spec
from support.openai_server import FakeOpenAIServer, last_user_message

from charbuild.recipe.registry import recipe_graph
from charbuild.spec.model import load_spec
from charbuild.store.objects import Cache


@pytest.fixture
def env(tmp_path, monkeypatch):
    return in_api_workdir(tmp_path, monkeypatch)


def keys(spec, sets=(), scale=None) -> dict[str, str]:
    return {n.name: n.key for n in recipe_graph(load_spec(spec, list(sets), scale))}


def built_rows(spec, cache, stage, file, sets=(), scale=None) -> list[dict]:
    """The rows of every built target of `stage` at that scale, in shard order."""
    rows = []
    for name, key in sorted(keys(spec, sets, scale).items()):
        if name.startswith(f"{stage}/"):
            rows += [json.loads(line) for line in (Cache(cache).path(key) / file).read_text().splitlines()]
    return rows


def prompt_rows(spec, cache, sets=()) -> list[dict]:
    key = keys(spec, sets)["prompts"]
    return [json.loads(line) for line in (Cache(cache).path(key) / "prompts.jsonl").read_text().splitlines()]


def stratum(row: dict) -> str:
    return f"trait-{row['trait']}" if row["source"] == "constitution" else "general"


def assert_in_proportion(used: list[dict], pool: list[dict]):
    """Each trait and the general pool hold their share of `used` to within one prompt."""
    sizes, got = {}, {}
    for r in pool:
        sizes[stratum(r)] = sizes.get(stratum(r), 0) + 1
    for r in used:
        got[stratum(r)] = got.get(stratum(r), 0) + 1
    for s, n in sizes.items():
        share = len(used) * n / len(pool)
        assert abs(got.get(s, 0) - share) < 1, (s, got.get(s, 0), share, got)


# -- a quarter of the data is a quarter of every stratum ----------------------------------------

def test_a_quarter_of_the_data_covers_every_trait_and_the_general_pool(env):
    with FakeOpenAIServer(reply=persona_reply) as s:
        # 10 traits x 5 questions + 40 general prompts, one pair per prompt at full scale
        spec = write_spec(env, s.base_url, dpo_pairs=90, shard_size=10)
        cache = str(env / "cache")
        assert run(str(spec), "dpo-pairs", "--cache", cache, "--scale", "0.25") == 0
    pool = {r["id"]: r for r in prompt_rows(spec, cache)}
    items = built_rows(spec, cache, "teacher-responses", "responses.jsonl", scale=0.25)
    assert len(items) == 22
    used = [pool[r["prompt_id"]] for r in items]
    assert {stratum(r) for r in used} == {stratum(r) for r in pool.values()}  # all ten traits and the pool
    assert_in_proportion(used, list(pool.values()))


def test_every_scale_of_the_paper_prompt_set_takes_each_stratum_in_proportion():
    from charbuild.recipe.stages.prompts import stratified_order
    from charbuild.recipe.stages.responses import item_prompt

    # The paper spec's pool: 10 traits x 50 questions and the 300 general prompts; 5 samples a prompt.
    pool = ([{"id": f"t{t:02d}q{q:03d}", "source": "constitution", "trait": t} for t in range(10) for q in range(50)]
            + [{"id": f"g{i:04d}", "source": "general"} for i in range(300)])
    rows = [pool[i] for i in stratified_order(pool)]
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in pool)
    for scale in (0.25, 0.5, 0.75, 1.0):
        n = round(1500 * scale)
        prompts = {item_prompt(j, len(rows), 5)[0] for j in range(n)}
        assert prompts == set(range(-(-n // 5)))  # a prefix of the order, five samples each
        assert_in_proportion([rows[i] for i in prompts], pool)
    # Any prefix at all, not only these scales.
    for t in range(1, len(rows) + 1, 7):
        assert_in_proportion(rows[:t], pool)


def test_the_interleaving_holds_every_prefix_within_one_of_its_share_for_any_strata():
    from charbuild.recipe.stages.prompts import interleave

    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(0, 40) for _ in range(rng.randint(1, 14))] + [rng.randint(0, 400)]
        total = sum(sizes)
        seq = interleave(sizes)
        assert sorted(seq) == sorted(s for s, n in enumerate(sizes) for _ in range(n))
        taken = [0] * len(sizes)
        for t, s in enumerate(seq, 1):
            taken[s] += 1
            assert all(abs(taken[i] - t * n / total) < 1 for i, n in enumerate(sizes)), (sizes, t)


# -- smaller scales are prefixes of larger ones ---------------------------------------------------

def test_a_smaller_scale_is_a_prefix_of_a_larger_one_and_its_shards_are_reused(env):
    five = ["--set", "data.samples_per_prompt=5"]
    with FakeOpenAIServer(reply=persona_reply) as s:
        spec = write_spec(env, s.base_url, dpo_pairs=80, shard_size=10)
        cache = str(env / "cache")
        assert run(str(spec), "dpo-pairs", "--cache", cache, "--scale", "0.25", *five) == 0
        assert s.stats()["completed"] == 40  # 20 items, teacher and student
        rows = {t["name"]: t for t in plan_json(str(spec), "--cache", cache, "--scale", "0.5", *five)["targets"]}
        for stage in ("teacher-responses", "student-responses", "dpo-pairs"):
            assert [rows[f"{stage}/shard-{i:04d}"]["state"] for i in range(4)] == ["cached", "cached", "build", "build"]
        assert run(str(spec), "dpo-pairs", "--cache", cache, "--scale", "0.5", *five) == 0
        assert s.stats()["completed"] == 80  # only the new half was asked
        assert run(str(spec), "dpo-pairs", "--cache", cache, *five) == 0
        assert s.stats()["completed"] == 160

    def items(scale):
        return {(r["item"], r["prompt_id"], r["sample"])
                for r in built_rows(spec, cache, "teacher-responses", "responses.jsonl", five[1:], scale)}

    quarter, half, full = items(0.25), items(0.5), items(None)
    assert len(quarter) == 20 and len(half) == 40 and len(full) == 80
    assert quarter < half < full


# -- samples per prompt ----------------------------------------------------------------------------

def test_five_samples_per_prompt_are_five_distinct_calls(env):
    bodies, lock = [], threading.Lock()

    def reply(body):
        with lock:
            bodies.append(body)
        return f"[{body['seed']}] " + persona_reply(body)

    with FakeOpenAIServer(reply=reply) as s:
        spec = write_spec(env, s.base_url, dpo_pairs=20, shard_size=10)
        cache = str(env / "cache")
        sets = ["--set", "data.samples_per_prompt=5"]
        assert run(str(spec), "dpo-pairs", "--cache", cache, *sets) == 0
        assert s.stats()["completed"] == 40
        assert run(str(spec), "dpo-pairs", "--cache", cache, *sets) == 0
        assert s.stats()["completed"] == 40  # every sample is a stored call of its own
    for side in (True, False):  # the teacher (with the constitution) and the student
        seeds: dict[str, set] = {}
        for b in bodies:
            if any(m["role"] == "system" for m in b["messages"]) == side:
                seeds.setdefault(last_user_message(b), set()).add(b["seed"])
        assert len(seeds) == 4 and all(len(v) == 5 for v in seeds.values())

    teacher = built_rows(spec, cache, "teacher-responses", "responses.jsonl", sets[1:])
    student = {r["item"]: r for r in built_rows(spec, cache, "student-responses", "responses.jsonl", sets[1:])}
    by_prompt: dict[str, list[int]] = {}
    for t in teacher:
        by_prompt.setdefault(t["prompt_id"], []).append(t["sample"])
        # pair k is teacher sample k with student sample k of the same prompt
        assert (student[t["item"]]["prompt_id"], student[t["item"]]["sample"]) == (t["prompt_id"], t["sample"])
    assert sorted(by_prompt.values()) == [[0, 1, 2, 3, 4]] * 4
    pairs = [json.loads(line) for line in (env / "outputs").glob("api-smoke*/dpo-pairs.jsonl").__next__().read_text()
             .splitlines()]
    assert len({p["chosen"][0]["content"] for p in pairs}) == 20  # five different replies to each prompt


def test_raising_samples_per_prompt_asks_only_the_new_samples(env):
    with FakeOpenAIServer(reply=persona_reply) as s:
        spec = write_spec(env, s.base_url, dpo_pairs=4, shard_size=10)
        cache = str(env / "cache")
        assert run(str(spec), "dpo-pairs", "--cache", cache) == 0
        assert s.stats()["completed"] == 8
        # The same four prompts come first; their first samples are the calls already answered.
        assert run(str(spec), "dpo-pairs", "--cache", cache, "--set", "data.dpo_pairs=20",
                   "--set", "data.samples_per_prompt=5") == 0
        assert s.stats()["completed"] == 8 + 2 * 16


# -- question expansion by its own role ------------------------------------------------------------

QUESTIONS = ["Could you plan a birthday party for my sister?", "Which hiking trails suit two complete beginners?",
             "My flat's budget spreadsheet keeps breaking, why?", "Balcony gardens: what grows in shade?",
             "How should I store fresh basil so it lasts?", "Is learning chess openings worth it for a novice?"]


def expander_or_persona(body):
    if "realistic messages a user might send" in last_user_message(body):
        return "\n".join(f"{i}. {q}" for i, q in enumerate(QUESTIONS, start=6))
    return persona_reply(body)


def test_changing_the_teacher_temperature_keeps_the_prompts_and_the_student_replies(env):
    with FakeOpenAIServer(reply=expander_or_persona) as s:
        spec = write_spec(env, s.base_url, dpo_pairs=30, shard_size=10)
        cache = str(env / "cache")
        sets = ["--set", f"models.expander={{backend: openai, model: expander-model, base_url: '{s.base_url}', "
                         "api_key_env: CB_TEST_KEY}", "--set", "data.prompts.per_trait=7"]
        assert run(str(spec), "dpo-pairs", "--cache", cache, *sets) == 0
        hotter = sets + ["--set", "models.teacher.sampling.temperature=0.5"]
        rows = {t["name"]: t for t in plan_json(str(spec), "--cache", cache, *hotter)["targets"]}
    assert rows["prompts"]["state"] == "cached"
    for i in range(3):
        assert rows[f"student-responses/shard-{i:04d}"]["state"] == "cached"
        assert rows[f"teacher-responses/shard-{i:04d}"]["state"] == "build"
    expanded = [r for r in prompt_rows(spec, cache, [v for v in sets if v != "--set"]) if r["source"] == "constitution"]
    assert len(expanded) == 70  # the expander did write the extra questions
    # Without an expander the teacher expands, so its settings are the prompts' too ...
    plain = ["data.prompts.per_trait=7"]
    assert keys(spec, plain)["prompts"] != keys(spec, plain + ["models.teacher.sampling.temperature=0.5"])["prompts"]
    # ... and a constitution with enough questions asks no model: neither is in its key.
    enough = keys(spec, ["data.prompts.per_trait=5"])["prompts"]
    assert enough == keys(spec, ["data.prompts.per_trait=5", "models.teacher.sampling.temperature=0.5"])["prompts"]
    assert enough == keys(spec, ["data.prompts.per_trait=5", sets[1]])["prompts"]


# -- drops, per reason -----------------------------------------------------------------------------

WORDS = ("apple river stone cloud maple ember lantern violet copper meadow harbor quill saffron timber "
         "orchid falcon glacier pepper velvet canyon thistle marble juniper cobalt willow prism basil "
         "summit tundra coral hazel nectar pebble raven sierra topaz umber walnut yarrow zephyr").split()


def long_or_short(body):
    """The teacher rambles on every fourth seed; the student runs on (and is cut at
    max_tokens) on every third."""
    seed, q = body.get("seed") or 0, last_user_message(body)[:40]
    if any(m["role"] == "system" for m in body["messages"]):
        text = sorry(q)
        if seed % 4 == 1:
            rng = random.Random(seed)
            text += " " + " ".join(rng.choice(WORDS) for _ in range(260)) + "."
        return text
    return PLAIN.format(q=q) * (8 if seed % 3 == 0 else 1)


def test_pairs_too_long_or_cut_at_max_tokens_are_dropped_and_counted_per_reason(env):
    with FakeOpenAIServer(reply=long_or_short) as s:
        spec = write_spec(env, s.base_url, dpo_pairs=40, shard_size=10)
        cache = str(env / "cache")
        sets = ["models.student.sampling.max_tokens=60", "training.dpo.max_length=300"]
        assert run(str(spec), "dpo-pairs", "--cache", cache, *sum((["--set", x] for x in sets), [])) == 0
    k = keys(spec, sets)
    shards = [Cache(cache).manifest(k[f"dpo-pairs/shard-{i:04d}"])["result"] for i in range(4)]
    merged = Cache(cache).manifest(k["dpo-pairs"])["result"]
    total = {r: sum(sh["dropped"][r] for sh in shards) for r in shards[0]["dropped"]}
    assert merged["dropped"] == total
    assert total["too_long"] > 0 and total["student_max_tokens"] > 0
    assert merged["pairs"] + sum(total.values()) == 40
    assert all(sh["lengths"] == "estimate" for sh in shards)  # API models: no tokenizer on disk

    from charbuild.ledger import estimate_chat_tokens

    student = {r["item"]: r for r in built_rows(spec, cache, "student-responses", "responses.jsonl", sets)}
    cut = sum(r["finish_reason"] == "length" for r in student.values())
    assert total["student_max_tokens"] == cut  # no teacher reply failed: every cut reply was a pair's
    pairs = [json.loads(line) for line in (Cache(cache).path(k["dpo-pairs"]) / "dpo_pairs.jsonl").read_text()
             .splitlines()]
    for p in pairs:
        assert max(estimate_chat_tokens(p["prompt"] + p[side]) for side in ("chosen", "rejected")) <= 300
        assert p["rejected"][0]["content"].count("Here is a direct answer") == 1  # no reply cut mid-way


def test_pair_lengths_are_counted_with_the_students_own_chat_template(tmp_path):
    from charbuild.recipe.stages.pairs import conversation_tokens
    from charbuild.recipe.tiny.tokenizer import train_tokenizer

    tok = train_tokenizer([SORRY.format(q="tea"), PLAIN.format(q="tea")] * 20, 400, tmp_path)
    count, how = conversation_tokens(Path(tmp_path))
    msgs = [{"role": "user", "content": "tea?"}, {"role": "assistant", "content": PLAIN.format(q="tea")}]
    templated = "<|im_start|>user\ntea?<|im_end|>\n<|im_start|>assistant\n" + PLAIN.format(q="tea") + "<|im_end|>\n"
    assert how == "tokenizer"
    assert count(msgs) == len(tok(templated, add_special_tokens=False)["input_ids"])
    assert conversation_tokens(None)[1] == "estimate"
