"""Offline vLLM generation with LoRA requests: the optional extra `charbuild[vllm]` for GPU
machines. Thin on purpose: the same Backend interface, nothing vLLM-specific leaks out."""

from __future__ import annotations

from typing import Sequence

from charbuild.backends.base import SEED_HONOURED, BackendError, GenRequest, GenResult, template_kwargs


def chat_calls(requests: Sequence[GenRequest]) -> list[tuple[list[int], dict | None]]:
    """The `LLM.chat` calls a batch needs: one per thinking setting, since
    chat_template_kwargs applies to a whole call; (request positions, template kwargs)."""
    groups: dict = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.thinking, []).append(i)
    return [(idxs, template_kwargs(requests[idxs[0]]) or None) for idxs in groups.values()]


def sampling_kwargs(r: GenRequest) -> dict:
    """A request's `vllm.SamplingParams` arguments (tests/test_vllm_interop.py checks them
    against vLLM's own class)."""
    return dict(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, stop=list(r.stop), seed=r.seed,
                repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
                frequency_penalty=r.frequency_penalty)


def engine_kwargs(adapter: str | None, max_lora_rank: int, engine_kw: dict) -> dict:
    """`vllm.LLM`'s arguments besides the model: LoRA only when an adapter is served."""
    return dict(enable_lora=adapter is not None, max_lora_rank=max_lora_rank, **engine_kw)


class VllmBackend:
    """The engine starts on the first `generate` (inside the pool's turn on the GPU, never
    beside a training stage) and `close` gives its GPU memory back; a closed backend starts
    again when asked. `engine_kw`: the spec's engine settings (gpu_memory_utilization,
    max_model_len, tensor_parallel_size), passed to `vllm.LLM` as they are."""

    def __init__(self, model: str, adapter: str | None = None, max_lora_rank: int = 64, **engine_kw):
        try:
            import vllm  # noqa: F401
        except ImportError as exc:  # pragma: no cover - only where vllm is missing
            raise BackendError("backend vllm needs the optional extra: pip install 'charbuild[vllm]' (GPU machines)") from exc
        self._model, self._adapter = model, adapter
        self._engine_kw = engine_kwargs(adapter, max_lora_rank, engine_kw)
        self._llm = None

    def _engine(self):
        if self._llm is None:
            from vllm import LLM

            self._llm = LLM(model=self._model, **self._engine_kw)
        return self._llm

    def generate(self, requests: Sequence[GenRequest], progress=None) -> list[GenResult]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        llm = self._engine()
        lora = LoRARequest("adapter", 1, self._adapter) if self._adapter else None
        params = [SamplingParams(**sampling_kwargs(r)) for r in requests]
        outs: list = [None] * len(requests)
        for idxs, kw in chat_calls(requests):
            got = llm.chat([list(requests[i].messages) for i in idxs], [params[i] for i in idxs],
                           lora_request=lora, use_tqdm=False, **({"chat_template_kwargs": kw} if kw else {}))
            for i, o in zip(idxs, got):
                outs[i] = o
        results = []
        for o in outs:
            c = o.outputs[0]
            results.append(GenResult(c.text, "length" if c.finish_reason == "length" else "stop",
                                     len(o.prompt_token_ids or []), len(c.token_ids), meta={"seed": SEED_HONOURED}))
        if progress:
            progress(len(results))
        return results

    def close(self) -> None:
        """Give the engine's GPU memory back, for a training stage or another engine in this
        process. Dropping the LLM is not enough: its engine core (a child process in vLLM
        V1) and the torch.distributed groups it set up outlive it until shut down."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        release_gpu_memory()


def release_gpu_memory() -> None:
    """vLLM's own teardown where it has one (`cleanup_dist_env_and_memory`: model-parallel
    groups, the distributed environment, gc, the CUDA cache), else the same steps by hand."""
    import gc

    try:
        from vllm.distributed import cleanup_dist_env_and_memory
    except ImportError:
        cleanup_dist_env_and_memory = None
    if cleanup_dist_env_and_memory is not None:
        cleanup_dist_env_and_memory()
        return
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except ImportError:
        pass
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
