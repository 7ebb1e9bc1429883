"""One backend per (model, adapter) for the length of a build, created on first use."""

from __future__ import annotations

import os

from ..spec import ModelSpec
from .base import Backend, BackendError


class BackendPool:
    def __init__(self, budget=None) -> None:
        self._backends: dict[tuple, Backend] = {}
        self.budget = budget  # governor.Budget shared by every API backend of the run

    def get(self, role: str, ctx) -> Backend:
        m: ModelSpec = ctx.spec.models[role]
        model_slot = f"model:{role}"
        path = str(ctx.input(model_slot)) if model_slot in ctx.inputs else m.model
        adapter, merged = None, ()
        if role == "student":  # adapters are trained on the student only
            if "adapter" in ctx.inputs:
                adapter = str(ctx.input("adapter") / "adapter")
            merged = tuple(str(p / "adapter") for p in ctx.inputs.get("merge", []))
        k = (m.backend, path, adapter, merged, m.base_url)
        if k not in self._backends:
            self._backends[k] = make_backend(m, path, adapter, merged, self.budget)
        return self._backends[k]

    def close(self) -> None:
        for b in self._backends.values():
            b.close()
        self._backends.clear()


def make_backend(m: ModelSpec, path: str, adapter: str | None, merged: tuple[str, ...] = (), budget=None) -> Backend:
    if m.backend == "openai":
        from .openai_backend import OpenAIBackend, OpenAIConfig

        if adapter or merged:
            raise BackendError("the openai backend cannot apply a local LoRA adapter; serve it (vllm serve --lora-modules) instead")
        return OpenAIBackend(OpenAIConfig(model=m.model, base_url=m.base_url, api_key_env=m.api_key_env,
                                          concurrency=m.concurrency, rpm=m.rpm, tpm=m.tpm), budget=budget)
    if m.backend == "transformers":
        from .transformers_backend import TransformersBackend, TransformersConfig

        return TransformersBackend(TransformersConfig(model=path, adapter=adapter, merged_adapters=merged,
                                                      batch_size=m.batch_size))
    if m.backend == "vllm":
        from .vllm_backend import VllmBackend

        if merged:
            raise BackendError("vllm serves one LoRA per request: fold the DPO adapter first (training.dpo.merge: true)")
        return VllmBackend(path, adapter=adapter)
    raise BackendError(f"unknown backend {m.backend!r}")


def missing_keys(models: dict[str, ModelSpec], env=os.environ) -> list[str]:
    """Roles whose API key variable is unset: checked before anything is spent."""
    return [f"{role} ({m.model}) needs the environment variable {m.api_key_env}"
            for role, m in models.items() if m.backend == "openai" and m.api_key_env and not env.get(m.api_key_env)]
