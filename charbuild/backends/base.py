"""The one interface every generation backend speaks.

Stages never know whether text comes from a local model, an HTTP API or vLLM: they
build `GenRequest`s and get `GenResult`s back in the same order.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

# Role markers a model must never be allowed to continue into (field report, 9.3).
from charbuild.spec.defaults import ROLE_STOPS  # noqa: E402


# transformers builds a model from a checkpoint under a patch of torch.nn.Module that is
# process-wide (parameters on the "meta" device until the weights are read), so a model
# built in another thread meanwhile gets meta tensors ("Cannot copy out of meta tensor"
# at --jobs 2). Loading a checkpoint, and building a model from scratch, hold this lock.
MODEL_LOADING = threading.RLock()


@dataclass(frozen=True)
class GenRequest:
    messages: list[dict]  # chat messages: [{"role": "system"|"user"|"assistant", "content": str}]
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    stop: tuple[str, ...] = tuple(ROLE_STOPS)
    seed: int | None = None
    repetition_penalty: float | None = None  # HF/vLLM style, 1.0 = off; None: off locally, not sent to a server
    frequency_penalty: float = 0.0  # OpenAI style, 0.0 = off
    extra_body: dict | None = None  # non-standard request fields an OpenAI-compatible server takes (top_k...)
    thinking: bool | None = None  # a hybrid model's reasoning on/off through its chat template; None: its default
    # Output tokens a budget reservation holds for this call (None: max_tokens). Sized from the
    # measured lengths so a tight cap is not filled by reservations nobody uses; neither sent
    # nor keyed (charbuild.backends.cached.sampling_params names what is).
    reserve_tokens: int | None = None


def template_kwargs(req: GenRequest) -> dict:
    """What a chat template is given for `req.thinking`: Qwen3 and GLM-4.5 read
    `enable_thinking`, DeepSeek-V3.1 reads `thinking`; a template ignores the one it lacks."""
    return {} if req.thinking is None else {"enable_thinking": req.thinking, "thinking": req.thinking}


# GenResult.meta["seed"]: whether the answer is what its request's seed determines. A local
# backend seeds each request's sampler itself; a server is sent the seed and may ignore it
# (`transformers serve` seeds the process, so its seeds hold only at concurrency 1).
SEED_HONOURED, SEED_UNVERIFIED = "honoured", "sent, not verifiable"


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


class Interrupted(KeyboardInterrupt):
    """A batch was stopped because the run was interrupted (Ctrl-C); the answers that had
    arrived reached `on_result`. A KeyboardInterrupt, not an Exception, so no stage can
    mistake it for a failed sample and commit a target from half its answers."""
