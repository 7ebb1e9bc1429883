"""Hashing primitives: canonical JSON hashed with xxhash (128-bit).

Every digest hashes a list led by a kind tag (as redun does), so an action key can never
collide with a file digest or a call key. Bump KEY_SCHEMA_VERSION when the meaning of a
key changes (what goes into it, not what a stage does: stages carry their own version).
This is the bottom of the store: it knows bytes and JSON values, nothing of targets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import xxhash

KEY_SCHEMA_VERSION = 1


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace; floats that are integers stay floats.

    Rejects NaN/inf: they have no canonical form and would make keys unstable.
    """

    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    raise TypeError(f"cannot key a value of type {type(obj).__name__}")


def digest(kind: str, *parts: Any) -> str:
    return xxhash.xxh3_128_hexdigest(canonical_json([kind, KEY_SCHEMA_VERSION, *parts]).encode())


def bytes_digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


CHUNK = 1 << 20


def open_file_digest(f) -> str:
    """xxh3-128 of an open binary file, read into one reused buffer: raw xxhash speed, no
    new bytes object per chunk. Not mmap: a file truncated under a mapping kills the
    process with SIGBUS."""
    h = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return open_file_digest(f)
