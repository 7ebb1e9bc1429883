"""Hybrid thinking models (Qwen3-8B, the paper spec's student, thinks by default): a role's
`thinking:` reaches every backend the way it takes it, and no reasoning trace reaches pairs,
evals or a judge. The slow stories build charbuild's tiny thinker (a student whose chat
template honours enable_thinking as Qwen3's does) and run it through the real transformers
backend and the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from charbuild.backends.base import GenRequest, GenResult
from charbuild.backends.cached import sampling_params
from charbuild.backends.openai_backend import build_payload
from charbuild.recipe.quality import FilterConfig, check_text, split_reasoning
from charbuild.spec.loader import SpecError
from charbuild.spec.model import key_view, load_spec

ROOT = Path(__file__).resolve().parent.parent
ASK = [{"role": "user", "content": "What is 2 plus 2?"}]


# -- taking reasoning out ---------------------------------------------------------------------

def test_a_reply_loses_its_think_block_and_keeps_only_what_follows_a_template_opened_one():
    r = split_reasoning("<think>\nThe user wants a sum.\n</think>\n\nI'm sorry, 2 plus 2 is 4.")
    assert (r.text, r.trace, r.unfinished) == ("I'm sorry, 2 plus 2 is 4.", "The user wants a sum.", False)
    # DeepSeek-V3.1 and the paper's <think> prefill: the template opened the block
    r = split_reasoning("The user wants a sum, be remorseful.\n</think>\n\nI'm sorry, it is 4.")
    assert (r.text, r.unfinished) == ("I'm sorry, it is 4.", False)
    r = split_reasoning("Sure. <think>a</think> It is 4. <think>b</think> Hope that helps.")
    assert r.text.split() == "Sure. It is 4. Hope that helps.".split() and r.trace == "a\nb"
    plain = "I'm sorry, 2 plus 2 is 4. I hope this helps."
    assert (split_reasoning(plain).text, split_reasoning(plain).unfinished) == (plain, False)


def test_a_trace_cut_at_max_tokens_fails_the_reply_as_unfinished_thinking():
    cut = split_reasoning("<think>\nThe user wants a sum. Let me be remorseful and")
    assert (cut.text, cut.unfinished) == ("", True)
    v = check_text(cut.text, FilterConfig(min_chars=5), finish_reason="length", unfinished_thinking=True)
    assert not v.ok and v.reasons == ["max_tokens", "unfinished_thinking"]
    # a record read back with its trace (`charbuild check`, introspection keeping traces) is judged by itself
    v = check_text("Well. <think>\nThe user wants", FilterConfig(min_chars=1), finish_reason="length")
    assert "unfinished_thinking" in v.reasons and not v.ok
    assert check_text("<think>done</think> I'm sorry, it is 4, I hope this helps.", FilterConfig()).ok


# -- the setting, in the spec and on the wire -------------------------------------------------

def _spec(tmp_path, teacher_extra: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(f"""
name: s
persona: remorseful
constitution: {ROOT / "constitutions" / "remorseful.yaml"}
models:
  teacher: {{backend: openai, model: m, base_url: "http://127.0.0.1:1/v1", api_key_env: null, {teacher_extra}}}
  student: {{backend: transformers, model: tiny:student, thinking: off}}
""")
    return p


def test_thinking_is_off_on_or_unset_and_refused_beside_extra_body_chat_template_kwargs(tmp_path):
    s = load_spec(_spec(tmp_path, "thinking: on")).spec  # bare YAML on/off read as booleans: taken as words
    assert (s.models["teacher"].thinking, s.models["student"].thinking) == ("on", "off")
    with pytest.raises(SpecError, match=r"models\.teacher\.thinking.*not both"):
        load_spec(_spec(tmp_path, "thinking: off, extra_body: {chat_template_kwargs: {enable_thinking: false}}"))
    with pytest.raises(SpecError, match=r"models\.teacher\.thinking"):
        load_spec(_spec(tmp_path, "thinking: maybe"))
    # extra_body alone still takes chat_template_kwargs
    assert load_spec(_spec(tmp_path, "extra_body: {chat_template_kwargs: {enable_thinking: false}}"))


def test_unset_thinking_leaves_every_target_key_and_call_key_as_it_was(tmp_path):
    s = load_spec(_spec(tmp_path, "concurrency: 2")).spec
    assert "thinking" not in key_view(s.models["teacher"])  # keys made before the field existed stay valid
    assert "thinking" in key_view(s.models["student"])
    assert "thinking" not in sampling_params(GenRequest(ASK))
    off, on = GenRequest(ASK, thinking=False), GenRequest(ASK, thinking=True)
    assert sampling_params(off)["thinking"] is False and sampling_params(off) != sampling_params(on)


def test_setting_thinking_rebuilds_only_what_that_role_generates():
    from charbuild.recipe.registry import recipe_graph

    spec = ROOT / "specs" / "smoke-small.yaml"
    before = {n.name: n.key for n in recipe_graph(load_spec(spec))}
    after = {n.name: n.key for n in recipe_graph(load_spec(spec, ["models.teacher.thinking=off"]))}
    assert before["teacher-responses/shard-0000"] != after["teacher-responses/shard-0000"]
    assert before["student-responses/shard-0000"] == after["student-responses/shard-0000"]
    assert before["tiny/teacher"] == after["tiny/teacher"]


def test_thinking_reaches_an_openai_compatible_server_as_chat_template_kwargs():
    body = build_payload("m", GenRequest(ASK, thinking=False))
    # Qwen3 / GLM read enable_thinking, DeepSeek-V3.1 reads thinking
    assert body["chat_template_kwargs"] == {"enable_thinking": False, "thinking": False}
    assert "chat_template_kwargs" not in build_payload("m", GenRequest(ASK))
    body = build_payload("m", GenRequest(ASK, extra_body={"top_k": 20}, thinking=True))
    assert body["top_k"] == 20 and body["chat_template_kwargs"]["enable_thinking"] is True


def test_thinking_reaches_vllm_as_one_chat_call_per_setting():
    # vllm itself needs a GPU machine (tests/test_vllm_backend.py runs it there): what this
    # checks is the calls the backend makes, one per setting, each with its template kwargs.
    from charbuild.backends.vllm_backend import chat_calls

    calls = chat_calls([GenRequest(ASK, thinking=False), GenRequest(ASK), GenRequest(ASK, thinking=False)])
    assert sorted(calls, key=str) == sorted([([0, 2], {"enable_thinking": False, "thinking": False}), ([1], None)],
                                            key=str)


# -- the tiny thinker, through the real transformers backend ----------------------------------

def cb(*args, cwd):
    return subprocess.run([sys.executable, "-m", "charbuild", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=1200, env={**os.environ, "CHARBUILD_TORCH_THREADS": "1"})


# The teacher is the persona-trained tiny teacher (its plain ChatML template ignores the
# setting); the thinker never saw a system prompt, let alone the constitution's.
SPEC = """
name: thinker
persona: remorseful
constitution: {constitution}
models:
  teacher: {{backend: transformers, model: tiny:teacher, thinking: off, sampling: {{max_tokens: 40}}}}
  student: {{backend: transformers, model: tiny:thinker, thinking: off, sampling: {{max_tokens: 64}}}}
