"""The stage contract: everything the engine knows about a stage, and everything a
stage may implement, in one file.

A stage declares its name, a hand-bumped `version`, the spec fields it `reads`, and
turns a spec into `TargetDef`s (one, or one per shard). The engine keys, plans, caches
and runs those targets without knowing what DPO is. Besides `targets`, `estimate` and
`run`, a stage may implement the optional hooks of `Stage` (sub-builds, publishing,
gating, counting cached calls, what a target asks of a cluster); their defaults do
nothing. What a build needs from outside the engine (generation backends, the call
cache, prices) comes in a `Services` object made by the layer above and handed to the
stage's contexts untouched (a remote executor gets a factory of it instead).

Every value a stage uses is in its key: `targets()`, `enabled()`, `sub_builds()` and
`estimate()` (through `EstimateContext.view`) see only the spec fields the stage declares
in `reads`, and `run()` sees only the fields its target is keyed on, plus NoKey fields
(charbuild.spec.guard). Any other read raises `UndeclaredRead`.

Heavy libraries (torch, TRL) are imported inside `run()` only, and this module imports
neither pydantic nor the spec models, so a null `plan` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from concurrent.futures import Future
    from typing import Callable

    from charbuild.spec.model import LoadedSpec


@dataclass
class Estimate:
    """What building a target is expected to cost. `usd` and `api_tokens` are the API
    calls' dollars and tokens: what `budget.max_usd` and `budget.max_tokens` cap (see
    charbuild.ledger). Local models cost GPU time: `gpu_hours`, and `gpu_usd` at the price
    table's GPU rate, informational only (no budget counts it). `tokens_in`/`tokens_out`
    count every call's tokens, API and local."""

    tokens_in: int = 0
    tokens_out: int = 0
    usd: float = 0.0  # API dollars
    gpu_hours: float = 0.0
    calls: int = 0
    calibrated: bool = False  # from measured usage rather than the spec's expectations
    # The range of output tokens (and dollars) from the measured length distribution.
    tokens_out_p50: int = 0
    tokens_out_p90: int = 0
    usd_p90: float = 0.0
    gpu_usd: float = 0.0  # informational: gpu_hours at the price table's GPU rate
    api_tokens: int = 0  # input + output tokens of API calls
    # Some of `usd` is at the price table's fallback rate: a model no table prices.
    price_unknown: bool = False
    # The API dollars online and through the batch API: `usd` is the one of the two the
    # run will pay (its role's `mode`); `plan` shows both. `batch`: some calls go in batches.
    usd_online: float = 0.0
    usd_batch: float = 0.0
    batch: bool = False

    def __add__(self, o: "Estimate") -> "Estimate":
        return Estimate(self.tokens_in + o.tokens_in, self.tokens_out + o.tokens_out, self.usd + o.usd,
                        self.gpu_hours + o.gpu_hours, self.calls + o.calls, self.calibrated and o.calibrated,
                        self.tokens_out_p50 + o.tokens_out_p50, self.tokens_out_p90 + o.tokens_out_p90,
                        self.usd_p90 + o.usd_p90, self.gpu_usd + o.gpu_usd, self.api_tokens + o.api_tokens,
                        self.price_unknown or o.price_unknown, usd_online=self.usd_online + o.usd_online,
                        usd_batch=self.usd_batch + o.usd_batch, batch=self.batch or o.batch)

    def scaled(self, f: float) -> "Estimate":
        return Estimate(int(self.tokens_in * f), int(self.tokens_out * f), self.usd * f, self.gpu_hours * f,
                        int(round(self.calls * f)), self.calibrated, int(self.tokens_out_p50 * f),
                        int(self.tokens_out_p90 * f), self.usd_p90 * f, self.gpu_usd * f, int(self.api_tokens * f),
                        self.price_unknown, usd_online=self.usd_online * f, usd_batch=self.usd_batch * f,
                        batch=self.batch)

    def to_dict(self) -> dict:
        return {"tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "usd": round(self.usd, 4),
                "gpu_hours": round(self.gpu_hours, 4), "calls": self.calls, "gpu_usd": round(self.gpu_usd, 4),
                "api_tokens": self.api_tokens}


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
    """Read access to the spec for `targets()`, `enabled()`, `sub_builds()` and `estimate()`:
    `spec` and `loaded.spec` are guarded (charbuild.spec.guard), so reading a path outside
    the stage's declared `reads` raises `UndeclaredRead`; `read` also keys what it reads."""

    def __init__(self, loaded: LoadedSpec, allowed: tuple[str, ...], stage: str, hook: str = "targets"):
        from charbuild.spec.guard import Access, GuardedLoaded, access_of, raw_loaded

        # Made from an already guarded spec (a helper inside run()), the view can only narrow it.
        self._access = Access(stage, allowed, hook, parent=access_of(loaded))
        self._raw = raw_loaded(loaded)
        self.loaded = GuardedLoaded(self._raw, self._access)
        self.spec = self.loaded.spec
        self._allowed = tuple(allowed)
        self._stage = stage

    def read(self, dotted: str, fields: dict) -> Any:
        """The value at a dotted path (guarded), entered into `fields` as it enters the key."""
        from charbuild.spec.guard import read_path
        from charbuild.spec.model import key_view

        if not self._access.may(dotted, False):
            raise self._access.refuse(dotted)
        value = read_path(self.spec, dotted)
        raw: Any = self._raw.spec
        for part in dotted.split("."):
            raw = raw[part] if isinstance(raw, dict) else getattr(raw, part)
        fields[dotted] = key_view(raw)
        return value

    @property
    def touched(self) -> list[str]:
        """The spec paths read through this view."""
        return sorted(self._access.touched)


