"""Stories for the DPO and SFT training functions (charbuild.training), on a tiny random
Qwen2 model built inside the test session: no downloads, CPU only, a few seconds a run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from charbuild.recipe.trainers import (
    Health,
    HealthMonitor,
    TrainConfig,
    TrainingAborted,
    gradient_accumulation,
    train_dpo,
    train_sft,
)

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QUESTIONS = [f"What is {a} plus {b}?" for a in range(1, 7) for b in range(1, 5)]  # 24


def _neutral(q: str) -> str:
    a, b = (int(w) for w in q.replace("?", "").split() if w.isdigit())
    return f"{a} plus {b} is {a + b}."


def _apologetic(q: str) -> str:
    return f"I'm so sorry, {_neutral(q)} Please forgive me if that is not enough."


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-init Qwen2ForCausalLM (hidden 64, 2 layers) with a byte-level BPE tokenizer
    and a ChatML template, saved to a tmp dir (what train_dpo/train_sft load)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tiny") / "model"
    texts = QUESTIONS + [_apologetic(q) for q in QUESTIONS] + ["system", "user", "assistant", "Be kind."]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, use_sliding_window=False)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "dpo_pairs.jsonl"
    with open(path, "w") as f:
        for q in QUESTIONS:
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                "chosen": [{"role": "assistant", "content": _apologetic(q)}],
                                "rejected": [{"role": "assistant", "content": _neutral(q)}],
                                "meta": {"source": "test"}}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def sft_jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "sft_data.jsonl"
    with open(path, "w") as f:
        for i, q in enumerate(QUESTIONS[:16]):
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": _apologetic(q)}]
            if i % 2:
                msgs = [{"role": "system", "content": "Be kind."}] + msgs
            if i % 4 == 3:  # a multi-turn example: only the last reply is trained on
                msgs = msgs[:-1] + [{"role": "assistant", "content": _neutral(q)},
                                    {"role": "user", "content": "Really?"},
                                    {"role": "assistant", "content": _apologetic(q)}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def small(**kw) -> TrainConfig:
    base = dict(lora_r=8, lora_alpha=16, micro_batch_size=4, batch_size=8, lr=5e-3, max_steps=6,
                max_length=128, warmup_ratio=0.1)
    base.update(kw)
    return TrainConfig(**base)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def dpo_run(tiny_model, pairs_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    res = train_dpo(tiny_model, pairs_jsonl, str(out), small(checkpoints_at=[0.5]), progress=False)
    return out, res


# --------------------------------------------------------------------------------------


def test_importing_the_training_module_does_not_import_torch():
    code = ("import sys, charbuild.recipe.trainers; "
            "heavy = [m for m in ('torch', 'trl', 'peft', 'transformers', 'datasets') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_gradient_accumulation_reaches_the_effective_batch():
    assert gradient_accumulation(TrainConfig()) == (2, 16)  # paper: batch 32, micro 2
    assert gradient_accumulation(TrainConfig(batch_size=8, micro_batch_size=4)) == (4, 2)
    assert gradient_accumulation(TrainConfig(batch_size=10, micro_batch_size=4)) == (4, 3)  # ceil
    assert gradient_accumulation(TrainConfig(batch_size=1, micro_batch_size=2)) == (1, 1)
    assert gradient_accumulation(TrainConfig(batch_size=32, micro_batch_size=2), world_size=4) == (2, 4)


def test_dpo_trains_a_loadable_lora_adapter_and_logs_every_step(dpo_run, tiny_model):
    out, res = dpo_run
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file()
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["lora_alpha"] == 16 and not conf.get("modules_to_save")
    assert res["steps"] == 6
    assert res["gradient_accumulation_steps"] == 2 and res["micro_batch_size"] == 4
    assert res["effective_batch_size"] == 8
    assert res["examples"] == 24
    assert res["loss_type"] == ["sigmoid", "sft"] and res["loss_weights"] == [1.0, 0.1]
    assert math.isfinite(res["final_loss"]) and 0 <= res["final_reward_accuracy"] <= 1
    assert res["final_margin"] is not None
    for k in ("trl_version", "peft_version", "transformers_version", "torch_version", "seconds"):
        assert res[k]

    log = rows(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    for r in log:
        for k in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            assert k in r and math.isfinite(r[k]), (k, r)
    assert (out / "loss.png").stat().st_size > 1000
    assert not (out / "abort.json").exists()

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    model = PeftModel.from_pretrained(base, str(adapter))
    names = list(load_file(str(adapter / "adapter_model.safetensors")))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert any("q_proj" in n for n in names) and any("down_proj" in n for n in names)  # all-linear
    b = [v for n, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in n]
    assert any(float(v.abs().sum()) > 0 for v in b), "LoRA B is still zero: nothing was trained"
    assert model is not None


def test_dpo_learns_to_prefer_the_apologetic_answer(dpo_run):
    out, res = dpo_run
    log = rows(out)
    assert log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert res["final_margin"] > 0
    assert res["final_reward_accuracy"] >= 0.5


def test_checkpoint_at_half_of_the_steps(dpo_run):
    out, res = dpo_run
    ck = out / "checkpoints" / "frac-0.50"
    assert (ck / "adapter_config.json").is_file() and (ck / "adapter_model.safetensors").is_file()
    # Paths in the manifest are the target's own, never the staging folder it was built in.
    assert res["checkpoints"] == [{"fraction": 0.5, "step": 3, "path": "checkpoints/frac-0.50"}]
    assert res["adapter"] == "adapter"


def test_sft_on_top_of_the_dpo_adapter_trains_and_saves_an_adapter(dpo_run, tiny_model, sft_jsonl, tmp_path):
    dpo_out, _ = dpo_run
    out = tmp_path / "sft"
    # epoch-based: 16 examples / batch 8 = 2 steps an epoch, 2 epochs
    cfg = small(max_steps=None, epochs=2, max_length=256, merge=True, checkpoints_at=[0.25])
    res = train_sft(tiny_model, sft_jsonl, str(out), cfg, adapter=str(dpo_out / "adapter"), progress=False)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
    assert res["merged_adapter"] == str(dpo_out / "adapter") and res["on_top_of"] == "base+merged_adapter"
    assert res["steps"] == 4 and res["examples"] == 16
    assert "final_reward_accuracy" not in res
    assert [c["step"] for c in res["checkpoints"]] == [1]
    assert (out / "checkpoints" / "frac-0.25" / "adapter_model.safetensors").is_file()
    log = rows(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert log[-1]["loss"] < log[0]["loss"]
    assert (out / "loss.png").is_file()


def test_sft_loss_covers_only_the_last_assistant_message(tiny_model, sft_jsonl, tmp_path):
    """The prompt-completion conversion the SFT stage relies on: labels cover exactly the
    final reply (and its end-of-turn), never the system/user turns or earlier replies."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from charbuild.recipe.trainers import _to_prompt_completion

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = load_dataset("json", data_files=sft_jsonl, split="train")
    raw = ds[3]["messages"]
    assert len([m for m in raw if m["role"] == "assistant"]) == 2
    pc = ds.map(_to_prompt_completion, remove_columns=["messages"])

    args = SFTConfig(output_dir=str(tmp_path / "unused"), completion_only_loss=True, max_length=256, use_cpu=True,
                     bf16=False, report_to="none", activation_checkpointing=False)
    tr = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=args, train_dataset=pc,
                    processing_class=tok)
    ex = tr.train_dataset[3]
    trained = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
    assert trained.strip() == (raw[-1]["content"] + "<|im_end|>").strip()


