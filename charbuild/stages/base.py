"""The stage contract: the only thing the engine knows about a stage.

A stage declares its name, a hand-bumped `version`, the spec fields it `reads`, and
turns a spec into `TargetDef`s (one, or one per shard). The engine keys, plans, caches
and runs those targets without knowing what DPO is. Heavy libraries (torch, TRL) are
imported inside `run()` only, so `plan` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..estimate import Estimate  # noqa: F401  (re-exported for stages)
from ..spec import LoadedSpec, key_view


@dataclass
class TargetDef:
    name: str
    stage: str
    fields: dict[str, Any]  # spec path -> keyed value: what the stage read
    params: dict[str, Any] = field(default_factory=dict)  # derived, keyed (shard range...)
    inputs: dict[str, list[str]] = field(default_factory=dict)  # slot -> target names
    shard: tuple[int, int] | None = None  # (start, count) of the items this target covers
    after: list[str] = field(default_factory=list)  # ordering only (gates): never part of the key
    spec: Any = None  # the LoadedSpec of a sub-build (another data scale), when not the main spec


class SpecView:
    """Read access to the spec that records what was read, and refuses undeclared reads."""

    def __init__(self, loaded: LoadedSpec, allowed: tuple[str, ...], stage: str):
        self.loaded = loaded
        self.spec = loaded.spec
        self._allowed = allowed
        self._stage = stage

    def read(self, dotted: str, fields: dict) -> Any:
        if not any(dotted == a or dotted.startswith(a + ".") for a in self._allowed):
            raise RuntimeError(f"stage {self._stage} read {dotted!r} but declares only {self._allowed}")
        value: Any = self.spec
        for part in dotted.split("."):
            value = value[part] if isinstance(value, dict) else getattr(value, part)
        kv = key_view(value)
        fields[dotted] = kv
        return value


class Stage:
    name: ClassVar[str]
    version: ClassVar[int] = 1
    cacheable: ClassVar[bool] = True
    reads: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def enabled(self, spec: SpecView) -> bool:
        return True

    def targets(self, spec: SpecView) -> list[TargetDef]:
        raise NotImplementedError

    def estimate(self, target: TargetDef, ctx: "EstimateContext") -> Estimate:
        return Estimate()

    def run(self, ctx: "BuildContext") -> dict | None:
        """Write the target's files into ctx.out_dir; return usage/metrics for the manifest."""
        raise NotImplementedError


@dataclass
class EstimateContext:
    loaded: LoadedSpec
    prices: Any  # cost.PriceTable
    calibration: Any  # cost.Calibration
    system_prompt_tokens: int


@dataclass
class BuildContext:
    target: TargetDef
    key: str
    loaded: LoadedSpec
    out_dir: Path
    inputs: dict[str, list[Path]]  # slot -> artifact dirs of the input targets, in order
    backends: Any  # backends.pool.BackendPool
    budget: Any  # executor.Spend, to report usage as it happens
    progress: bool = True
    force_gates: tuple[str, ...] = ()
    call_cache: Any = None  # callcache.CallCache: every generation call is stored once answered

    @property
    def spec(self):
        return self.loaded.spec

    def input(self, slot: str) -> Path:
        paths = self.inputs[slot]
        if len(paths) != 1:
            raise RuntimeError(f"input {slot} has {len(paths)} artifacts, expected one")
        return paths[0]


def shard_ranges(total: int, size: int) -> list[tuple[int, int, int]]:
    """(index, start, count) per shard. Shard i covers the same items whatever the total,
    so raising a data size keeps every full shard already built."""
    return [(i, s, min(size, total - s)) for i, s in enumerate(range(0, total, size))]


def shard_name(base: str, index: int) -> str:
    return f"{base}/shard-{index:04d}"
