"""The recipe's final model (paper: OCT `tools/merge_loras.py`): one PEFT LoRA adapter made
of the DPO adapter at `dpo_weight` and the SFT adapter at `sft_weight` (paper 1.0 and 0.25),
for the base student.

The SFT adapter was trained with the DPO adapter folded in, so both adapters are deltas
on the base's weights: base + 1.0 dW_dpo + 1.0 dW_sft is the SFT model, and the paper's
mix turns SFT down to a quarter. Both merges are PEFT's `add_weighted_adapter`:

- linear (the paper's): A = sum sqrt(w_i s_i) A_i, B = sum sqrt(w_i s_i) B_i (s_i = alpha_i /
  r_i), so B A = sum w_i s_i B_i A_i + sum_{i != j} sqrt(w_i s_i w_j s_j) B_i A_j: the
  weighted sum of the deltas plus cross terms, and one rank for both adapters;
- exact (`cat`): A = [w_i s_i A_i] stacked, B = [B_i] side by side, so B A = sum w_i dW_i
  exactly, at rank r_dpo + r_sft.

The adapter is saved in PEFT's layout at the next rank vLLM's LoRA loader takes (zero rows
and columns added: the delta is unchanged), and `weighted_sum_gap` records how far it is
from the exact weighted sum. Torch, transformers and PEFT are imported inside functions.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from charbuild.spec.model import VLLM_LORA_RANKS, vllm_lora_rank

PEFT_COMBINATION = {"linear": "linear", "exact": "cat"}
MERGED_NAME = "default"  # PEFT saves the adapter named "default" at the top of the folder


def merged_rank(method: str, r_dpo: int, r_sft: int) -> int:
    if method not in PEFT_COMBINATION:
        raise ValueError(f"unknown merge method {method!r}: linear or exact")
    if method == "exact":
        return r_dpo + r_sft
    if r_dpo != r_sft:
        raise ValueError(f"method linear (the paper's merge) mixes the LoRA factors and needs one rank, got DPO rank "
                         f"{r_dpo} and SFT rank {r_sft}: use method exact")
    return r_dpo


def vllm_problems(config: dict) -> list[str]:
    """What vLLM's LoRA loader refuses in an adapter_config.json (PEFT's layout is taken as
    saved; tests/test_vllm_interop.py holds this to vLLM's own check), and a rank no vLLM
    engine starts with: vLLM would load it under a larger max_lora_rank, but the final
    adapter is saved at the engine's rank, so the engine serves the saved factors as they are."""
    out = []
    if config.get("r") not in VLLM_LORA_RANKS:
        out.append(f"rank {config.get('r')} is not a max_lora_rank vLLM starts with {VLLM_LORA_RANKS}")
    if config.get("use_dora"):
        out.append("DoRA")
    if config.get("bias", "none") != "none":
        out.append(f"bias {config.get('bias')!r}")
    if config.get("modules_to_save"):
        out.append(f"modules_to_save {config.get('modules_to_save')}")
    return out


def _rank_axis(key: str) -> int | None:
    """Which axis of a saved LoRA tensor is the rank: rows of A, columns of B."""
    if "lora_A" in key or "lora_embedding_A" in key:
        return 0
    if "lora_B" in key or "lora_embedding_B" in key:
        return 1
    return None


def pad_rank(tensors: dict, rank: int) -> dict:
    """LoRA factors zero-padded to `rank`: B A is unchanged."""
    import torch.nn.functional as F

    out = {}
    for key, t in tensors.items():
        axis = _rank_axis(key)
        if axis is None or t.shape[axis] == rank:
            out[key] = t
        elif t.shape[axis] > rank:
            raise ValueError(f"{key}: rank {t.shape[axis]} is over {rank}")
        else:
            out[key] = F.pad(t, (0, 0, 0, rank - t.shape[0]) if axis == 0 else (0, rank - t.shape[1])).contiguous()
    return out


def pad_saved_adapter(adapter_dir: Path, rank: int) -> None:
    """Rewrite a saved adapter at `rank`. Its config has lora_alpha == r (PEFT's merged
    adapters have scaling 1), kept so after padding."""
    from safetensors.torch import load_file, save_file

    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    if cfg["r"] == rank:
        return
    if cfg["lora_alpha"] != cfg["r"] or cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: padding needs scaling alpha / r == 1, got {cfg['lora_alpha']} / {cfg['r']}")
    save_file(pad_rank(load_file(str(weights)), rank), str(weights), metadata={"format": "pt"})
    cfg_path.write_text(json.dumps({**cfg, "r": rank, "lora_alpha": rank}, indent=2, sort_keys=True) + "\n")


