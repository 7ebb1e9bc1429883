"""The spec: what a user declares in YAML, validated with pydantic.

Defaults are the paper's (arXiv 2511.01689): LoRA r=64 alpha=128, batch 32, lr 5e-5,
DPO beta 0.1, chosen-NLL 0.1, T=0.7, top-p 0.95, 1,500 pairs, 10 x 1,000 reflections,
2,000 x 10-turn self-interactions.

Cache keys. A stage keys the fields it reads (`SpecView.read` in `targets()`), and its
`run()` sees only those (charbuild.spec.guard): every value a stage uses is in its key.
Fields marked `NoKey` are left out of every key, and a run may read them anywhere, so a
field is NoKey only if it cannot change any output byte nor any accept/reject decision
(a gate, a training-health rule). Each one, and why:

- models.*.api_key_env: the *name* of the variable holding the key; the same endpoint and
  model answer the same requests whichever account pays.
- models.*.concurrency, rpm, tpm: how many requests are in flight and how fast they go
  out; every request carries its own seed and its answer is matched back to it, so
  pacing changes when an answer arrives, not what it is.
- models.*.price, prices: dollars for estimates and the budget ledger. A budget can stop
  a build, but it never changes a committed target (finished targets are kept as built).
- models.*.size: the size class for GPU-hour estimates only.
- expect.*: expected lengths for estimates before anything was measured.
- description: free text no stage reads.

Keyed although they look operational:
- models.*.batch_size: the transformers backend batches requests with left padding; each
  row samples from its own seeded generator, but batched and unbatched forward passes
  differ in the last bits, which in bf16 on a GPU can flip a sample that sits on a
  boundary (charbuild.backends.transformers_backend). A new batch size reruns the
  generation targets, whose calls the call cache answers (call keys have no batch size).
- training.*.micro_batch_size: changes gradient accumulation (sums over micro-batches in
  a different order, different padding per micro-batch): different numerics.
- training.*.report_to: logging integrations may write their files (tensorboard events)
  into the trainer's directory inside the adapter object.
- training.*.health: the health rules accept or reject an adapter (see HealthSpec).
- gates.*.severity: whether a failing gate blocks what consumes its target.
- budget.*: no stage reads it (the ledger does), so it is in no key either way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from charbuild.spec.defaults import GATE_CHECKS, ROLE_STOPS, default_gates
from charbuild.spec.loader import Loc, SpecError, apply_set, load_layers, where

NOKEY = {"nokey": True}

# A build graph may hold at most this many targets, data shards included (README, "Specs"):
# the data sizes are checked against it here, the whole graph as it is collected
# (charbuild.engine.graph). The paper's recipe has about 190; `plan` over 5,000 takes seconds.
MAX_TARGETS = 5_000


def NoKey(default: Any = None, **kw: Any) -> Any:
    if "default_factory" in kw:
        return Field(json_schema_extra=NOKEY, **kw)
    return Field(default, json_schema_extra=NOKEY, **kw)


class _Model(BaseModel):
    # inf and nan are refused in every number: they cannot enter a key (JSON has neither)
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _plain_values(cls, v: Any) -> Any:
        """What typed fields refuse, refused in free-form ones too (gate options): non-finite
        numbers, and NUL characters in any text (no path, prompt or model id holds one)."""
        _refuse_odd_values(v)
        return v


def _refuse_odd_values(value: Any) -> None:
    """Without recursion, each container once (free-form values may be deep or shared)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\0" in v:
                raise ValueError("NUL characters are not allowed")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError("non-finite numbers (inf, nan) are not allowed")
        elif isinstance(v, (dict, list, tuple)) and id(v) not in seen:
            seen.add(id(v))
            stack += [x for kv in v.items() for x in kv] if isinstance(v, dict) else list(v)


def _not_blank(v: Optional[str]) -> Optional[str]:
    if v is not None and not v.strip():
        raise ValueError("must not be empty")
    return v


class Sampling(_Model):
    temperature: float = Field(0.7, ge=0, le=2, description="sampling temperature (paper 0.7)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling (paper 0.95)")
    max_tokens: int = Field(1024, ge=1, description="max new tokens per generation")
    repetition_penalty: float = Field(1.1, gt=0, description="HF/vLLM style; OCT uses 1.1 (the humorous run had none)")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI style penalty, 0 = off")
    stop: list[str] = Field(default_factory=lambda: list(ROLE_STOPS), description="stop strings besides EOS")


