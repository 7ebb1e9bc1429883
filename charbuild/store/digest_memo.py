"""Digests of stored files, remembered against what `stat` says of them (as DVC's state
and git's index do), so verifying an unchanged input costs a stat and a lookup, not a read.

A memo entry is used only while the file's device, inode, size, mtime_ns and ctime_ns are
exactly those seen when it was hashed. A write changes mtime; rewriting a file through a
new inode (editors, `cp`, a rename over it) changes the inode; a write that puts the old
mtime back still moves ctime, which no user can set.

Racy files (git's rule): timestamps have a granularity (a kernel tick, a second on some
filesystems), so a file rewritten within the tick it was hashed in keeps its mtime. An
entry whose mtime is within RACY_NS of the moment hashing began is therefore not trusted:
the file is hashed again next time, and by then the entry is old enough to keep.

What no stat-based memo sees: bytes changed under an unchanged stat (media decay). For
that, hash with the memo bypassed (`Cache.verify(key, rehash=True)`).

The memo lives in the cache's index (`<root>/index`, a diskcache), so every process that
uses the cache shares it; it is an optimisation only, and when the index cannot be read or
written the file is simply hashed.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Any

from charbuild.store.hashing import CHUNK, open_file_digest  # noqa: F401

RACY_NS = 2_000_000_000
# Below this, reading the file costs about what a lookup does (both ~30 us from the page
# cache), and a memo write costs more than either.
MIN_SIZE = 256 * 1024
_KEY = "file-digest"


def hash_file(f) -> str:
    return open_file_digest(f)  # a module-level name, so tests can count the hashing


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class DigestMemo:
    """`digest(path)` through a memo kept in `store` (anything with diskcache's get/set;
    None: no memo, every file is hashed)."""

    def __init__(self, store: Any, racy_ns: int | None = None, min_size: int | None = None):
        self.store = store
        self.racy_ns = RACY_NS if racy_ns is None else racy_ns
        self.min_size = MIN_SIZE if min_size is None else min_size

    def digest(self, path: str | os.PathLike, st: os.stat_result | None = None, rehash: bool = False) -> str:
        """The file's content digest; `st` is a stat the caller already has."""
        path = os.path.abspath(path)
        if st is None:
            st = os.stat(path)
        use_memo = self.store is not None and st.st_size >= self.min_size and stat.S_ISREG(st.st_mode)
        if use_memo and not rehash:
            entry = self._get(path)
            if entry is not None and entry[0] == _identity(st) and self._trusted(entry):
                return entry[2]
        started = time.time_ns()
        with open(path, "rb") as f:
            before = _identity(os.fstat(f.fileno()))
            digest = hash_file(f)
            after = _identity(os.fstat(f.fileno()))
        # A file that changed while it was read has no one digest to remember.
        if use_memo and before == after:
            self._set(path, (after, started, digest))
        return digest

    def _trusted(self, entry: tuple) -> bool:
        (_, _, _, mtime_ns, _), started, _ = entry
        return started - mtime_ns >= self.racy_ns

    # The memo only saves reads: a locked, read-only or damaged index must not fail a verify.
    def _get(self, path: str) -> tuple | None:
        try:
            entry = self.store.get((_KEY, path))
        except Exception:
            return None
        return entry if isinstance(entry, tuple) and len(entry) == 3 else None

    def _set(self, path: str, entry: tuple) -> None:
        try:
            self.store.set((_KEY, path), entry)
        except Exception:
            pass
