"""Offline vLLM generation with LoRA requests: the optional extra `charbuild[vllm]` for GPU
machines. Thin on purpose: the same Backend interface, nothing vLLM-specific leaks out."""

from __future__ import annotations

from typing import Sequence

from charbuild.backends.base import BackendError, GenRequest, GenResult


class VllmBackend:
    def __init__(self, model: str, adapter: str | None = None, max_lora_rank: int = 64, **engine_kw):
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - only where vllm is missing
            raise BackendError("backend vllm needs the optional extra: pip install 'charbuild[vllm]' (GPU machines)") from exc
        self._adapter = adapter
        self._llm = LLM(model=model, enable_lora=adapter is not None, max_lora_rank=max_lora_rank, **engine_kw)

    def generate(self, requests: Sequence[GenRequest], progress=None) -> list[GenResult]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("adapter", 1, self._adapter) if self._adapter else None
        params = [SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, stop=list(r.stop),
                                 seed=r.seed, repetition_penalty=r.repetition_penalty,
                                 frequency_penalty=r.frequency_penalty) for r in requests]
        outs = self._llm.chat([list(r.messages) for r in requests], params, lora_request=lora, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            results.append(GenResult(c.text, "length" if c.finish_reason == "length" else "stop",
                                     len(o.prompt_token_ids or []), len(c.token_ids)))
        if progress:
            progress(len(results))
        return results

    def close(self) -> None:
        self._llm = None
