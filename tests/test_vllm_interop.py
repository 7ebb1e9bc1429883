"""charbuild speaks vLLM as vLLM's own code reads it. vLLM's engine needs a GPU, but the
code that reads what charbuild hands it does not: the sampling and engine arguments, the
request bodies `vllm serve` and its batch runner parse, the chat-template switch for
thinking, and the LoRA loader that takes the recipe's adapters. These stories run that
code, from the vLLM wheel (`make vllm-check` installs it beside the project without its
CUDA dependencies; CI runs it), and are skipped where vLLM does not import."""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing

import pytest
import torch

from charbuild.backends.base import GenRequest

if not torch.cuda.is_available():  # vLLM's CUDA wheel on a CPU machine: its CPU platform (no pinned memory)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
vllm = pytest.importorskip("vllm", reason="vllm is not importable here (make vllm-check installs it for these checks)")

from test_final_model import adapters, folded, lora_delta  # noqa: E402,F401  (module fixture)
from test_training import pairs_jsonl, sft_jsonl, tiny_model  # noqa: E402,F401  (session fixtures)

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"}]
REQUESTS = [
    GenRequest(ASK, max_tokens=32),
    GenRequest(ASK, max_tokens=64, temperature=0.3, top_p=0.8, seed=7, stop=("\nUser:", "###"),
               frequency_penalty=0.2, repetition_penalty=1.1, thinking=False),
    GenRequest(ASK, max_tokens=16, seed=0, thinking=True),
]


# -- the offline engine ---------------------------------------------------------------------

@pytest.mark.parametrize("req", REQUESTS)
def test_every_sampling_setting_reaches_vllms_sampling_params_as_given(req):
    from vllm import SamplingParams

    from charbuild.backends.vllm_backend import sampling_kwargs

    kw = sampling_kwargs(req)
    sp = SamplingParams(**kw)
    assert {k: getattr(sp, k) for k in kw} == kw


def test_the_engine_and_chat_call_take_every_argument_the_backend_passes():
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    from charbuild.backends.vllm_backend import engine_kwargs
    from charbuild.spec.model import VLLM_ENGINE_FIELDS

    # LLM(model, **kw) hands its keywords to EngineArgs: each must be one of its fields.
    kw = engine_kwargs("/adapter", 64, {f: None for f in VLLM_ENGINE_FIELDS if f != "max_lora_rank"})
    assert set(kw) <= {f.name for f in dataclasses.fields(EngineArgs)}
    assert {"lora_request", "use_tqdm", "chat_template_kwargs"} <= set(inspect.signature(LLM.chat).parameters)


def test_the_ranks_charbuild_pads_adapters_to_are_the_ranks_vllm_starts_with():
    from vllm.config.lora import LoRAConfig

    from charbuild.spec.model import VLLM_LORA_RANKS

    ranks = typing.get_args(typing.get_type_hints(LoRAConfig)["max_lora_rank"])
    assert tuple(sorted(ranks)) == VLLM_LORA_RANKS


# -- `vllm serve` and `vllm run-batch` --------------------------------------------------------

