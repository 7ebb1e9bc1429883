"""Whether each model a build generates with can be reached, checked before the first
target runs, so a build that would stop at its third stage stops before its first paid call.

Per role, by backend (each problem one line: role, model, what is missing, how to fix it):

- openai: the endpoint answers `GET {base_url}/models` within a few seconds. Any HTTP
  answer counts, 401 and 404 included (some servers guard or lack the route): what is
  checked is that a server is there. (Its key is checked apart: `pool.missing_keys`.)
- transformers: the model is a folder on disk, or in the Hugging Face cache (the backend
  loads local files only, never downloads).
- vllm: the package is installed, a CUDA GPU is visible (as many as tensor_parallel_size),
  and the model is a folder on disk, in the Hugging Face cache, or on the Hub: offline
  (`HF_HUB_OFFLINE`) a model missing from the cache is a problem; online, a Hub lookup
  that finds no such model is one, and a lookup that cannot be made (no network) is not:
  vLLM downloads it when it starts, and a check that cannot tell must not stop the build.

Models charbuild builds itself (`tiny:`) are targets of the build, not checked here.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import os
import re
from pathlib import Path
from typing import Mapping

from charbuild.spec.model import ModelSpec

ENDPOINT_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TRUE = {"1", "true", "yes", "on"}


def model_problems(models: Mapping[str, ModelSpec], env: Mapping[str, str] = os.environ,
                   timeout_s: float = ENDPOINT_TIMEOUT_S) -> list[str]:
    """Every problem of every role in `models`, in role order; endpoints are asked at once."""
    endpoints = sorted({m.base_url for m in models.values() if m.backend == "openai" and m.base_url})
    answers: dict[str, str | None] = {}
    if endpoints:
        with cf.ThreadPoolExecutor(max_workers=min(8, len(endpoints))) as pool:
            answers = dict(zip(endpoints, pool.map(lambda u: endpoint_silence(u, timeout_s), endpoints)))
    gpu = _gpus() if any(m.backend == "vllm" for m in models.values()) else None
    out = []
    for role, m in models.items():
        where = f"{role} ({m.model}, backend {m.backend})"
        if m.backend == "openai":
            why = answers.get(m.base_url)
            if why:
                out.append(f"{where}: {m.base_url} does not answer ({why}): start the server or fix "
                           f"models.{role}.base_url")
            continue
        if m.backend == "vllm":
            if importlib.util.find_spec("vllm") is None:
                out.append(f"{where}: vllm is not installed: pip install 'charbuild[vllm]' on a machine with a CUDA "
                           f"GPU, or set models.{role}.backend: transformers")
            need = m.tensor_parallel_size or 1
            if gpu is not None and gpu < need:
                out.append(f"{where}: vLLM needs {'a CUDA GPU' if need == 1 else f'{need} CUDA GPUs'} and "
                           f"{'none is' if not gpu else f'{gpu} are'} visible (torch.cuda): run on a GPU machine, "
                           f"or set models.{role}.backend: transformers")
        why = weights_missing(m, env)
        if why:
            out.append(f"{where}: {why}")
    return out


def endpoint_silence(base_url: str, timeout_s: float = ENDPOINT_TIMEOUT_S) -> str | None:
    """None if a server answers GET {base_url}/models (any HTTP status), else why not."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(base_url.rstrip("/") + "/models", headers={"User-Agent": "charbuild-preflight"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # an answer, whatever its status: the server is there
    except urllib.error.URLError as exc:
        return str(getattr(exc, "reason", exc))
    except (OSError, ValueError) as exc:  # a timeout, a reset connection, a malformed URL
        return str(exc) or type(exc).__name__


def weights_missing(m: ModelSpec, env: Mapping[str, str] = os.environ) -> str | None:
    """Why `m`'s weights cannot be loaded where this build runs, or None (including where
    that cannot be known without the network)."""
    name = m.model
    if name.startswith("tiny:") or Path(name).expanduser().exists():
        return None
    if name.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(name):
        return f"no model folder at {name}: fix the path"
    if _in_hf_cache(name, env):
        return None
    if m.backend == "transformers":
        return (f"neither a folder nor in the Hugging Face cache ({_hf_cache(env)}), and the transformers backend "
                f"loads local files only: huggingface-cli download {name}")
    if (env.get("HF_HUB_OFFLINE") or "").lower() in _TRUE:
        return (f"not in the Hugging Face cache ({_hf_cache(env)}) and HF_HUB_OFFLINE is set: "
                f"huggingface-cli download {name} where the network is, or unset HF_HUB_OFFLINE")
    return _hub_lookup(name, env)


def _hub_lookup(repo: str, env: Mapping[str, str]) -> str | None:
    try:
        from huggingface_hub import model_info
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        return None
    try:
        model_info(repo, timeout=ENDPOINT_TIMEOUT_S, token=env.get("HF_TOKEN") or None)
    except GatedRepoError:
        return f"gated on the Hugging Face Hub: accept its terms at https://huggingface.co/{repo} and log in (HF_TOKEN)"
    except RepositoryNotFoundError:
        return "no such model on the Hugging Face Hub (a private one needs HF_TOKEN): fix the model id"
    except Exception:  # no network, a proxy, a timeout: cannot check, and vLLM will say so when it starts
        return None
    return None


def _hf_cache(env: Mapping[str, str]) -> Path:
    """The Hub cache folder as huggingface_hub resolves it, read from `env` (its own
    constants are fixed when it is first imported)."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _in_hf_cache(repo: str, env: Mapping[str, str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo, "config.json", cache_dir=str(_hf_cache(env))), str)


def _gpus() -> int:
    """CUDA devices visible. Counting leaves CUDA uninitialised in this process
    (torch.cuda.is_initialized() stays False), so a vLLM engine started later may still fork."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
