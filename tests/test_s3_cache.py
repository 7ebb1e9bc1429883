"""The cache and the call cache on an object store: a real S3 API on loopback (moto's
server), each worker with its own local working cache, the bucket the shared truth."""

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

from support import s3_server
from support.engine_stages import build

if s3_server.missing():
    pytest.skip(s3_server.missing(), allow_module_level=True)

from charbuild.store.calls import CallCache  # noqa: E402
from charbuild.store.objects import Cache  # noqa: E402
from support.s3_fixtures import manifest_key, prefix_of, s3, url, worker  # noqa: E402,F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def log(tmp_path, monkeypatch):
    p = tmp_path / "events.log"
    monkeypatch.setenv("CB_TEST_LOG", str(p))
    return p


def events(log) -> list[str]:
    return [line.split()[1] for line in Path(log).read_text().splitlines()] if Path(log).exists() else []


# -- objects ---------------------------------------------------------------------------------

def test_a_build_on_s3_has_the_local_keys_and_a_fresh_worker_builds_nothing(specs, cache_dir, url, s3, worker, log):
    local_plan, _ = build(specs / "smoke-small.yaml", cache_dir)
    log.unlink()
    worker("a")
    plan, report = build(specs / "smoke-small.yaml", url)
    assert [(r.name, r.key) for r in plan.rows] == [(r.name, r.key) for r in local_plan.rows]
    assert sorted(report.built) == sorted(r.name for r in plan.rows) and len(events(log)) == 4
    stored = set(s3.keys(prefix_of(url)))
    for r in plan.rows:  # every target is in the bucket, its manifest written last
        assert manifest_key(url, r.key) in stored
    assert not any("/locks/" in k or "/claims/" in k for k in stored)  # leases go once the work is stored

    fresh = worker("b")
    plan2, report2 = build(specs / "smoke-small.yaml", url)
    assert plan2.to_build == [] and report2.built == [] and len(events(log)) == 4
    assert [r.key for r in plan2.rows] == [r.key for r in local_plan.rows]
    assert sorted(report2.cached) == sorted(r.name for r in plan.rows)
    # Nothing was read, so nothing was downloaded; what a stage reads comes down on demand.
    assert not (fresh / "objects").exists() or not any((fresh / "objects").rglob("*.jsonl"))
    merged = next(r.key for r in plan2.rows if r.name == "merged")
    assert "remorseful-0" in (Cache(url).path(merged) / "merged.jsonl").read_text()
    assert (fresh / "objects" / merged[:2] / merged / "MANIFEST.json").is_file()


