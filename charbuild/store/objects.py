"""The content-addressed store.

Layout under the cache root (any worker that can reach the root can use it):

    objects/ab/<key>/        one built target: its files + MANIFEST.json
    tmp/                     targets being built (renamed into objects/ when complete)
    locks/<key>.lock         per-target build lock (two runs never build one target twice)
    locks/runs/*.lease       what each running build reads, so `gc` leaves it (see `hold`)
    corrupt/                 objects that failed verification, folders in objects/ without a
                             valid manifest, a damaged index: set aside, kept for inspection
    index/                   diskcache: last build per target name, usage stats, plan memos,
                             file digests by stat (digest_memo: unchanged files are not re-read);
                             derived data only (see index.py: a damaged one is started afresh)
    logs/<target>.<key>.log  library output of each build (progress bars, training logs)

A target is visible only once its directory is renamed into place, and the manifest
(with a digest of every file) is written before that rename: an entry is complete or
absent. Reads verify the digests (a file unchanged since it was last hashed, by its
stat, is not read again); a mismatch moves the entry to corrupt/ and the target is rebuilt.

A cache given as a URL (`s3://bucket/prefix`, see remote.py) is this layout in a local
working cache (`CHARBUILD_LOCAL_CACHE`, or one folder per URL under ~/.cache/charbuild)
with the store behind it as the shared truth: `has` looks here, then at the store's
manifest; `path` and `verify` download a stored object (checked against its manifest)
before anyone reads it; `commit` commits here, then publishes (files first, the manifest
last and only if absent); build locks are leases in the store as well as here. The index,
staging and logs stay local: derived or per-worker. What a run holds from `gc` is in a
lease here and one in the store (remote.RunLease), which a gc on any machine reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import sys
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Callable, Iterable, Iterator

from charbuild.errors import CacheWriteError
from charbuild.store.atomic import write_json_atomic, write_text_atomic
from charbuild.store.digest_memo import DigestMemo
from charbuild.store.hashing import file_digest
from charbuild.store.index import Index

MANIFEST = "MANIFEST.json"
MANIFEST_SCHEMA = 1
ABSENT_S = 1.0  # how long a key the store lacked is taken as still missing (see _remote_has)


class CorruptObject(Exception):
    pass


def default_root() -> Path:
    return Path(os.environ.get("CHARBUILD_CACHE", "cache"))


def warn_stderr(message: str) -> None:
    print(f"charbuild: warning: {message}", file=sys.stderr)


def _is_url(root) -> bool:
    # As remote.is_url, without importing it: a local cache must not load fsspec.
    return isinstance(root, str) and "://" in root and not root.startswith("file://") and \
        root.split("://", 1)[0].replace("+", "").replace(".", "").replace("-", "").isalnum()


class Cache:
    def __init__(self, root: str | Path | None = None, warn: Callable[[str], None] | None = None,
                 local: str | Path | None = None):
        """`root`: a directory, or a URL (then `local` is the working cache; by default
        remote.local_cache_for picks it)."""
        if root is None:
            root = os.environ.get("CHARBUILD_CACHE") or "cache"
        self.warn = warn or warn_stderr  # damage found and repaired on the way: one line each
        self.url: str | None = None
        self.remote = None  # remote.RemoteStore when the cache is a URL
        if _is_url(root):
            from charbuild.store.remote import RemoteStore, local_cache_for

            self.url = str(root).rstrip("/")
            self.remote = RemoteStore(self.url, self.warn)
            root = local if local is not None else local_cache_for(self.url)
        elif isinstance(root, str) and root.startswith("file://"):
            root = root[len("file://"):]
        self.root = Path(root)
        self._index: Index | None = None
        self._digests: DigestMemo | None = None
        self._lease: _Lease | None = None
        self._remote_manifests: dict[str, dict] = {}  # keys the store holds, with their manifests
        self._remote_bad: dict[str, str | None] = {}  # keys whose stored files failed verification: where they went
        self._fetched: set[str] = set()  # keys downloaded and checked by this process
        self._fetch_problems: dict[str, list[str]] = {}  # what the last download of a key found
        self._absent: dict[str, float] = {}  # keys the store lacked, when we looked (monotonic)
        self._leased: set[str] = set()  # keys whose build lease in the store we hold
        self._run_lease = None  # remote.RunLease: what this process holds from a gc on any machine

    @property
    def location(self) -> str:
        """What this cache was opened on (the URL, or the directory): what another process
        passes to Cache() to open the same cache."""
        return self.url or str(self.root)

    # -- paths -------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        """Where `key`'s object lies here; with a store behind, it is downloaded first."""
        real = self.resolve(key)
        p = self.root / "objects" / real[:2] / real
        if self.remote is not None and not os.path.exists(p / MANIFEST):
            self._materialise(real)
        return p

    def _local(self, key: str) -> Path:
        real = self.resolve(key)
        return self.root / "objects" / real[:2] / real

    def _alias_file(self, key: str) -> str:
        return os.path.join(self.root, "objects", key[:2], key + ".alias")

    def log_path(self, key: str, target: str) -> Path:
        """Where the library output of building `target` (at `key`) is kept: by name first,
        so a person finds it with ls; by key, so two builds of one name do not mix."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in target)
        return self.root / "logs" / f"{safe}.{key[:12]}.log"

    def resolve(self, key: str) -> str:
        """The key whose object holds this target: itself, or the object it was cut off to."""
        try:
            with open(self._alias_file(key), encoding="ascii") as f:
                return f.read().strip() or key
        except OSError:
            return key

    def has(self, key: str) -> bool:
        """Cheap existence check (no verification): what a null `plan` needs. With a store
        behind, a key missing here costs a read of its manifest there."""
        real = self.resolve(key)
        if os.path.exists(os.path.join(self.root, "objects", real[:2], real, MANIFEST)):
            return True
        return self.remote is not None and self._remote_has(key)

    def _remote_manifest(self, key: str) -> dict | None:
        """The store's manifest for `key`'s own object, when valid (remembered: a published
        manifest changes only when it is set aside, by this process or a rebuild)."""
        m = self._remote_manifests.get(key)
        if m is None:
            from charbuild.store.remote import valid_manifest

            m = self.remote.manifest(key)
            if not valid_manifest(m, key):
                return None
            self._remote_manifests[key] = m
        return m

    def prefetch(self, keys: Iterable[str]) -> None:
        """Look up many keys in the store at once (a plan's): their manifests, remembered,
        and which are missing, remembered for ABSENT_S seconds. A no-op on a local cache."""
        if self.remote is None:
            return
        todo = [k for k in dict.fromkeys(keys) if not (self._local(k) / MANIFEST).exists()]
        if len(todo) < 2:
            return
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(max_workers=min(16, len(todo)), thread_name_prefix="charbuild-prefetch") as pool:
            list(pool.map(self._remote_has, todo))

    def _remote_has(self, key: str) -> bool:
        # A miss is remembered briefly: a plan asks about a target and again as an input,
        # and the build asks again before its lock. Taking the lock forgets it (`lock`), so
        # the check under the lock, the one that decides, is always fresh.
        seen = self._absent.get(key)
        if seen is not None and time.monotonic() - seen < ABSENT_S:
            return False
        found = self._remote_has_now(key)
        if found:
            self._absent.pop(key, None)
        else:
            self._absent[key] = time.monotonic()
        return found

    def _remote_has_now(self, key: str) -> bool:
        real = self.resolve(key)
        if self._remote_manifest(real) is not None:
            return True
        if real != key:  # a local alias to an object the store no longer has
            if self._remote_manifest(key) is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._alias_file(key))
                return True
        target = self.remote.alias_target(key)
        if target and target != key and self._remote_manifest(target) is not None:
            with contextlib.suppress(OSError):
                write_text_atomic(self._alias_file(key), target, fsync=False)
            return True
        return False

    def alias(self, key: str, existing: str) -> None:
        """Early cutoff: `key` produced exactly what `existing` holds, so it points there."""
        write_text_atomic(self._alias_file(key), existing)
        if self.remote is not None:
            self._ensure_published(existing)  # the store never holds an alias to nothing
            self.remote.set_alias(key, existing)

    def manifest(self, key: str) -> dict | None:
        try:
            with open(self._local(key) / MANIFEST, encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            # With a store behind: its manifest, without downloading the files.
            if self.remote is not None and self._remote_has(key):
                return self._remote_manifest(self.resolve(key))
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
            return {"_unreadable": True}

    # -- the store behind (a URL cache) ------------------------------------------------------
    def _materialise(self, real: str) -> None:
        """Download `real`'s object from the store into objects/, checked file by file
        against its manifest; what fails is remembered for `verify` and never put in place."""
        m = self._remote_manifest(real)
        if m is None:
            return
        with self.staging(real) as tmp:
            problems = self.remote.fetch(real, m, tmp)
            if problems:
                # Out of every worker's view at once: whoever plans next rebuilds it (and a
                # rebuild's manifest can be created only once this one is gone).
                self._fetch_problems[real] = problems
                self._remote_bad[real] = self.remote.set_aside(real, m)
                self._remote_manifests.pop(real, None)
                # Gone, manifest and all: a gc removes the manifest first, then the files.
                if self._remote_bad[real] is None and self.remote.manifest(real) is None:
                    self.warn(f"{self.url}: object {real} was removed from the store while we read it (a gc "
                              "that did not see this run's lease?)")
                    return
                self.warn(f"{self.url}: object {real} failed verification on download ({'; '.join(problems[:2])}); "
                          f"set aside as {self._remote_bad[real]}")
                return
            write_json_atomic(tmp / MANIFEST, m)
            dst = self.root / "objects" / real[:2] / real
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, dst)
            except OSError:
                if not self._valid_manifest(dst):  # not another process's download of it
                    moved = self._set_aside(dst)
                    if moved is not None:
                        self.warn(f"{dst} had no valid manifest; moved it to {moved}")
                    os.rename(tmp, dst)
        self._fetched.add(real)
        self._mark_published(real)

    def _published_key(self, real: str) -> tuple:
        return ("published", self.url, real)

    def _mark_published(self, real: str) -> None:
        with contextlib.suppress(CacheWriteError):
            if self.index.get(self._published_key(real)) is None:
                self.index.set(self._published_key(real), time.time())

    def _ensure_published(self, real: str) -> None:
        """Upload a verified local object the store lacks: one committed here by a run
        killed before its upload ended (or its manifest) is not lost to other workers."""
        # The store itself is asked, not only this worker's memory of having published: a
        # bucket emptied or recreated since (lifecycle rules, a new test server) would
        # otherwise never get the object back, and every other worker would rebuild it.
        if real in self._remote_manifests or self._remote_has(real):
            self._mark_published(real)
            return
        m = None
        with contextlib.suppress(OSError, ValueError):
            with open(self.root / "objects" / real[:2] / real / MANIFEST, encoding="utf-8") as f:
                m = json.load(f)
        if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
            return
        self._remote_manifests[real] = self.remote.publish(real, self.root / "objects" / real[:2] / real, m)
        self._mark_published(real)

    # -- verification --------------------------------------------------------------------
    @property
    def digests(self) -> DigestMemo:
        """File digests remembered against their stat, in the index: every process shares them."""
        if self._digests is None:
            self._digests = DigestMemo(self.index)
        return self._digests

    def verify(self, key: str, rehash: bool = False) -> list[str]:
        """Problems found in a stored object (empty when it is intact).

        A file whose stat is what it was when last hashed is not read again (see
        digest_memo); `rehash` reads every file, for what stat cannot see (media decay).
        While this Cache holds a lease (`hold`), the key joins it first: once verified, an
        object stays until the lease ends, whatever `gc` is asked to remove."""
        if self._lease is not None:
            with contextlib.suppress(OSError):  # best effort, as `hold` is
                self._lease.add([key, self.resolve(key)])
        if self._run_lease is not None:
            self._hold_in_store([key, self.resolve(key)], "")
        if self.remote is not None:
            real = self.resolve(key)
            if real in self._fetch_problems:
                return list(self._fetch_problems[real])  # its download failed the check
            if not (self._local(key) / MANIFEST).exists():
                # Only in the store: its files are checked as they are downloaded (`path`),
                # so nothing is downloaded just to be checked (a run that finds every
                # target cached moves no model).
                if self._remote_has(key):
                    return []
            elif real in self._fetched and not rehash:
                return []  # checked digest by digest as it arrived, moments ago
        m = self.manifest(key) if self.remote is None else self._local_manifest(key)
        if m is None:
            gone = self.index.get(("removed-by-gc", self.resolve(key))) if not self._local(key).exists() else None
            return [f"removed by gc at {gone['at']}" if isinstance(gone, dict) else "missing"]
        if m.get("_unreadable") or m.get("key") != self.resolve(key) or "files" not in m:
            return ["manifest unreadable or for another key"]
        base = self._local(key)
        problems = []
        for rel, info in m["files"].items():
            p = base / rel
            try:
                st = os.stat(p)
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: missing")
            elif st.st_size != info["size"]:
                problems.append(f"{rel}: size {st.st_size} != {info['size']}")
            elif self.digests.digest(p, st, rehash) != info["digest"]:
                problems.append(f"{rel}: content digest mismatch")
        if not problems and self.remote is not None:
            self._ensure_published(self.resolve(key))
        return problems

    def _local_manifest(self, key: str) -> dict | None:
        try:
            with open(self._local(key) / MANIFEST, encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
            return {"_unreadable": True}

    def quarantine(self, key: str) -> Path | None:
        real = self.resolve(key)
        src = self._local(key)
        if os.path.exists(self._alias_file(key)):
            os.unlink(self._alias_file(key))
        if self.remote is not None and real in self._remote_bad:
            # The store's copy failed verification on download and was set aside then.
            moved = self._remote_bad.pop(real)
            self._fetch_problems.pop(real, None)
            if real != key:
                self.remote.remove_alias(key)
            if moved is not None:
                return moved  # type: ignore[return-value]  # a URL: where the bad manifest went
        self._fetched.discard(real)
        if self.remote is not None:
            with contextlib.suppress(CacheWriteError):
                self.index.delete(self._published_key(real))
        return self._set_aside(src)

    def _set_aside(self, src: Path) -> Path | None:
        """Move `src` under corrupt/ (None when it is gone already)."""
        if not src.exists():
            return None
        dst = self.root / "corrupt" / f"{src.name}-{int(time.time())}-{uuid.uuid4().hex[:6]}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            return None
        return dst

    # -- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self, key: str) -> Iterator[Path]:
        """A private directory to build into; removed on any exception (Ctrl-C included)."""
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def sweep_dead_staging(self) -> list[Path]:
        """Remove staging dirs (`staging`'s <key>.<pid>.<id>) whose process is gone and whose
        key's build lock no one holds: what a killed build left (SIGKILL, a crash, Ctrl-C
        pressed until it stopped at once). Cheap enough to run before every build; returns
        those removed. The lock, not the pid, is what makes it safe (pids are per host and
        reused): a pid still alive only makes it skip."""
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return []
        out = []
        for d in sorted(tmp.iterdir()):
            parts = d.name.split(".")
            if len(parts) != 3 or not parts[1].isdigit() or _pid_alive(int(parts[1])):
                continue
            with self._lock_if_free(parts[0]) as free:
                if free and d.is_dir() and not d.is_symlink():
                    shutil.rmtree(d, ignore_errors=True)
                    out.append(d)
        return out

    def commit(self, key: str, staged: Path, manifest: dict) -> dict:
        """Digest every staged file, write the manifest, and rename into place atomically."""
        files = {}
        for p in sorted(staged.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(staged).as_posix()
                files[rel] = {"size": p.stat().st_size, "digest": file_digest(p)}
        manifest = {**manifest, "schema": MANIFEST_SCHEMA, "key": key, "files": files,
                    "content_digest": _content_digest(files)}
        write_json_atomic(staged / MANIFEST, manifest)
        dst = self.root / "objects" / key[:2] / key  # its own object, never through an alias
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, dst)
        except OSError:
            # Another worker committed the same key first; both built the same content.
            if self._valid_manifest(dst):
                return manifest
            if not os.path.lexists(dst):
                raise
            # A folder without a valid manifest (a partial `rm`, an interrupted removal) is
            # not an object: it goes aside, and the object takes its place.
            moved = self._set_aside(dst)
            if moved is not None:
                self.warn(f"{dst} had no valid manifest (an interrupted removal?); moved it to {moved}, rebuilt")
            os.rename(staged, dst)
        # The key is its own object now: an alias left from an early cutoff would hide it,
        # and a note that gc removed it would be out of date.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._alias_file(key))
        if self.index.get(("removed-by-gc", key)) is not None:  # a read: no write lock per commit
            with contextlib.suppress(CacheWriteError):
                self.index.delete(("removed-by-gc", key))
        if self.remote is not None:
            self._fetch_problems.pop(key, None)  # a bad download of it is history now
            self._remote_bad.pop(key, None)
            # Under our lease the store was just seen without it: no need to look again.
            theirs = self.remote.publish(key, dst, self._local_manifest(key) or manifest,
                                         look_first=key not in self._leased)
            self._remote_manifests[key] = theirs
            self._mark_published(key)
            if theirs.get("content_digest") != manifest.get("content_digest"):
                # Another worker published first, with other bytes: the store is the truth.
                trash = self.root / "tmp" / f"{key}.replaced.{uuid.uuid4().hex[:8]}"
                os.rename(dst, trash)
                shutil.rmtree(trash, ignore_errors=True)
                self._materialise(key)
                return theirs
        return manifest

    def _valid_manifest(self, folder: Path, key: str | None = None) -> bool:
        try:
            with open(folder / MANIFEST, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, ValueError):
            return False
        return isinstance(m, dict) and m.get("key") == (key or folder.name) and isinstance(m.get("files"), dict)

    def remove(self, key: str) -> None:
        if os.path.exists(self._alias_file(key)):
            os.unlink(self._alias_file(key))
            return
        shutil.rmtree(self.path(key), ignore_errors=True)

    def aliases(self) -> Iterator[tuple[str, str]]:
        objects = self.root / "objects"
        if objects.is_dir():
            for f in objects.glob("*/*.alias"):
                yield f.name[: -len(".alias")], self.resolve(f.name[: -len(".alias")])

    def keys(self) -> Iterator[str]:
        for entry in self._object_folders():
            if (entry / MANIFEST).exists():
                yield entry.name

    def debris(self) -> Iterator[Path]:
        """Folders in objects/ without a valid manifest: not objects (nothing reads them),
        what an interrupted removal or a partial copy left."""
        for entry in self._object_folders():
            if not entry.is_symlink() and not self._valid_manifest(entry):
                yield entry

    def _object_folders(self) -> Iterator[Path]:
        objects = self.root / "objects"
        if not objects.is_dir():
            return
        for prefix in sorted(objects.iterdir()):
            if prefix.is_dir():  # a stray file there is no prefix to list
                for entry in sorted(prefix.iterdir()):
                    if entry.is_dir():
                        yield entry

    def size(self, key: str) -> int:
        return sum(p.stat().st_size for p in self.path(key).rglob("*") if p.is_file())

    # -- locking -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str, wait: bool = True) -> Iterator[bool]:
        """An exclusive lock on building `key`, held by this process; yields False when
        `wait` is off and another process holds it. The OS drops it if we die. With a store
        behind, also its lease there (locks/<key>), so no two machines build one target at
        once; a dead worker's lease lapses after CHARBUILD_LEASE_TTL seconds."""
        with self._local_lock(key, wait) as got:
            if not got or self.remote is None:
                yield got
                return
            lease = self.remote.try_lease(f"locks/{key}", f"build of {key}")
            poll = 0.05
            while lease is None and wait:
                time.sleep(poll)
                poll = min(1.0, poll * 1.5)
                lease = self.remote.try_lease(f"locks/{key}", f"build of {key}")
            if lease is None:
                yield False
                return
            self._absent.pop(key, None)
            self._leased.add(key)
            try:
                yield True
            finally:
                self._leased.discard(key)
                # Stored (ours or an alias): the chain can go, a later taker finds the object.
                lease.release(done=key in self._remote_manifests or self._remote_alias_published(key))

    def _remote_alias_published(self, key: str) -> bool:
        real = self.resolve(key)
        return real != key and real in self._remote_manifests

    @contextlib.contextmanager
    def _local_lock(self, key: str, wait: bool) -> Iterator[bool]:
        d = self.root / "locks"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{key}.lock", "a+") as f:
            flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
            try:
                fcntl.flock(f, flags)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- index ---------------------------------------------------------------------------
    @property
    def index(self) -> Index:
        if self._index is None:
            self._index = Index(self.root, self.warn)
        return self._index

    def record_build(self, spec_name: str, target: str, record: dict) -> None:
        self.index.set(("last", spec_name, target), record)
        self.index.set(("last", "*", target), record)

    def last_build(self, spec_name: str, target: str) -> dict | None:
        return self.index.get(("last", spec_name, target)) or self.index.get(("last", "*", target))

    def close(self) -> None:
        self._digests = None
        if self.remote is not None:
            self.remote.close()
        if self._index is not None:
            self._index.close()
            self._index = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._run_lease is not None:
            self._run_lease.release()
            self._run_lease = None

    def check_writable(self) -> None:
        """Raise CacheWriteError when a build could not store what it builds (a read-only
        cache, a full disk): found before the first target, not after it."""
        tmp = self.root / "tmp"
        probe = tmp / f".probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)  # a block: a full disk refuses it, an empty file it would not
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise CacheWriteError(self.root, exc.strerror or str(exc)) from exc
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        self.index.set(("writable",), time.time())  # CacheWriteError when it cannot be written
        if self.remote is not None:
            self.remote.probe()  # RemoteError (a CacheWriteError): credentials, a missing bucket

    # -- leases: what running builds read, which `gc` leaves ---------------------------------
    def hold(self, keys: Iterable[str], what: str = "") -> None:
        """Keep these keys (and the objects they resolve to) from `gc` until this Cache is
        closed (or collected, or the process ends): a run holds every target of its plan,
        and `verify` adds each key it checks. `gc` reads the leases of live processes; on a
        store the keys also go into this run's lease there, for a gc on any machine.

        Best effort: where no lease can be written (a read-only cache), this process cannot
        run gc on the cache either; and a key gc removes anyway is reported as such."""
        keys = list(keys)
        try:
            if self._lease is None:
                self._lease = _Lease(self.root, what)
            self._lease.add(keys)
        except OSError:
            pass
        self._hold_in_store(keys, what)

    def _hold_in_store(self, keys: list[str], what: str) -> None:
        """The store's half of `hold`: the keys go into this run's lease there, then, if a gc
        is deciding, we wait for it and forget what we knew of those keys (see remote.py)."""
        if self.remote is None:
            return
        try:
            if self._run_lease is None:
                self._run_lease = self.remote.run_lease(what or "a charbuild run")
            new = self._run_lease.add(keys)
            if new and self.remote.wait_for_gc():
                for k in new:
                    self._remote_manifests.pop(k, None)
                    self._absent.pop(k, None)
        except CacheWriteError as exc:  # best effort, as the local lease is
            self.warn(f"could not hold {len(keys)} keys from gc in {self.url}: {exc}")

    @contextlib.contextmanager
    def gc_lock(self) -> Iterator[None]:
        """Held by `gc` while it decides and removes: a lease grows only outside it, so a
        key is either in a lease gc reads, or added after gc is done (and then checked)."""
        with _gc_lock(self.root, fcntl.LOCK_EX):
            yield

    def leases(self, remove_stale: bool = False) -> dict[str, str]:
        """Key -> who holds it, from the leases of live processes (call it under
        `gc_lock`); leases whose process is gone are deleted when `remove_stale`."""
        held: dict[str, str] = {}
        d = self.root / "locks" / "runs"
        if not d.is_dir():
            return held
        for f in sorted(d.glob("*.lease")):
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:  # its owner holds it: a live build
                    with os.fdopen(os.dup(fd), encoding="utf-8", errors="replace") as lines:
                        head, *keys = lines.read().splitlines() or [""]
                    try:
                        who = json.loads(head)
                        who = f"{who.get('what') or 'a build'} (pid {who.get('pid')} on {who.get('host')})"
                    except ValueError:
                        who = "a running build"
                    for k in keys:
                        held.setdefault(k.strip(), who)
                    continue
                if remove_stale:
                    with contextlib.suppress(OSError):
                        f.unlink()
            finally:
                os.close(fd)
        held.pop("", None)
        return held

    # -- garbage collection (what `gc` needs) --------------------------------------------
    def object_size(self, key: str) -> int:
        """Bytes in `key`'s own object (never through an alias); 0 when it has none."""
        return _tree_size(self.root / "objects" / key[:2] / key)

    def remove_alias(self, key: str) -> None:
        """Unlink `key`'s alias (OSError when it cannot be)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._alias_file(key))

    def remove_object(self, key: str) -> int | None:
        """Take `key`'s own object out of the store and delete it; the bytes freed. It leaves
        in one rename, so a failure (OSError) leaves it whole; files that then refuse to be
        deleted stay under tmp/, uncounted, for `clean_staging`."""
        trash = self.root / "tmp" / f"{key}.gc.{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.root / "objects" / key[:2] / key, trash)
        except FileNotFoundError:
            return None  # gone already (another gc): not ours to count
        # A build that reads it anyway (one whose lease gc could not see) can then say why.
        with contextlib.suppress(CacheWriteError):
            self.index.set(("removed-by-gc", key), {"at": time.strftime("%Y-%m-%d %H:%M:%S")})
        size = _tree_size(trash)
        shutil.rmtree(trash, ignore_errors=True)
        return size - _tree_size(trash)

    def remove_debris(self, folder: Path) -> int | None:
        """Delete a folder of objects/ without a valid manifest (see `debris`), as
        `remove_object` does an object; the bytes freed, None when it was gone already."""
        trash = self.root / "tmp" / f"{folder.name}.gc.{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return None
        if self._valid_manifest(trash, folder.name):  # a build committed the object meanwhile
            with contextlib.suppress(OSError):
                os.rename(trash, folder)
            return None
        size = _tree_size(trash)
        shutil.rmtree(trash, ignore_errors=True)
        return size - _tree_size(trash)

    def prune_index(self, removed: set[str]) -> int:
        """Drop index entries that lead to removed keys: early-cutoff entries mapping to
        them and their kept-by-cutoff notes. Last-build records stay: they explain later
        why a target is stale. Returns how many went."""
        n = 0
        for k in list(self.index.iterkeys()):
            if not (isinstance(k, tuple) and len(k) == 2):
                continue
            if (k[0] == "kept-by-cutoff" and k[1] in removed) or (k[0] == "cutoff" and self.index.get(k) in removed):
                n += bool(self.index.delete(k))
        return n

    def clean_staging(self, older_than: float = 3600, dry_run: bool = False) -> list[Path]:
        """Staging dirs under tmp/ nothing wrote to for `older_than` seconds and whose key's
        build lock no one holds (a killed build's, or what `remove_object` could not delete):
        removed, unless `dry_run`. Returns those removed (or that would be)."""
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return []
        stale = time.time() - older_than
        out = []
        for d in sorted(tmp.iterdir()):
            if _newest_mtime(d) > stale:
                continue
            with self._lock_if_free(d.name.split(".", 1)[0]) as free:
                if not free:
                    continue
                if not dry_run:
                    if d.is_dir() and not d.is_symlink():
                        shutil.rmtree(d, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            d.unlink()
            if dry_run or not os.path.lexists(d):
                out.append(d)
        return out

    def remove_lock(self, key: str) -> bool:
        """Delete `key`'s lock file unless a build holds it; whether one was deleted."""
        with self._lock_if_free(key) as free:
            if free:
                try:
                    os.unlink(self.root / "locks" / f"{key}.lock")
                    return True
                except OSError:
                    pass
        return False

    @contextlib.contextmanager
    def _lock_if_free(self, key: str) -> Iterator[bool]:
        """Hold `key`'s build lock when no one does (True), without creating its file."""
        try:
            fd = os.open(self.root / "locks" / f"{key}.lock", os.O_RDWR)
        except FileNotFoundError:
            yield True
            return
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
            except OSError:
                got = False
            yield got
        finally:
            os.close(fd)  # closing drops the lock


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # not ours to signal: it exists
        return True
    return True


class _Lease:
    """locks/runs/<host>.<pid>.<id>.lease: a header line (who), then one key a line. Its
    owner holds an exclusive flock on it while it lives (the OS drops it if the process
    dies); keys are appended under a shared gc lock, so `gc` never reads one half-grown."""

    def __init__(self, root: Path, what: str):
        self.root = root
        self.keys: set[str] = set()
        self._lock = threading.Lock()
        d = root / "locks" / "runs"
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.lease"
        with _gc_lock(root, fcntl.LOCK_SH):  # gc never sees it before it is locked
            self.file = open(self.path, "a", encoding="utf-8")
            self._done = weakref.finalize(self, _end_lease, self.file, self.path)
            fcntl.flock(self.file, fcntl.LOCK_EX)
            self.file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
            self.file.flush()

    def add(self, keys: list[str]) -> None:
        with self._lock:
            new = [k for k in dict.fromkeys(keys) if k not in self.keys]
            if not new:
                return
            with _gc_lock(self.root, fcntl.LOCK_SH):
                self.file.write("".join(k + "\n" for k in new))
                self.file.flush()
            self.keys.update(new)

    def release(self) -> None:
        self._done()


def _end_lease(file, path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
    file.close()  # closing drops the flock


@contextlib.contextmanager
def _gc_lock(root: Path, how: int) -> Iterator[None]:
    path = root / "locks" / "gc.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:  # a cache this process cannot write: a read-only descriptor locks as well
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # none there: no build could have written a lease either
            yield
            return
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)  # closing drops it


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _newest_mtime(path: Path) -> float:
    """The latest modification of `path` or anything under it (0 when it is gone)."""
    try:
        newest = os.lstat(path).st_mtime
    except OSError:
        return 0.0
    for dirpath, dirs, files in os.walk(path):
        for f in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, f)).st_mtime)
    return newest


def _content_digest(files: dict) -> str:
    from charbuild.store.hashing import digest

    return digest("Content", {k: v["digest"] for k, v in files.items()})
