"""The call cache around a backend: every call looked up first, every answer stored.

Call keys (model identity, rendered messages, sampling, sample index) are made here; the
store (`charbuild.store.calls`) knows only keys and JSON entries.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import xxhash

from charbuild.backends.base import Backend, GenRequest, GenResult, Progress
from charbuild.store.calls import CLAIM_WINDOW, POLL_S, CallCache, _Claim

BATCH_CLAIM_WINDOW = 50_000  # a batch holds a stage's new calls, not CLAIM_WINDOW at a time
from charbuild.store.hashing import canonical_json, digest


def to_entry(r: GenResult) -> dict:
    return {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens, "meta": dict(r.meta or {})}


def from_entry(e: dict | None) -> GenResult | None:
    if e is None:
        return None
    return GenResult(text=e["text"], finish_reason=e["finish_reason"], prompt_tokens=e["prompt_tokens"],
                     completion_tokens=e["completion_tokens"], meta=e["meta"])


# -- keys ----------------------------------------------------------------------------------

def sampling_params(req: GenRequest) -> dict:
    out = {"max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
           "stop": list(req.stop), "seed": req.seed, "repetition_penalty": req.repetition_penalty,
           "frequency_penalty": req.frequency_penalty}
    if req.extra_body:  # only when set, so that calls without it keep the keys they had
        out["extra_body"] = req.extra_body
    if req.thinking is not None:  # likewise
        out["thinking"] = req.thinking
    return out


def call_key(backend_kind: str, model_id: str, model_digest: str | None, template_digest: str | None,
             req: GenRequest, sample_index: int) -> str:
    """Key of one call: what is asked, of which model, with which sampling, which sample."""
    return digest("Call", backend_kind, model_id, model_digest, template_digest, req.messages,
                  sampling_params(req), int(sample_index))


def occurrence_indices(requests: Sequence[GenRequest]) -> list[int]:
    """Default sample indices: 0 for the first occurrence of a request, 1 for the second...
    Identical requests stay distinct samples, and adding or reordering other requests
    does not change any request's index (positions would)."""
    seen: dict[str, int] = {}
    out = []
    for r in requests:
        k = canonical_json([r.messages, sampling_params(r)])
        out.append(seen.get(k, 0))
        seen[k] = out[-1] + 1
    return out


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".npz", ".h5", ".msgpack")
_CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")
_EDGE = 1 << 20
_digest_memo: dict[str, tuple[tuple, str]] = {}
_memo_lock = threading.Lock()


def _edges_digest(path: Path, size: int) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read(_EDGE))
    return h.hexdigest()


def model_digest_for_path(path) -> str | None:
    """Digest of a local model (or adapter) directory; None for anything else (remote ids).

    Covers config.json / generation_config.json / adapter_config.json in full and each
    weights file by name, size and an xxhash of its first and last MiB: cheap (2 MiB
    read per file) yet changes when weights change. Memoized on the files' mtimes.
    """
    if path is None:
        return None
    p = Path(path)
    if not p.is_dir():
        return None
    files = []
    for f in sorted(p.rglob("*")):
        if any(part.startswith(".") for part in f.relative_to(p).parts) or not f.is_file():
            continue
        if f.name in _CONFIG_FILES or f.name.endswith(_WEIGHT_SUFFIXES):
            st = f.stat()
            files.append((f, st.st_size, st.st_mtime_ns))
    sig = tuple((str(f), size, mt) for f, size, mt in files)
    real = str(p.resolve())
    with _memo_lock:
        hit = _digest_memo.get(real)
    if hit is not None and hit[0] == sig:
        return hit[1]
    parts = []
    for f, size, _ in files:
        rel = f.relative_to(p).as_posix()
        if f.name in _CONFIG_FILES:
            parts.append([rel, size, xxhash.xxh3_128_hexdigest(f.read_bytes())])
        else:
            parts.append([rel, size, _edges_digest(f, size)])
    d = digest("ModelDir", parts)
    with _memo_lock:
        _digest_memo[real] = (sig, d)
    return d


def template_digest(tokenizer_dir) -> str | None:
    """Hash of the chat template (tokenizer_config.json's chat_template, chat_template.jinja
    or chat_template.json) when the directory has one; None otherwise."""
    if tokenizer_dir is None:
        return None
    d = Path(tokenizer_dir)
    if not d.is_dir():
        return None
    found: dict[str, Any] = {}
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        try:
            tpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, UnicodeDecodeError, AttributeError):
            tpl = cfg.read_bytes().hex()  # unreadable: key on its bytes rather than ignore it
        if tpl:
            found["tokenizer_config.json"] = tpl
    for name in ("chat_template.jinja", "chat_template.json"):
        f = d / name
        if f.is_file():
            found[name] = f.read_text(encoding="utf-8", errors="replace")
    return digest("ChatTemplate", found) if found else None



