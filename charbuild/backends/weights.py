"""Which weights make the student for a target's inputs.

A trained target's folder (dpo-adapter, sft-adapter, final) holds `adapter/` and, where
the spec asks for it (`training.*.merge`, `training.final.merged_weights`), `merged/`: the
base with every adapter under it and its own folded in. The pool, the call keys and
`sample`/`chat` all resolve the student through `student_weights`, so what a call is keyed
on is what is loaded, and merged weights, once saved, are what the next stage uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_LORA_RANK = 64  # the paper's, for an adapter whose config cannot be read


def has_merged(target_dir: Path | str) -> bool:
    return (Path(target_dir) / "merged" / "config.json").is_file()


def student_weights(base: str, adapter: Path | str | None = None, merge: Sequence[Path | str] = (),
                    merged: Callable[[Path | str], bool] = has_merged) -> tuple[str, str | None, tuple[str, ...]]:
    """(model to load, adapter folder to apply on top, adapter folders to fold in first, in
    order) for the student `base` with the targets of the `adapter` and `merge` slots.
    `merged(target)`: whether it saved merged weights (default: look in its folder; a plan,
    before anything is built, says from the spec which targets will)."""
    if adapter is not None and merged(adapter):
        return str(Path(adapter) / "merged"), None, ()  # everything under it is folded in already
    rest = [Path(d) for d in merge]
    last = max((i for i, d in enumerate(rest) if merged(d)), default=None)
    if last is not None:
        base, rest = str(rest[last] / "merged"), rest[last + 1:]
    return base, (str(Path(adapter) / "adapter") if adapter is not None else None), tuple(str(d / "adapter") for d in rest)


def adapter_rank(adapter_dir: str | None) -> int:
    """The LoRA rank an adapter folder was saved with (vLLM must be started with at least it)."""
    try:
        return int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"])
    except (TypeError, OSError, ValueError, KeyError):
        return DEFAULT_LORA_RANK
