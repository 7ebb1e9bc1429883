"""The shared store behind a local working cache: an fsspec URL (`s3://bucket/prefix`, and
`gs://...` through the same code), as DVC's remote or Bazel's remote cache.

Each worker keeps its own local working cache (a plain cache directory: the objects it
built or read, its index, its staging); the store is the shared truth. Layout under the URL:

    objects/ab/<key>/<files>          a built target's files, uploaded first
    objects/ab/<key>/MANIFEST.json    written last, only if absent (If-None-Match: *): the
                                      target exists once this does, complete
    objects/ab/<key>.alias            early cutoff: the key whose object holds this target
    calls/ab/<key>.json               one answered call (the local layout, see calls.py)
    locks/<key>/<generation>          build leases; calls/claims/<key>/<generation> call claims
    locks/runs/<owner>.json           what one run reads and writes, with an expiry it renews:
                                      `gc` on any machine leaves those keys (see RunLease)
    locks/gc/<generation>             held by a `gc` while it decides and removes
    corrupt/<key>-<time>-<id>/MANIFEST.json   manifests of objects that failed verification

Only conditional create is needed from the store (S3, GCS and local files all have it), so
leases are chains of generations: a lease is taken by creating generation 1, or, when the
newest generation has expired or been released, the next one; creation fails for all but
one taker. A holder renews its generation's expiry from a background thread; a dead
worker's lease lapses after its TTL (`CHARBUILD_LEASE_TTL`, seconds). Generations are
deleted only once the work they guarded is stored (the manifest or the call's entry):
from then on a second holder finds the result and asks nothing, so no live chain is ever
shortened under a waiting taker.

`gc` and the runs it must not disturb meet as readers and a writer with no lock to share,
only strongly consistent reads: a run writes a key into its run lease, then looks for a
live gc lease (and waits for it to end, after which what it holds is looked up afresh); a
gc takes its lease, then reads the run leases. Whichever wrote second sees the other's
write, so a key is either in a lease gc reads, or looked up after gc is done. An object
goes manifest first, then its files: a publish writes them in the other order, so a
half-removed object, like a half-published one, is just absent.

Credentials and endpoints come from the store's own configuration (for S3 the AWS
environment, `AWS_ENDPOINT_URL` included, or a profile), never from a spec. Importing this
module imports fsspec; it is imported only when a cache is given as a URL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import xxhash

from charbuild.errors import CacheWriteError
from charbuild.store.hashing import CHUNK

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
DEFAULT_TTL_S = 60.0
SKEW_WARN_S = 5.0  # a clock this far off the store's is worth a line: NTP is not running
SMALL = 16 << 20  # below this a file travels in one request; above, in parts of PART bytes
PART = 8 << 20
MAX_PARTS = 10_000  # S3's limit on the parts of one upload
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
RUNS = "locks/runs"
GC_LEASE = "locks/gc"
_KEY = re.compile(r"[0-9a-f]{8,128}")


def is_url(root) -> bool:
    """A cache given as an fsspec URL other than a local file: one (`file://` is a path)."""
    return isinstance(root, str) and bool(_URL.match(root)) and not root.startswith("file://")


def local_cache_for(url: str) -> Path:
    """The worker's local working cache for `url`: $CHARBUILD_LOCAL_CACHE, else one folder per
    URL under the user's cache directory, so two buckets never share local objects."""
    env = os.environ.get("CHARBUILD_LOCAL_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "charbuild" / xxhash.xxh3_64_hexdigest(url.rstrip("/").encode())


def lease_ttl() -> float:
    try:
        ttl = float(os.environ.get("CHARBUILD_LEASE_TTL", DEFAULT_TTL_S))
    except ValueError:
        ttl = DEFAULT_TTL_S
    return ttl if ttl > 0 and math.isfinite(ttl) else DEFAULT_TTL_S


class RemoteError(CacheWriteError):
    """The store could not be reached or refused us (credentials, a missing bucket): one line
    from the CLI, as a local cache that cannot be written is."""

    def __init__(self, url: str, reason: str):
        super().__init__(url, reason)
        self.args = (f"cannot use the cache at {url}: {reason}",)

    def __str__(self) -> str:
        return self.args[0]


class RemoteStore:
    """Small objects, streamed files, conditional creates and leases under one URL."""

    def __init__(self, url: str, warn: Callable[[str], None] | None = None):
        import fsspec

        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0].lower()
        # Listings must never come from a cache: another worker's writes are what we look for.
        options = {"skip_instance_cache": True, "use_listings_cache": False}
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as exc:
            extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol, protocol)
            raise RemoteError(self.url, f"{exc} (pip install 'charbuild[{extra}]')") from exc
        self.base = self.base.rstrip("/")
        self.s3 = protocol in ("s3", "s3a")
        self.warn = warn or (lambda m: None)
        self.ttl = lease_ttl()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._held: dict[str, "Lease"] = {}
        self._runs: "weakref.WeakSet[RunLease]" = weakref.WeakSet()
        self._held_lock = threading.Lock()
        self.clock: Callable[[], float] = time.time  # this machine's; see now()
        self._skew: float | None = None
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    def __reduce__(self):
        # A worker process (Ray's) connects afresh: clients, threads and leases stay here.
        return (RemoteStore, (self.url,))

    def _p(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def _fail(self, what: str, exc: BaseException) -> RemoteError:
        return RemoteError(self.url, f"{what}: {type(exc).__name__}: {exc}")

    def _bucket_exists(self, exc: BaseException) -> None:
        """A missing bucket reads like a missing object: say so, rather than rebuild
        everything into a bucket no write will reach."""
        if _error_code(exc) == "NoSuchBucket":
            raise RemoteError(self.url, "no such bucket") from exc

    # -- small objects ---------------------------------------------------------------------
    def read(self, rel: str) -> bytes | None:
        """The object's bytes; None when there is none."""
        try:
            if self.s3:  # one GET: s3fs would otherwise ask for the size first
                return self.fs.cat_file(self._p(rel), max_concurrency=1)
            return self.fs.cat_file(self._p(rel))
        except (FileNotFoundError, NotADirectoryError) as exc:
            self._bucket_exists(exc)
            return None
        except Exception as exc:
            raise self._fail(f"reading {rel}", exc) from exc

    def read_json(self, rel: str):
        return _json_body(self.read(rel))

    def write(self, rel: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._p(rel), data)
        except Exception as exc:
            raise self._fail(f"writing {rel}", exc) from exc

    def create(self, rel: str, data: bytes) -> bool:
        """Write only if absent (If-None-Match: *); False when it exists already."""
        try:
            self.fs.pipe_file(self._p(rel), data, mode="create")
            return True
        except FileExistsError:
            return False
        except Exception as exc:
            if _precondition_failed(exc):
                return False
            raise self._fail(f"creating {rel}", exc) from exc

    def delete(self, rels: Iterable[str]) -> None:
        paths = [self._p(r) for r in rels]
        if not paths:
            return
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._fail(f"deleting {len(paths)} objects", exc) from exc

    def names(self, rel_dir: str) -> list[str]:
        """Names directly under a prefix ([] when none)."""
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(rel_dir), detail=False)]
        except (FileNotFoundError, NotADirectoryError) as exc:
            self._bucket_exists(exc)
            return []
        except Exception as exc:
            raise self._fail(f"listing {rel_dir}", exc) from exc

    def find(self, rel_dir: str) -> list[str]:
        """Every object under a prefix, relative to the URL."""
        try:
            found = self.fs.find(self._p(rel_dir))
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self._fail(f"listing {rel_dir}", exc) from exc
        n = len(self.base) + 1
        return [p[n:] for p in found]

    def listing(self, rel_dir: str) -> dict[str, tuple[int, float | None]]:
        """Every object under a prefix, relative to the URL: its size and when it was last
        written (None where the store does not say)."""
        try:
            found = self.fs.find(self._p(rel_dir), detail=True)
        except (FileNotFoundError, NotADirectoryError) as exc:
            self._bucket_exists(exc)
            return {}
        except Exception as exc:
            raise self._fail(f"listing {rel_dir}", exc) from exc
        n = len(self.base) + 1
        return {p[n:]: (int(info.get("size") or 0), _mtime(info)) for p, info in found.items()}

    def read_many(self, rels: Iterable[str], parse: Callable[[bytes | None], object] = lambda b: b) -> dict:
        """rel -> parse(its bytes, None when absent), read 16 at a time: one request each."""
        rels = list(dict.fromkeys(rels))
        if len(rels) < 2:
            return {r: parse(self.read(r)) for r in rels}
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(max_workers=16, thread_name_prefix="charbuild-read") as pool:
            return dict(zip(rels, pool.map(lambda r: parse(self.read(r)), rels)))

    def probe(self) -> None:
        """Raise RemoteError unless we can create and delete an object here."""
        rel = f"tmp/.probe.{self.owner.replace(':', '.')}"
        try:
            self.fs.pipe_file(self._p(rel), b"probe")
            self.fs.rm_file(self._p(rel))
        except Exception as exc:
            raise self._fail("a test write", exc) from exc

    # -- files -----------------------------------------------------------------------------
    def upload(self, local: Path, rel: str) -> None:
        """Stream a file up: a large one in parts of PART bytes, never whole in memory."""
        try:
            size = os.path.getsize(local)
            if self.s3:
                part = max(PART, math.ceil(size / MAX_PARTS))
                self.fs.put_file(str(local), self._p(rel), chunksize=part)
            else:
                self.fs.put_file(str(local), self._p(rel))
        except Exception as exc:
            raise self._fail(f"uploading {rel}", exc) from exc

    def download(self, rel: str, local: Path, size: int) -> str | None:
        """Stream an object down into `local`, hashing as it arrives; its digest (None when
        the object is gone). One pass over the bytes: a model is not read back to hash it."""
        h = xxhash.xxh3_128()
        try:
            if size <= SMALL:
                data = self.read(rel)
                if data is None:
                    return None
                h.update(data)
                with open(local, "wb") as out:
                    out.write(data)
                return h.hexdigest()
            with self.fs.open(self._p(rel), "rb", block_size=PART) as src, open(local, "wb") as out:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            return h.hexdigest()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except RemoteError:
            raise
        except Exception as exc:
            raise self._fail(f"downloading {rel}", exc) from exc

    # -- objects -----------------------------------------------------------------------------
    @staticmethod
    def object_dir(key: str) -> str:
        return f"objects/{key[:2]}/{key}"

    def manifest(self, key: str) -> dict | None:
        """The object's manifest when it is there and names this key; None otherwise (an
        unreadable one reads as {"_unreadable": True})."""
        return self.read_json(f"{self.object_dir(key)}/{MANIFEST}")

    def publish(self, key: str, folder: Path, manifest: dict, look_first: bool = True) -> dict:
        """Upload a committed local object: its files, then its manifest if none is there.
        Returns the manifest the store holds: ours, or a first writer's (use theirs).
        `look_first`: skip the upload when the store has the object already (off only for
        a caller that holds the key's build lease and has just seen it missing)."""
        base = self.object_dir(key)
        if look_first:
            theirs = self.manifest(key)
            if valid_manifest(theirs, key):
                return theirs
        for rel in manifest["files"]:
            self.upload(folder / rel, f"{base}/{rel}")
        data = json.dumps(manifest, indent=1, sort_keys=True, default=str).encode()
        for _ in range(3):
            if self.create(f"{base}/{MANIFEST}", data):
                return manifest
            theirs = self.manifest(key)
            if valid_manifest(theirs, key):
                return theirs
            if theirs is not None:  # garbage where a manifest goes: it blocks every writer
                self.set_aside(key, theirs)
        raise RemoteError(self.url, f"could not publish {key}: its manifest keeps changing")

    def fetch(self, key: str, manifest: dict, dest: Path) -> list[str]:
        """Download an object's files into `dest`, checking each against the manifest;
        the problems found ([] when every file is what the manifest says)."""
        problems = []
        base = self.object_dir(key)
        for rel, info in manifest["files"].items():
            p = dest / rel
            if not p.resolve().is_relative_to(dest.resolve()):
                problems.append(f"{rel}: not a path inside the object")
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            got = self.download(f"{base}/{rel}", p, int(info.get("size", 0)))
            if got is None:
                problems.append(f"{rel}: missing in {self.url}")
            elif p.stat().st_size != info["size"]:
                problems.append(f"{rel}: size {p.stat().st_size} != {info['size']} in {self.url}")
            elif got != info["digest"]:
                problems.append(f"{rel}: content digest mismatch in {self.url}")
        return problems

    def set_aside(self, key: str, seen: dict | None) -> str | None:
        """Take a bad object out of view: its manifest is copied under corrupt/ and removed,
        unless it changed since we read it (another worker rebuilt it meanwhile). The files
        stay, for the rebuild to overwrite. Returns where the manifest went."""
        rel = f"{self.object_dir(key)}/{MANIFEST}"
        raw = self.read(rel)
        if raw is None:
            return None
        try:
            now = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            now = {"_unreadable": True}
        if seen is not None and now != seen:
            return None
        dst = f"corrupt/{key}-{int(time.time())}-{uuid.uuid4().hex[:6]}/{MANIFEST}"
        self.write(dst, raw)
        self.delete([rel])
        return f"{self.url}/{dst}"

    def alias_target(self, key: str) -> str | None:
        return _alias_body(self.read(f"objects/{key[:2]}/{key}.alias"))

    def objects(self) -> "StoredObjects":
        """What objects/ holds, from one listing: each key's files and each alias."""
        out = StoredObjects()
        for rel, stat in self.listing("objects").items():
            parts = rel.split("/")
            if len(parts) == 3 and parts[2].endswith(".alias") and _KEY.fullmatch(parts[2][:-len(".alias")]):
                out.aliases[parts[2][:-len(".alias")]] = stat
            elif len(parts) >= 4 and _KEY.fullmatch(parts[2]) and parts[1] == parts[2][:2]:
                out.folders.setdefault(parts[2], {})["/".join(parts[3:])] = stat
        return out

    def manifests(self, keys: Iterable[str]) -> dict[str, dict | None]:
        """key -> its stored manifest (as `manifest`), read 16 at a time."""
        keys = list(keys)
        got = self.read_many([f"{self.object_dir(k)}/{MANIFEST}" for k in keys], _json_body)
        return {k: got[f"{self.object_dir(k)}/{MANIFEST}"] for k in keys}

    def alias_targets(self, keys: Iterable[str]) -> dict[str, str | None]:
        keys = list(keys)
        got = self.read_many([f"objects/{k[:2]}/{k}.alias" for k in keys], _alias_body)
        return {k: got[f"objects/{k[:2]}/{k}.alias"] for k in keys}

    def set_alias(self, key: str, target: str) -> None:
        self.write(f"objects/{key[:2]}/{key}.alias", target.encode("ascii"))

    def remove_alias(self, key: str) -> None:
        self.delete([f"objects/{key[:2]}/{key}.alias"])

    # -- the store's clock --------------------------------------------------------------------
    def now(self) -> float:
        """The time by the store's clock: what lease expiries are written in and read against,
        so machines whose own clocks disagree still agree on when a lease lapses. The
        offset from this machine's clock is measured once, from the time the store gives an
        object written for it (to within a second: S3 keeps whole seconds), and applied only
        where it is certainly not zero; where the store gives no time, this machine's clock."""
        if self._skew is None:
            with self._held_lock:
                if self._skew is None:
                    self._skew = self._measure_skew()
        return self.clock() + self._skew

    def _measure_skew(self) -> float:
        rel = f"locks/clock/{self.owner.replace(':', '-')}"
        try:
            t0 = self.clock()
            self.write(rel, b"")
            t1 = self.clock()
            written = _mtime(self.fs.info(self._p(rel)))
            self.delete([rel])
        except Exception as exc:  # the lease requests that follow will say what is wrong
            log.debug("store clock: not measured (%s); using this machine's", exc)
            return 0.0
        if written is None:
            return 0.0
        # The store wrote it between t0 and t1 by our clock, and keeps whole seconds: the offset
        # lies in [low, high]. Where that holds 0, the clocks agree as far as can be told, and
        # this machine's is used as it is (the same clock as other machines that agree).
        low, high = written - t1, written + 1 - t0
        if low <= 0 <= high:
            return 0.0
        skew = (low + high) / 2
        if abs(skew) > SKEW_WARN_S:
            self.warn(f"this machine's clock is {skew:+.0f} s off {self.url}'s: leases use the store's")
        return skew

    # -- leases ------------------------------------------------------------------------------
    def try_lease(self, name: str, what: str = "") -> "Lease | None":
        """Take the lease `name` (e.g. locks/<key>) unless a live holder has it; None then."""
        def body(gen: int) -> bytes:
            return json.dumps({"owner": self.owner, "what": what, "gen": gen,
                               "expires": self.now() + self.ttl}).encode()

        if self.create(f"{name}/{_gen(1)}", body(1)):
            return self._held_lease(name, 1, [])
        for _ in range(4):
            gens = sorted(int(n) for n in self.names(name) if n.isdigit())
            if not gens:  # released and deleted since: the chain starts again
                if self.create(f"{name}/{_gen(1)}", body(1)):
                    return self._held_lease(name, 1, [])
                continue
            top = gens[-1]
            held = self.read_json(f"{name}/{_gen(top)}")
            if held is None:
                continue  # deleted while we looked: its work is stored, look again
            if not held.get("_unreadable") and not held.get("released") and \
                    float(held.get("expires", 0)) > self.now():
                return None
            if self.create(f"{name}/{_gen(top + 1)}", body(top + 1)):
                return self._held_lease(name, top + 1, gens)
        return None

    def holder(self, name: str) -> dict | None:
        """Who holds the lease `name` now (its newest live generation's body), or None."""
        gens = sorted(int(n) for n in self.names(name) if n.isdigit())
        if not gens:
            return None
        held = self.read_json(f"{name}/{_gen(gens[-1])}")
        return held if _live(held, self.now()) else None

    def building(self, keys: Iterable[str]) -> dict[str, str]:
        """key -> who, for those of `keys` whose build lease (locks/<key>) someone holds now:
        one listing of locks/, then a read of each such key's newest generation."""
        wanted = set(keys)
        newest: dict[str, str] = {}
        for rel in self.listing("locks"):
            parts = rel.split("/")
            if len(parts) == 3 and parts[1] in wanted and parts[2].isdigit():
                newest[parts[1]] = max(newest.get(parts[1], ""), parts[2])
        bodies = self.read_many([f"locks/{k}/{g}" for k, g in newest.items()], _json_body)
        now = self.now()
        return {k: f"a build of it ({b.get('owner', '?')})" for k, g in newest.items()
                if _live(b := bodies[f"locks/{k}/{g}"], now)}

    def run_lease(self, what: str) -> "RunLease":
        """This process's run lease (see RunLease); written once it holds a key."""
        lease = RunLease(self, what)
        with self._held_lock:
            self._runs.add(lease)
        self._start_renewer()
        return lease

    def run_leases(self) -> list[tuple[str, dict | None, bool]]:
        """Every run lease in the store: (where, its body, whether it is live)."""
        rels = [r for r in self.listing(RUNS) if r.endswith(".json")]
        bodies = self.read_many(rels, _json_body)
        now = self.now()
        return [(r, bodies[r], _live(bodies[r], now) and isinstance(bodies[r].get("keys"), list)) for r in rels]

    def wait_for_gc(self) -> bool:
        """Wait while a gc holds its lease; whether one did (then what it removed is gone, and
        anything looked up before must be looked up again)."""
        waited, poll = False, 0.1
        while (gc := self.holder(GC_LEASE)) is not None:
            if not waited:
                self.warn(f"a gc of {self.url} is running ({gc.get('owner', '?')}): waiting for it to end")
            waited = True
            time.sleep(poll)
            poll = min(1.0, poll * 1.5)
        return waited

    def _held_lease(self, name: str, gen: int, older: list[int]) -> "Lease":
        lease = Lease(self, name, gen, older)
        with self._held_lock:
            self._held[f"{name}/{_gen(gen)}"] = lease
        self._start_renewer()
        return lease

    def _start_renewer(self) -> None:
        with self._held_lock:
            if self._renewer is None or not self._renewer.is_alive():
                self._stop.clear()
                self._renewer = threading.Thread(target=self._renew_loop, name="charbuild-leases", daemon=True)
                self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._held_lock:
                held = [*self._held.values(), *self._runs]
            for lease in held:
                try:
                    lease.renew()
                except Exception as exc:  # the next renewal may get through; a lapse is survivable
                    self.warn(f"could not renew the lease {lease.path} in {self.url}: {exc}")

    def close(self) -> None:
        self._stop.set()


