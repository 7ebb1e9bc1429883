"""Stories for the recipe's final model (the paper's: the DPO adapter at 1.0 plus the SFT
adapter at 0.25, one LoRA adapter), what uses it by default, and merged weights that the
next stage really loads. The merges are checked on a tiny Qwen2 student trained here
(test_training's), against the weights themselves."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from charbuild.spec.loader import SpecError
from charbuild.spec.model import load_spec
from test_training import pairs_jsonl, sft_jsonl, small, tiny_model  # noqa: F401  (session fixtures)

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "specs" / "smoke-small.yaml"
RANK = 12  # in no vLLM rank: both merges are saved padded (linear 12 -> 16, exact 24 -> 32)


@pytest.fixture(scope="module")
def adapters(tiny_model, pairs_jsonl, sft_jsonl, tmp_path_factory):  # noqa: F811
    """A DPO adapter, and an SFT adapter trained with it folded in, as the recipe trains them."""
    from charbuild.recipe.trainers import train_dpo, train_sft

    out = tmp_path_factory.mktemp("adapters")
    cfg = small(lora_r=RANK, lora_alpha=2 * RANK, max_steps=3, warmup_ratio=0.0)
    train_dpo(tiny_model, pairs_jsonl, str(out / "dpo"), cfg, progress=False)
    train_sft(tiny_model, sft_jsonl, str(out / "sft"), cfg, adapter=str(out / "dpo" / "adapter"), progress=False)
    return out / "dpo" / "adapter", out / "sft" / "adapter"


def lora_delta(adapter: Path, module: str):
    """dW = (alpha / r) B A of one module, read from the saved adapter (not through PEFT)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    w = load_file(str(adapter / "adapter_model.safetensors"))
    a, b = (w[f"base_model.model.{module}.lora_{x}.weight"].double() for x in "AB")
    return b @ a * (cfg["lora_alpha"] / cfg["r"])


