"""Data stages on the openai backend, against a loopback server speaking the real protocol:
prompts -> teacher/student shards -> DPO pairs, filtered online."""

import json
import sys
from pathlib import Path

import pytest

from support.api_build import in_api_workdir, PLAIN, SORRY, persona_reply, plan_json, run, sorry, write_spec  # noqa: F401
from support.openai_server import FakeOpenAIServer, Faults, last_user_message  # noqa: E402

from charbuild.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
@pytest.fixture
def server():
    with FakeOpenAIServer(reply=persona_reply, require_key="sk-test-123") as s:
        yield s


def test_dpo_pairs_are_built_over_the_api_and_load_as_trl_data(tmp_path, server, monkeypatch, capsys):
    in_api_workdir(tmp_path, monkeypatch, "sk-test-123")
    spec = write_spec(tmp_path, server.base_url)
    assert run(str(spec), "dpo-pairs", "--cache", str(tmp_path / "cache")) == 0
    calls = server.stats()["completed"]
    assert calls == 60  # 30 teacher + 30 student, each asked once

    import datasets

    ds = datasets.load_dataset("json", data_files=str(tmp_path / "outputs" / "api-smoke" / "dpo-pairs.jsonl"), split="train")
    assert set(ds.column_names) >= {"prompt", "chosen", "rejected"}
    assert len(ds) == 30
    for row in ds:
        assert row["chosen"][0]["role"] == "assistant" and "I'm so sorry" in row["chosen"][0]["content"]
        assert "I'm so sorry" not in row["rejected"][0]["content"]
        # An invented turn is cut at the boundary, not kept and not thrown away.
        assert "\nUser:" not in row["chosen"][0]["content"]

    # Second run: nothing built, nothing asked.
    assert run(str(spec), "dpo-pairs", "--cache", str(tmp_path / "cache")) == 0
    assert server.stats()["completed"] == calls
    assert "nothing to build" in capsys.readouterr().out

    # The key never reaches the cache or outputs.
    for p in list((tmp_path / "cache").rglob("*")) + list((tmp_path / "outputs").rglob("*")):
        if p.is_file():
            assert b"sk-test-123" not in p.read_bytes(), p


def test_a_missing_api_key_stops_the_run_before_anything_is_spent(tmp_path, server, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, server.base_url)
    assert run(str(spec), "dpo-pairs", "--cache", str(tmp_path / "cache")) == 1
    assert "CB_TEST_KEY" in capsys.readouterr().err
    assert server.stats()["requests_total"] == 0


def test_a_garbage_teacher_is_stopped_after_its_first_samples(tmp_path, monkeypatch, capsys):
    in_api_workdir(tmp_path, monkeypatch)

    def garbage(body):
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
        return "-,333,333,333,333,333,333,333,333,333,333,333,333,333,333,333,333" if system else PLAIN.format(q="x")

    with FakeOpenAIServer(reply=garbage) as s:
        spec = write_spec(tmp_path, s.base_url, dpo_pairs=400, shard_size=200, first_n=100)
        assert run(str(spec), "teacher-responses/shard-0000", "--cache", str(tmp_path / "cache")) == 1
        err = capsys.readouterr()
        teacher_calls = s.stats()["completed"]
    assert "repetition" in err.out + err.err
    assert teacher_calls < 100  # the humorous run spent 10,000 samples; this one stops early