# -- the wrapper ------------------------------------------------------------------------------

def _takes_on_result(fn) -> bool:
    try:
        return "on_result" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class CachedBackend:
    """Any `Backend`, with every call looked up first and every answer stored."""

    def __init__(self, inner: Backend, cache: CallCache, backend_kind: str, model_id: str,
                 model_digest: str | None = None, template_digest: str | None = None,
                 usd_of: Callable[[GenResult], float | None] | None = None, batch: bool = False):
        """`batch`: ask the calls the cache misses through the inner backend's batch API
        (`generate_batch`, charbuild.backends.batch) when it has one; failed lines go online."""
        self.inner = inner
        self.cache = cache
        self.backend_kind = backend_kind
        self.model_id = model_id
        self.model_digest = model_digest
        self.template_digest = template_digest
        self.usd_of = usd_of
        self.asked = 0  # calls sent to the inner backend
        self.waited = 0  # calls answered by another run while we waited for its claim
        self._streams = _takes_on_result(inner.generate)
        self._batch = getattr(inner, "generate_batch", None) if batch else None

    def key(self, req: GenRequest, sample_index: int) -> str:
        return call_key(self.backend_kind, self.model_id, self.model_digest, self.template_digest, req, sample_index)

    def generate(self, requests: Sequence[GenRequest], progress: Progress | None = None,
                 sample_indices: Sequence[int] | None = None) -> list[GenResult]:
        reqs = list(requests)
        if sample_indices is None:
            sample_indices = occurrence_indices(reqs)
        elif len(sample_indices) != len(reqs):
            raise ValueError(f"{len(sample_indices)} sample indices for {len(reqs)} requests")
        results: list[GenResult | None] = [None] * len(reqs)
        where: dict[str, list[int]] = {}  # key -> positions (identical calls are asked once)
        for i, (r, s) in enumerate(zip(reqs, sample_indices)):
            where.setdefault(self.key(r, s), []).append(i)

        def fill(k: str, res: GenResult) -> None:
            for i in where[k]:
                results[i] = res
            if progress is not None:
                progress(len(where[k]))

        pending = []
        for k, entry in zip(where, self.cache.get_many(list(where))):
            hit = from_entry(entry)
            if hit is not None:
                fill(k, hit)
            else:
                pending.append(k)

        poll = POLL_S[0]
        while pending:
            claims: dict[str, _Claim] = {}
            busy: list[str] = []
            try:
                window = BATCH_CLAIM_WINDOW if self._batch is not None else CLAIM_WINDOW
                claims, stored, busy = self.cache.claim_new(pending[:window])
                busy += pending[window:]
                for k, entry in stored.items():  # answered by another run since we looked
                    self.waited += 1
                    fill(k, from_entry(entry))
                if claims:
                    self._ask(reqs, where, claims, fill)
                    poll = POLL_S[0]
            finally:
                for c in claims.values():
                    c.release(done=False)
            if busy and not claims:
                time.sleep(poll)  # every call left is being asked by another run: wait for its answers
                poll = min(POLL_S[1], poll * 2)
            pending = busy
        return results  # type: ignore[return-value]

    def _ask(self, reqs, where, claims: dict, fill) -> None:
        if self._batch is not None:
            claims = self._ask_batch(reqs, where, claims, fill)
            if not claims:
                return
        keys = list(claims)
        batch = [reqs[where[k][0]] for k in keys]
        lock = threading.Lock()
        stored: set[int] = set()

        def store(j: int, res: GenResult) -> None:  # as each answer arrives (backend's loop thread)
            k = keys[j]
            usd = self.usd_of(res) if self.usd_of is not None else res.meta.get("usd")
            self.cache.put(k, to_entry(res), usage_usd=usd)
            with lock:
                c = claims.pop(k, None)
                stored.add(j)
            if c is not None:
                c.release(done=True)
            res.meta["cached"] = False
            fill(k, res)

        self.asked += len(batch)
        if self._streams:
            caller = threading.get_ident()
            writer: cf.ThreadPoolExecutor | None = None
            errors: list[BaseException] = []

            def store_logged(j: int, res: GenResult) -> None:
                try:
                    store(j, res)
                except BaseException as e:  # surfaced after the batch
                    errors.append(e)

            def on_result(j: int, res: GenResult) -> None:
                nonlocal writer
                if threading.get_ident() == caller:  # on our own thread (a local backend): nothing to unblock
                    store_logged(j, res)
                    return
                if writer is None:  # a backend's event-loop thread: never block it on disk
                    writer = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="callcache-writer")
                writer.submit(store_logged, j, res)

            try:
                out = self.inner.generate(batch, on_result=on_result)
            finally:
                if writer is not None:
                    writer.shutdown(wait=True)  # every answer that arrived is stored, even when the batch failed
            if errors:
                raise errors[0]
        else:
            out = self.inner.generate(batch)
        if len(out) != len(batch):
            raise RuntimeError(f"backend returned {len(out)} results for {len(batch)} requests")
        for j, res in enumerate(out):
            if j not in stored:
                store(j, res)

    def _ask_batch(self, reqs, where, claims: dict, fill) -> dict:
        """The claimed calls through the batch API, each answer stored as it is downloaded;
        the claims of the calls it did not answer come back, to be asked online."""
        from charbuild.store.calls import BatchJournals

        scope = digest("BatchScope", self.backend_kind, self.model_id, self.model_digest, self.template_digest)
        items = {k: reqs[where[k][0]] for k in claims}

        def store(k: str, res: GenResult) -> None:
            # A resumed batch may answer calls this request list does not hold: stored all the same.
            usd = self.usd_of(res) if self.usd_of is not None else res.meta.get("usd")
            self.cache.put(k, to_entry(res), usage_usd=usd)
            res.meta["cached"] = False
            c = claims.pop(k, None)
            if c is not None:
                c.release(done=True)
            if k in where:
                fill(k, res)

        self.asked += len(items)
        unanswered = set(self._batch(items, BatchJournals(self.cache.root, scope, self.cache.remote), store))
        self.asked -= len(unanswered)
        return {k: c for k, c in claims.items() if k in unanswered}

    def close(self) -> None:
        self.inner.close()


