"""The call-level cache: every generation call (one sample of one prompt) is paid once.

Layout under the cache root:

    calls/ab/<key>.json      one answered call: {"key", "result", "usage_usd", "digest", ...}
    calls/claims.lock        claims on calls being asked right now: one byte-range lock per call
    calls/batches/<scope>/<id>.json   a batch sent to a provider's batch API and not yet collected
                             (its batch id and which call key each line answers)

An entry is written to a temp file and renamed (linked) into place, so it is complete or
absent; the first writer wins and a valid entry is never overwritten. Reads verify the
digest inside the entry: a corrupt entry is counted, logged and treated as missing (the
call is asked again and the entry replaced). Entries are not fsynced: a process killed
with -9 loses nothing the kernel already has, and an entry torn by a power cut fails
verification and is simply asked again.

`charbuild.backends.cached.CachedBackend` wraps any backend with this store. Before asking, it claims each missed call
(non-blocking; an open-file-description byte-range lock on calls/claims.lock at an offset
taken from the key, so a claim costs one syscall and no file; the OS drops it when the
process dies; where OFD locks are missing, an flock on calls/locks/<key>.lock): a call
claimed by another run is not asked here but waited for and read from the cache, so two
runs sharing one cache root ask each call once, and a call answered by one run is never
re-asked by the other once it is stored. Answers are stored one by one as they arrive
(backends that take `on_result`, like the openai one: by a writer thread, so the
backend's event loop is never blocked on disk) or when the batch returns.

On a store (`CallCache("s3://bucket/prefix")`, or `remote=` a remote.RemoteStore) the
local layout is the worker's working copy and the store is the truth: an entry missing
here is read from `calls/ab/<key>.json` there (verified, then kept here), a new one is
created there only if absent (the first writer wins, as here), and a claim is also a
lease there (`calls/claims/<key>/`, see remote.py: taken by conditional create, renewed
while held, lapsing CHARBUILD_LEASE_TTL seconds after its holder died), so drivers on
different machines ask each call once. Batch journals are written there too
(`calls/batches/<scope>/<id>.json`): a worker that dies while its batch runs leaves the
batch id where the worker that takes its calls over finds it, and that worker collects the
batch instead of paying for it again.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

from charbuild.store.hashing import digest

log = logging.getLogger(__name__)

ENTRY_SCHEMA = 1
CLAIM_WINDOW = 512  # calls claimed at once per generate()
REMOTE_REQUESTS = 16  # a store's look-ups and claims in flight at once
LIST_FROM = 4  # missing keys per prefix from which listing the prefix beats a GET per key
POLL_S = (0.01, 0.2)  # wait for calls claimed by another run: first and longest poll interval


# -- the store -------------------------------------------------------------------------------

def _entry_digest(key: str, result: dict, usage_usd: float | None) -> str:
    return digest("CallEntry", key, result, usage_usd)


class CallCache:
    """One small verified JSON file per answered call, under <root>/calls/."""

    def __init__(self, root: str | Path, remote=None):
        """`root`: the cache directory, or a store's URL (then the working copy is
        remote.local_cache_for(url)); `remote`: the store behind a directory `root`."""
        if isinstance(root, str) and "://" in root and not root.startswith("file://"):
            from charbuild.store.remote import RemoteStore, local_cache_for

            remote = remote or RemoteStore(root)
            root = local_cache_for(root)
        self.remote = remote
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
        self._pool: cf.ThreadPoolExecutor | None = None  # a store's requests, sent side by side

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    @property
    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt, "stored": self.stored}

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    # reading
    def _read(self, key: str, report: bool = True, local_only: bool = False) -> dict | None:
        """The verified entry, or None when missing or corrupt (counted and logged when
        `report`); no hit/miss counting."""
        p = self.path(key)
        try:
            with open(p, "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):
            raw = None
        if self.remote is None or local_only:
            return None if raw is None else self._parse(key, raw, p, report)
        if raw is not None:
            out = self._parse(key, raw, p, report=False)
            if out is not None:
                return out
        return self._read_remote(key, report)  # a copy here that is corrupt is replaced from there

    def _read_remote(self, key: str, report: bool) -> dict | None:
        raw = self.remote.read(self._rel(key))
        if raw is None:
            return None
        out = self._parse(key, raw, f"{self.remote.url}/{self._rel(key)}", report)
        if out is not None:
            self._keep(key, raw)
        return out

    def _rel(self, key: str) -> str:
        return f"calls/{key[:2]}/{key}.json"

    def _keep(self, key: str, data: bytes) -> bool:
        """Write an entry here unless one is there (True when this wrote it)."""
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
                if self._read(key, report=False, local_only=True) is not None:
                    return False  # a valid entry: first writer wins
                os.replace(tmp, p)  # the old one is corrupt: replace it
            return True
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _parse(self, key: str, raw: bytes, p, report: bool) -> dict | None:
        try:
            e = json.loads(raw)
            res = e["result"]
            if e.get("schema") != ENTRY_SCHEMA or e.get("key") != key or \
                    e.get("digest") != _entry_digest(key, res, e.get("usage_usd")):
                raise ValueError("digest mismatch")
            out = {"text": str(res["text"]), "finish_reason": res["finish_reason"],
                   "prompt_tokens": int(res["prompt_tokens"]), "completion_tokens": int(res["completion_tokens"]),
                   "meta": dict(res.get("meta") or {})}
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            if not report:
                return None
            self._count("corrupt")
            log.warning("call cache: entry %s is corrupt (%s); asking the call again", p, err)
            return None
        out["meta"]["cached"] = True
        if e.get("usage_usd") is not None:
            out["meta"]["usd_when_asked"] = e["usage_usd"]
        return out

    def get(self, key: str) -> dict | None:
        r = self._read(key)
        self._count("hits" if r is not None else "misses")
        return r

    def get_many(self, keys: Iterable[str]) -> list[dict | None]:
        return self._map(self.get, list(keys))

    def _map(self, fn: Callable, keys: list[str]) -> list:
        """fn over keys in order; on a store, REMOTE_REQUESTS at a time: each is a round trip
        (tens of ms), and a shard's hundreds of calls one after another would be seconds."""
        if self.remote is None or len(keys) < 2:
            return [fn(k) for k in keys]
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(REMOTE_REQUESTS, thread_name_prefix="callcache-store")
        return list(self._pool.map(fn, keys))

    def has(self, key: str) -> bool:
        """Existence only (no verification): what a plan needs to count cached calls."""
        if os.path.exists(self.path(key)):
            return True
        return self.remote is not None and self._read_remote(key, report=False) is not None

    def has_many(self, keys: Iterable[str]) -> list[bool]:
        """`has` for many keys (a plan counting a stage's cached calls). On a store, those
        missing here are looked for side by side, by name: one GET each when they are few,
        else one listing per key prefix they fall in (a paper-scale plan asks about tens of
        thousands of calls: a listing answers a thousand names)."""
        keys = list(keys)
        present = [os.path.exists(self.path(k)) for k in keys]
        missing = [k for k, p in zip(keys, present) if not p]
        if self.remote is None or not missing:
            return present
        prefixes = sorted({k[:2] for k in missing})
        if len(missing) < LIST_FROM * len(prefixes):
            found = {k for k, there in zip(missing, self._map(lambda k: self.remote.read(self._rel(k)) is not None,
                                                              missing)) if there}
        else:
            found = set()
            for names in self._map(lambda pre: self.remote.names(f"calls/{pre}"), prefixes):
                found.update(n.removesuffix(".json") for n in names)
        return [p or k in found for k, p in zip(keys, present)]

    def __contains__(self, key: str) -> bool:
        return self._read(key) is not None

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def keys(self) -> Iterable[str]:
        if self.remote is not None:  # the store's: every worker's answers
            local = set(self._local_keys())
            for rel in self.remote.find("calls"):
                parts = rel.split("/")
                if len(parts) == 3 and len(parts[1]) == 2 and parts[2].endswith(".json"):
                    local.discard(parts[2][:-5])
                    yield parts[2][:-5]
            yield from local  # stored here, their upload failed: still answered
            return
        yield from self._local_keys()

    def _local_keys(self) -> Iterable[str]:
        if not self.dir.is_dir():
            return
        for sub in self.dir.iterdir():
            if len(sub.name) == 2 and sub.is_dir():
                for f in sub.iterdir():
                    if f.name.endswith(".json") and not f.name.startswith("."):
                        yield f.name[:-5]

    # writing
    def put(self, key: str, result: dict, usage_usd: float | None = None) -> bool:
        """Store an answer (text, finish_reason, token counts, meta); the first writer wins.
        Returns True when this call wrote it."""
        res = {k: result[k] for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens")}
        res["meta"] = {k: v for k, v in (result.get("meta") or {}).items() if k != "cached"}
        entry = {"schema": ENTRY_SCHEMA, "key": key, "result": res, "usage_usd": usage_usd,
                 "digest": _entry_digest(key, res, usage_usd), "created": time.time()}
        data = json.dumps(entry, ensure_ascii=False, allow_nan=False, default=str).encode("utf-8")
        wrote = self._keep(key, data)
        if self.remote is not None:
            wrote = self._put_remote(key, data)
        if wrote:
            self._count("stored")
        return wrote

    def _put_remote(self, key: str, data: bytes) -> bool:
        rel = self._rel(key)
        if self.remote.create(rel, data):
            return True
        raw = self.remote.read(rel)
        if raw is not None and self._parse(key, raw, rel, report=False) is not None:
            if raw != data:  # theirs is the truth: every worker reads the same answer
                with contextlib.suppress(OSError):
                    os.replace(self._tmp_with(key, raw), self.path(key))
            return False
        self.remote.write(rel, data)  # a corrupt entry there: replace it
        return True

    def _tmp_with(self, key: str, data: bytes) -> Path:
        tmp = self.path(key).with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp

    # claims
    def claim(self, key: str) -> "_Claim | None":
        """A non-blocking exclusive claim on asking `key` (None when another holds it, in
        this process or another; with a store behind, on another machine too)."""
        c = self._claim_ofd(key) if _OFD is not None else self._claim_file(key)
        if c is None or self.remote is None:
            return c
        try:
            lease = self.remote.try_lease(f"calls/claims/{key}", "call")
        except BaseException:
            c.release(done=False)
            raise
        if lease is None:
            c.release(done=False)
            return None
        c.lease = lease
        return c

    def claim_new(self, keys: list[str]) -> tuple[dict[str, "_Claim"], dict[str, dict], list[str]]:
        """Claim each of `keys` (calls missed a moment ago): (claims, entries stored by another
        run since, keys another run is asking now). Side by side on a store."""
        def one(k: str):
            c = self.claim(k)
            if c is None:
                return None, None
            hit = self._read(k, report=False)  # stored by another run since we looked
            if hit is not None:
                c.release(done=False)
                return None, hit
            return c, None

        claims, stored, busy = {}, {}, []
        try:
            for k, (c, hit) in zip(keys, self._map(one, keys)):
                if c is not None:
                    claims[k] = c
                elif hit is not None:
                    stored[k] = hit
                else:
                    busy.append(k)
        except BaseException:
            for c in claims.values():
                c.release(done=False)
            raise
        return claims, stored, busy

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
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)
        if fd >= 0:
            os.close(fd)  # drops any claim still held through it

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