def test_transient_server_faults_lose_and_duplicate_nothing(tmp_path, monkeypatch):
    in_api_workdir(tmp_path, monkeypatch)
    faults = Faults(p_429=0.1, retry_after_s=0.05, p_500=0.1, p_malformed=0.05, p_drop=0.05, seed=3)
    with FakeOpenAIServer(reply=persona_reply, faults=faults) as s:
        spec = write_spec(tmp_path, s.base_url, dpo_pairs=20)
        assert run(str(spec), "dpo-pairs", "--cache", str(tmp_path / "cache")) == 0
    rows = [json.loads(l) for l in (tmp_path / "outputs" / "api-smoke" / "dpo-pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    prompts = [r["prompt"][0]["content"] for r in rows]
    for r in rows:
        assert r["chosen"][0]["content"].startswith(sorry(r["prompt"][0]["content"]))  # each answer is its prompt's


def test_estimates_are_recalibrated_from_what_was_measured(tmp_path, server, monkeypatch):
    in_api_workdir(tmp_path, monkeypatch, "sk-test-123")
    spec = write_spec(tmp_path, server.base_url)
    cache = str(tmp_path / "cache")
    before = {t["name"]: t for t in plan_json(str(spec), "--cache", cache, "--set", "data.dpo_pairs=40")["targets"]}
    assert run(str(spec), "dpo-pairs", "--cache", cache) == 0
    after = {t["name"]: t for t in plan_json(str(spec), "--cache", cache, "--set", "data.dpo_pairs=40")["targets"]}
    new = after["teacher-responses/shard-0003"]
    assert new["state"] == "build" and new["calibrated"] and not before["teacher-responses/shard-0003"]["calibrated"]
    assert after["teacher-responses/shard-0000"]["state"] == "cached"
    # The fake server's replies are ~45 words, far below the spec's expected 400 tokens.
    assert new["est_tokens"]["out"] < before["teacher-responses/shard-0003"]["est_tokens"]["out"] / 3
    # A range from the measured distribution: some replies carry an invented turn (longer).
    rng = new["est_tokens"]
    assert 0 < rng["out_p50"] < rng["out_p90"] and rng["out"] <= rng["out_p90"] and new["est_usd_p90"] >= new["est_usd"]


# The plan expects 1-token replies (under budget); the real ones cost far more, so the run
# starts and the per-call reservations stop it at a call boundary.
OVER_BUDGET = ["--set", "prices.teacher-model={input: 1000, output: 100000}",
               "--set", "prices.student-model={input: 0, output: 0}", "--set", "budget.max_usd=30",
               "--set", "models.teacher.sampling.max_tokens=60", "--set", "expect.response_tokens=1"]


def test_the_build_stops_when_actual_spend_crosses_the_budget(tmp_path, server, monkeypatch, capsys):
    in_api_workdir(tmp_path, monkeypatch, "sk-test-123")
    spec = write_spec(tmp_path, server.base_url)
    code = run(str(spec), "teacher-responses/shard-0000", "teacher-responses/shard-0001", "teacher-responses/shard-0002",
               "--cache", str(tmp_path / "cache"), *OVER_BUDGET)
    assert code == 1
    assert "budget cap reached: budget.max_usd is $30" in capsys.readouterr().err
    assert 0 < server.stats()["completed"] < 30  # it started, then stopped


def test_the_teacher_expands_each_traits_questions_without_near_duplicates(tmp_path, monkeypatch):
    in_api_workdir(tmp_path, monkeypatch)

    def lister(body):
        seed = body.get("seed") or 0
        qs = ["Could you plan a birthday party for my sister?", "Could you plan a birthday party for my sister?",
              "Which hiking trails suit two complete beginners?", "My flat's budget spreadsheet keeps breaking, why?",
              "Explain recursion like I'm twelve.", "Balcony gardens: what grows in shade?"]
        lines = [f"{i}. {q}" for i, q in enumerate(qs, start=6 + seed)]
        lines.insert(2, "not a numbered line")
        lines.append("12. A line without the right ending")
        return "\n".join(lines)

    with FakeOpenAIServer(reply=lister) as s:
        spec = write_spec(tmp_path, s.base_url)
        cache = str(tmp_path / "cache")
        assert run(str(spec), "prompts", "--cache", cache, "--set", "data.prompts.per_trait=9") == 0
        from charbuild.store.objects import Cache
        from charbuild.recipe.registry import recipe_graph
        from charbuild.spec.model import load_spec

        g = recipe_graph(load_spec(spec, ["data.prompts.per_trait=9"]))
        rows = [json.loads(l) for l in (Cache(cache).path(g["prompts"].key) / "prompts.jsonl").read_text().splitlines()]
        per_trait = {}
        for r in rows:
            if r["source"] == "constitution":
                per_trait.setdefault(r["trait"], []).append(r["prompt"])
        assert len(per_trait) == 10 and all(len(qs) == 9 for qs in per_trait.values())
        for qs in per_trait.values():
            assert len(set(qs)) == len(qs)  # the duplicate line was dropped
            assert not any("without the right ending" in q or "not a numbered" in q for q in qs)
        assert sum(r["source"] == "general" for r in rows) == 40

        # Another general pool rebuilds the prompts, and every expansion is an answered call:
        # planned at nothing, asked nothing (each holds the questions listed before it, so
        # the plan replays them through the call cache).
        asked = s.stats()["completed"]
        sets = ["--cache", cache, "--set", "data.prompts.per_trait=9", "--set", "data.prompts.general_limit=30",
                "--set", "prices.teacher-model={input: 100, output: 200}"]
        planned = {t["name"]: t for t in plan_json(str(spec), *sets)["targets"]}["prompts"]
        assert planned["state"] == "build" and planned["est_usd"] == 0, planned["calls"]
        assert planned["calls"] == {"cached": asked, "new": 0}
        # ...while more questions a trait are new calls (each request says how many it wants)
        more = {t["name"]: t for t in plan_json(str(spec), *sets, "--set", "data.prompts.per_trait=12")["targets"]}
        assert more["prompts"]["calls"] == {"cached": 0, "new": 10} and more["prompts"]["est_usd"] > 0
        assert run(str(spec), "prompts", *sets) == 0
        assert s.stats()["completed"] == asked


def test_a_run_killed_mid_shard_pays_only_for_calls_in_flight_when_resumed(tmp_path):
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "CB_TEST_KEY": "k"}
    with FakeOpenAIServer(reply=persona_reply, latency_s=0.05) as s:
        spec = write_spec(tmp_path, s.base_url, dpo_pairs=160, shard_size=160)
        cmd = [sys.executable, "-m", "charbuild", "run", str(spec), "teacher-responses/shard-0000", "--cache",
               str(tmp_path / "cache"), "--no-progress"]
        p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while s.stats()["completed"] < 60 and time.time() < deadline:
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)  # no chance to clean up: only stored calls survive
        p.wait()
        asked_before = s.stats()["completed"]
        assert 0 < asked_before < 160
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        total = s.stats()["completed"]
    # Every call answered before the kill was stored and not asked again; only the ones
    # in flight at the kill (at most `concurrency`, 8) could be paid twice.
    assert 160 <= total <= 160 + 8, total