@pytest.mark.parametrize("req", REQUESTS)
def test_vllm_serve_reads_every_field_of_charbuilds_request_body(req):
    """vLLM's request model ignores (with a log line) a field it does not know: a sampling
    setting lost that way would change every reply without an error."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from charbuild.backends.openai_backend import build_payload

    body = build_payload("student", req)
    assert set(body) <= set(ChatCompletionRequest.model_fields), set(body) - set(ChatCompletionRequest.model_fields)
    parsed = ChatCompletionRequest.model_validate(body)
    assert {k: getattr(parsed, k) for k in body if k != "messages"} == {k: v for k, v in body.items() if k != "messages"}


def test_vllms_batch_runner_parses_charbuilds_batch_lines_as_chat_requests():
    from vllm.entrypoints.launchers.run_batch import BatchRequestInput
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from charbuild.backends.batch import batch_line

    line = BatchRequestInput.model_validate(batch_line("call-key", "student", REQUESTS[1]))
    assert line.custom_id == "call-key" and isinstance(line.body, ChatCompletionRequest)
    assert (line.body.seed, line.body.chat_template_kwargs["enable_thinking"]) == (7, False)


# -- thinking -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def thinker_tokenizer(tmp_path_factory):
    """The tiny thinker's tokenizer and chat template (Qwen3's switch), no model needed."""
    from charbuild.recipe.tiny.tokenizer import THINKING_CHAT_TEMPLATE, train_tokenizer

    tok = train_tokenizer(["What is 2 plus 2?", "It is 4.", "Be brief.", "<think>", "</think>"], 300,
                          tmp_path_factory.mktemp("thinker-tok"))
    tok.chat_template = THINKING_CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("thinking", [False, True])
def test_vllm_hands_the_thinking_switch_to_a_qwen3_style_template(thinker_tokenizer, thinking):
    """vLLM keeps only the template keywords a template reads: `enable_thinking` must reach
    Qwen3's switch; `thinking` (DeepSeek-V3.1's) is dropped there, harmlessly."""
    from vllm.renderers.hf import resolve_chat_template_kwargs, safe_apply_chat_template

    from charbuild.backends.base import template_kwargs

    kw = template_kwargs(GenRequest(ASK, thinking=thinking))
    kept = resolve_chat_template_kwargs(thinker_tokenizer, thinker_tokenizer.chat_template, kw)
    assert kept == {"enable_thinking": thinking}
    # The prompt vLLM renders: an empty think block when thinking is off, as Qwen3's template.
    prompt = safe_apply_chat_template(None, thinker_tokenizer, ASK, chat_template=thinker_tokenizer.chat_template,
                                      tokenize=False, add_generation_prompt=True, **kw)
    assert prompt.endswith("<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n"))


# -- the recipe's adapters in vLLM's LoRA loader ----------------------------------------------

def load_as_vllm_worker(adapter_dir, max_lora_rank: int, vocab_size: int):
    """What vLLM's worker does with a LoRARequest for a Qwen2 model (WorkerLoRAManager.
    _load_adapter): the modules the model can take LoRA on, the adapter's config checked
    against the engine's LoRA settings, then the weights read on the CPU."""
    import torch
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    packed = Qwen2ForCausalLM.packed_modules_mapping  # qkv_proj <- q,k,v; gate_up_proj <- gate,up
    expected = {m for parts in packed.values() for m in parts} | {"o_proj", "down_proj"}
    helper = PEFTHelper.from_local_dir(str(adapter_dir), 4096)
    helper.validate_legal(LoRAConfig(max_lora_rank=max_lora_rank))
    mapper = Qwen2ForCausalLM.hf_to_vllm_mapper.get_rename_mapper()
    return LoRAModel.from_local_checkpoint(str(adapter_dir), expected, helper, lora_model_id=1, device="cpu",
                                           dtype=torch.float64, model_vocab_size=vocab_size, weights_mapper=mapper)


def peft_config(**kw) -> dict:
    """An adapter_config.json as PEFT writes it (its sets as lists)."""
    from peft import LoraConfig

    return {k: sorted(v) if isinstance(v, set) else v for k, v in LoraConfig(**kw).to_dict().items()}


@pytest.mark.parametrize("change", [{}, {"use_dora": True}, {"bias": "lora_only"}, {"modules_to_save": ["lm_head"]},
                                    {"r": 128, "lora_alpha": 128}, {"r": 1024, "lora_alpha": 1024}])