def lowrank_sq_norm(bs: list, as_: list) -> float:
    """||sum B_i A_i||_F^2 from the factors, tr((B^T B)(A A^T)) with the B_i side by side and
    the A_i stacked: r x r products, never the d x d deltas."""
    import torch

    b, a = torch.cat(bs, dim=1).double(), torch.cat(as_, dim=0).double()
    return max(0.0, float(torch.trace((b.T @ b) @ (a @ a.T))))


def weighted_sum_gap(model, names: list[str], weights: list[float], merged: str = MERGED_NAME) -> float:
    """||dW_merged - sum w_i dW_i|| / ||sum w_i dW_i|| (Frobenius, over every adapted layer):
    0 for exact; for linear, the size of its cross terms."""
    from peft.tuners.lora import LoraLayer

    num = den = 0.0
    for layer in model.modules():
        if not isinstance(layer, LoraLayer) or merged not in layer.lora_A:
            continue
        parts = [(layer.lora_B[n].weight, layer.lora_A[n].weight * (w * layer.scaling[n]))
                 for n, w in zip(names, weights) if n in layer.lora_A]
        if not parts:
            continue
        bs, as_ = [b for b, _ in parts], [a for _, a in parts]
        den += lowrank_sq_norm(bs, as_)
        num += lowrank_sq_norm([layer.lora_B[merged].weight] + bs,
                               [layer.lora_A[merged].weight * layer.scaling[merged]] + [-a for a in as_])
    return math.sqrt(num / den) if den else 0.0


def adapter_config(adapter_dir: str | Path) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())


def merge_final(base_model: str, dpo_adapter: str, sft_adapter: str, out_dir: str, dpo_weight: float = 1.0,
                sft_weight: float = 0.25, method: str = "linear", merged_weights: bool = False,
                progress: bool = True) -> dict:
    """out_dir/adapter: the final adapter (and tokenizer); out_dir/merged: the base with it
    folded in, in the base's dtype, if `merged_weights`. Returns what the manifest records."""
    import peft
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    out = Path(out_dir)
    for name in ("adapter", "merged"):
        shutil.rmtree(out / name, ignore_errors=True)
    ranks = [adapter_config(d)["r"] for d in (dpo_adapter, sft_adapter)]
    rank = merged_rank(method, *ranks)
    saved_rank = vllm_lora_rank(rank)  # refused before anything is loaded
    if not torch.cuda.is_available():
        torch.set_num_threads(2)
    if not progress:  # transformers' loading and saving bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base_model, local_files_only=True, dtype="auto")
    stored = model.dtype
    # PEFT writes the merged factors in the base's dtype: in bf16 the exact merge would be rounded.
    # (On the CPU, float32: about 32 GB of memory for an 8B student.)
    model = PeftModel.from_pretrained(model.float(), dpo_adapter, adapter_name="dpo", local_files_only=True)
    model.load_adapter(sft_adapter, adapter_name="sft", local_files_only=True)
    names, weights = ["dpo", "sft"], [dpo_weight, sft_weight]
    model.add_weighted_adapter(names, weights, MERGED_NAME, combination_type=PEFT_COMBINATION[method])
    gap = weighted_sum_gap(model, names, weights)
    model.set_adapter(MERGED_NAME)
    for n in names:
        model.delete_adapter(n)
    model.save_pretrained(str(out / "adapter"), selected_adapters=[MERGED_NAME])
    pad_saved_adapter(out / "adapter", saved_rank)
    tok.save_pretrained(str(out / "adapter"))
    problems = vllm_problems(adapter_config(out / "adapter"))
    if problems:
        raise ValueError(f"the final adapter is not one vLLM loads: {'; '.join(problems)}")
    if merged_weights:
        full = model.merge_and_unload().to(stored)
        full.save_pretrained(str(out / "merged"))
        tok.save_pretrained(str(out / "merged"))
    return {"method": method, "peft_combination": PEFT_COMBINATION[method], "dpo_weight": dpo_weight,
            "sft_weight": sft_weight, "dpo_rank": ranks[0], "sft_rank": ranks[1], "rank": rank, "saved_rank": saved_rank,
            "weighted_sum_gap": round(gap, 6), "adapter": "adapter", "merged": "merged" if merged_weights else None,
            "base_model": base_model,
            "dtype": str(stored).replace("torch.", ""), "seconds": round(time.perf_counter() - t0, 2),
            "peft_version": peft.__version__}
