"""Content keys: canonical JSON hashed with xxhash (128-bit).

Every key hashes a list led by a kind tag (as redun does), so an action key can never
collide with a file digest or a spec digest. Bump KEY_SCHEMA_VERSION when the meaning of
a key changes (what goes into it, not what a stage does: stages carry their own version).
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


def action_key(stage: str, version: int, fields: dict, params: dict, input_keys: dict[str, list[str]]) -> str:
    """The key of one target: what it does (stage+version), what it reads, what it consumes."""
    return digest("Action", stage, version, fields, params, input_keys)


def bytes_digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Files outside the spec chain that a graph was keyed on (prompt pools...): the plan memo
# re-checks them, so editing one is never missed by a fast null plan.
FILES_READ: set[Path] = set()


def source_digest(path: str | Path) -> str:
    """Digest of an input file named by a spec, remembered as a plan dependency."""
    FILES_READ.add(Path(path).resolve())
    return file_digest(path)
