"""The content-addressed store.

Layout under the cache root (any worker that can reach the root can use it):

    objects/ab/<key>/        one built target: its files + MANIFEST.json
    tmp/                     targets being built (renamed into objects/ when complete)
    locks/<key>.lock         per-target build lock (two runs never build one target twice)
    corrupt/                 objects that failed verification, kept for inspection
    index/                   diskcache: last build per target name, usage stats, plan memos,
                             file digests by stat (digest_memo: unchanged files are not re-read)

A target is visible only once its directory is renamed into place, and the manifest
(with a digest of every file) is written before that rename: an entry is complete or
absent. Reads verify the digests (a file unchanged since it was last hashed, by its
stat, is not read again); a mismatch moves the entry to corrupt/ and the target is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from charbuild.store.atomic import write_json_atomic, write_text_atomic
from charbuild.store.digest_memo import DigestMemo
from charbuild.store.hashing import file_digest

MANIFEST = "MANIFEST.json"
MANIFEST_SCHEMA = 1


class CorruptObject(Exception):
    pass


def default_root() -> Path:
    return Path(os.environ.get("CHARBUILD_CACHE", "cache"))


class Cache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()
        self._index = None
        self._digests: DigestMemo | None = None

    # -- paths -------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        real = self.resolve(key)
        return self.root / "objects" / real[:2] / real

    def _alias_file(self, key: str) -> str:
        return os.path.join(self.root, "objects", key[:2], key + ".alias")

    def resolve(self, key: str) -> str:
        """The key whose object holds this target: itself, or the object it was cut off to."""
        try:
            with open(self._alias_file(key), encoding="ascii") as f:
                return f.read().strip() or key
        except OSError:
            return key

    def has(self, key: str) -> bool:
        """Cheap existence check (no verification): what a null `plan` needs."""
        real = self.resolve(key)
        return os.path.exists(os.path.join(self.root, "objects", real[:2], real, MANIFEST))

    def alias(self, key: str, existing: str) -> None:
        """Early cutoff: `key` produced exactly what `existing` holds, so it points there."""
        write_text_atomic(self._alias_file(key), existing)

    def manifest(self, key: str) -> dict | None:
        try:
            with open(self.path(key) / MANIFEST, encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"_unreadable": True}

    # -- verification --------------------------------------------------------------------
    @property
    def digests(self) -> DigestMemo:
        """File digests remembered against their stat, in the index: every process shares them."""
        if self._digests is None:
            try:
                store = self.index
            except Exception:  # a damaged index fails where it is needed; verifying can do without
                store = None
            self._digests = DigestMemo(store)
        return self._digests

    def verify(self, key: str, rehash: bool = False) -> list[str]:
        """Problems found in a stored object (empty when it is intact).

        A file whose stat is what it was when last hashed is not read again (see
        digest_memo); `rehash` reads every file, for what stat cannot see (media decay)."""
        m = self.manifest(key)
        if m is None:
            return ["missing"]
        if m.get("_unreadable") or m.get("key") != self.resolve(key) or "files" not in m:
            return ["manifest unreadable or for another key"]
        base = self.path(key)
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
        return problems

    def quarantine(self, key: str) -> Path | None:
        src = self.path(key)
        if os.path.exists(self._alias_file(key)):
            os.unlink(self._alias_file(key))
        if not src.exists():
            return None
        dst = self.root / "corrupt" / f"{src.name}-{int(time.time())}-{uuid.uuid4().hex[:6]}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
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
            if not self.has(key):
                raise
        return manifest

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
        objects = self.root / "objects"
        if not objects.is_dir():
            return
        for prefix in objects.iterdir():
            for entry in prefix.iterdir():
                if (entry / MANIFEST).exists():
                    yield entry.name

    def size(self, key: str) -> int:
        return sum(p.stat().st_size for p in self.path(key).rglob("*") if p.is_file())

    # -- locking -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str, wait: bool = True) -> Iterator[bool]:
        """An exclusive lock on building `key`, held by this process; yields False when
        `wait` is off and another process holds it. The OS drops it if we die."""
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
    def index(self):
        if self._index is None:
            import diskcache  # imported late: a null plan does not need it

            self._index = diskcache.Cache(str(self.root / "index"))
        return self._index

    def record_build(self, spec_name: str, target: str, record: dict) -> None:
        self.index.set(("last", spec_name, target), record)
        self.index.set(("last", "*", target), record)

    def last_build(self, spec_name: str, target: str) -> dict | None:
        return self.index.get(("last", spec_name, target)) or self.index.get(("last", "*", target))

    def close(self) -> None:
        self._digests = None
        if self._index is not None:
            self._index.close()
            self._index = None

    # -- garbage collection (what `gc` needs) --------------------------------------------
    def object_size(self, key: str) -> int:
        """Bytes in `key`'s own object (never through an alias); 0 when it has none."""
        return _tree_size(self.root / "objects" / key[:2] / key)

    def remove_alias(self, key: str) -> None:
        """Unlink `key`'s alias (OSError when it cannot be)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._alias_file(key))

    def remove_object(self, key: str) -> int:
        """Take `key`'s own object out of the store and delete it; the bytes freed. It leaves
        in one rename, so a failure (OSError) leaves it whole; files that then refuse to be
        deleted stay under tmp/, uncounted, for `clean_staging`."""
        trash = self.root / "tmp" / f"{key}.gc.{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.root / "objects" / key[:2] / key, trash)
        except FileNotFoundError:
            return 0  # gone already (another gc)
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
