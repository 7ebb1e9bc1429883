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


def _content_digest(files: dict) -> str:
    from charbuild.store.hashing import digest

    return digest("Content", {k: v["digest"] for k, v in files.items()})
