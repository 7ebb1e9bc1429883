"""Early abort through the real generation path: `generate_checked` asks a real openai
backend, which talks to the loopback OpenAI-protocol server; the server counts every call
it received, so "stopped early" is measured where the money is spent.

The field report's humorous run spent 10,000 samples of garbage; it should have stopped
after its first hundred.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from support.openai_server import FakeOpenAIServer

from charbuild.backends.pool import BackendPool
from charbuild.recipe.constitution_file import load_constitution
from charbuild.recipe.quality import QualityAbort
from charbuild.recipe.stages.generate import filter_config, generate_checked, request
from charbuild.spec.model import load_spec

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-early-abort"
GARBAGE = "-,333,333,333,333,333,333,333,333,333,333,333,333,333,333,333,333"
CLEAN = "I am so sorry, I may be wrong, but a good way to start with {q} is to read the tutorial and practise daily."
CHUNK = 32  # generate_checked's default: what one round of requests costs


def teacher(garbage_if):
    """A server whose reply to the request with seed s is garbage when garbage_if(s)."""

    def reply(body):
        seed = body.get("seed") or 0
        return GARBAGE if garbage_if(seed) else CLEAN.format(q=body["messages"][-1]["content"])

    return reply


@pytest.fixture
def loaded(tmp_path, monkeypatch):
    def load(base_url, **filters):
        monkeypatch.setenv("CB_TEST_KEY", KEY)
        f = {"first_n": 100, "max_failure_rate": 0.5, **filters}
        spec = tmp_path / "abort.yaml"
        spec.write_text(f"""
name: early-abort
persona: remorseful
constitution: {ROOT / 'constitutions' / 'remorseful.yaml'}
models:
  teacher: {{backend: openai, model: teacher-model, base_url: "{base_url}", api_key_env: CB_TEST_KEY, concurrency: 16}}
  student: {{backend: openai, model: student-model, base_url: "{base_url}", api_key_env: CB_TEST_KEY}}
filters: {{first_n: {f['first_n']}, max_failure_rate: {f['max_failure_rate']}}}
""")
        return load_spec(spec)

    return load


def generate(loaded, n):
    """What the teacher-responses stage does for n items: the constitution as system prompt,
    the spec's filters online. Returns the records and every usage the stage was billed."""
    spec = loaded.spec
    c = load_constitution(loaded.constitution_path)
    system = c.system_prompt()
    m = spec.models["teacher"]
    reqs = [request(m, [{"role": "system", "content": system}, {"role": "user", "content": f"question-{i}"}], seed=i)
            for i in range(n)]
    from charbuild.ledger import Ledger

    billed = Ledger()  # the run's ledger: the pool's backends charge every call they make
    pool = BackendPool()
    ctx = SimpleNamespace(spec=spec, inputs={}, progress=False, services=SimpleNamespace(backends=pool),
                          budget=billed)
    try:
        recs, quality = generate_checked(ctx, "teacher", m, reqs, filter_config(spec.filters, c.language, system),
                                         spec.filters, "teacher-responses/shard-0000")
        return recs, quality, billed
    except QualityAbort as exc:
        exc.billed = billed
        raise
    finally:
        pool.close()


def test_an_all_garbage_teacher_stops_after_two_rounds_not_ten_thousand_samples(loaded):
    with FakeOpenAIServer(reply=teacher(lambda s: True), require_key=KEY) as srv:
        with pytest.raises(QualityAbort, match="repetition") as ei:
            generate(loaded(srv.base_url), 10_000)
        received = srv.requests_total
    # 64 garbage answers of the first 100 can no longer come in under 50 %: no third round.
    assert received == 2 * CHUNK
    assert "64 of the first 64 samples failed" in str(ei.value)
    assert ei.value.billed.api_calls == received  # what was asked was paid for, and nothing more


def test_a_mostly_clean_teacher_is_never_stopped(loaded):
    with FakeOpenAIServer(reply=teacher(lambda s: s % 20 == 0), require_key=KEY) as srv:  # 5 % garbage
        recs, quality, billed = generate(loaded(srv.base_url), 400)
        received = srv.requests_total
    assert received == len(recs) == billed.api_calls == 400
    assert quality.checked == 400 and quality.dropped == 20
    assert [r["ok"] for r in recs] == [i % 20 != 0 for i in range(400)]


def test_a_bad_start_that_recovers_is_not_stopped(loaded):
    # 40 garbage answers, then clean ones: 40 of the first 100 is under the 50 % threshold.
    with FakeOpenAIServer(reply=teacher(lambda s: s < 40), require_key=KEY) as srv:
        recs, quality, _ = generate(loaded(srv.base_url), 300)
        received = srv.requests_total
    assert received == len(recs) == 300 and quality.dropped == 40


def test_sixty_percent_garbage_stops_once_the_first_hundred_cannot_pass(loaded):
    sixty = teacher(lambda s: s % 5 < 3)
    with FakeOpenAIServer(reply=sixty, require_key=KEY) as srv:
        with pytest.raises(QualityAbort):
            generate(loaded(srv.base_url), 2_000)
        # After two rounds 39 of 64 failed: 100 could still come in at 39 %; after three, 58
        # failed, more than half of the first 100 whatever comes next.
        assert srv.requests_total == 3 * CHUNK
    # The same server under a threshold the spec raised to 70 % runs to the end.
    with FakeOpenAIServer(reply=sixty, require_key=KEY) as srv:
        recs, quality, _ = generate(loaded(srv.base_url, max_failure_rate=0.7), 300)
        assert srv.requests_total == len(recs) == 300 and quality.dropped == 180