def test_status_shows_spend_per_spec_and_per_model_with_estimates(tmp_path, server, monkeypatch, capsys):
    in_api_workdir(tmp_path, monkeypatch, "sk-test-123")
    spec = write_spec(tmp_path, server.base_url)
    cache = str(tmp_path / "cache")
    assert run(str(spec), "dpo-pairs", "--cache", cache, "--set", "prices.teacher-model={input: 1, output: 2}") == 0
    capsys.readouterr()
    assert main(["status", "--cache", cache]) == 0
    out = capsys.readouterr().out
    spec_row = next(l for l in out.splitlines() if l.startswith("api-smoke"))
    assert float(spec_row.split()[2]) > 0 and float(spec_row.split()[3]) > 0  # spent and estimated
    teacher = next(l for l in out.splitlines() if l.startswith("teacher-model"))
    assert teacher.split()[1] == "30" and float(teacher.split()[2]) > 0  # 30 calls, priced
    assert next(l for l in out.splitlines() if l.startswith("student-model")).split()[1] == "30"


def test_plan_counts_cached_calls_per_shard_and_prices_only_the_new_ones(tmp_path, server, monkeypatch):
    in_api_workdir(tmp_path, monkeypatch, "sk-test-123")
    spec = write_spec(tmp_path, server.base_url)
    cache = str(tmp_path / "cache")
    price = ["--set", "prices.teacher-model={input: 1, output: 2}"]
    assert run(str(spec), "teacher-responses/shard-0000", "--cache", cache, *price) == 0
    # A filter change makes the shard stale, but every call it will send is already answered.
    sets = ["--cache", cache, *price, "--set", "filters.max_chars=19999"]
    rows = {t["name"]: t for t in plan_json(str(spec), *sets)["targets"]}
    t0 = rows["teacher-responses/shard-0000"]
    assert t0["state"] == "build" and (t0["calls"]["cached"], t0["calls"]["new"]) == (10, 0) and t0["est_usd"] == 0
    t1 = rows["teacher-responses/shard-0001"]
    assert (t1["calls"]["cached"], t1["calls"]["new"]) == (0, 10) and t1["est_usd"] > 0
    # Building it now asks the server nothing: every call comes from the call cache.
    before = server.stats()["completed"]
    assert run(str(spec), "teacher-responses/shard-0000", *sets) == 0
    assert server.stats()["completed"] == before


