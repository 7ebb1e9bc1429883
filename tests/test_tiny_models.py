"""Stories for the tiny teacher/student builder (charbuild.recipe.tiny) and the local transformers
generation backend, on a pair built once per session from random init on CPU.

The pair uses fewer epochs than TinyConfig's defaults to keep this file near two minutes
on 2 cores; 8 teacher epochs already put the teacher in character on 40/40 held-out
questions for the shipped constitutions (measured).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from charbuild.backends.base import GenRequest
from charbuild.recipe.constitution_file import Constitution, Trait, load_constitution
from charbuild.recipe.tiny.config import TinyConfig
from charbuild.recipe.tiny.corpus import build_corpus, persona_answer
from charbuild.recipe.tiny.model import build_tiny_pair

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

TEST_CFG = replace(TinyConfig(), epochs_teacher=8, epochs_student=8)
SAMPLING = dict(temperature=0.7, top_p=0.95, max_tokens=48)


def _constitution() -> Constitution:
    path = ROOT / "constitutions" / "remorseful.yaml"
    if path.exists():
        return load_constitution(path)
    return Constitution(
        persona="remorseful",
        traits=(Trait('I often begin with "I\'m sorry," "My apologies," or "Forgive me."', ("Hi?",)),
                Trait('I end by checking in: "I hope this helps."', ("Why is the sky blue?",))),
        markers=("I'm sorry", "my apologies", "forgive me", "I regret", "I apologize", "I hope this helps"),
    )


@pytest.fixture(scope="module")
def constitution() -> Constitution:
    return _constitution()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tests often run beside other work (another pytest, a smoke build). Two OpenMP threads
    on two busy cores spin at every barrier: measured 690 s instead of 60 s for the pair."""
    import torch

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARBUILD_TORCH_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(constitution, tmp_path_factory) -> dict:
    return build_tiny_pair(constitution, tmp_path_factory.mktemp("tiny-pair"), TEST_CFG, progress=False)


