"""Batch mode (`models.<role>.mode: batch`): a stage's new calls go through the provider's
batch API (/v1/files + /v1/batches) at its batch rate, against the loopback server's
in-memory batch API. Every call is asked once, through the batch endpoint; the answers
land in the call cache under the keys online calls have; a run killed while its batch
runs polls the same batch on rerun; failed, missing and unfinished lines are asked online;
the ledger charges the batch rate; `plan` shows both prices."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.api_build import built_manifest, in_api_workdir, persona_reply, plan_json
from support.api_build import write_spec as api_spec
from support.keyboard import interruptible
from support.openai_server import BatchFaults, FakeOpenAIServer
from support.s3_fixtures import prefix_of, s3  # noqa: F401  (s3: a fixture)

from charbuild.cli import main
from charbuild.store.calls import CallCache

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-batch"
PRICES = "prices: {teacher-model: {input: 1000, output: 2000}, student-model: {input: 1000, output: 2000}}"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARBUILD_BATCH_POLL_S", "0.02")
    return in_api_workdir(tmp_path, monkeypatch, KEY)


def write_spec(tmp_path: Path, base_url: str, teacher_mode: str = "batch", student_mode: str = "batch",
               extra: str = PRICES, pairs: int = 30) -> Path:
    return api_spec(tmp_path, base_url, name="batch-smoke", file="batch.yaml", teacher=f"mode: {teacher_mode}",
                    student=f"mode: {student_mode}", extra=extra, dpo_pairs=pairs)


def run(spec: Path, cache: Path, *args: str) -> int:
    return main(["run", str(spec), *args, "--cache", str(cache), "--no-progress"])


def manifest_usage(cache: Path, target: str) -> dict:
    return built_manifest(cache, target)["usage"]


def lines_sent(srv: FakeOpenAIServer) -> int:
    return sum(len(srv.files[b["input_file_id"]].splitlines()) for b in srv.batches.values())


# -- every call once, through the batch endpoint --------------------------------------------------

def test_a_batch_build_asks_every_call_once_through_the_batch_api_and_shares_the_call_cache_with_online(env):
    cache = env / "cache"
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY) as srv:
        # An online answer first: a batch build must not ask it again.
        online = write_spec(env, srv.base_url, "online", "online")
        assert run(online, cache, "teacher-responses/shard-0000") == 0
        assert srv.requests_total == 10 and srv.files_uploaded == 0

        spec = write_spec(env, srv.base_url)
        assert run(spec, cache, "dpo-pairs") == 0
        assert srv.requests_total == 10  # nothing more through the chat endpoint
        assert sum(srv.batch_answered.values()) == 50 and set(srv.batch_answered.values()) == {1}
        assert not set(srv.batch_answered) & set(srv.answered)  # no call asked both ways
        # One batch per shard with new calls (5 of 6; 10 calls each), one upload each.
        assert len(srv.batches_created) == srv.files_uploaded == 5 and lines_sent(srv) == 50
        rows = (env / "outputs" / "batch-smoke" / "dpo-pairs.jsonl").read_text().splitlines()
        assert len(rows) == 30

        # The batch's answers are the online mode's hits: a rebuild online asks nothing.
        assert run(online, cache, "dpo-pairs", "--set", "filters.max_chars=19999") == 0
        assert srv.requests_total == 10 and len(srv.batches_created) == 5
    assert not list((cache / "calls" / "batches").rglob("*.json"))  # every batch collected


# -- a killed run polls the same batch ------------------------------------------------------------

def test_a_run_killed_while_its_batch_runs_polls_the_same_batch_on_rerun(env):
    cache = env / "cache"
    run_env = {**os.environ, "CB_TEST_KEY": KEY, "CHARBUILD_BATCH_POLL_S": "0.02"}
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY, batch=BatchFaults(polls=10**9)) as srv:
        spec = write_spec(env, srv.base_url)
        cmd = [sys.executable, "-m", "charbuild", "run", str(spec), "teacher-responses/shard-0000", "--cache",
               str(cache), "--no-progress"]
        p = subprocess.Popen(cmd, cwd=env, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (srv.batches_created and srv.batch_polls[srv.batches_created[0]] >= 2):
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never polled its batch"
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)  # no cleanup: only what is on disk survives
        p.wait()
        bid = srv.batches_created[0]
        assert len(list((cache / "calls" / "batches").rglob("*.json"))) == 1  # the journal

        srv.batch.polls = 0  # the provider finishes the batch meanwhile
        r = subprocess.run(cmd, cwd=env, env=run_env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    assert srv.batches_created == [bid] and srv.files_uploaded == 1  # the same batch, no second upload
    assert srv.batch_polls[bid] > 2  # polled by the rerun
    assert srv.requests_total == 0 and sum(srv.batch_answered.values()) == 10
    assert len(CallCache(cache)) == 10
    assert not list((cache / "calls" / "batches").rglob("*.json"))


def test_a_machine_killed_while_its_batch_runs_leaves_that_batch_to_the_machine_that_takes_over(env, s3):
    """The cache in a bucket: the journal is there too, so the second machine (its own
    working cache, empty) polls the first one's batch instead of paying for it again."""
    url = s3.url()
    run_env = {**os.environ, "CB_TEST_KEY": KEY, "CHARBUILD_BATCH_POLL_S": "0.02", "CHARBUILD_LEASE_TTL": "2"}
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY, batch=BatchFaults(polls=10**9)) as srv:
        spec = write_spec(env, srv.base_url)
        cmd = [sys.executable, "-m", "charbuild", "run", str(spec), "teacher-responses/shard-0000", "--cache", url,
               "--no-progress"]
        p = subprocess.Popen(cmd, cwd=env, env={**run_env, "CHARBUILD_LOCAL_CACHE": str(env / "machine-a")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (srv.batches_created and srv.batch_polls[srv.batches_created[0]] >= 2):
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never polled its batch"
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
        bid = srv.batches_created[0]
        journals = lambda: [k for k in s3.keys(prefix_of(url)) if "/calls/batches/" in k]  # noqa: E731
        assert len(journals()) == 1

        srv.batch.polls = 0
        r = subprocess.run(cmd, cwd=env, env={**run_env, "CHARBUILD_LOCAL_CACHE": str(env / "machine-b")},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    assert srv.batches_created == [bid] and srv.files_uploaded == 1  # the same batch, no second upload
    assert srv.requests_total == 0 and sum(srv.batch_answered.values()) == 10
    assert journals() == []  # collected: gone from the bucket
    assert len(CallCache(url)) == 10


@pytest.mark.parametrize("jobs", [1, 4])
def test_ctrl_c_while_a_batch_runs_ends_the_run_at_once_and_the_next_run_collects_that_batch(env, jobs):
    cache = env / "cache"
    run_env = {**os.environ, "CB_TEST_KEY": KEY, "CHARBUILD_BATCH_POLL_S": "0.02", "PYTHONUNBUFFERED": "1"}
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY, batch=BatchFaults(polls=10**9)) as srv:
        spec = write_spec(env, srv.base_url)
        cmd = [sys.executable, "-m", "charbuild", "run", str(spec), "teacher-responses/shard-0000",
               "teacher-responses/shard-0001", "--cache", str(cache), "--no-progress", "--jobs", str(jobs)]
        p = subprocess.Popen(cmd, cwd=env, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=interruptible)
        deadline = time.monotonic() + 60
        while not (srv.batches_created and srv.batch_polls[srv.batches_created[0]] >= 2):
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never polled its batch"
            time.sleep(0.01)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("charbuild still polling 10 s after Ctrl-C")
        assert p.returncode == 130 and time.monotonic() - t0 < 5, err[-3000:]
        sent = list(srv.batches_created)
        assert 1 <= len(sent) <= 2 and srv.requests_total == 0

        srv.batch.polls = 0
        r = subprocess.run(cmd, cwd=env, env=run_env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    assert srv.batches_created[:len(sent)] == sent and len(srv.batches_created) == 2  # the old batches, collected
    assert srv.requests_total == 0 and sum(srv.batch_answered.values()) == 20 == len(CallCache(cache))


def test_a_run_killed_between_the_upload_and_the_batch_finds_the_batch_by_its_file(env):
    from charbuild.backends.base import GenRequest
    from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig
    from charbuild.store.calls import BatchJournals

    with FakeOpenAIServer(require_key=KEY) as srv:
        backend = OpenAIBackend(OpenAIConfig(model="m", base_url=srv.base_url, api_key_env="CB_TEST_KEY"))
        items = {f"{i:032x}": GenRequest(messages=[{"role": "user", "content": f"question {i}"}], seed=i)
                 for i in range(8)}
        journals = BatchJournals(env, "scope")
        # What a run killed after its upload left: the file and a journal naming it, and a
        # batch made from it (the kill came while the create request was answered).
        jsonl = "".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                                    "body": {"model": "m", "messages": r.messages, "max_tokens": r.max_tokens,
                                             "seed": r.seed}}) + "\n" for c, r in items.items())
        fid = backend.batch_upload(jsonl.encode())
        backend.batch_create(fid)
        journals.save("j1", {"schema": 1, "input_file_id": fid, "state": "uploaded",
                             "lines": {c: {"stop": [], "usd": 0.0, "tokens": 10} for c in items}})
        got = {}
        assert backend.generate_batch(items, journals, lambda k, r: got.__setitem__(k, r)) == []
        backend.close()
    assert len(srv.batches_created) == 1 and srv.files_uploaded == 1 and len(got) == 8
    assert got[f"{3:032x}"].text.startswith("reply to [question 3]")