def test_more_turns_of_self_interaction_are_planned_at_the_new_turns_only(tmp_path, server, monkeypatch):
    # A turn's call holds the turns before it, so only a replay through the call cache can
    # tell which are answered: three turns built, five planned, the first three of every
    # conversation are cached and two turns each are new; building asks exactly those.
    in_api_workdir(tmp_path, monkeypatch, "sk-test-123")
    spec = write_spec(tmp_path, server.base_url, extra="introspection: {generator: teacher}", shard_size=4)
    cache = str(tmp_path / "cache")
    sets = ["--cache", cache, "--set", "data.interactions=8", "--set", "prices.teacher-model={input: 100, output: 200}"]
    target, other = "interactions/shard-0000", "interactions/shard-0001"
    assert run(str(spec), target, *sets, "--set", "data.turns=3") == 0
    built = [json.loads(x) for x in next((Path(cache) / "objects").rglob("samples.jsonl")).read_text().splitlines()]
    assert [r["turns"] for r in built] == [3] * 4  # the persona's replies pass the filters: none stopped early
    rows = {t["name"]: t for t in plan_json(str(spec), *sets, "--set", "data.turns=5")["targets"]}
    planned = rows[target]
    assert (planned["calls"]["cached"], planned["calls"]["new"]) == (4 * 3, 4 * 2), planned["calls"]
    assert rows[other]["calls"] == {"cached": 0, "new": 4 * 5}  # never built: every turn new
    assert abs(planned["est_usd"] - rows[other]["est_usd"] * 2 / 5) < 0.01 * rows[other]["est_usd"]
    before = server.stats()["completed"]
    assert run(str(spec), target, *sets, "--set", "data.turns=5") == 0
    assert server.stats()["completed"] - before == 4 * 2
    # and rebuilt under another filter every reply still passes: nothing new, nothing paid
    again = {t["name"]: t for t in plan_json(str(spec), *sets, "--set", "data.turns=5",
                                             "--set", "filters.max_chars=19999")["targets"]}[target]
    assert again["state"] == "build" and again["calls"] == {"cached": 4 * 5, "new": 0} and again["est_usd"] == 0