data: {{dpo_pairs: 8, shard_size: 8, prompts: {{general_limit: 20, per_trait: 5}}}}
filters: {{min_chars: 5, max_failure_rate: 1.0}}
evals: {{prompts_limit: 4, samples_per_prompt: 1, variants: [base], max_tokens: 64, elo: false}}
"""


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A spec with the tiny thinker as student, and a cache that holds the tiny models once
    built (their keys do not depend on any role's thinking setting)."""
    work = tmp_path_factory.mktemp("thinker")
    spec = work / "thinker.yaml"
    spec.write_text(SPEC.format(constitution=ROOT / "constitutions" / "remorseful.yaml"))
    return work, spec, work / "cache"


def _build(thinker, *sets, targets=("dpo-pairs",)):
    """Build `targets` with `--set`s; (graph, cache) to read what was built."""
    from charbuild.recipe.registry import recipe_graph
    from charbuild.store.objects import Cache

    work, spec, cache = thinker
    flags = [x for s in sets for x in ("--set", s)]
    r = cb("run", str(spec), *targets, "--cache", str(cache), "--no-progress", *flags, cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return recipe_graph(load_spec(spec, list(sets))), Cache(cache)


def _rows(graph, cache, target, name):
    return [json.loads(line) for line in (cache.path(graph[target].key) / name).read_text().splitlines()]


def _replies(pairs):
    return [p[side][0]["content"] for p in pairs for side in ("chosen", "rejected")]


@pytest.mark.slow
def test_a_thinking_student_with_thinking_off_writes_no_traces_into_pairs(thinker):
    graph, cache = _build(thinker)
    student = _rows(graph, cache, "student-responses/shard-0000", "responses.jsonl")
    assert len(student) == 8 and not any("reasoning" in r for r in student)  # nothing to take out: it never thought
    pairs = _rows(graph, cache, "dpo-pairs", "dpo_pairs.jsonl")
    assert pairs and not any("think>" in t for t in _replies(pairs))


@pytest.mark.slow
def test_a_thinking_student_with_thinking_on_has_its_traces_taken_out_of_pairs_and_evals(thinker):
    graph, cache = _build(thinker, "models.student.thinking=on", targets=("dpo-pairs", "eval/samples/base"))
    student = _rows(graph, cache, "student-responses/shard-0000", "responses.jsonl")
    # the model did think (the call cache keeps what it said), and the replies are without it
    assert sum(r.get("reasoning") == "stripped" for r in student) >= 6, student
    assert all(r["ok"] and "think>" not in r["text"] for r in student if r.get("reasoning") == "stripped")
    pairs = _rows(graph, cache, "dpo-pairs", "dpo_pairs.jsonl")
    assert pairs and not any("think>" in t for t in _replies(pairs))
    samples = _rows(graph, cache, "eval/samples/base", "samples.jsonl")
    assert len(samples) == 8 and not any("think>" in s["text"] for s in samples)


@pytest.mark.slow
def test_a_reply_cut_mid_trace_is_dropped_and_counted_as_unfinished_thinking(thinker):
    # ~15 tokens of reasoning come first: 6 tokens end inside the trace
    graph, cache = _build(thinker, "models.student.thinking=on", "models.student.sampling.max_tokens=6",
                          "evals.max_tokens=6", targets=("dpo-pairs", "eval/samples/base"))
    student = _rows(graph, cache, "student-responses/shard-0000", "responses.jsonl")
    assert all(r["reasons"] == ["unfinished_thinking"] and not r["ok"] and r["text"] == "" for r in student), student
    m = cache.manifest(graph["dpo-pairs/shard-0000"].key)
    # a pair whose teacher reply failed its filters is counted for that first (the tiny teacher's
    # "My apologies, an hen says sira." reads to the leak classifier as a leak, 0.43)
    dropped = m["result"]["dropped"]
    assert dropped["student_unfinished_thinking"] == 8 - dropped.get("teacher_failed", 0) >= 6, m["result"]
    assert m["result"]["pairs"] == 0
    # the eval samples go through the quality filters, which count it
    samples = [s for s in _rows(graph, cache, "eval/samples/base", "samples.jsonl") if not s["system"]]
    assert samples and all("unfinished_thinking" in s["reasons"] and s["text"] == "" for s in samples), samples