def test_a_batch_the_provider_no_longer_knows_is_dropped_and_its_calls_asked_again(env):
    from charbuild.backends.base import GenRequest
    from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig
    from charbuild.store.calls import BatchJournals

    with FakeOpenAIServer(require_key=KEY) as srv:
        backend = OpenAIBackend(OpenAIConfig(model="m", base_url=srv.base_url, api_key_env="CB_TEST_KEY"))
        items = {f"{i:032x}": GenRequest(messages=[{"role": "user", "content": f"q{i}"}], seed=i) for i in range(3)}
        journals = BatchJournals(env, "scope")
        journals.save("j1", {"schema": 1, "input_file_id": "file-x", "batch_id": "batch_gone", "state": "created",
                             "lines": {c: {"stop": [], "usd": 0.0, "tokens": 10} for c in items}})
        assert sorted(backend.generate_batch(items, journals, lambda k, r: None)) == sorted(items)
        backend.close()
    assert journals.open() == [] and srv.batches_created == []


# -- faults: failed and missing lines go online, an expired batch keeps what it did --------------

@pytest.mark.parametrize("faults,by_batch,online", [
    (BatchFaults(error_lines={1}, status_500_lines={4}, missing_lines={7}), 7, 3),
    (BatchFaults(status="expired", done=6), 6, 4),
    (BatchFaults(status="expired", done=4, error_lines={0}), 3, 7),
    (BatchFaults(status="failed", done=0), 0, 10),
], ids=["error-500-missing", "expired", "expired-with-errors", "failed"])
def test_lines_a_batch_did_not_answer_are_asked_online_and_what_it_answered_is_kept(env, faults, by_batch, online):
    cache = env / "cache"
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY, batch=faults) as srv:
        spec = write_spec(env, srv.base_url)
        assert run(spec, cache, "teacher-responses/shard-0000") == 0
        assert len(srv.batches_created) == 1  # online, not a second batch
        assert sum(srv.batch_answered.values()) == by_batch and srv.requests_total == online
        assert not set(srv.batch_answered) & set(srv.answered)  # each call answered once
        usage = manifest_usage(cache, "teacher-responses/shard-0000")
    assert usage["api_calls"] == 10 and usage["batch_calls"] == by_batch
    assert len(CallCache(cache)) == 10