def test_two_drivers_on_one_bucket_build_each_target_once(specs, tmp_path, url, s3, log):
    spec = specs / "smoke-small.yaml"
    env = {**os.environ, "CB_SLEEP": "0.4", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "CHARBUILD_LEASE_TTL": "20"}
    cmd = [sys.executable, str(ROOT / "tests" / "support" / "engine_stages.py"), str(spec), url]
    procs = [subprocess.Popen(cmd, env={**env, "CHARBUILD_LOCAL_CACHE": str(tmp_path / f"driver-{i}")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    built = events(log)
    assert sorted(built) == sorted(set(built)) and len(built) == 4, built  # every target built exactly once
    reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sum(len(r["built"]) for r in reports) == 4
    assert sum(len(r["waited"]) + len(r["cached"]) for r in reports) == 4
    assert len([k for k in s3.keys(prefix_of(url)) if k.endswith("/MANIFEST.json")]) == 4  # all in the bucket


DIE_BEFORE_MANIFEST = r"""
import os, sys
from charbuild.store import remote
create = remote.RemoteStore.create
def create_or_die(self, rel, data):
    if rel.endswith("MANIFEST.json") and rel.split("/")[-2] == os.environ["CB_DIE_KEY"]:
        os._exit(9)  # killed mid-upload: the files are up, the manifest is not
    return create(self, rel, data)
remote.RemoteStore.create = create_or_die
sys.argv = sys.argv[1:]
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _killed_mid_upload(specs, tmp_path, url, s3, key: str) -> Path:
    local = tmp_path / "workers" / "killed-worker"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "CHARBUILD_LOCAL_CACHE": str(local), "CB_DIE_KEY": key,
           "CHARBUILD_LEASE_TTL": "2"}  # its build lease on the target lapses soon after it dies
    r = subprocess.run([sys.executable, "-c", DIE_BEFORE_MANIFEST, str(ROOT / "tests" / "support" / "engine_stages.py"),
                        str(specs / "smoke-small.yaml"), url], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr[-3000:]
    stored = set(s3.keys(prefix_of(url)))
    assert f"{prefix_of(url)}/objects/{key[:2]}/{key}/source.txt" in stored  # its files were uploaded
    assert manifest_key(url, key) not in stored
    return local


def test_a_kill_mid_upload_leaves_the_target_absent_and_the_next_run_rebuilds_and_publishes_it(
        specs, cache_dir, tmp_path, url, s3, worker, log):
    source = next(r.key for r in build(specs / "smoke-small.yaml", cache_dir)[0].rows if r.name == "source")
    log.unlink()
    _killed_mid_upload(specs, tmp_path, url, s3, source)
    assert events(log) == ["source"]

    worker("fresh")
    plan, report = build(specs / "smoke-small.yaml", url)
    assert next(r for r in plan.rows if r.name == "source").state == "build"  # absent: no manifest
    assert "source" in report.built and events(log).count("source") == 2
    m = json.loads(s3.get(manifest_key(url, source)))
    assert m["key"] == source and "source.txt" in m["files"]


def test_the_killed_worker_publishes_what_it_committed_without_rebuilding(specs, cache_dir, tmp_path, url, s3, worker, log):
    source = next(r.key for r in build(specs / "smoke-small.yaml", cache_dir)[0].rows if r.name == "source")
    log.unlink()
    local = _killed_mid_upload(specs, tmp_path, url, s3, source)
    worker("killed-worker")
    assert Path(os.environ["CHARBUILD_LOCAL_CACHE"]) == local
    _, report = build(specs / "smoke-small.yaml", url)
    assert events(log).count("source") == 1 and "source" in report.cached
    assert manifest_key(url, source) in set(s3.keys(prefix_of(url)))


def test_a_corrupted_file_in_the_bucket_is_detected_on_download_and_rebuilt(specs, url, s3, worker, log):
    worker("a")
    plan, _ = build(specs / "smoke-small.yaml", url)
    key = next(r.key for r in plan.rows if r.name == "source")
    obj = f"{prefix_of(url)}/objects/{key[:2]}/{key}/source.txt"
    s3.put(obj, s3.get(obj).replace(b"remorseful", b"REMORSEFUL"))  # same size, other content

    # A fresh worker downloads only what is read: the shards, stale for a new temperature,
    # read the source (their plan renders their prompts from it) and find it corrupt.
    worker("b")
    log.unlink()
    sets = ["models.teacher.sampling.temperature=0.3"]
    _, report = build(specs / "smoke-small.yaml", url, sets)
    assert report.failed == {} and events(log)[0] == "source" and "source" in report.built
    aside = s3.keys(f"{prefix_of(url)}/corrupt/")
    assert len(aside) == 1 and aside[0].endswith("/MANIFEST.json") and key in aside[0]  # kept for inspection
    assert s3.get(obj) == b"remorseful"  # rebuilt and published again
    worker("c")
    _, report = build(specs / "smoke-small.yaml", url, sets)  # good now, for everyone
    assert report.built == [] and report.failed == {}


def test_a_corrupt_input_found_while_building_is_set_aside_and_the_next_run_rebuilds_it(specs, url, s3, worker, log,
                                                                                      monkeypatch):
    from charbuild.engine import planner

    worker("a")
    plan, _ = build(specs / "smoke-small.yaml", url)
    key = next(r.key for r in plan.rows if r.name == "source")
    obj = f"{prefix_of(url)}/objects/{key[:2]}/{key}/source.txt"
    s3.put(obj, b"REMORSEFUL")
    monkeypatch.setattr(planner, "count_calls", lambda *a: None)  # a plan that reads no input
    worker("b")
    sets = ["models.teacher.sampling.temperature=0.3"]
    _, report = build(specs / "smoke-small.yaml", url, sets)
    assert list(report.failed) == ["items/shard-0000"] and "merged" in report.skipped
    assert "input source is corrupt" in report.failed["items/shard-0000"]
    assert "digest mismatch" in report.failed["items/shard-0000"]
    assert manifest_key(url, key) not in s3.keys(prefix_of(url))  # out of every worker's view
    _, report = build(specs / "smoke-small.yaml", url, sets)
    assert "source" in report.built and report.failed == {} and s3.get(obj) == b"remorseful"


def test_a_second_writer_uses_the_first_writers_object(tmp_path, url, s3):
    key = "ab" + "0" * 30
    caches = [Cache(url, local=tmp_path / f"w{i}") for i in range(2)]
    for i, c in enumerate(caches):
        with c.staging(key) as d:
            (d / "out.txt").write_text(f"writer {i}")
            c.commit(key, d, {"target": "t"})
    assert json.loads(s3.get(manifest_key(url, key)))["files"]["out.txt"]["size"] == len("writer 0")
    for c in caches:  # the second's own bytes gave way to the first's: one truth
        assert (c.path(key) / "out.txt").read_text() == "writer 0" and c.verify(key) == []
    reader = Cache(url, local=tmp_path / "reader")
    assert reader.has(key) and (reader.path(key) / "out.txt").read_text() == "writer 0"


def test_a_large_file_is_streamed_up_and_down_in_parts(tmp_path, url, monkeypatch):
    from charbuild.store import remote

    monkeypatch.setattr(remote, "SMALL", 1 << 20)
    monkeypatch.setattr(remote, "PART", 5 << 20)  # S3's smallest part
    key = "cd" + "1" * 30
    data = os.urandom(1 << 20) * 12  # 12 MiB: three parts
    a = Cache(url, local=tmp_path / "a")
    with a.staging(key) as d:
        (d / "model.safetensors").write_bytes(data)
        a.commit(key, d, {"target": "model"})
    b = Cache(url, local=tmp_path / "b")
    assert b.verify(key) == [] and (b.path(key) / "model.safetensors").read_bytes() == data


# -- leases ------------------------------------------------------------------------------------

HOLD = r"""
import sys, time
from charbuild.store.calls import CallCache
from charbuild.store.objects import Cache
what, url, key = sys.argv[1:4]
if what == "claim":
    held = CallCache(url).claim(key)
else:
    held = Cache(url).lock(key, wait=False)
    assert held.__enter__()
assert held
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("what", ["claim", "lock"])
def test_a_dead_workers_claim_lapses_after_its_expiry(tmp_path, url, what, monkeypatch):
    key = "ef" + "2" * 30
    ttl = 1.5
    monkeypatch.setenv("CHARBUILD_LEASE_TTL", str(ttl))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CHARBUILD_LOCAL_CACHE": str(tmp_path / "dead")}
    p = subprocess.Popen([sys.executable, "-c", HOLD, what, url, key], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        monkeypatch.setenv("CHARBUILD_LOCAL_CACHE", str(tmp_path / "alive"))  # another machine
        if what == "claim":
            calls = CallCache(url)

            def take():
                return calls.claim(key)
        else:
            cache = Cache(url)

            def take():
                held = cache.lock(key, wait=False)
                return held if held.__enter__() else None
        time.sleep(ttl * 1.2)  # renewed while its holder lives: held past its first expiry
        assert take() is None
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        killed = time.monotonic()
        assert take() is None  # dead, but its lease has not lapsed yet
        got = None
        while got is None and time.monotonic() - killed < ttl + 10:
            time.sleep(0.1)
            got = take()
        assert got is not None  # lapsed: taken without the dead worker's help
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


CALLS_CHILD = r"""
import json, sys
from charbuild.backends.base import GenRequest
from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig
from charbuild.backends.cached import CachedBackend
from charbuild.store.calls import CallCache
base_url, url, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
reqs = [GenRequest(messages=[{"role": "user", "content": f"question-{i}"}], seed=i, max_tokens=64) for i in ids]
be = OpenAIBackend(OpenAIConfig(model="fake-model", base_url=base_url, api_key_env=None, concurrency=8, timeout_s=30))
cb = CachedBackend(be, CallCache(url), "openai", "fake-model")
print("ready", flush=True)
sys.stdin.readline()
out = []
for s in range(0, len(reqs), 16):
    out += cb.generate(reqs[s:s + 16])
print(json.dumps({"texts": [r.text for r in out], "asked": cb.asked, "waited": cb.waited}), flush=True)
be.close()
"""


def test_two_drivers_on_one_bucket_ask_each_call_once(tmp_path, url, s3):
    from support.openai_server import FakeOpenAIServer

    n, conc = 60, 8
    with FakeOpenAIServer(latency_s=0.03) as srv:
        procs = []
        for name, ids in (("a", list(range(n))), ("b", list(range(n + 10))[::-1])):
            env = {**os.environ, "PYTHONPATH": str(ROOT), "CHARBUILD_LOCAL_CACHE": str(tmp_path / name)}
            p = subprocess.Popen([sys.executable, "-c", CALLS_CHILD, srv.base_url, url, json.dumps(ids)], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "ready"
            procs.append(p)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        completed = srv.completed
    ra, rb = (json.loads(o.strip().splitlines()[-1]) for o in outs)
    # Without sharing 130 completions; with it each call once, bar the calls in flight.
    assert completed <= n + 10 + conc, (completed, ra["asked"], rb["asked"])
    assert ra["asked"] + rb["asked"] <= n + 10 + conc
    assert [t.split(" seed=")[0] for t in ra["texts"]] == [f"reply to [question-{i}]" for i in range(n)]
    assert len(CallCache(url)) == n + 10
    assert len([k for k in s3.keys(f"{prefix_of(url)}/calls/") if k.endswith(".json")]) == n + 10  # in the bucket
    assert not s3.keys(f"{prefix_of(url)}/calls/claims/")  # claims go once their answers are stored


# -- the command line and the call cache over the API --------------------------------------------

def test_the_cli_builds_and_plans_on_s3_and_a_call_answered_by_one_driver_is_not_asked_by_another(
        tmp_path, url, s3, worker, monkeypatch):
    from support.api_build import persona_reply, plan_json, run, write_spec
    from support.openai_server import FakeOpenAIServer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CB_TEST_KEY", "sk-test-123")
    target = "teacher-responses/shard-0000"
    with FakeOpenAIServer(reply=persona_reply, require_key="sk-test-123") as srv:
        spec = write_spec(tmp_path, srv.base_url)
        worker("a")
        assert run(str(spec), target, "--cache", url) == 0
        asked = srv.stats()["completed"]
        assert asked == 10  # one shard of 10 teacher calls

        worker("b")  # another machine: plans from the bucket alone
        plan = plan_json(str(spec), target, "--cache", url)
        assert {t["state"] for t in plan["targets"]} == {"cached"}

        # The objects go (a gc, another spec's keys): the answered calls stay in the bucket.
        objects = s3.keys(f"{prefix_of(url)}/objects/")
        assert objects and len(s3.keys(f"{prefix_of(url)}/calls/")) == 10
        for k in objects:
            s3.delete(k)
        monkeypatch.setenv("CHARBUILD_CACHE", url)  # the environment's way of saying --cache
        worker("c")
        assert run(str(spec), target) == 0
        assert srv.stats()["completed"] == asked  # every call read from the bucket, none asked
        assert len(CallCache(url)) == 10
    for k in s3.keys(prefix_of(url)):  # the key never reaches the bucket
        assert b"sk-test-123" not in s3.get(k), k


def test_plan_on_a_local_cache_never_imports_the_store_code(specs, tmp_path):
    code = ("import sys; from charbuild.cli import main; main(['plan', sys.argv[1], '--cache', sys.argv[2]]); "
            "bad = [m for m in ('s3fs', 'charbuild.store.remote', 'botocore') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(specs / "smoke-small.yaml"), str(tmp_path / "c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_bucket_that_does_not_exist_is_one_line(specs, tmp_path, monkeypatch, capsys, s3):
    from charbuild.cli import main

    monkeypatch.setenv("CHARBUILD_LOCAL_CACHE", str(tmp_path / "w"))
    monkeypatch.chdir(tmp_path)
    for verb in ("plan", "run"):
        assert main([verb, str(specs / "smoke-small.yaml"), "--cache", "s3://no-such-bucket-here/x"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("charbuild: cannot use the cache at s3://no-such-bucket-here/x: no such bucket"), err
        assert len(err.splitlines()) == 1


def test_a_worker_puts_back_what_an_emptied_bucket_lost_instead_of_rebuilding_it(specs, url, s3, worker, log):
    # The bucket lost its objects (a lifecycle rule, a bucket made anew) while a worker kept
    # its working cache, which remembers having published them: it must ask the bucket.
    worker("a")
    plan, _ = build(specs / "smoke-small.yaml", url)
    for k in list(s3.keys(prefix_of(url))):
        s3.client.delete_object(Bucket=s3.bucket, Key=k)
    assert not list(s3.keys(prefix_of(url)))
    _, report = build(specs / "smoke-small.yaml", url)  # the same worker, its cache intact
    assert report.built == [] and len(events(log)) == 4  # nothing built again
    stored = set(s3.keys(prefix_of(url)))
    assert all(manifest_key(url, r.key) in stored for r in plan.rows)  # and every target is back


@pytest.mark.parametrize("spread", ["few keys, one look-up each", "many keys under few prefixes, listed"])
def test_a_plan_on_a_fresh_machine_counts_the_calls_the_bucket_holds(url, worker, spread):
    """`plan` asks whether each of a stage's calls is answered: a machine that never ran the
    build finds the bucket's answers, and nothing it has not got is counted."""
    from charbuild.store import calls as calls_mod

    n = 6 if spread.startswith("few") else 80
    keys = [f"{'ab' if i % 2 else 'cd'}{i:062x}" for i in range(n)] if n > 6 else [f"{i:02x}{i:062x}" for i in range(n)]
    answer = {"text": "hi", "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 1, "meta": {}}
    worker("a")
    built_by_a = CallCache(url)
    for k in keys[::3]:
        built_by_a.put(k, answer)
    worker("b")
    fresh = CallCache(url)
    listed = n >= calls_mod.LIST_FROM * len({k[:2] for k in keys})  # b has none of them here
    assert listed == (n > 6)  # the story takes the path it names
    assert fresh.has_many(keys) == [i % 3 == 0 for i in range(n)]
    assert fresh.has_many(keys) == [fresh.has(k) for k in keys]


def test_machines_whose_clocks_disagree_agree_on_when_a_lease_lapses(url):
    """A lease taken on a machine whose clock runs two minutes slow (a VM without NTP) is
    still live for a machine with the right time, and lapses for it after the TTL."""
    from charbuild.store.remote import RemoteStore

    slow, right = RemoteStore(url), RemoteStore(url)
    warned: list[str] = []
    slow.clock = lambda: time.time() - 120
    slow.warn = warned.append
    slow.ttl = right.ttl = 3.0
    held = slow.try_lease("locks/clock-story", "a build")
    assert held is not None
    assert right.try_lease("locks/clock-story", "another build") is None  # live, by the store's clock
    assert right.holder("locks/clock-story") is not None
    # Told, to within what the store's whole seconds and a busy machine's request times allow.
    assert any(re.search(r"clock is \+1(1[7-9]|2[0-3]) s off", w) for w in warned), warned
    slow.close()  # as if the slow machine died: no more renewals (close releases nothing)
    t0 = time.monotonic()
    while right.try_lease("locks/clock-story", "another build") is None:  # lapses after its TTL, give or take
        assert time.monotonic() - t0 < 10, "a dead machine's lease outlived its TTL by far (its clock, not the store's?)"
        time.sleep(0.2)
    right.close()