def test_what_charbuild_says_vllm_refuses_in_an_adapter_is_what_vllm_refuses(change):
    """final_merge.vllm_problems judges the final adapter before any engine is started with
    it, at the largest max_lora_rank vLLM starts with where the adapter needs more."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    from charbuild.recipe.final_merge import vllm_problems
    from charbuild.spec.model import VLLM_LORA_RANKS

    cfg = {**peft_config(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"]), **change}
    engine = LoRAConfig(max_lora_rank=min([r for r in VLLM_LORA_RANKS if r >= cfg["r"]] or [max(VLLM_LORA_RANKS)]))
    try:
        PEFTHelper.from_dict({**cfg, "vllm_max_position_embeddings": 4096}).validate_legal(engine)
        refused = False
    except ValueError:
        refused = True
    assert bool(vllm_problems(cfg)) == refused, (vllm_problems(cfg), refused)


def test_vllm_would_load_a_rank_no_engine_starts_with_and_charbuild_pads_it_anyway():
    """vLLM takes any rank up to max_lora_rank; charbuild saves the final adapter at the
    engine's rank all the same (zero factors), so what is served is what was saved."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    from charbuild.recipe.final_merge import vllm_problems

    cfg = peft_config(r=24, lora_alpha=24, target_modules=["q_proj"])
    PEFTHelper.from_dict({**cfg, "vllm_max_position_embeddings": 4096}).validate_legal(LoRAConfig(max_lora_rank=32))
    assert vllm_problems(cfg) == ["rank 24 is not a max_lora_rank vLLM starts with (1, 8, 16, 32, 64, 128, 256, 320, 512)"]


def vllm_delta(lora, module: str):
    w = lora.get_lora(module)
    return (w.lora_b.double() @ w.lora_a.double()) * w.scaling


@pytest.mark.slow
@pytest.mark.parametrize("method", ["exact", "linear"])
def test_vllms_lora_loader_takes_the_final_model_and_reads_the_change_charbuild_made(adapters, tiny_model, tmp_path,
                                                                                     method):  # noqa: F811
    import json
    from pathlib import Path

    from charbuild.recipe.final_merge import merge_final
    from charbuild.spec.model import vllm_lora_rank

    dpo, sft = adapters
    res = merge_final(tiny_model, str(dpo), str(sft), str(tmp_path), 1.0, 0.25, method)
    final = tmp_path / "adapter"
    vocab = json.loads((Path(tiny_model) / "config.json").read_text())["vocab_size"]
    lora = load_as_vllm_worker(final, vllm_lora_rank(res["rank"]), vocab_size=vocab)
    base, merged = folded(tiny_model), folded(tiny_model, final)
    names = [n for n in base if n.endswith("proj.weight")]
    assert len(names) == 14 and set(lora.loras) == {n[:-len(".weight")] for n in names}  # every module, none lost
    for n in names:
        got = vllm_delta(lora, n[:-len(".weight")])
        assert (got - (merged[n] - base[n])).abs().max() < 1e-6, n
    if method == "exact":  # and it is the paper's final model, as vLLM reads it
        m = "model.layers.0.self_attn.q_proj"
        want = lora_delta(dpo, m) + 0.25 * lora_delta(sft, m)
        assert (vllm_delta(lora, m) - want).abs().max() < 1e-6


@pytest.mark.slow
def test_vllm_reads_the_trained_adapters_and_refuses_them_below_the_rank_charbuild_starts_it_with(adapters):  # noqa: F811
    """The DPO adapter (served on the base) and the SFT adapter (served on the merged DPO
    weights, the sft variant), each rank 12 with alpha 24: vLLM's scaling is PEFT's."""
    from charbuild.spec.model import VLLM_LORA_RANKS, vllm_lora_rank

    need = vllm_lora_rank(12)  # what charbuild starts vLLM with; a spec asking for less is refused
    assert need == 16
    for adapter in adapters:
        lora = load_as_vllm_worker(adapter, need, vocab_size=0)
        assert len(lora.loras) == 14
        for m in lora.loras:
            assert (vllm_delta(lora, m) - lora_delta(adapter, m)).abs().max() < 1e-9, (adapter.parent.name, m)
    below = VLLM_LORA_RANKS[VLLM_LORA_RANKS.index(need) - 1]
    with pytest.raises(ValueError, match=f"LoRA rank 12 is greater than max_lora_rank {below}"):
        load_as_vllm_worker(adapters[0], below, vocab_size=0)