class Price(_Model):
    input: float = Field(ge=0, description="USD per 1M input tokens")
    output: float = Field(ge=0, description="USD per 1M output tokens")


class ModelSpec(_Model):
    backend: Literal["openai", "transformers", "vllm"]
    model: str = Field(description="model id, local path, or tiny:teacher / tiny:student for charbuild's toy models")
    revision: Optional[str] = Field(None, description="model revision or weights digest (part of the key)")
    base_url: Optional[str] = Field(None, description="OpenAI-compatible endpoint (openai backend)")
    api_key_env: Optional[str] = NoKey("OPENAI_API_KEY", description="NAME of the env var holding the key (not keyed)")
    concurrency: int = NoKey(16, ge=1, description="requests in flight (openai); not keyed: each request is seeded "
                                                  "and answered on its own")
    batch_size: int = Field(16, ge=1, description="generation batch (transformers backend); keyed: padding and batched "
                                                  "matmuls can flip a bf16 sample (see the module docstring)")
    rpm: Optional[int] = NoKey(None, ge=1, description="requests per minute limit (pacing only, not keyed)")
    tpm: Optional[int] = NoKey(None, ge=1, description="tokens per minute limit (pacing only, not keyed)")
    sampling: Sampling = Field(default_factory=Sampling)
    price: Optional[Price] = NoKey(None, description="overrides the price table for this model (estimates and the "
                                                     "budget ledger; not keyed)")
    size: Optional[str] = NoKey(None, description="size class for GPU-hour estimates (tiny, 8b, 32b...; not keyed)")

    _ids_not_blank = field_validator("model", "revision")(_not_blank)

    @model_validator(mode="after")
    def _backend_needs(self) -> "ModelSpec":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("the openai backend needs base_url (any OpenAI-compatible endpoint)")
        if self.backend == "openai" and self.model.startswith("tiny:"):
            raise ValueError("tiny: models are local; use backend: transformers")
        return self


class Expect(_Model):
    """Expected lengths before any call was made; replaced by measured ones after a build.
    Estimates only: no stage's run() reads them, so none is keyed."""

    prompt_tokens: int = NoKey(60, ge=1)
    response_tokens: int = NoKey(400, ge=1)
    reflection_tokens: int = NoKey(600, ge=1)
    turn_tokens: int = NoKey(150, ge=1)


class PromptsSpec(_Model):
    general: str = Field("builtin:prompts-general", description="JSONL prompt pool (path, builtin:NAME or hf:DATASET)")
    general_limit: Optional[int] = Field(None, ge=0, description="use at most this many general prompts")
    per_trait: int = Field(50, ge=0, description="questions per trait after teacher expansion (paper: 50)")
    expansion_max_tokens: int = Field(1500, ge=16)


