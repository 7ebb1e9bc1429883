"""The one interface every generation backend speaks.

Stages never know whether text comes from a local model, an HTTP API or vLLM: they
build `GenRequest`s and get `GenResult`s back in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

# Role markers a model must never be allowed to continue into (field report, 9.3).
from charbuild.spec.defaults import ROLE_STOPS  # noqa: E402


@dataclass(frozen=True)
class GenRequest:
    messages: list[dict]  # chat messages: [{"role": "system"|"user"|"assistant", "content": str}]
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    stop: tuple[str, ...] = tuple(ROLE_STOPS)
    seed: int | None = None
    repetition_penalty: float = 1.0  # HF/vLLM style, 1.0 = off
    frequency_penalty: float = 0.0  # OpenAI style, 0.0 = off


@dataclass
class GenResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (hit max_tokens)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    meta: dict = field(default_factory=dict)


Progress = Callable[[int], None]  # called with the number of newly finished requests


class Backend(Protocol):
    """Generates one completion per request, results in request order."""

    def generate(self, requests: Sequence[GenRequest], progress: Progress | None = None) -> list[GenResult]: ...

    def close(self) -> None: ...


class BackendError(RuntimeError):
    """A backend could not serve a request (after its retries); the message says why."""