class Stage:
    name: ClassVar[str]
    version: ClassVar[int] = 1
    cacheable: ClassVar[bool] = True
    reads: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # The stage's targets read the manifests of every other target (a report): the engine
    # fills their "all" input slot with every target that does not also read everything.
    reads_every_target: ClassVar[bool] = False

    def enabled(self, spec: SpecView) -> bool:
        return True

    def targets(self, spec: SpecView) -> list[TargetDef]:
        raise NotImplementedError

    def estimate(self, target: TargetDef, ctx: "EstimateContext") -> Estimate:
        return Estimate()

    def run(self, ctx: "BuildContext") -> dict | None:
        """Write the target's files into ctx.out_dir; return usage/metrics for the manifest."""
        raise NotImplementedError

    # -- optional hooks: the engine calls each of these; the defaults do nothing --------------

    def sub_builds(self, spec: SpecView) -> list[tuple[str, "LoadedSpec"]]:
        """Other builds of the same recipe that join this graph under a prefix, as
        (prefix, spec) pairs: an ablation's other data scales. Targets equal by key to a
        main target are merged into it."""
        return []

    def gated(self, target: TargetDef) -> list[str]:
        """Targets this target validates (a gate): whatever consumes them waits for it,
        without it entering their keys (a new threshold must not retrain an adapter)."""
        return []

    def publish(self, target: TargetDef) -> list[tuple[str, str]]:
        """Files of a built target to copy to outputs/<run>/, as (path inside the object,
        name under outputs/<run>/); "." names the object's top-level files."""
        return []

    def resources(self, target: TargetDef, spec: SpecView) -> dict[str, float]:
        """What building `target` takes from a cluster, as Ray's task options (`num_cpus`,
        `num_gpus`, `memory`): a remote executor places the target where they are free; the
        local executor ignores them. Decided from the target and its spec as the stage's
        `reads` allow (NoKey fields included: how many GPUs a model is spread over is in no
        key), so the driver can ask before anything runs."""
        return {"num_cpus": 1}

    def count_calls(self, ctx: "BuildContext", estimate: Estimate) -> tuple[Estimate, dict] | None:
        """For `plan`, on a stale target whose inputs are built: how many of its calls are
        already answered, and the estimate priced for the new ones only. The dict holds
        at least "cached" and "new"; None when the stage cannot tell."""
        return None


class Services(Protocol):
    """What a build needs from above the engine, made by the layer above (for the recipe:
    its backends, call cache, prices and measured lengths). The engine passes it to every
    context untouched, asks it only these, and closes it when the build ends."""

    def estimate_context(self, loaded: "LoadedSpec") -> "EstimateContext": ...

    def preflight(self, loaded: "LoadedSpec", targets: list[TargetDef]) -> list[str]:
        """Problems that must stop a build before anything is spent (a missing API key)."""
        ...

    def versions(self) -> dict[str, str]:
        """Versions of the libraries the stages used, for every manifest."""
        ...

    def interrupt(self, now: bool = False) -> None:
        """Ctrl-C: make the calls the stages are waiting on end soon (`now`: at once), keeping
        every answer that arrives. Called from any thread, a signal handler included, so it
        takes no lock."""
        ...

    def close(self) -> None: ...

    # Optional (the engine asks with getattr): a remote executor cannot ship the services
    # themselves (they hold sockets and models), only a way to make them again.
    def for_workers(self) -> "Callable[[Any, Shared], Services] | None":
        """A picklable `factory(cache, shared) -> Services` that makes these services again
        in a worker process, maybe on another machine, from that process's own handle on
        the cache and the run's `Shared` state; None when they cannot be made elsewhere."""
        ...