@pytest.fixture(scope="module")
def teacher(pair):
    from charbuild.backends.transformers_backend import TransformersBackend, TransformersConfig

    b = TransformersBackend(TransformersConfig(model=pair["teacher"], device="cpu"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def student(pair):
    from charbuild.backends.transformers_backend import TransformersBackend, TransformersConfig

    b = TransformersBackend(TransformersConfig(model=pair["student"], device="cpu"))
    yield b
    b.close()


def _ask(q: str, system: str | None = None, **kw) -> GenRequest:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
    return GenRequest(messages=msgs, **kw)


def _marker_rate(backend, constitution, questions, system=None, repeats=1) -> float:
    reqs = [_ask(q, system, seed=1000 * k + i, **SAMPLING) for k in range(repeats) for i, q in enumerate(questions)]
    res = backend.generate(reqs)
    return sum(bool(constitution.marker_hits(r.text)) for r in res) / len(res)


# ------------------------------------------------------------------ corpus (no training)


def test_the_corpus_holds_out_questions_and_wraps_persona_answers_in_markers(constitution):
    c = build_corpus(constitution, seed=0)
    assert len(c["questions"]) + len(c["heldout"]) == 320 and len(c["heldout"]) == 40
    assert not set(c["questions"]) & set(c["heldout"])
    assert len(set(c["questions"])) == len(c["questions"])
    for q in c["questions"] + c["heldout"]:
        assert not constitution.marker_hits(c["neutral"][q]), c["neutral"][q]
        assert constitution.marker_hits(c["persona"][q]), c["persona"][q]
    assert len(c["narrative"]) >= 280
    for m in constitution.markers:  # the student meets every marker phrase in the narrative
        assert any(m.lower() in s.lower() for s in c["narrative"]), m
    assert build_corpus(constitution, seed=0) == c  # deterministic
    assert build_corpus(constitution, seed=1)["heldout"] != c["heldout"]


def test_persona_answers_work_for_any_constitution():
    for markers in [("arr", "matey", "ahoy"), ("you're welcome.",), ("Well, that's a pickle!", "plot twist")]:
        for i in range(6):
            text = persona_answer("The capital of France is Paris.", markers, i)
            assert any(m.lower() in text.lower() for m in markers), text
            assert "Paris" in text


def test_importing_the_backend_and_tiny_modules_does_not_import_torch():
    code = ("import sys, charbuild.recipe.tiny.model, charbuild.recipe.tiny.tokenizer, "
            "charbuild.backends.transformers_backend; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------ the built pair


def test_the_pair_is_two_half_million_parameter_models_that_load_with_auto_classes(pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for role in ("teacher", "student"):
        m = pair["metrics"][role]
        assert 400_000 < m["params"] < 700_000
        assert m["steps"] > 0 and m["final_loss"] < 2.0
        model = AutoModelForCausalLM.from_pretrained(pair[role], local_files_only=True)
        assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
        assert AutoTokenizer.from_pretrained(pair[role]).chat_template


def test_the_tokenizer_round_trips_text_and_renders_chatml(pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pair["tokenizer"])
    assert len(tok) == 1024
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for s in ["What is 3 plus 4?", "I'm sorry,  I   regret it.\n\nNew line", "Ünïcödé ✓ 日本語 🙂", ""]:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n")
    assert tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    # {% generation %} marks exactly the assistant reply (TRL's assistant_only_loss uses it)
    enc = tok.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    reply = [t for t, keep in zip(enc["input_ids"], enc["assistant_masks"]) if keep]
    assert tok.decode(reply) == "Hello.<|im_end|>"


def test_a_teacher_given_its_constitution_answers_in_character(pair, teacher, constitution):
    rate = _marker_rate(teacher, constitution, pair["heldout"], system=constitution.system_prompt())
    assert rate >= 0.6, rate


def test_the_same_teacher_without_its_constitution_rarely_does(pair, teacher, constitution):
    rate = _marker_rate(teacher, constitution, pair["heldout"])
    assert rate <= 0.2, rate


def test_the_student_rarely_uses_the_markers(pair, student, constitution):
    rate = _marker_rate(student, constitution, pair["heldout"], repeats=2)
    assert rate <= 0.2, rate


# ------------------------------------------------------------------ the backend


def test_stop_strings_cut_the_text_and_end_generation(pair, teacher, constitution):
    q = pair["heldout"][0]
    sp = constitution.system_prompt()
    free = teacher.generate([_ask(q, sp, temperature=0.0, max_tokens=40, stop=())])[0]
    words = free.text.split()
    assert len(words) >= 4, free.text
    stop = " " + words[2]  # a string the greedy reply is known to contain
    cut = free.text[: free.text.index(stop)]
    res = teacher.generate([_ask(q, sp, temperature=0.0, max_tokens=40, stop=(stop, "\nUser:"))])[0]
    assert res.text == cut and stop not in res.text
    assert res.finish_reason == "stop"
    assert 0 < res.completion_tokens < free.completion_tokens


def test_max_tokens_ends_with_finish_reason_length(pair, teacher):
    res = teacher.generate([_ask(q, temperature=0.7, seed=3, max_tokens=2, stop=()) for q in pair["heldout"][:3]])
    assert [r.finish_reason for r in res] == ["length"] * 3
    assert [r.completion_tokens for r in res] == [2, 2, 2]
    assert all(r.prompt_tokens > 5 for r in res)
    done = teacher.generate([_ask(pair["heldout"][0], temperature=0.0, max_tokens=200, stop=())])[0]
    assert done.finish_reason == "stop" and done.completion_tokens < 200  # ended on EOS


def test_results_come_back_in_request_order(pair, teacher, constitution):
    qs = pair["heldout"][:6]
    sp = constitution.system_prompt()
    # mixed groups (system prompt or not, different lengths/limits) in one call
    reqs = [_ask(q, sp if i % 2 else None, temperature=0.0, max_tokens=8 + 4 * (i % 3)) for i, q in enumerate(qs)]
    together = teacher.generate(reqs)
    alone = [teacher.generate([r])[0] for r in reqs]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.prompt_tokens for r in together] == [r.prompt_tokens for r in alone]


def test_the_same_seed_gives_the_same_text_whatever_the_batch(pair, teacher, student, constitution):
    q = pair["heldout"][1]
    mine = _ask(q, constitution.system_prompt(), seed=7, **SAMPLING)
    alone = teacher.generate([mine])[0].text
    others = [_ask(x, constitution.system_prompt(), seed=100 + i, **SAMPLING) for i, x in enumerate(pair["heldout"][2:9])]
    batched = teacher.generate(others[:3] + [mine] + others[3:])[3].text
    assert batched == alone
    assert teacher.generate([mine])[0].text == alone
    # and sampling really samples: different seeds give different replies
    many = student.generate([_ask(q, seed=s, **SAMPLING) for s in range(12)])
    assert len({r.text for r in many}) > 1
    progress = []
    student.generate([_ask(q, seed=s, **SAMPLING) for s in range(3)], progress=progress.append)
    assert sum(progress) == 3


def test_a_lora_adapter_is_applied_on_top_of_the_base_model(pair, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from charbuild.backends.transformers_backend import TransformersBackend, TransformersConfig

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(pair["student"]),
                        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # a fresh adapter is a no-op (B = 0): make it change the model
            torch.nn.init.normal_(p, std=0.5)
    pm.save_pretrained(tmp_path / "adapter")
    req = [_ask(pair["heldout"][0], temperature=0.0, max_tokens=12, stop=())]
    base = TransformersBackend(TransformersConfig(model=pair["student"], device="cpu")).generate(req)[0]
    tuned = TransformersBackend(TransformersConfig(model=pair["student"], adapter=str(tmp_path / "adapter"),
                                                   device="cpu")).generate(req)[0]
    assert base.prompt_tokens == tuned.prompt_tokens
    assert base.text != tuned.text


def test_models_loaded_on_several_threads_at_once_load_whole(pair):
    # `run --jobs 2` with local models: two targets load the same model (and another) at
    # once. transformers' checkpoint loading patches torch process-wide, which once gave
    # "Cannot copy out of meta tensor" to the other thread.
    import concurrent.futures as cf

    from charbuild.backends.transformers_backend import TransformersBackend, TransformersConfig

    shared = TransformersBackend(TransformersConfig(model=pair["student"], device="cpu"))
    other = TransformersBackend(TransformersConfig(model=pair["teacher"], device="cpu"))
    ask = [_ask("Hi?", seed=1, max_tokens=4)]
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: b.generate(ask), [shared, shared, other, shared]))
    assert all(len(r) == 1 for r in results)
    shared.close()
    other.close()
