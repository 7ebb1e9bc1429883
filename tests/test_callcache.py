"""The call-level cache: every generation call is paid once, across reruns, kills and
concurrent runs, counted on the loopback OpenAI-protocol server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest


from support.openai_server import FakeOpenAIServer, signature  # noqa: E402

from charbuild.backends.base import GenRequest, GenResult  # noqa: E402
from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig, build_payload  # noqa: E402
from charbuild.store.calls import CallCache  # noqa: E402
from charbuild.backends.cached import (  # noqa: E402
    CachedBackend,
    call_key,
    to_entry,
    model_digest_for_path,
    occurrence_indices,
    template_digest,
)
from charbuild.recipe.stages.generate import generate_checked  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def ask(i: int, **kw) -> GenRequest:
    return GenRequest(messages=[{"role": "user", "content": f"question-{i}"}], seed=i, max_tokens=64, **kw)


def backend(srv, concurrency=8) -> OpenAIBackend:
    return OpenAIBackend(OpenAIConfig(model="fake-model", base_url=srv.base_url, api_key_env=None,
                                      concurrency=concurrency, timeout_s=10, backoff_base_s=0.01, backoff_max_s=0.1))


def cached(inner, root) -> CachedBackend:
    return CachedBackend(inner, CallCache(root), "openai", "fake-model")


def duplicates(srv) -> int:
    """Answers the server gave more than once for the same request."""
    return sum(c - 1 for c in srv.answered.values() if c > 1)


# -- single process ---------------------------------------------------------------------------

def test_a_second_generate_of_the_same_requests_asks_the_server_nothing(cache_dir):
    with FakeOpenAIServer(latency_s=0.005) as srv, backend(srv) as be:
        cb = cached(be, cache_dir)
        reqs = [ask(i) for i in range(40)]
        first = cb.generate(reqs)
        assert srv.completed == 40 and cb.cache.stats["stored"] == 40
        assert not any(r.meta["cached"] for r in first)

        again = cached(be, cache_dir).generate(reqs)  # a fresh wrapper: only the files are shared
        assert srv.completed == 40
        assert [r.text for r in again] == [r.text for r in first]
        assert all(r.meta["cached"] for r in again)
        for i, r in enumerate(again):  # order kept, usage kept
            assert r.text.startswith(f"reply to [question-{i}] seed={i} ")
            assert (r.prompt_tokens, r.completion_tokens, r.finish_reason) == \
                (first[i].prompt_tokens, first[i].completion_tokens, first[i].finish_reason)


def test_adding_requests_pays_only_for_the_new_ones(cache_dir):
    with FakeOpenAIServer() as srv, backend(srv) as be:
        cached(be, cache_dir).generate([ask(i) for i in range(0, 40, 2)])
        assert srv.completed == 20
        ticks: list[int] = []
        out = cached(be, cache_dir).generate([ask(i) for i in range(40)], progress=ticks.append)
        assert srv.completed == 40 and duplicates(srv) == 0  # only the 20 odd ones were new
        assert sum(ticks) == 40
        assert [r.meta["cached"] for r in out] == [i % 2 == 0 for i in range(40)]


def test_identical_requests_are_distinct_samples_and_each_is_cached(cache_dir):
    same = [ask(1, temperature=1.0)] * 3
    assert occurrence_indices(same + [ask(2)] + same[:1]) == [0, 1, 2, 0, 3]
    with FakeOpenAIServer() as srv, backend(srv) as be:
        cached(be, cache_dir).generate(same)
        assert srv.completed == 3  # three samples of one prompt: three calls
        cached(be, cache_dir).generate([ask(0)] + same + same[:1])
        assert srv.completed == 5  # ask(0) and the 4th sample are new
        # explicit sample indices: the same sample asked twice in one batch is asked once
        out = cached(be, cache_dir).generate(same[:2], sample_indices=[7, 7])
        assert srv.completed == 6 and out[0].text == out[1].text


def test_a_corrupted_call_entry_is_detected_and_asked_again(cache_dir):
    with FakeOpenAIServer() as srv, backend(srv) as be:
        reqs = [ask(i) for i in range(6)]
        cb = cached(be, cache_dir)
        first = cb.generate(reqs)
        paths = [cb.cache.path(cb.key(r, 0)) for r in reqs]
        paths[0].write_bytes(paths[0].read_bytes()[:40])  # torn write
        e = json.loads(paths[1].read_text())
        e["result"]["text"] = "tampered"  # valid JSON, wrong digest
        paths[1].write_text(json.dumps(e))
        paths[2].write_bytes(b"\x00\xff garbage")

        cb2 = cached(be, cache_dir)
        again = cb2.generate(reqs)
        assert cb2.cache.corrupt == 3 and cb2.cache.hits == 3
        assert srv.completed == 9  # exactly the three corrupt ones were asked again
        assert [r.text for r in again] == [r.text for r in first]
        cb3 = cached(be, cache_dir)  # and their entries were replaced by valid ones
        cb3.generate(reqs)
        assert cb3.cache.corrupt == 0 and cb3.cache.hits == 6 and srv.completed == 9


def test_first_writer_wins_and_a_valid_entry_is_never_overwritten(cache_dir):
    cc = CallCache(cache_dir)
    k = call_key("openai", "m", None, None, ask(1), 0)
    assert cc.get(k) is None
    assert cc.put(k, to_entry(GenResult("first", "stop", 1, 2))) is True
    assert cc.put(k, to_entry(GenResult("second", "stop", 1, 2))) is False
    assert cc.get(k)["text"] == "first"
    assert not [p for p in cc.path(k).parent.iterdir() if p.name.endswith(".tmp")]


def test_the_key_changes_with_every_sampling_param_the_messages_the_sample_and_the_model(tmp_path):
    base = ask(1)
    k0 = call_key("openai", "m", None, None, base, 0)
    assert k0 == call_key("openai", "m", None, None, ask(1), 0)  # stable
    variants = [
        replace(base, max_tokens=65), replace(base, temperature=0.71), replace(base, top_p=0.9),
        replace(base, stop=("\nUser:",)), replace(base, seed=2), replace(base, seed=None),
        replace(base, repetition_penalty=1.1), replace(base, frequency_penalty=0.2),
        replace(base, messages=[{"role": "user", "content": "question-1 "}]),
        replace(base, messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "question-1"}]),
    ]
    keys = {call_key("openai", "m", None, None, v, 0) for v in variants}
    keys |= {call_key("openai", "m", None, None, base, 1), call_key("vllm", "m", None, None, base, 0),
             call_key("openai", "m2", None, None, base, 0), call_key("openai", "m", "d1", None, base, 0),
             call_key("openai", "m", "d2", None, base, 0), call_key("openai", "m", None, "t1", base, 0)}
    assert k0 not in keys and len(keys) == len(variants) + 6

    # model digest of a local directory: changes with config, weights (even their last MiB), names
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text('{"hidden": 8}')
    (m / "model.safetensors").write_bytes(b"\x01" * (3 << 20))
    (m / "README.md").write_text("ignored")
    d0 = model_digest_for_path(m)
    assert d0 and d0 == model_digest_for_path(str(m))
    (m / "README.md").write_text("still ignored")
    assert model_digest_for_path(m) == d0
    w = bytearray((m / "model.safetensors").read_bytes())
    w[-10] = 2
    (m / "model.safetensors").write_bytes(bytes(w))
    d1 = model_digest_for_path(m)
    assert d1 != d0
    (m / "config.json").write_text('{"hidden": 9}')
    d2 = model_digest_for_path(m)
    assert d2 not in (d0, d1)
    (m / "model.safetensors").rename(m / "model-00001.safetensors")
    assert model_digest_for_path(m) not in (d0, d1, d2)
    assert model_digest_for_path("deepseek-chat") is None and model_digest_for_path(tmp_path / "nope") is None

    # chat template digest
    assert template_digest(m) is None
    (m / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ a }}", "eos_token": "x"}))
    t1 = template_digest(m)
    (m / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ a }}", "eos_token": "y"}))
    assert template_digest(m) == t1  # only the template counts
    (m / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ b }}"}))
    assert template_digest(m) not in (None, t1)
    (m / "tokenizer_config.json").unlink()
    (m / "chat_template.jinja").write_text("{{ a }}")
    assert template_digest(m) is not None


def test_generate_checked_uses_the_call_cache_when_the_context_has_one(cache_dir):
    from charbuild.ledger import Ledger

    spent = Ledger()  # the run's ledger: the backend charges every call it really makes
    m = SimpleNamespace(backend="openai", model="fake-model", revision=None)
    with FakeOpenAIServer() as srv, backend(srv) as be:
        be.ledger = spent

        def ctx(call_cache):
            services = SimpleNamespace(backends=SimpleNamespace(get=lambda role, ctx: be))
            if call_cache is not None:
                services.call_cache = call_cache
            return SimpleNamespace(services=services, progress=False, inputs={}, budget=spent)

        reqs = [ask(i) for i in range(10)] + [ask(3)]  # a repeated request: a second sample
        recs, _ = generate_checked(ctx(CallCache(cache_dir)), "teacher", m, reqs, None, None, "t", chunk=4)
        assert srv.completed == 11 and spent.api_calls == 11
        recs2, _ = generate_checked(ctx(CallCache(cache_dir)), "teacher", m, reqs, None, None, "t", chunk=4)
        assert srv.completed == 11 and spent.api_calls == 11  # cached calls are not spend
        assert recs2 == recs
        generate_checked(ctx(None), "teacher", m, reqs[:2], None, None, "t")  # no cache: as before
        assert srv.completed == 13


# -- several processes ------------------------------------------------------------------------

CHILD = r"""
import json, sys
from charbuild.backends.base import GenRequest
from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig
import charbuild.store.calls
from charbuild.backends.cached import CachedBackend
from charbuild.store.calls import CallCache
base_url, root, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if not spec.get("ofd", True):
    charbuild.store.calls._OFD = None