# -- batches in flight ---------------------------------------------------------------------

class BatchJournals:
    """Batches sent to a provider's batch API and not yet collected, one JSON file each under
    calls/batches/<scope>/ (scope: the model and endpoint they were sent to). A journal is
    written before the batch is polled, so a killed run's successor finds the batch id and
    collects that batch instead of paying for the calls again; it is removed once every
    answer it brought is stored."""

    def __init__(self, root: str | Path, scope: str, remote=None):
        self.dir = Path(root) / "calls" / "batches" / scope
        self.remote = remote  # remote.RemoteStore: journals are kept there too, for other workers
        self.rel = f"calls/batches/{scope}"

    def open(self) -> list[tuple[str, dict]]:
        """(journal id, journal) of every batch not yet collected, oldest first (this
        worker's, then those in the store that this worker does not have)."""
        out = []
        try:
            files = sorted(self.dir.glob("*.json"), key=lambda f: f.stat().st_mtime)
        except OSError:
            files = []
        for f in files:
            try:
                self._add(out, f.stem, json.loads(f.read_bytes()), f)
            except (OSError, ValueError, UnicodeDecodeError):
                log.warning("call cache: batch journal %s is unreadable; its batch is not collected", f)
        if self.remote is not None:
            mine = {jid for jid, _ in out}
            for name in sorted(self.remote.names(self.rel)):
                jid = name.removesuffix(".json")
                if name.endswith(".json") and jid not in mine:
                    self._add(out, jid, self.remote.read_json(f"{self.rel}/{name}"), f"{self.remote.url}/{self.rel}/{name}")
        return out

    @staticmethod
    def _add(out: list, jid: str, j, where) -> None:
        if isinstance(j, dict) and isinstance(j.get("lines"), dict):
            out.append((jid, j))
        elif j is not None:  # None: collected by another worker since it was listed
            log.warning("call cache: batch journal %s is unreadable; its batch is not collected", where)

    def save(self, jid: str, journal: dict) -> None:
        from charbuild.store.atomic import write_json_atomic

        write_json_atomic(self.dir / f"{jid}.json", journal)
        if self.remote is not None:  # after the local copy: the store's is what another worker acts on
            self.remote.write(f"{self.rel}/{jid}.json", json.dumps(journal, sort_keys=True).encode())

    def done(self, jid: str) -> None:
        if self.remote is not None:
            self.remote.delete([f"{self.rel}/{jid}.json"])
        try:
            os.unlink(self.dir / f"{jid}.json")
        except FileNotFoundError:
            pass


# Open-file-description locks (Linux >= 3.15): per open file, not per process, so closing
# some other descriptor of the file never drops them.
_OFD = (fcntl.F_OFD_SETLK,) if hasattr(fcntl, "F_OFD_SETLK") else None
_FLOCK = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
_HELD: set[tuple[str, int]] = set()
_HELD_LOCK = threading.Lock()


class _Claim:
    __slots__ = ("cache", "key", "fd", "path", "held", "lease")

    def __init__(self, cache: CallCache, key: str, fd: int, path: Path | None = None, held=None):
        self.cache, self.key, self.fd, self.path, self.held = cache, key, fd, path, held
        self.lease = None  # remote.Lease, on a store

    def release(self, done: bool) -> None:
        """Drop the claim; `done` (the answer is stored) also removes a per-call lock file
        (and the store's claim chain)."""
        if self.fd < 0:
            return
        if self.lease is not None:
            lease, self.lease = self.lease, None
            # Answered by anyone (read from the store since the claim) is done too: the
            # claim chain goes rather than stay behind as a released generation.
            lease.release(done or self.cache._read(self.key, report=False, local_only=True) is not None)
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