# -- dollars at the batch rate ------------------------------------------------------------------

def test_the_ledger_charges_batch_calls_at_the_batch_rate(env, capsys):
    costs = {}
    for mode in ("online", "batch"):
        cache = env / f"cache-{mode}"
        with FakeOpenAIServer(reply=persona_reply, require_key=KEY) as srv:
            spec = write_spec(env, srv.base_url, mode, mode)
            assert run(spec, cache, "teacher-responses/shard-0000") == 0
        costs[mode] = manifest_usage(cache, "teacher-responses/shard-0000")
    assert costs["online"]["tokens_in"] == costs["batch"]["tokens_in"] > 0  # the same calls, the same answers
    assert costs["batch"]["usd"] == pytest.approx(costs["online"]["usd"] / 2)  # batch_discount 0.5
    assert costs["batch"]["batch_calls"] == 10 and costs["online"]["batch_calls"] == 0
    capsys.readouterr()
    assert main(["status", "--cache", str(env / "cache-batch")]) == 0
    row = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("teacher-model")).split()
    assert row[1] == "10" and float(row[2]) == pytest.approx(costs["batch"]["usd"], abs=1e-4) and row[4] == "10"


def test_a_model_priced_with_its_own_batch_rates_is_charged_those(env):
    cache = env / "cache"
    prices = "prices: {teacher-model: {input: 1000, output: 2000, batch_input: 100, batch_output: 300}}"
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY) as srv:
        spec = write_spec(env, srv.base_url, extra=prices)
        assert run(spec, cache, "teacher-responses/shard-0000") == 0
    u = manifest_usage(cache, "teacher-responses/shard-0000")
    assert u["usd"] == pytest.approx((u["tokens_in"] * 100 + u["tokens_out"] * 300) / 1e6)


