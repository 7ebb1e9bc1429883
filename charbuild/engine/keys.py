"""Action keys: what a target does (stage + version), what it reads, what it consumes.

Built on the store's hashing primitives; the kind tags keep action, cutoff and call keys
apart.
"""

from __future__ import annotations

from pathlib import Path

from charbuild.store.hashing import digest, file_digest


def action_key(stage: str, version: int, fields: dict, params: dict, input_keys: dict[str, list[str]]) -> str:
    """The key of one target: what it does (stage+version), what it reads, what it consumes."""
    return digest("Action", stage, version, fields, params, input_keys)


def cutoff_key(stage: str, version: int, fields: dict, params: dict, input_contents: dict[str, list[str]]) -> str:
    """The action key with the inputs' *content* digests in place of their keys (Bazel's
    early cutoff): equal when an upstream rebuild produced byte-identical files."""
    return digest("Cutoff", stage, version, fields, params, input_contents)


# Files outside the spec chain that a graph was keyed on (prompt pools...): the plan memo
# re-checks them, so editing one is never missed by a fast null plan.
FILES_READ: set[Path] = set()


def source_digest(path: str | Path) -> str:
    """Digest of an input file named by a spec, remembered as a plan dependency."""
    FILES_READ.add(Path(path).resolve())
    return file_digest(path)
