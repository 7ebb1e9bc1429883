"""The call-level cache: every generation call (one sample of one prompt) is paid once.

Layout under the cache root:

    calls/ab/<key>.json      one answered call: {"key", "result", "usage_usd", "digest", ...}
    calls/claims.lock        claims on calls being asked right now: one byte-range lock per call

An entry is written to a temp file and renamed (linked) into place, so it is complete or
absent; the first writer wins and a valid entry is never overwritten. Reads verify the
digest inside the entry: a corrupt entry is counted, logged and treated as missing (the
call is asked again and the entry replaced). Entries are not fsynced: a process killed
with -9 loses nothing the kernel already has, and an entry torn by a power cut fails
verification and is simply asked again.

`CachedBackend` wraps any backend. Before asking, it claims each missed call
(non-blocking; an open-file-description byte-range lock on calls/claims.lock at an offset
taken from the key, so a claim costs one syscall and no file; the OS drops it when the
process dies; where OFD locks are missing, an flock on calls/locks/<key>.lock): a call
claimed by another run is not asked here but waited for and read from the cache, so two
runs sharing one cache root ask each call once, and a call answered by one run is never
re-asked by the other once it is stored. Answers are stored one by one as they arrive
(backends that take `on_result`, like the openai one: by a writer thread, so the
backend's event loop is never blocked on disk) or when the batch returns.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import fcntl
import inspect
import json
import logging
import os
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import xxhash

from .backends.base import Backend, GenRequest, GenResult, Progress
from .keys import canonical_json, digest

log = logging.getLogger(__name__)

ENTRY_SCHEMA = 1
CLAIM_WINDOW = 512  # calls claimed at once per generate()
POLL_S = (0.01, 0.2)  # wait for calls claimed by another run: first and longest poll interval


# -- keys ----------------------------------------------------------------------------------

def sampling_params(req: GenRequest) -> dict:
    return {"max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "stop": list(req.stop), "seed": req.seed, "repetition_penalty": req.repetition_penalty,
            "frequency_penalty": req.frequency_penalty}


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


# -- the store -------------------------------------------------------------------------------

def _result_dict(r: GenResult) -> dict:
    meta = {k: v for k, v in (r.meta or {}).items() if k != "cached"}
    return {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens, "meta": meta}


def _entry_digest(key: str, result: dict, usage_usd: float | None) -> str:
    return digest("CallEntry", key, result, usage_usd)


class CallCache:
    """One small verified JSON file per answered call, under <root>/calls/."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "calls"
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.stored = 0
        self._made: set[str] = set()
        self._lock = threading.Lock()
        self._fd = -1  # calls/claims.lock, opened on the first claim
        self._claims_id = ""

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    @property
    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt, "stored": self.stored}

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    # reading
    def _read(self, key: str, report: bool = True) -> GenResult | None:
        """The verified entry, or None when missing or corrupt (counted and logged when
        `report`); no hit/miss counting."""
        p = self.path(key)
        try:
            with open(p, "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            e = json.loads(raw)
            res = e["result"]
            if e.get("schema") != ENTRY_SCHEMA or e.get("key") != key or \
                    e.get("digest") != _entry_digest(key, res, e.get("usage_usd")):
                raise ValueError("digest mismatch")
            out = GenResult(text=res["text"], finish_reason=res["finish_reason"],
                            prompt_tokens=int(res["prompt_tokens"]), completion_tokens=int(res["completion_tokens"]),
                            meta=dict(res.get("meta") or {}))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            if not report:
                return None
            self._count("corrupt")
            log.warning("call cache: entry %s is corrupt (%s); asking the call again", p, err)
            return None
        out.meta["cached"] = True
        if e.get("usage_usd") is not None:
            out.meta["usd_when_asked"] = e["usage_usd"]
        return out

    def get(self, key: str) -> GenResult | None:
        r = self._read(key)
        self._count("hits" if r is not None else "misses")
        return r

    def get_many(self, keys: Iterable[str]) -> list[GenResult | None]:
        return [self.get(k) for k in keys]

    def has(self, key: str) -> bool:
        """Existence only (no verification): what a plan needs to count cached calls."""
        return os.path.exists(self.path(key))

    def __contains__(self, key: str) -> bool:
        return self._read(key) is not None

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def keys(self) -> Iterable[str]:
        if not self.dir.is_dir():
            return
        for sub in self.dir.iterdir():
            if len(sub.name) == 2 and sub.is_dir():
                for f in sub.iterdir():
                    if f.name.endswith(".json") and not f.name.startswith("."):
                        yield f.name[:-5]

    # writing
    def put(self, key: str, result: GenResult, usage_usd: float | None = None) -> bool:
        """Store an answer; the first writer wins. Returns True when this call wrote it."""
        res = _result_dict(result)
        entry = {"schema": ENTRY_SCHEMA, "key": key, "result": res, "usage_usd": usage_usd,
                 "digest": _entry_digest(key, res, usage_usd), "created": time.time()}
        data = json.dumps(entry, ensure_ascii=False, allow_nan=False, default=str).encode("utf-8")
        p = self.path(key)
        sub = key[:2]
        if sub not in self._made:
            p.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(sub)
        tmp = p.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, p)  # atomic, and fails when an entry is already there
            except FileExistsError:
                if self._read(key, report=False) is not None:
                    return False  # a valid entry: first writer wins
                os.replace(tmp, p)  # the old one is corrupt: replace it
            self._count("stored")
            return True
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    # claims
    def claim(self, key: str) -> "_Claim | None":
        """A non-blocking exclusive claim on asking `key` (None when another holds it, in
        this process or another)."""
        if _OFD is not None:
            return self._claim_ofd(key)
        return self._claim_file(key)

    def _claims_fd(self) -> int:
        with self._lock:
            if self._fd < 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.dir / "claims.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
                self._claims_id = str((self.dir / "claims.lock").resolve())
            return self._fd

    def _claim_ofd(self, key: str) -> "_Claim | None":
        fd = self._claims_fd()
        off = int(key[:15], 16)
        held = (self._claims_id, off)
        with _HELD_LOCK:  # OFD locks do not conflict within one open file: guard this process too
            if held in _HELD:
                return None
            try:
                fcntl.fcntl(fd, _OFD[0], struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, off, 1, 0))
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    return None
                raise
            _HELD.add(held)
        return _Claim(self, key, fd=fd, held=held)

    def _claim_file(self, key: str) -> "_Claim | None":
        d = self.dir / "locks"
        if "locks" not in self._made:
            d.mkdir(parents=True, exist_ok=True)
            self._made.add("locks")
        lp = d / f"{key}.lock"
        while True:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return None
                raise
            try:  # the holder before us may have removed the file after storing: lock the live one
                if os.fstat(fd).st_ino == os.stat(lp).st_ino:
                    return _Claim(self, key, fd=fd, path=lp)
            except FileNotFoundError:
                pass
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # drops any claim still held through it

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