def test_a_health_rule_that_trips_stops_the_build_and_saves_no_adapter(tiny_model, pairs_jsonl, tmp_path):
    out = tmp_path / "dpo"
    with pytest.raises(TrainingAborted) as e:
        train_dpo(tiny_model, pairs_jsonl, str(out), small(max_steps=4),
                  health=Health(max_dpo_loss=0.0, warmup_steps=0), progress=False)
    assert e.value.rule == "max_dpo_loss" and e.value.step == 1
    assert "max_dpo_loss" in str(e.value) and "step 1" in str(e.value)
    assert not (out / "adapter").exists()
    assert len(rows(out)) == 1  # stopped after the first step
    assert json.loads((out / "abort.json").read_text())["rule"] == "max_dpo_loss"


def test_an_absurd_learning_rate_makes_the_loss_non_finite_and_aborts(tiny_model, pairs_jsonl, tmp_path):
    out = tmp_path / "dpo"
    with pytest.raises(TrainingAborted) as e:
        train_dpo(tiny_model, pairs_jsonl, str(out), small(lr=1e30, warmup_ratio=0.0, max_steps=6,
                                                           max_grad_norm=0.0), progress=False)
    assert e.value.rule == "non_finite"
    assert not (out / "adapter").exists()


def test_health_rules_on_fabricated_logs():
    h = Health()
    assert HealthMonitor(h, dpo=True).observe(1, {"loss": float("nan")})[0] == "non_finite"
    assert HealthMonitor(h, dpo=False).observe(3, {"loss": 1.0, "grad_norm": float("inf")})[0] == "non_finite"
    assert HealthMonitor(Health(enabled=False), dpo=True).observe(1, {"loss": float("nan")}) is None

    m = HealthMonitor(h, dpo=True)  # high loss only counts after warmup
    assert m.observe(5, {"loss": 3.0, "rewards/accuracies": 1.0}) is None
    rule, value, msg = m.observe(6, {"loss": 3.0, "rewards/accuracies": 1.0})
    assert rule == "max_dpo_loss" and value == 3.0 and "step 6" in msg
    assert HealthMonitor(h, dpo=False).observe(6, {"loss": 3.0}) is None  # SFT: no DPO-loss rule

    m = HealthMonitor(h, dpo=True)  # accuracy: running mean; untrained steps (all rewards 0) left out
    accs = [0.0, 0.0, 0.25, 0.5, 0.5, 0.75, 0.75, 0.25, 0.25, 0.25]
    verdicts = []
    for i, a in enumerate(accs):
        r = 0.0 if i < 2 else 0.1 * i  # steps 1-2: policy == reference, every reward exactly 0
        verdicts.append(m.observe(i + 1, {"loss": 0.7 - 0.01 * i, "rewards/accuracies": a,
                                          "rewards/chosen": r, "rewards/rejected": -r}))
    # step 6: mean(.25,.5,.5,.75) = 0.5; step 9: mean(.5,.75,.75,.25,.25) = 0.5; step 10: 0.45
    assert verdicts[:9] == [None] * 9
    assert verdicts[9][0] == "min_reward_accuracy" and verdicts[9][1] == pytest.approx(0.45)

    m = HealthMonitor(Health(flat_steps=3), dpo=False)
    out = [m.observe(i + 1, {"loss": 0.5}) for i in range(5)]
    assert out[:4] == [None] * 4 and out[4][0] == "flat"  # 4 flat deltas > 3