def folded(base: str, adapter: str | Path | None = None):
    """The student's weights (float64) with an adapter folded in by PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.double() for k, v in model.state_dict().items()}


Q = "model.layers.0.self_attn.q_proj"
MODULES = [Q, "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.slow
def test_the_final_model_is_dpo_at_one_plus_sft_at_a_quarter(adapters, tiny_model, tmp_path):  # noqa: F811
    from charbuild.recipe.final_merge import merge_final

    dpo, sft = adapters
    res = merge_final(tiny_model, str(dpo), str(sft), str(tmp_path), 1.0, 0.25, "exact", merged_weights=True)
    base, final = folded(tiny_model), folded(tiny_model, tmp_path / "adapter")
    for m in MODULES:
        want = base[f"{m}.weight"] + 1.0 * lora_delta(dpo, m) + 0.25 * lora_delta(sft, m)
        assert (lora_delta(sft, m).abs().max() > 1e-4) and (lora_delta(dpo, m).abs().max() > 1e-4)  # trained
        assert (final[f"{m}.weight"] - want).abs().max() < 1e-6, m
    # The full merged weights are the same model.
    merged = folded(str(tmp_path / "merged"))
    assert (merged[f"{Q}.weight"] - final[f"{Q}.weight"]).abs().max() < 1e-6
    # One adapter in PEFT's layout that vLLM's loader takes: rank 12 + 12 zero-padded to 32.
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], res["rank"], res["saved_rank"]) == (32, 32, 24, 32)
    assert not cfg["use_dora"] and cfg["bias"] == "none" and cfg["modules_to_save"] is None
    assert (tmp_path / "adapter" / "tokenizer.json").is_file() and res["weighted_sum_gap"] < 1e-6


@pytest.mark.slow
def test_the_papers_linear_merge_is_pefts_own_and_not_the_weighted_sum(adapters, tiny_model, tmp_path):  # noqa: F811
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from charbuild.recipe.final_merge import merge_final

    dpo, sft = adapters
    res = merge_final(tiny_model, str(dpo), str(sft), str(tmp_path), 1.0, 0.25, "linear")
    ours = folded(tiny_model, tmp_path / "adapter")
    # PEFT's own linear merge, as the reference's tools/merge_loras.py makes it.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(dpo),
                                      adapter_name="dpo")
    model.load_adapter(str(sft), adapter_name="sft")
    model.add_weighted_adapter(["dpo", "sft"], [1.0, 0.25], "paper", combination_type="linear")
    model.set_adapter("paper")
    peft_linear = {k: v.double() for k, v in model.merge_and_unload().state_dict().items()}
    base = folded(tiny_model)
    for m in MODULES:
        assert (ours[f"{m}.weight"] - peft_linear[f"{m}.weight"]).abs().max() < 1e-6, m
    # Mixing the factors adds cross terms: not base + dW_dpo + 0.25 dW_sft.
    exact = base[f"{Q}.weight"] + lora_delta(dpo, Q) + 0.25 * lora_delta(sft, Q)
    gap = (ours[f"{Q}.weight"] - exact).norm() / (exact - base[f"{Q}.weight"]).norm()
    assert gap > 0.05 and res["weighted_sum_gap"] > 0.05
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], res["rank"]) == (16, RANK) and not (tmp_path / "merged").exists()


def test_the_papers_merge_needs_both_adapters_at_one_rank(tmp_path):
    from charbuild.recipe.final_merge import merged_rank
    from charbuild.spec.model import vllm_lora_rank

    with pytest.raises(SpecError, match=r"training.final: method linear .* needs one rank, got training.dpo.lora.r 32 "
                                        r"and training.sft.lora.r 64: .* method: exact"):
        load_spec(ROOT / "specs" / "remorseful-paper.yaml", ["training.dpo.lora.r=32"])
    spec = load_spec(ROOT / "specs" / "remorseful-paper.yaml", ["training.dpo.lora.r=32", "training.final.method=exact"])
    assert spec.spec.training.final.method == "exact"
    with pytest.raises(ValueError, match="needs one rank"):
        merged_rank("linear", 32, 64)
    # The paper's r64 + r64 exactly is rank 128, which vLLM takes; a rank it does not take is padded.
    assert merged_rank("exact", 64, 64) == 128 and vllm_lora_rank(128) == 128 and vllm_lora_rank(96) == 128
    with pytest.raises(ValueError, match="over the largest vLLM"):
        vllm_lora_rank(513)


def test_padding_an_adapter_to_a_vllm_rank_keeps_its_delta():
    import torch

    from charbuild.recipe.final_merge import pad_rank

    a, b = torch.randn(12, 64), torch.randn(96, 12)
    padded = pad_rank({"x.lora_A.weight": a, "x.lora_B.weight": b, "x.other": a}, 16)
    assert padded["x.lora_A.weight"].shape == (16, 64) and padded["x.lora_B.weight"].shape == (96, 16)
    assert torch.equal(padded["x.lora_B.weight"] @ padded["x.lora_A.weight"], b @ a) and padded["x.other"] is a


def test_sample_and_evals_default_to_the_final_model():
    from charbuild.cli import parser
    from charbuild.recipe.registry import recipe_graph
    from charbuild.recipe.stages.evals import variant_inputs

    assert parser().parse_args(["sample", str(SMOKE), "hi"]).target == "final"
    assert parser().parse_args(["chat", str(SMOKE)]).target == "final"
    loaded = load_spec(SMOKE)
    assert loaded.spec.evals.variants == ["base", "dpo", "sft", "final"]
    graph = recipe_graph(loaded)
    assert variant_inputs("final") == {"adapter": ["final"]}
    assert graph["eval/samples/final"].defn.inputs["adapter"] == ["final"]
    assert "eval/samples/final" in graph["eval/markers"].defn.inputs["samples"]
    assert "eval/samples/final" in graph["eval/elo"].defn.inputs["samples"]
    assert graph["final"].defn.inputs == {"dpo": ["dpo-adapter"], "sft": ["sft-adapter"], "model:student": ["tiny/student"]}
    assert graph["final"].stage.publish(graph["final"].defn) == [("adapter", "final")]


def test_the_final_model_is_keyed_on_its_weights_and_method_and_the_paper_is_the_default():
    from charbuild.recipe.registry import recipe_graph

    paper = load_spec(ROOT / "specs" / "remorseful-paper.yaml")
    assert paper.spec.training.final.model_dump() == {"dpo_weight": 1.0, "sft_weight": 0.25, "method": "linear",
                                                      "merged_weights": False}
    before = {n.name: n.key for n in recipe_graph(paper)}
    for change in ("training.final.sft_weight=0.5", "training.final.method=exact", "training.final.merged_weights=true"):
        after = {n.name: n.key for n in recipe_graph(load_spec(ROOT / "specs" / "remorseful-paper.yaml", [change]))}
        changed = {n for n in before if before[n] != after[n]}
        assert {"final", "eval/samples/final", "eval/markers", "report"} <= changed, change
        # Nothing it is made of, and no other variant.
        assert not changed & {"dpo-adapter", "sft-adapter", "eval/samples/base", "eval/samples/dpo", "eval/samples/sft"}


def _trained(d: Path, merged: bool) -> Path:
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 64, "lora_alpha": 128}))
    (d / "adapter" / "adapter_model.safetensors").write_bytes(d.name.encode() * 64)
    if merged:
        (d / "merged").mkdir()
        (d / "merged" / "config.json").write_text("{}")
        (d / "merged" / "model.safetensors").write_bytes(d.name.encode() * 128)
    return d


def test_with_merge_on_the_next_stage_loads_the_merged_weights(tmp_path, monkeypatch):
    from charbuild.backends import pool
    from charbuild.backends.cached import call_identity
    from charbuild.backends.weights import student_weights

    base = str(tmp_path / "student")
    dpo, dpo_merged = _trained(tmp_path / "dpo", False), _trained(tmp_path / "dpo-m", True)
    sft, sft_merged = _trained(tmp_path / "sft", False), _trained(tmp_path / "sft-m", True)
    # training.dpo.merge: false: the adapter is folded in at load time, as before.
    assert student_weights(base, sft, [dpo]) == (base, str(sft / "adapter"), (str(dpo / "adapter"),))
    # training.dpo.merge: true: SFT training, introspection and the sft variant load dpo's merged weights.
    assert student_weights(base, None, [dpo_merged]) == (str(dpo_merged / "merged"), None, ())
    assert student_weights(base, dpo_merged) == (str(dpo_merged / "merged"), None, ())
    assert student_weights(base, sft, [dpo_merged]) == (str(dpo_merged / "merged"), str(sft / "adapter"), ())
    # training.sft.merge (or final's merged_weights): everything under it is in its merged weights.
    assert student_weights(base, sft_merged, [dpo]) == (str(sft_merged / "merged"), None, ())

    # The pool loads what student_weights says, and the call key follows what is loaded.
    made = []
    monkeypatch.setattr(pool, "make_backend", lambda m, path, adapter, merged, *a, **k: made.append((path, adapter, merged)))
    m = SimpleNamespace(backend="transformers", model=base, base_url=None, revision=None)

    def ctx(inputs):
        spec = SimpleNamespace(models={"student": m})
        return SimpleNamespace(spec=spec, inputs=inputs, input=lambda slot: inputs[slot][0])

    pool.BackendPool(price_table=lambda spec: None).get("student", ctx({"adapter": [dpo_merged]}))
    assert made == [(str(dpo_merged / "merged"), None, ())]
    keys = {call_identity(ctx(i), "student", m)[2] for i in
            ({"adapter": [dpo]}, {"adapter": [dpo_merged]}, {"adapter": [sft], "merge": [dpo]},
             {"adapter": [sft], "merge": [dpo_merged]})}
    assert len(keys) == 4


def test_sft_trains_on_the_merged_dpo_weights_when_dpo_merge_is_on(tmp_path, monkeypatch):
    from charbuild.contract import BuildContext
    from charbuild.recipe import trainers
    from charbuild.recipe.registry import recipe_graph

    calls = []
    monkeypatch.setattr(trainers, "train_sft", lambda model, data, out, cfg, health, adapter=None, progress=True:
                        calls.append((model, adapter)) or {})
    for merged in (False, True):
        loaded = load_spec(SMOKE, [f"training.dpo.merge={str(merged).lower()}"])
        node = recipe_graph(loaded)["sft-adapter"]
        dpo = _trained(tmp_path / f"dpo-{merged}", merged)
        inputs = {"data": [tmp_path], "dpo": [dpo], "model:student": [tmp_path / "student"]}
        node.stage.run(BuildContext(node.defn, node.key, loaded, tmp_path, inputs, budget=object(), progress=False))
    assert calls == [(str(tmp_path / "student"), str(tmp_path / "dpo-False" / "adapter")),
                     (str(tmp_path / "dpo-True" / "merged"), None)]


def test_vllm_is_started_with_the_rank_of_the_adapter_it_serves(tmp_path, monkeypatch):
    from charbuild.backends import pool, vllm_backend

    started = []
    monkeypatch.setattr(vllm_backend, "VllmBackend", lambda path, adapter=None, max_lora_rank=64:
                        started.append((adapter, max_lora_rank)))
    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_config.json").write_text(json.dumps({"r": 128, "lora_alpha": 128}))  # exact: r64 + r64
    m = SimpleNamespace(backend="vllm")
    pool.make_backend(m, "Qwen/Qwen3-8B", str(final))
    pool.make_backend(m, "Qwen/Qwen3-8B", None)
    assert started == [(str(final), 128), (None, 64)]


def test_the_report_shows_base_dpo_sft_and_final(tmp_path):
    from charbuild.contract import BuildContext
    from charbuild.recipe.registry import recipe_graph

    loaded = load_spec(SMOKE)
    node = recipe_graph(loaded)["report"]
    rates = {"base": 0.1, "dpo": 0.4, "sft": 0.9, "final": 0.6}

    def target(name: str, result: dict, files: dict) -> Path:
        d = tmp_path / name.replace("/", "_")
        d.mkdir()
        (d / "MANIFEST.json").write_text(json.dumps({"target": name, "stage": name, "result": result}))
        for f, text in files.items():
            (d / f).write_text(text)
        return d

    markers = [{"model": v, "system_prompt": s, "rate": r, "ci_low": 0.0, "ci_high": 1.0, "n": 40,
                "failures": {}} for v, r in rates.items() for s in (False, True)]
    final = {"metrics": {"method": "linear", "peft_combination": "linear", "dpo_weight": 1.0, "sft_weight": 0.25,
                         "rank": 16, "saved_rank": 16, "weighted_sum_gap": 0.42, "merged": None}}
    inputs = {"all": [target("eval/markers", {}, {"markers.json": json.dumps(markers)}), target("final", final, {})]}
    out = tmp_path / "out"
    out.mkdir()
    node.stage.run(BuildContext(node.defn, node.key, loaded, out, inputs, budget=object(), progress=False))
    sections = {s["title"]: s for s in json.loads((out / "report.json").read_text())["sections"]}
    assert [r[0] for r in sections["Character markers"]["table"]["rows"]] == [v for v in rates for _ in (0, 1)]
    assert "DPO x 1.0 + SFT x 0.25" in sections["Final model"]["text"] and "42.0%" in sections["Final model"]["text"]
    # Emergence is judged on the final model, the one the recipe ships.
    assert ["trained variant", "final"] in sections["Character emergence"]["table"]["rows"]