# Open-file-description locks (Linux >= 3.15): per open file, not per process, so closing
# some other descriptor of the file never drops them.
_OFD = (fcntl.F_OFD_SETLK,) if hasattr(fcntl, "F_OFD_SETLK") else None
_FLOCK = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
_HELD: set[tuple[str, int]] = set()
_HELD_LOCK = threading.Lock()


class _Claim:
    __slots__ = ("cache", "key", "fd", "path", "held")

    def __init__(self, cache: CallCache, key: str, fd: int, path: Path | None = None, held=None):
        self.cache, self.key, self.fd, self.path, self.held = cache, key, fd, path, held

    def release(self, done: bool) -> None:
        """Drop the claim; `done` (the answer is stored) also removes a per-call lock file."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        if self.held is not None:
            with _HELD_LOCK:
                try:
                    fcntl.fcntl(fd, _OFD[0], struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, self.held[1], 1, 0))
                except OSError:
                    pass  # the descriptor was closed: the lock went with it
                _HELD.discard(self.held)
            return
        if done:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(fd)


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
                 usd_of: Callable[[GenResult], float | None] | None = None):
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
        for k in where:
            hit = self.cache.get(k)
            if hit is not None:
                fill(k, hit)
            else:
                pending.append(k)

        poll = POLL_S[0]
        while pending:
            claims: dict[str, _Claim] = {}
            busy: list[str] = []
            try:
                for k in pending:
                    if len(claims) >= CLAIM_WINDOW:
                        busy.append(k)
                        continue
                    c = self.cache.claim(k)
                    if c is None:
                        busy.append(k)
                        continue
                    hit = self.cache._read(k, report=False)  # stored by another run since we looked
                    if hit is not None:
                        c.release(done=False)
                        self.waited += 1
                        fill(k, hit)
                    else:
                        claims[k] = c
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
        keys = list(claims)
        batch = [reqs[where[k][0]] for k in keys]
        lock = threading.Lock()
        stored: set[int] = set()

        def store(j: int, res: GenResult) -> None:  # as each answer arrives (backend's loop thread)
            k = keys[j]
            usd = self.usd_of(res) if self.usd_of is not None else res.meta.get("usd")
            self.cache.put(k, res, usage_usd=usd)
            with lock:
                c = claims.pop(k, None)
                stored.add(j)
            if c is not None:
                c.release(done=True)
            res.meta["cached"] = False
            fill(k, res)

        self.asked += len(batch)
        if self._streams:
            writer = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="callcache-writer")
            errors: list[BaseException] = []

            def store_logged(j: int, res: GenResult) -> None:
                try:
                    store(j, res)
                except BaseException as e:  # surfaced after the batch
                    errors.append(e)

            try:
                out = self.inner.generate(batch, on_result=lambda j, res: writer.submit(store_logged, j, res))
            finally:
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

    def close(self) -> None:
        self.inner.close()


# -- wiring for the data stages ----------------------------------------------------------------

def call_identity(ctx, role: str, m) -> tuple[str, str, str | None, str | None]:
    """(backend kind, model id, weights/adapter digest, chat template digest) of the model a
    stage uses for `role`: the model part of every call key (the spec's `revision` for
    remote models)."""
    kind = getattr(m, "backend", "unknown")
    model_id = getattr(m, "model", str(role))
    mdig = tdig = None
    if kind != "openai":
        inputs = getattr(ctx, "inputs", {}) or {}
        slot = f"model:{role}"
        path = str(ctx.input(slot)) if slot in inputs else model_id
        mdig = model_digest_for_path(path)
        tdig = template_digest(path)
        if "adapter" in inputs and role == "student":
            adir = Path(ctx.input("adapter")) / "adapter"
            mdig = digest("ModelAdapter", mdig, model_digest_for_path(adir))
            tdig = template_digest(adir) or tdig
    rev = getattr(m, "revision", None)
    if rev:
        mdig = digest("ModelRevision", mdig, rev) if mdig else str(rev)
    return kind, model_id, mdig, tdig


def cached_backend_for(ctx, role: str, m, backend: Backend, cache: CallCache) -> CachedBackend:
    """Wrap the backend a stage got for `role` with the call cache, keyed on the model's identity."""
    return CachedBackend(backend, cache, *call_identity(ctx, role, m))