# -- wiring for the data stages ----------------------------------------------------------------

def call_identity(ctx, role: str, m) -> tuple[str, str, str | None, str | None]:
    """(backend kind, model id, weights/adapter digest, chat template digest) of the model a
    stage uses for `role`: the model part of every call key.

    It covers what the pool (`BackendPool.get`) loads for the role, read from the same
    inputs: the base weights (the role's `model:{role}` input, e.g. a tiny model, else the
    spec's path or id), for the student every adapter folded in first (the `merge` slot,
    in order) and the adapter applied on top (the `adapter` slot); and the spec's
    `revision`. Remote (openai) models are keyed by model id and endpoint: one model name
    on two providers can be two models (quantised, another revision, another template). A
    `revision` says which weights the endpoint serves, and then replaces the endpoint: two
    endpoints given the same revision share their calls."""
    kind = getattr(m, "backend", "unknown")
    model_id = getattr(m, "model", str(role))
    mdig = tdig = None
    if kind != "openai":
        inputs = getattr(ctx, "inputs", {}) or {}
        slot = f"model:{role}"
        path = str(ctx.input(slot)) if slot in inputs else model_id
        mdig = model_digest_for_path(path)
        tdig = template_digest(path)
        if role == "student":  # as the pool: adapters are trained on (and applied to) the student only
            from charbuild.backends.weights import student_weights

            loaded, adir, merged = student_weights(path, ctx.input("adapter") if "adapter" in inputs else None,
                                                   inputs.get("merge", []))
            if loaded != path:  # a target's saved merged weights replace the base
                mdig, tdig = model_digest_for_path(loaded), template_digest(loaded)
            if merged:  # folded into the base first, in order (the SFT variant: the DPO adapter)
                mdig = digest("ModelMerged", mdig, [model_digest_for_path(a) for a in merged])
            if adir is not None:
                mdig = digest("ModelAdapter", mdig, model_digest_for_path(adir))
                tdig = template_digest(adir) or tdig
    rev = getattr(m, "revision", None)
    if kind == "openai" and not rev:
        mdig = digest("Endpoint", endpoint_id(getattr(m, "base_url", None) or ""))
    if rev:
        mdig = digest("ModelRevision", mdig, rev) if mdig else str(rev)
    return kind, model_id, mdig, tdig


def endpoint_id(base_url: str) -> str:
    """An endpoint as a call key sees it: scheme, host and path, without a trailing slash or
    a default port, so that spellings of one URL share their calls."""
    from urllib.parse import urlsplit

    u = urlsplit(base_url.strip())
    try:
        port = u.port
    except ValueError:  # not a port number: the spelling as it is
        return base_url.strip().rstrip("/")
    default = {"http": 80, "https": 443}.get(u.scheme.lower())
    host = (u.hostname or "") + (f":{port}" if port and port != default else "")
    return f"{u.scheme.lower()}://{host}{u.path.rstrip('/')}"


def cached_backend_for(ctx, role: str, m, backend: Backend, cache: CallCache, batch: bool = False) -> CachedBackend:
    """Wrap the backend a stage got for `role` with the call cache, keyed on the model's identity
    (never on `batch`: an answer is the same call whichever way it was asked)."""
    return CachedBackend(backend, cache, *call_identity(ctx, role, m), batch=batch)