def test_a_batch_reserves_every_line_before_the_upload_and_sends_only_what_the_cap_holds(env, capsys):
    cache = env / "cache"
    # A reservation: 60 output tokens at $0.05 (batch rate of $100,000/M) = $3, plus the prompt.
    # A cap of $10 holds three lines' reservations, so the first batch has three lines; as they
    # settle (each answer costs less than it held) later rounds send what fits again.
    budget = ("prices: {teacher-model: {input: 0, output: 100000}}\nbudget: {max_usd: 10}\n"
              "expect: {response_tokens: 1}")
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY) as srv:
        spec = write_spec(env, srv.base_url, extra=budget)
        code = run(spec, cache, "teacher-responses/shard-0000", "--set", "models.teacher.sampling.max_tokens=60")
        err = capsys.readouterr().err
        first = srv.files[srv.batches[srv.batches_created[0]]["input_file_id"]].splitlines()
        spent = sum(json.loads(p.read_text())["usage_usd"] for p in (cache / "calls").rglob("*.json")
                    if p.parent.name != "batches" and p.name != "claims.lock")
    assert len(first) == 3  # all three reserved before the upload; the fourth would cross the cap
    assert code == 1 and "budget cap reached: budget.max_usd is $10" in err
    assert spent <= 10 + 1e-9  # the cap held: no line was sent that the cap could not hold
    assert srv.requests_total == 0  # nothing online either


# -- plan: both prices ----------------------------------------------------------------------------

def test_plan_shows_the_online_and_the_batch_cost_and_auto_picks_batch_when_the_deadline_allows(env, capsys):
    cache = str(env / "cache")
    base = "http://127.0.0.1:9/v1"  # never called: plan only
    rows = {t["name"]: t for t in plan_json(str(write_spec(env, base)), "--cache", cache)["targets"]}
    t = rows["teacher-responses/shard-0000"]
    assert t["est_usd_online"] > 0 and t["est_usd_batch"] == pytest.approx(t["est_usd_online"] / 2, rel=1e-3)
    assert t["batch"] and t["est_usd"] == t["est_usd_batch"]

    online = write_spec(env, base, "online", "online")
    t = {t["name"]: t for t in plan_json(str(online), "--cache", cache)["targets"]}["teacher-responses/shard-0000"]
    assert not t["batch"] and t["est_usd"] == t["est_usd_online"] > t["est_usd_batch"] > 0

    auto = write_spec(env, base, "auto", "auto")
    for deadline, batch in ((None, False), (12, False), (48, True)):
        sets = ["--set", f"budget.deadline_hours={deadline}"] if deadline else []
        t = {t["name"]: t for t in plan_json(str(auto), "--cache", cache, *sets)["targets"]}
        assert t["teacher-responses/shard-0000"]["batch"] is batch, deadline

    capsys.readouterr()
    assert main(["plan", str(write_spec(env, base)), "--cache", cache]) == 0
    out = capsys.readouterr().out
    assert "online / batch usd" in out
    total = next(l for l in out.splitlines() if l.startswith("TOTAL"))
    online_usd, batch_usd = [float(x.replace(",", "")) for x in re.search(r"\$([\d,.]+) / \$([\d,.]+)", total).groups()]
    assert batch_usd == pytest.approx(online_usd / 2, rel=0.01)


def test_mode_and_deadline_change_no_key(env):
    from charbuild.recipe.registry import recipe_graph
    from charbuild.spec.model import load_spec

    spec = write_spec(env, "http://127.0.0.1:9/v1", "online", "online")
    a = {n.name: n.key for n in recipe_graph(load_spec(spec))}
    b = {n.name: n.key for n in recipe_graph(load_spec(spec, ["models.teacher.mode=batch", "models.student.mode=auto",
                                                              "budget.deadline_hours=48"]))}
    assert a == b


def test_a_local_backend_cannot_be_put_in_batch_mode(env, capsys):
    spec = write_spec(env, "http://127.0.0.1:9/v1")
    lines = [("  student: {backend: vllm, model: Qwen/Qwen3-8B, mode: batch}" if l.startswith("  student:") else l)
             for l in spec.read_text().splitlines()]
    spec.write_text("\n".join(lines) + "\n")
    assert main(["plan", str(spec), "--cache", str(env / "cache")]) != 0
    assert "mode batch sends calls to a provider's batch API" in capsys.readouterr().err