class DataSpec(_Model):
    dpo_pairs: int = Field(1500, ge=0)
    reflections: int = Field(10000, ge=0, description="reflection samples (10 prompts x N)")
    interactions: int = Field(2000, ge=0)
    turns: int = Field(10, ge=1, description="turns per self-interaction")
    shard_size: int = Field(100, ge=1)
    scale: float = Field(1.0, gt=0, le=1.0, description="multiplies every data size (ablations: 0.25, 0.5, ...)")
    prompts: PromptsSpec = Field(default_factory=PromptsSpec)

    def count(self, field: str) -> int:
        n = getattr(self, field)
        return max(1, round(n * self.scale)) if n else 0

    @model_validator(mode="after")
    def _shards_bounded(self) -> "DataSpec":
        """Each shard is a target: refuse sizes that would make the graph too large to plan,
        before a single target is made."""
        shards = {f: -(-self.count(f) // self.shard_size) for f in ("dpo_pairs", "reflections", "interactions")}
        total = sum(shards.values())
        if total > MAX_TARGETS:
            worst = max(shards, key=shards.get)
            raise PydanticCustomError(
                "too_many_targets",
                f"{self.count(worst):,} items in shards of {self.shard_size:,} make {shards[worst]:,} shards "
                f"({total:,} with the other data sizes); a build may have at most {MAX_TARGETS:,} targets: "
                "raise data.shard_size or lower the data sizes", {"at_field": worst})
        return self


class FilterSpec(_Model):
    min_chars: int = Field(20, ge=0)
    max_chars: int = Field(20000, ge=1)
    check_refusal: bool = True
    truncate_turns: bool = True
    first_n: int = Field(100, ge=1, description="abort a stage when the first N samples fail too often")
    max_failure_rate: float = Field(0.5, ge=0, le=1)


class IntrospectionSpec(_Model):
    generator: str = Field("dpo-student", description="dpo-student (paper) or a model role such as teacher")
    reflection_max_tokens: int = Field(2048, ge=1)
    turn_max_tokens: int = Field(1024, ge=1)
    keep_think_reflections: bool = True
    keep_think_interactions: bool = False
    reflection_filters: FilterSpec = Field(default_factory=lambda: FilterSpec(min_chars=100))


class LoraSpec(_Model):
    r: int = Field(64, ge=1)
    alpha: int = Field(128, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class HealthSpec(_Model):
    """Training-health gates (the field report's kill criteria 10.4): the build stops there.

    Keyed, with the rest of the training settings: a health rule decides whether an adapter
    is accepted (a tripped rule stops training and saves no adapter), so an adapter built
    under other thresholds must not be served for these. A new threshold retrains."""

    enabled: bool = True
    max_dpo_loss: float = Field(2.0, gt=0, description="DPO loss (incl. the NLL term) above this after warm-up stops")
    min_reward_accuracy: float = Field(0.5, ge=0, le=1, description="DPO reward accuracy below this after warm-up stops")
    warmup_steps: int = Field(5, ge=0)
    flat_steps: int = Field(10, ge=1, description="loss unchanged for more steps than this stops")


class TrainSpec(_Model):
    lora: LoraSpec = Field(default_factory=LoraSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    batch_size: int = Field(32, ge=1, description="effective batch (micro x accumulation)")
    micro_batch_size: int = Field(2, ge=1, description="per-device batch; keyed: accumulation order and padding "
                                                       "change the numerics")
    lr: float = Field(5e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1, description="cap on optimizer steps (smoke builds)")
    max_length: int = Field(1024, ge=16)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    seed: int = 123456
    merge: bool = Field(False, description="fold the adapter into the base for the next stage")
    report_to: list[str] = Field(default_factory=list, description="TRL logging integrations (tensorboard, wandb); "
                                                                     "keyed: they may write into the adapter object")


class DPOTrainSpec(TrainSpec):
    beta: float = Field(0.1, gt=0)
    nll_coef: float = Field(0.1, ge=0, description="chosen-NLL weight, TRL loss_type [sigmoid, sft]")
    checkpoints_at: list[float] = Field(default_factory=list, description="data fractions to save adapters at")


class SFTTrainSpec(TrainSpec):
    max_length: int = Field(3072, ge=16)


class TrainingSpec(_Model):
    dpo: DPOTrainSpec = Field(default_factory=DPOTrainSpec)
    sft: SFTTrainSpec = Field(default_factory=SFTTrainSpec)


class GateSpec(_Model):
    check: str = Field(description="marker_rate, differ, refusal_rate, invented_turn_rate, repetition_rate, garbage_rate, length_rate")
    target: str = Field(description="the target the gate checks: dpo-pairs or sft-data")
    threshold: float = Field(description="marker_rate/differ: minimum; *_rate: maximum")
    severity: Literal["error", "warn"] = Field("error", description="error stops the build, warn reports and goes on "
                                                                    "(keyed: it decides whether consumers may run)")
    enabled: bool = True
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("check")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in GATE_CHECKS:
            raise ValueError(f"unknown check {v!r} (known: {', '.join(GATE_CHECKS)})")
        return v


class EvalSpec(_Model):
    enabled: bool = True
    prompts: str = Field("builtin:eval-prompts", description="held-out prompts (JSONL path or builtin:NAME)")
    prompts_limit: Optional[int] = Field(None, ge=1)
    samples_per_prompt: int = Field(3, ge=1)
    variants: list[Literal["base", "dpo", "sft"]] = Field(default_factory=lambda: ["base", "dpo", "sft"])
    bootstrap: int = Field(200, ge=1)
    judge: str = Field("markers", description="a model role that judges pairs, or 'markers' (rule-based: more marker phrases wins)")
    elo: bool = True
    preferences: bool = False
    max_tokens: int = Field(512, ge=1)
    ablation_scales: list[float] = Field(default_factory=list,
                                         description="also build at these data scales and compare (e.g. [0.25, 0.5, 0.75])")

    @field_validator("ablation_scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not 0 < x <= 1]
        if bad:
            raise ValueError(f"scales must be in (0, 1], got {bad}")
        return sorted(set(v))


class BudgetSpec(_Model):
    """Caps on what API calls are billed, with one meaning everywhere: `plan` shows whether
    its estimate fits, `run` refuses to start when it does not and stops at a call
    boundary when the next API call could cross a cap (every answered call is stored:
    raise the cap and `run` continues), `status` and the report show what was charged.
    Local models' GPU time counts against neither cap: it is reported as GPU-hours with an
    informational GPU $ estimate. Calls answered from the call cache cost nothing."""

    max_usd: Optional[float] = Field(None, ge=0, description="cap on dollars billed by API models (backend: openai), "
                                     "metered per token at the price table's prices; local GPU time is not counted")
    max_tokens: Optional[int] = Field(None, ge=0, description="cap on input + output tokens of API calls; tokens of "
                                      "local models are reported, not counted")


class Spec(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    persona: str
    constitution: str = Field(description="constitution YAML, relative to the spec that names it")
    models: dict[str, ModelSpec]
    data: DataSpec = Field(default_factory=DataSpec)
    filters: FilterSpec = Field(default_factory=FilterSpec)
    introspection: IntrospectionSpec = Field(default_factory=IntrospectionSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    gates: dict[str, GateSpec] = Field(default_factory=dict, description="validation gates (defaults: gates.default_gates)")
    evals: EvalSpec = Field(default_factory=EvalSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    expect: Expect = Field(default_factory=Expect)
    prices: dict[str, Price] = NoKey(default_factory=dict, description="price overrides by model id (estimates and "
                                                                        "the budget ledger; not keyed)")
    description: str = NoKey("", description="free text; no stage reads it (not keyed)")

    _ids_not_blank = field_validator("persona", "constitution")(_not_blank)

    @field_validator("gates", mode="before")
    @classmethod
    def _default_gates(cls, v: Any) -> Any:
        """The default gates are always there; a spec overrides them by name (or disables one)."""
        if not isinstance(v, dict):
            return v
        merged = default_gates()
        for name, g in v.items():
            merged[name] = {**merged.get(name, {}), **g} if isinstance(g, dict) else g
        return merged

    @field_validator("models")
    @classmethod
    def _roles(cls, v: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        missing = {"teacher", "student"} - set(v)
        if missing:
            raise ValueError(f"models needs roles {sorted(missing)} (teacher answers with the constitution, student without)")
        return v

    @model_validator(mode="after")
    def _judge_known(self) -> "Spec":
        if self.evals.judge != "markers" and self.evals.judge not in self.models:
            raise ValueError(f"evals.judge {self.evals.judge!r} is neither 'markers' nor a role in models ({sorted(self.models)})")
        return self

    @model_validator(mode="after")
    def _generator_known(self) -> "Spec":
        gen = self.introspection.generator
        if gen != "dpo-student" and gen not in self.models:
            raise ValueError(f"introspection.generator {gen!r} is neither dpo-student nor a role in models ({sorted(self.models)})")
        return self

    @property
    def run_name(self) -> str:
        s = self.data.scale
        return self.name if s == 1 else f"{self.name}-{round(s * 100)}pct"


class LoadedSpec:
    """A validated spec plus where it came from (files read, field locations, and the
    command line's overrides: `--set`s in order, `--scale` exactly as given)."""

    def __init__(self, spec: Spec, path: Path, files: list[Path], locs: dict, constitution_path: Path,
                 sets: list[str] | tuple[str, ...] = (), scale: float | None = None):
        self.spec = spec
        self.path = path
        self.files = files
        self.locs = locs
        self.constitution_path = constitution_path
        self.sets = tuple(sets)
        self.scale = scale

    def where(self, loc: tuple) -> Loc | None:
        return where(self.locs, loc)

    @property
    def overrides(self) -> dict:
        """What the command line changed, as provenance records it."""
        return {"set": list(self.sets), "scale": self.scale}

    @property
    def output_name(self) -> str:
        """The folder under outputs/ this build publishes to. The spec as written gets
        `run_name` (outputs/smoke-small/); a build with `--set` or `--scale` gets its own,
        named by its exact data scale and a digest of the overrides (smoke-small-25.4pct-
        1a2b3c4d), so builds that differ only on the command line, or in scales that round
        to the same percent, never overwrite each other."""
        if not self.sets and self.scale is None:
            return self.spec.run_name
        import hashlib
        import json
        from decimal import Decimal

        digest = hashlib.sha256(json.dumps(self.overrides, sort_keys=True).encode()).hexdigest()[:8]
        s = self.spec.data.scale
        pct = "" if s == 1 else "-" + format((Decimal(repr(s)) * 100).normalize(), "f") + "pct"
        return f"{self.spec.name}{pct}-{digest}"

    def with_scale(self, scale: float) -> "LoadedSpec":
        """The same spec at another data scale (an ablation's sub-build): no further ablation."""
        s = self.spec
        spec = s.model_copy(update={"data": s.data.model_copy(update={"scale": scale}),
                                    "evals": s.evals.model_copy(update={"ablation_scales": []})})
        return LoadedSpec(spec, self.path, self.files, self.locs, self.constitution_path, self.sets, scale)


def load_raw(path: str | Path, sets: list[str] = (), scale: float | None = None) -> tuple[dict, dict, list[Path]]:
    data, locs, files = load_layers(path)
    for s in sets:
        apply_set(data, locs, s)
    if scale is not None:
        apply_set(data, locs, f"data.scale={scale}")
        locs[("data", "scale")] = Loc("--scale", None)
    return data, locs, files


def load_spec(path: str | Path, sets: list[str] = (), scale: float | None = None) -> LoadedSpec:
    path = Path(path)
    data, locs, files = load_raw(path, sets, scale)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_located(e, locs) for e in exc.errors(include_url=False)]) from None
    # A relative constitution path is relative to the file that wrote it, not the cwd.
    origin = where(locs, ("constitution",))
    base = Path(origin.file).parent if origin and origin.line else Path.cwd()
    cpath = (base / spec.constitution) if not Path(spec.constitution).is_absolute() else Path(spec.constitution)
    if not cpath.is_file():
        # a FIFO or a device would block or never end when it is read: only a regular file
        what = ("is a directory" if cpath.is_dir() else "is not a regular file (a FIFO or a device?)"
                if cpath.exists() else "not found")
        raise SpecError([{"type": "file_missing", "loc": ("constitution",), "where": str(origin or path),
                          "msg": f"constitution file {what}: {cpath}"}])
    return LoadedSpec(spec, path, files, locs, cpath.resolve(), sets, scale)


def _located(err: dict, locs: dict) -> dict:
    loc = tuple(err["loc"])
    w = where(locs, loc)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field" + _suggest(loc)
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "finite_number":
        msg = "must be a finite number (inf and nan are not allowed)"
    at_field = (err.get("ctx") or {}).get("at_field")  # a model's check that names one of its fields
    if at_field:
        loc += (at_field,)
        w = where(locs, loc)
    out = {"type": err["type"], "loc": loc, "msg": msg, "where": str(w) if w else "?"}
    if err["type"] != "missing":
        out["input"] = err.get("input")
    return out


def _suggest(loc: tuple) -> str:
    """' (did you mean X?)' from the fields the enclosing model really has."""
    import difflib

    model: Any = Spec
    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return ""
        f = model.model_fields.get(str(part))
        if f is None:  # a dict key such as a model role: step into the dict's value type
            continue
        subs = _models_in(f.annotation)
        model = subs[0] if subs else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(model.model_fields)})"


def _models_in(ann: Any) -> list:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in typing.get_args(ann) for m in _models_in(a)]


def key_view(value: Any) -> Any:
    """A spec value as it enters cache keys: JSON data without the NoKey fields."""
    if isinstance(value, BaseModel):
        from charbuild.spec.guard import is_nokey_field

        cls = type(value)
        return {name: key_view(getattr(value, name)) for name in cls.model_fields if not is_nokey_field(cls, name)}
    if isinstance(value, dict):
        return {str(k): key_view(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [key_view(v) for v in value]
    return value
