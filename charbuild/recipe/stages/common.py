"""Helpers shared by the recipe's stages (not by the engine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from charbuild.spec.model import Spec

TINY_PREFIX = "tiny:"
DATA_DIR = Path(__file__).resolve().parents[2] / "data"  # prompts, greetings, traits shipped with charbuild


def model_inputs(spec: Spec, role: str) -> dict[str, list[str]]:
    """A model that charbuild builds itself is an input target like any other."""
    m = spec.models[role]
    if m.model.startswith(TINY_PREFIX):
        return {f"model:{role}": [f"tiny/{m.model[len(TINY_PREFIX):]}"]}
    return {}


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def data_digest(name: str) -> str:
    """Digest of a data file shipped with charbuild: content a stage is keyed on."""
    import xxhash

    return xxhash.xxh3_128_hexdigest((DATA_DIR / name).read_bytes())


def item_seed(stage: str, item: int, base: int = 0) -> int:
    """A per-item seed that does not depend on batch composition or shard layout."""
    import xxhash

    return xxhash.xxh32_intdigest(f"{stage}:{item}".encode(), seed=base) & 0x7FFFFFFF