reqs = [GenRequest(messages=[{"role": "user", "content": f"question-{i}"}], seed=i, max_tokens=64) for i in spec["ids"]]
be = OpenAIBackend(OpenAIConfig(model="fake-model", base_url=base_url, api_key_env=None,
                                concurrency=spec["concurrency"], timeout_s=30))
cb = CachedBackend(be, CallCache(root), "openai", "fake-model")
print("ready", flush=True)
sys.stdin.readline()
out, chunk = [], spec.get("chunk") or len(reqs)
for s in range(0, len(reqs), chunk):
    out += cb.generate(reqs[s:s + chunk])
print(json.dumps({"texts": [r.text for r in out], "asked": cb.asked, "waited": cb.waited, **cb.cache.stats}), flush=True)
be.close()
"""


class Child:
    """A run in its own process, started and warmed up (imports done) before `go()`."""

    def __init__(self, srv, root, ids, concurrency=8, chunk=None, ofd=True):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        spec = json.dumps({"ids": list(ids), "concurrency": concurrency, "chunk": chunk, "ofd": ofd})
        self.p = subprocess.Popen([sys.executable, "-c", CHILD, srv.base_url, str(root), spec], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready"

    def go(self) -> "Child":
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return self

    def result(self, timeout=30) -> dict:
        out, _ = self.p.communicate(timeout=timeout)
        assert self.p.returncode == 0, out
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(10)


def wait_until(cond, timeout=20.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)


def test_a_run_killed_mid_batch_loses_only_the_calls_in_flight(cache_dir):
    n, conc = 200, 8
    with FakeOpenAIServer(latency_s=0.05) as srv:
        a = Child(srv, cache_dir, range(n), concurrency=conc)
        a.go()
        wait_until(lambda: srv.completed >= 80)  # ~0.5 s of a ~1.25 s batch
        a.kill()
        time.sleep(0.2)  # let the server finish the replies it was writing to the dead client
        completed_at_kill = srv.completed
        stored = len(CallCache(cache_dir))
        assert 80 - conc <= stored < n
        assert completed_at_kill - stored <= conc  # answered but not stored: only those in flight

        b = Child(srv, cache_dir, range(n), concurrency=conc).go().result()
        assert b["hits"] == stored and b["asked"] == n - stored
        assert [t.split(" seed=")[0] for t in b["texts"]] == [f"reply to [question-{i}]" for i in range(n)]
        assert srv.completed <= n + conc and duplicates(srv) <= conc
        assert len(CallCache(cache_dir)) == n
        assert not list((Path(cache_dir) / "calls" / "locks").glob("*.lock"))  # claims are cleaned up once stored


@pytest.mark.parametrize("ofd", [True, False], ids=["ofd-locks", "flock-files"])
def test_two_concurrent_runs_on_one_cache_ask_each_call_once(cache_dir, ofd):
    n, conc = 200, 8
    ids_a = list(range(n))
    ids_b = list(range(n + 40))[::-1]  # B: the same calls in the opposite order, plus 40 of its own
    with FakeOpenAIServer(latency_s=0.04) as srv:
        a = Child(srv, cache_dir, ids_a, concurrency=conc, chunk=32, ofd=ofd)
        b = Child(srv, cache_dir, ids_b, concurrency=conc, chunk=32, ofd=ofd)
        a.go()
        wait_until(lambda: srv.completed >= 60)  # A has stored some, is asking more
        b.go()
        ra, rb = a.result(), b.result()
    total = n + 40
    # without sharing: 200 + 240 = 440 completions; with it, each call once, bar in-flight overlap
    assert srv.completed <= total + conc, (srv.completed, ra, rb)
    assert duplicates(srv) <= conc
    assert ra["asked"] + rb["asked"] <= total + conc
    assert rb["asked"] >= 40 and ra["asked"] >= 60  # both really worked
    assert rb["hits"] + rb["waited"] > 0
    texts_a = dict(zip(ids_a, ra["texts"]))
    texts_b = dict(zip(ids_b, rb["texts"]))
    assert all(texts_a[i] == texts_b[i] for i in ids_a)  # one answer per call, seen by both runs
    sigs = {signature(build_payload("fake-model", ask(i))) for i in range(total)}
    assert all(srv.answered[s] >= 1 for s in sigs)


@pytest.mark.parametrize("streams", [True, False])
def test_backends_without_on_result_are_stored_after_the_batch(cache_dir, streams):
    calls: list[int] = []

    class Plain:
        def generate(self, requests, progress=None):
            calls.append(len(requests))
            return [GenResult(f"t{r.seed}", "stop", 1, 1) for r in requests]

        def close(self):
            pass

    class Streaming(Plain):
        def generate(self, requests, progress=None, on_result=None):
            out = Plain.generate(self, requests)
            for i, r in enumerate(out):
                on_result(i, r)
            return out

    inner = Streaming() if streams else Plain()
    cb = CachedBackend(inner, CallCache(cache_dir), "transformers", "tiny", model_digest="d")
    assert [r.text for r in cb.generate([ask(i) for i in range(5)])] == [f"t{i}" for i in range(5)]
    assert [r.text for r in cb.generate([ask(i) for i in range(7)])] == [f"t{i}" for i in range(7)]
    assert calls == [5, 2]  # the misses go in one batch


@pytest.mark.parametrize("ofd", [True, False])
def test_a_claimed_call_is_busy_for_everyone_else_until_released(cache_dir, monkeypatch, ofd):
    import charbuild.store.calls as cc_mod

    if not ofd:
        monkeypatch.setattr(cc_mod, "_OFD", None)  # the portable fallback: one flock'ed file per call
    elif cc_mod._OFD is None:
        pytest.skip("no open-file-description locks on this platform")
    a, b = CallCache(cache_dir), CallCache(cache_dir)
    k1, k2 = (call_key("openai", "m", None, None, ask(i), 0) for i in (1, 2))
    c = a.claim(k1)
    assert c is not None
    assert a.claim(k1) is None and b.claim(k1) is None  # same instance, other instance
    c2 = b.claim(k2)
    assert c2 is not None
    c.release(done=False)
    c3 = b.claim(k1)
    assert c3 is not None
    a.put(k1, to_entry(GenResult("x", "stop")))
    c3.release(done=True)
    c2.release(done=False)
    assert a.claim(k2) is not None
    if not ofd:
        assert not (Path(cache_dir) / "calls" / "locks" / f"{k1}.lock").exists()
    a.close(), b.close()