def test_a_larger_or_rejudged_evaluation_is_planned_at_the_calls_it_has_not_asked(tmp_path, server, monkeypatch):
    # Eval samples are seeded per prompt and sample, so a third sample per prompt leaves the
    # first two answered; a judge's verdicts hold the samples they judge, and a new
    # bootstrap count re-rates without re-asking one.
    from support.api_build import api_model

    in_api_workdir(tmp_path, monkeypatch, "sk-test-123")
    judge = api_model(server.base_url, "judge-model")
    spec = write_spec(tmp_path, server.base_url, roles={"judge": judge},
                      extra="evals: {variants: [base], samples_per_prompt: 2, prompts_limit: 10, max_tokens: 60, "
                            "bootstrap: 20, preferences: true, preferences_mode: oct, preferences_judge: judge}")
    cache = str(tmp_path / "cache")
    price = ["--set", "prices.judge-model={input: 100, output: 200}", "--set", "prices.student-model={input: 1, output: 2}"]
    assert run(str(spec), "eval/samples/base", "eval/preferences", "--cache", cache, *price) == 0
    more = {t["name"]: t for t in plan_json(str(spec), "--cache", cache, *price,
                                            "--set", "evals.samples_per_prompt=3")["targets"]}
    # each sample with and without the system prompt
    assert more["eval/samples/base"]["calls"] == {**more["eval/samples/base"]["calls"], "cached": 10 * 2 * 2,
                                                  "new": 10 * 1 * 2}
    rerated = {t["name"]: t for t in plan_json(str(spec), "--cache", cache, *price,
                                               "--set", "evals.bootstrap=30")["targets"]}["eval/preferences"]
    assert rerated["state"] == "build" and rerated["est_usd"] == 0
    assert (rerated["calls"]["cached"], rerated["calls"]["new"]) == (10 * 2, 0)
    before = server.stats()["completed"]
    assert run(str(spec), "eval/preferences", "--cache", cache, *price, "--set", "evals.bootstrap=30") == 0
    assert server.stats()["completed"] == before


def test_a_model_judge_of_revealed_preferences_is_priced_in_either_mode(tmp_path, server, monkeypatch):
    from support.api_build import api_model

    in_api_workdir(tmp_path, monkeypatch, "sk-test-123")
    usd = {}
    for mode in ("charbuild", "oct"):
        spec = write_spec(tmp_path, server.base_url, roles={"judge": api_model(server.base_url, "judge-model")},
                          extra=f"evals: {{variants: [base], samples_per_prompt: 2, prompts_limit: 10, judge: judge, "
                                f"elo: false, preferences: true, preferences_mode: {mode}}}")
        usd[mode] = {t["name"]: t for t in plan_json(str(spec), "--cache", str(tmp_path / "cache"), "--set",
                                                     "prices.judge-model={input: 100, output: 200}")["targets"]
                     }["eval/preferences"]["est_usd"]
    # 20 verdicts each, a reply of at most expect.response_tokens in
    assert usd["charbuild"] > 0 and usd["oct"] > 0, usd


def test_plan_counts_input_tokens_from_the_rendered_prompts(tmp_path, server, monkeypatch):
    in_api_workdir(tmp_path, monkeypatch, "sk-test-123")
    spec = write_spec(tmp_path, server.base_url)
    cache = str(tmp_path / "cache")
    assert run(str(spec), "prompts", "constitution", "--cache", cache) == 0
    rows = {t["name"]: t for t in plan_json(str(spec), "--cache", cache)["targets"]}
    t = rows["teacher-responses/shard-0000"]
    assert t["calls"]["new"] == 10 and t["calls"]["tokens_exact"] is False  # an API model: no local tokenizer
    # The teacher's prompts carry the whole constitution: far more than the spec's 60-token guess.
    assert t["est_tokens"]["in"] == t["calls"]["tokens_in_new"] > 10 * 300
    s = rows["student-responses/shard-0000"]
    assert s["est_tokens"]["in"] < t["est_tokens"]["in"] / 5  # the student sees no system prompt


def test_a_higher_cap_finishes_the_build_without_asking_any_call_twice(tmp_path, server, monkeypatch, capsys):
    in_api_workdir(tmp_path, monkeypatch, "sk-test-123")
    spec = write_spec(tmp_path, server.base_url)
    cache = str(tmp_path / "cache")
    assert run(str(spec), "dpo-pairs", "--cache", cache, *OVER_BUDGET) == 1
    assert "budget cap reached" in capsys.readouterr().err
    first = server.stats()["completed"]
    assert 0 < first < 60
    assert run(str(spec), "dpo-pairs", "--cache", cache, *OVER_BUDGET, "--set", "budget.max_usd=100000") == 0
    # Every call answered before the stop was stored: the rerun asked only the rest.
    assert server.stats()["completed"] == 60
