"""The cache's index (`<root>/index`, a diskcache over SQLite): what builds learned on the
way, nothing a build cannot redo. The last build of each target, early-cutoff entries,
failures, spend, calibration, file digests (digest_memo).

Because all of it is derived, a broken index never stops a command:

- one SQLite finds damaged (garbage written over it, a torn page: "file is not a
  database", "database disk image is malformed") is moved under corrupt/ and started
  afresh, with one warning;
- one that cannot be opened or written (a read-only cache, a full disk) reads as empty,
  with one warning, and a write raises CacheWriteError: a build cannot go on without
  recording what it built, and the CLI says so in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from charbuild.errors import CacheWriteError

_CORRUPT = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
_CORRUPT_TEXT = ("file is not a database", "malformed")


def is_corrupt(exc: BaseException) -> bool:
    """SQLite's word that the file's bytes are bad, as against a file it cannot open or
    write (OperationalError: read-only, full, I/O error), which moving it aside won't fix."""
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.OperationalError):
        return False
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    return name in _CORRUPT if name else any(t in str(exc) for t in _CORRUPT_TEXT)


class Index:
    """diskcache's get/set/delete/iterkeys/transact over `<root>/index`, opened on first use."""

    def __init__(self, root: str | Path, warn: Callable[[str], None]):
        self.root = Path(root)
        self.dir = self.root / "index"
        self._warn = warn
        self._db = None
        self._down: str | None = None  # why the index cannot be used, once it cannot
        self._warned = False
        self._lock = threading.RLock()
        self._txn = threading.local()
        self._ino: int | None = None  # of the cache.db we opened: a damaged one is moved only if still there

    # -- the diskcache API the store and the engine use --------------------------------------
    def get(self, key: Any, default: Any = None) -> Any:
        return self._do(lambda db: db.get(key, default), default, write=False)

    def set(self, key: Any, value: Any) -> bool:
        return self._do(lambda db: db.set(key, value), False, write=True)

    def delete(self, key: Any) -> bool:
        return self._do(lambda db: db.delete(key), False, write=True)

    def iterkeys(self) -> list:
        return self._do(lambda db: list(db.iterkeys()), [], write=False)

    @contextlib.contextmanager
    def transact(self) -> Iterator[None]:
        db = self._open()
        if db is None:
            raise CacheWriteError(self.dir, self._down)
        self._txn.depth = getattr(self._txn, "depth", 0) + 1
        try:
            with db.transact():
                yield
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise CacheWriteError(self.dir, _reason(exc, self.dir)) from exc
            # What the transaction wrote is lost with the rest of the damaged index.
            self._set_aside(db, exc)
        finally:
            self._txn.depth -= 1

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- failures -----------------------------------------------------------------------------
    def _do(self, op: Callable, default: Any, write: bool) -> Any:
        for attempt in (0, 1):
            db = self._open()
            if db is None:
                if write:
                    raise CacheWriteError(self.dir, self._down)
                return default
            if getattr(self._txn, "depth", 0):
                return op(db)  # transact() handles what goes wrong inside it, once
            try:
                return op(db)
            except sqlite3.DatabaseError as exc:
                if is_corrupt(exc) and attempt == 0:
                    self._set_aside(db, exc)
                    continue  # once more, on the fresh index
                if write:
                    raise CacheWriteError(self.dir, _reason(exc, self.dir)) from exc
                self._say(_reason(exc, self.dir))  # a read may fail once (a lock held a minute)
                return default
            except OSError as exc:  # diskcache keeps large values in files beside the database
                if write:
                    raise CacheWriteError(self.dir, exc.strerror or str(exc)) from exc
                return default
        return default

    def _open(self):
        with self._lock:
            if self._db is None and self._down is None:
                for attempt in (0, 1):
                    self._ino = _inode(self.dir / "cache.db")
                    try:
                        self._db = self._connect()
                    except sqlite3.DatabaseError as exc:
                        if is_corrupt(exc) and attempt == 0:
                            self._set_aside(None, exc)
                            if self._down is None:
                                continue
                        self._give_up(_reason(exc, self.dir))
                    except OSError as exc:  # index/ cannot be made
                        self._give_up(exc.strerror or str(exc))
                    break
            return self._db

    def _connect(self):
        import diskcache  # imported late: a null plan does not need it

        return diskcache.Cache(str(self.dir))

    def _give_up(self, reason: str) -> None:
        if self._down is None:
            self._down = reason
        self._say(reason)

    def _say(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            self._warn(f"cannot use the cache index at {self.dir} ({reason}); going on without it")

    def _set_aside(self, db, exc: BaseException) -> None:
        """Move the damaged index under corrupt/, unless another process did first (the
        index/ there now is a fresh one, and is kept)."""
        with self._lock:
            if db is not None:
                if db is self._db:
                    self._db = None
                with contextlib.suppress(Exception):
                    db.close()
            try:
                (self.root / "locks").mkdir(parents=True, exist_ok=True)
                with open(self.root / "locks" / "index.lock", "a+") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    if _inode(self.dir / "cache.db") != self._ino:
                        return
                    dst = self.root / "corrupt" / f"index-{int(time.time())}-{uuid.uuid4().hex[:6]}"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(self.dir, dst)
            except FileNotFoundError:
                return
            except OSError as move:
                self._give_up(f"{exc}, and it cannot be moved aside: {move.strerror or move}")
                return
            self._warn(f"the cache index was damaged ({exc}); moved it to {dst} and started a new one "
                       "(it only remembers what builds learned: nothing built is lost)")


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _reason(exc: BaseException, where: Path) -> str:
    """SQLite's words for a failed open or write; on a full disk it says "disk I/O error"
    (writing its WAL or shared memory failed), so the free space is checked too."""
    text = str(exc) or type(exc).__name__
    if "disk I/O error" in text:
        with contextlib.suppress(OSError):
            st = os.statvfs(where if where.exists() else where.parent)
            if st.f_bavail == 0:
                return f"no space left on device ({text})"
    return text