class Lease:
    """One held generation of a lease chain (see the module's docstring)."""

    def __init__(self, store: RemoteStore, name: str, gen: int, older: list[int]):
        self.store, self.name, self.gen, self.older = store, name, gen, older
        self.path = f"{name}/{_gen(gen)}"
        self._lock = threading.Lock()
        self._live = True

    def renew(self) -> None:
        with self._lock:
            if self._live:
                self.store.write(self.path, json.dumps({"owner": self.store.owner, "gen": self.gen,
                                                        "expires": self.store.now() + self.store.ttl}).encode())

    def release(self, done: bool) -> None:
        """`done`: what the lease guarded is stored, so the whole chain goes; otherwise this
        generation is marked released, for the next taker to follow."""
        with self._lock:
            if not self._live:
                return
            self._live = False
        with self.store._held_lock:
            self.store._held.pop(self.path, None)
        with contextlib.suppress(RemoteError):  # a lease left behind lapses on its own
            if done:
                self.store.delete([f"{self.name}/{_gen(g)}" for g in [self.gen, *reversed(self.older)]])
            else:
                self.store.write(self.path, json.dumps({"owner": self.store.owner, "gen": self.gen,
                                                        "released": True, "expires": 0}).encode())


class RunLease:
    """locks/runs/<owner>.json: the keys one run reads and writes (every target of its plan,
    every input it checks), rewritten whole as keys join and renewed with the build leases.
    Live until released, or until its process ends or drops the Cache that holds it; a
    dead run's lapses after its TTL, and a gc then removes it."""

    def __init__(self, store: RemoteStore, what: str):
        self.store = store
        self.path = f"{RUNS}/{re.sub(r'[^A-Za-z0-9._-]', '.', store.owner)}.{uuid.uuid4().hex[:8]}.json"
        self.head = {"owner": store.owner, "what": what, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.keys: list[str] = []
        self._lock = threading.Lock()  # a renewal never writes back fewer keys than an add wrote
        self._state = {"live": True, "written": False}
        self._done = weakref.finalize(self, _end_run_lease, store, self.path, self._lock, self._state)
        # Not at exit: by then the client's threads are shut down and no request leaves. A
        # process that ends without closing its Cache leaves the lease to lapse, as a kill does.
        self._done.atexit = False

    def add(self, keys: Iterable[str]) -> list[str]:
        """Write these keys into the lease; the ones that were not in it yet."""
        with self._lock:
            have = set(self.keys)
            new = [k for k in dict.fromkeys(keys) if k and k not in have]
            if new and self._state["live"]:
                self._write(self.keys + new)
                self.keys += new
            return new

    def renew(self) -> None:
        with self._lock:
            if self._state["live"] and self._state["written"]:
                self._write(self.keys)

    def _write(self, keys: list[str]) -> None:
        body = {**self.head, "expires": self.store.now() + self.store.ttl, "keys": keys}
        self.store.write(self.path, json.dumps(body).encode())
        self._state["written"] = True

    def release(self) -> None:
        self._done()


def _end_run_lease(store: RemoteStore, path: str, lock: threading.Lock, state: dict) -> None:
    with lock:
        state["live"] = False
        if state["written"]:
            with contextlib.suppress(Exception):  # left behind, it lapses on its own
                store.delete([path])


@dataclass
class StoredObjects:
    """objects/ in a store: key -> {file: (size, mtime)} (MANIFEST.json among them once
    published), and alias key -> (size, mtime)."""

    folders: dict[str, dict[str, tuple[int, float | None]]] = field(default_factory=dict)
    aliases: dict[str, tuple[int, float | None]] = field(default_factory=dict)

    def published(self) -> set[str]:
        return {k for k, files in self.folders.items() if MANIFEST in files}

    def size(self, key: str) -> int:
        return sum(size for size, _ in self.folders.get(key, {}).values())

    def newest(self, key: str) -> float | None:
        """When anything of the key's folder was last written (None when the store does not say)."""
        times = [t for _, t in self.folders.get(key, {}).values()]
        return None if not times or None in times else max(times)

    def complete(self, key: str, manifest) -> bool:
        """Every file the manifest names is there, at its size."""
        files = self.folders.get(key, {})
        return valid_manifest(manifest, key) and all(
            rel in files and files[rel][0] == info["size"] for rel, info in manifest["files"].items())


def _gen(n: int) -> str:
    return f"{n:012d}"


def _live(body, now: float) -> bool:
    return isinstance(body, dict) and not body.get("_unreadable") and not body.get("released") and \
        isinstance(body.get("expires"), (int, float)) and body["expires"] > now


def _json_body(raw: bytes | None):
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {"_unreadable": True}


def _alias_body(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    target = raw.decode("ascii", "replace").strip()
    return target if _KEY.fullmatch(target) else None


def _mtime(info: dict) -> float | None:
    """When a listed object was written, from what the store's listing says (S3's LastModified,
    GCS's updated, a file's mtime)."""
    for name in ("LastModified", "mtime", "updated", "last_modified"):
        v = info.get(name)
        if hasattr(v, "timestamp"):
            return v.timestamp()
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            import datetime

            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    return None


def valid_manifest(m, key: str) -> bool:
    return isinstance(m, dict) and m.get("key") == key and isinstance(m.get("files"), dict) and \
        all(isinstance(v, dict) and "digest" in v and "size" in v for v in m["files"].values())


def _precondition_failed(exc: BaseException) -> bool:
    """Stores that say PreconditionFailed without naming the condition reach us untranslated."""
    return _error_code(exc) in ("PreconditionFailed", "412")


def _error_code(exc: BaseException) -> str | None:
    """The store's error code (botocore's ClientError), through fsspec's translation."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
    return None