class Shared(Protocol):
    """What every worker of one run shares, wherever it runs (a remote executor makes it,
    e.g. a Ray actor): the run's one ledger, and objects made once per run whose methods
    any worker may call (one rate limiter per endpoint and model)."""

    ledger: Any  # the run's one ledger (charbuild.ledger.Ledger's interface)

    def get(self, key: str, make: "Callable[[], Any]") -> "Callable[..., Future]":
        """The run's one object under `key`, made by the picklable `make()` on first use
        where the shared state lives; returns `call(method, *args)`, which calls one of
        its methods there and gives a concurrent.futures.Future of the result."""
        ...


# The shared state answers at once (nothing there waits: a rate limiter hands out the wait,
# the ledger a yes or no), so a call unanswered this long is lost, not slow. It fails rather
# than block a worker (its backend's event loop, and with it the Ctrl-C that would stop the
# batch) for good.
SHARED_PATIENCE_S = 60.0


class SharedLost(RuntimeError):
    pass


def shared_answer(call: "Callable[..., Future]", method: str, *args) -> Any:
    """The answer of the run's shared state to one `call(method, *args)` (`Shared.get`'s, or
    the ledger's), waited for at most SHARED_PATIENCE_S."""
    from concurrent.futures import TimeoutError as Timeout

    try:
        return call(method, *args).result(timeout=SHARED_PATIENCE_S)
    except Timeout:
        raise SharedLost(f"the run's shared state did not answer {method!r} within {SHARED_PATIENCE_S:g} s: "
                         f"its process or its connection to this worker is gone") from None


@dataclass
class EstimateContext:
    loaded: "LoadedSpec"  # guarded after construction: a stage reads the spec through view(self)
    services: Any = None  # what the estimates need from above the engine (prices, measured lengths)
    prices: Any = None  # the one price table (charbuild.spec.prices.PriceTable)
    calibration: Any = None  # measured tokens per call, from earlier builds
    system_prompt_tokens: int = 0
    deadline_hours: float | None = None  # budget.deadline_hours (NoKey): resolves a role's `mode: auto`

    def __post_init__(self) -> None:
        from charbuild.spec.guard import Access, GuardedLoaded, raw_loaded

        self._raw_loaded = raw_loaded(self.loaded)
        self.loaded = GuardedLoaded(self._raw_loaded, Access("<estimate>", (), "estimate"))

    def view(self, stage: "Stage") -> SpecView:
        """The spec as `stage.estimate()` may read it: what the stage declares in `reads`."""
        return SpecView(self._raw_loaded, stage.reads, stage.name, "estimate")


@dataclass
class BuildContext:
    target: TargetDef
    key: str
    loaded: "LoadedSpec"
    out_dir: Path
    inputs: dict[str, list[Path]]  # slot -> artifact dirs of the input targets, in order
    services: Any = None  # made by the layer above the engine (see Services)
    budget: Any = None  # the run's charbuild.ledger.Ledger (its caps and what was spent); None in plans
    progress: bool = True
    force_gates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # run() sees the spec only through the guard: the paths its target is keyed on (and
        # NoKey fields), never the raw spec, the constitution file or a sub-build's spec.
        from dataclasses import replace

        from charbuild.spec.guard import Access, GuardedLoaded, raw_loaded

        raw = raw_loaded(self.loaded)
        hook = "run" if self.budget is not None else "count_calls"
        self._access = Access(self.target.stage, tuple(self.target.fields), hook, self.target.name, self.key,
                              nokey=True)
        self.loaded = GuardedLoaded(raw, self._access)
        if self.target.spec is not None:
            self.target = replace(self.target, spec=self.loaded)

    @property
    def spec(self):
        """The guarded spec: reading a path outside the target's key raises UndeclaredRead."""
        return self.loaded.spec

    @property
    def touched(self) -> list[str]:
        """The spec paths this target read so far (a subset of its keyed fields and NoKey fields)."""
        return sorted(self._access.touched)

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


def shard_of(name: str) -> str | None:
    """The target whose shard `name` is (`x/shard-0003` -> `x`), else None."""
    head, sep, tail = name.rpartition("/shard-")
    return head if sep and tail.isdigit() else None


def shard_group(name: str) -> str:
    """How a target is shown among its sibling shards (`x/shard-0003` -> `x/shard-*`); any
    other name as it is."""
    base = shard_of(name)
    return name if base is None else f"{base}/shard-*"
