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


class DataFileError(ValueError):
    """A JSONL file that cannot be read as rows: the message names the file and line."""


def read_jsonl(path: Path) -> Iterator[dict]:
    """The rows (JSON objects) of a JSONL file, blank lines skipped (see `jsonl_rows`)."""
    return (row for _, row in jsonl_rows(path))


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSONL file, blank lines skipped. A line that is not UTF-8,
    not JSON or not an object is an error naming the file, line and column: user files
    (prompt pools, `charbuild check`) come through here too, and a traceback or a
    silently skipped row would hide which line to fix."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        why = "is a directory; give a JSONL file" if isinstance(exc, IsADirectoryError) else (
            "not found" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc)).lower())
        raise DataFileError(f"{path}: {why}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                col = len(raw[:exc.start].decode("utf-8", "replace")) + 1
                raise DataFileError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {col}); "
                                    "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise DataFileError(f"{path}:{lineno}: not JSON ({why})") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            yield lineno, row


def data_digest(name: str) -> str:
    """Digest of a data file shipped with charbuild: content a stage is keyed on."""
    import xxhash

    return xxhash.xxh3_128_hexdigest((DATA_DIR / name).read_bytes())


def item_seed(stage: str, item: int, base: int = 0) -> int:
    """A per-item seed that does not depend on batch composition or shard layout."""
    import xxhash

    return xxhash.xxh32_intdigest(f"{stage}:{item}".encode(), seed=base) & 0x7FFFFFFF


def sample_seed(stage: str, prompt_id: str, sample: int) -> int:
    """The seed of one sample of one prompt, whatever item, shard or scale asks it: a new
    prompt order, pool size or samples_per_prompt leaves every answered call reusable."""
    import xxhash

    return xxhash.xxh32_intdigest(f"{stage}:{prompt_id}:{sample}".encode()) & 0x7FFFFFFF


LOCAL_BACKENDS = ("transformers", "vllm")


def local_model_resources(stage, target, spec) -> dict:
    """`Stage.resources` of a stage that generates with a model role: GPUs when one of the
    target's roles is a local model other than the tiny ones charbuild trains (those are
    CPU-sized), else one CPU (API calls spend their time waiting). As many GPUs as the
    widest of those models spans (a vLLM role's tensor_parallel_size: its engine starts
    only where it sees them all); the backends hold one local model at a time."""
    gpus = 0
    for path, value in target.fields.items():
        if path.count(".") == 1 and path.startswith("models.") and isinstance(value, dict):
            if value.get("backend") in LOCAL_BACKENDS and not str(value.get("model", "")).startswith(TINY_PREFIX):
                gpus = max(gpus, spec.spec.models[path.split(".")[1]].tensor_parallel_size or 1)
    return {"num_cpus": 1, "num_gpus": gpus} if gpus else {"num_cpus": 1}


def training_resources(stage, target, spec) -> dict:
    """`Stage.resources` of a training stage: one GPU unless the student is tiny, however
    many its vLLM engine spans. The trainer is one process that puts the model on one
    device; shown more, transformers' Trainer would replicate it on each (DataParallel) and
    multiply the batch by their count, training another adapter under the same key."""
    wants = local_model_resources(stage, target, spec)
    return {**wants, "num_gpus": 1} if wants.get("num_gpus") else wants
