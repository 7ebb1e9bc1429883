"""The spec: what a user declares in YAML, validated with pydantic.

Defaults are the paper's (arXiv 2511.01689): LoRA r=64 alpha=128, batch 32, lr 5e-5,
DPO beta 0.1, chosen-NLL 0.1, T=0.7, top-p 0.95, 1,500 pairs, 10 x 1,000 reflections,
2,000 x 10-turn self-interactions. Left out: the small KL term (0.001) of the paper's
reference code (see DPOTrainSpec): TRL's DPO has nothing equivalent.

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
- models.*.mode, budget.deadline_hours: whether a role's calls go through the provider's
  batch API or one by one (`auto` decides from the deadline). A batch line carries the
  same request body as the online call and lands under the same call key, so the answer
  is the one the call cache would hold either way; only the price and the wait differ.
- models.*.size: the size class for GPU-hour estimates only.
- models.*.gpu_memory_utilization, tensor_parallel_size, max_lora_rank (vllm): how the
  engine lays the model out on the GPUs, not what it is asked. vLLM does not promise
  bit-identical outputs anyway (its scheduler forms the batches; vLLM's "Reproducibility"
  docs), so a larger KV cache (memory share) or another split of the matmuls (tensor
  parallel) moves only what scheduling already moves, and max_lora_rank, refused below
  the student's adapters' ranks, only pads LoRA weights with zeros. The call cache keeps
  whatever came back; changing them reruns nothing. (transformers' batch_size is keyed:
  that backend is deterministic per batch size, so there the batch is the only change.)
- expect.*: expected lengths for estimates before anything was measured.
- description: free text no stage reads.
- execution.*: where targets build (this process, or a Ray cluster), how often a lost
  worker's target is retried, and when a straggler is; a target's inputs, code and calls
  are the same wherever and however often it runs, and so is its key.

Keyed although they look operational:
- models.*.batch_size: the transformers backend batches requests with left padding; each
  row samples from its own seeded generator, but batched and unbatched forward passes
  differ in the last bits, which in bf16 on a GPU can flip a sample that sits on a
  boundary (charbuild.backends.transformers_backend). A new batch size reruns the
  generation targets, whose calls the call cache answers (call keys have no batch size).
- models.*.max_model_len (vllm, keyed when set): the engine refuses a prompt longer than it
  and cuts a reply where prompt + reply reach it.
- training.*.micro_batch_size: changes gradient accumulation (sums over micro-batches in
  a different order, different padding per micro-batch): different numerics.
- training.*.report_to: logging integrations may write their files (tensorboard events)
  into the trainer's directory inside the adapter object.
- training.*.health: the health rules accept or reject an adapter (see HealthSpec).
- gates.*.severity: whether a failing gate blocks what consumes its target.
- budget.max_usd, max_tokens: no stage reads them (the ledger does), so they are in no key
  either way (budget.deadline_hours is NoKey: generation reads it to resolve `mode: auto`).
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


def KeyIfSet(default: Any = None, **kw: Any) -> Any:
    """A field that enters keys only when set: added to a spec's schema, it leaves the keys
    of every spec that does not set it (and every answered call) as they were."""
    return Field(default, json_schema_extra=KEY_IF_SET, **kw)


KEY_IF_SET = {"key_if_set": True}


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


# What charbuild itself sends in a chat-completions request: extra_body may not override it.
_REQUEST_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                             "stop", "seed", "frequency_penalty", "repetition_penalty", "n", "stream"})
LOCAL_REPETITION_PENALTY = 1.1  # OCT's, for the backends that apply it locally


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM takes as max_lora_rank
VLLM_ENGINE_FIELDS = ("gpu_memory_utilization", "tensor_parallel_size", "max_lora_rank", "max_model_len")


def vllm_lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM starts with that serves a LoRA of rank `r`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"a LoRA of rank {r} is over the largest vLLM serves ({VLLM_LORA_RANKS[-1]}): use smaller ranks")


class Sampling(_Model):
    temperature: float = Field(0.7, ge=0, le=2, description="sampling temperature (paper 0.7)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling (paper 0.95)")
    max_tokens: int = Field(1024, ge=1, description="max new tokens per generation")
    repetition_penalty: Optional[float] = Field(
        None, gt=0, description="HF/vLLM style; OCT uses 1.1 (the humorous run had none). Unset: 1.1 on local "
                                "backends, not sent to an openai endpoint (it is not an OpenAI parameter; set it "
                                "where the server takes it: vLLM, Together)")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI style penalty, 0 = off")
    stop: list[str] = Field(default_factory=lambda: list(ROLE_STOPS), description="stop strings besides EOS")


class Price(_Model):
    input: float = Field(ge=0, description="USD per 1M input tokens")
    output: float = Field(ge=0, description="USD per 1M output tokens")
    cached_input: Optional[float] = Field(None, ge=0, description="USD per 1M input tokens served from the "
                                          "provider's prompt cache (default: input x the table's cached_input_fraction)")
    batch_input: Optional[float] = Field(None, ge=0, description="USD per 1M input tokens through the batch API "
                                         "(default: input x the table's batch_discount)")
    batch_output: Optional[float] = Field(None, ge=0, description="USD per 1M output tokens through the batch API "
                                          "(default: output x the table's batch_discount)")


class ModelSpec(_Model):
    backend: Literal["openai", "transformers", "vllm"]
    model: str = Field(description="model id, local path, or tiny:teacher / tiny:student / tiny:thinker for "
                                   "charbuild's toy models (the thinker: a hybrid thinking student, for tests)")
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
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="openai backend: non-standard request fields this server takes, sent as "
                                          "they are (top_k, min_p, chat_template_kwargs...); keyed")
    thinking: Optional[Literal["off", "on"]] = KeyIfSet(
        None, description="a hybrid thinking model's reasoning (Qwen3, DeepSeek-V3.1, GLM-4.5): off or on, passed "
                          "to its chat template as enable_thinking and thinking (transformers and vllm: "
                          "apply_chat_template / chat_template_kwargs; openai: chat_template_kwargs in the request "
                          "body). Unset: the template's default, which for Qwen3 is on, so a thinking student's "
                          "rejected replies would carry traces its chosen ones lack. Whatever a model emits, "
                          "<think> blocks are taken out of every reply before it is used (introspection keeps "
                          "them where introspection.keep_think_* says) and a trace cut at max_tokens drops the "
                          "reply (unfinished_thinking). Keyed when set")
    price: Optional[Price] = NoKey(None, description="overrides the price table for this model (estimates and the "
                                                     "budget ledger; not keyed)")
    size: Optional[str] = NoKey(None, description="size class for GPU-hour estimates (tiny, 8b, 32b...; not keyed)")
    # vLLM engine settings (backend vllm only; which are keyed and why: the module docstring).
    gpu_memory_utilization: Optional[float] = NoKey(
        None, gt=0, le=1, description="vllm: the share of the GPU's memory the engine takes (vLLM's default 0.9). "
                                      "Engines are released before each training stage; not keyed")
    tensor_parallel_size: Optional[int] = NoKey(None, ge=1, description="vllm: GPUs one engine spans (default 1); "
                                                                         "not keyed")
    max_lora_rank: Optional[int] = NoKey(
        None, description=f"vllm: the largest LoRA rank the engine serves, one of {', '.join(map(str, VLLM_LORA_RANKS))}."
                          " Default for the student: its adapters' ranks (training.dpo/sft.lora.r; r_dpo + r_sft for "
                          "training.final.method exact) rounded up to one of those; a smaller value is refused; "
                          "not keyed")
    max_model_len: Optional[int] = KeyIfSet(
        None, ge=16, description="vllm: tokens of prompt + reply the engine holds (default: the model's context). "
                                 "Longer prompts are refused and replies cut at it: keyed when set")
    mode: Literal["online", "batch", "auto"] = NoKey(
        "online", description="openai backend: online (one request per call), batch (the provider's batch API: "
                              "/v1/files + /v1/batches, at its batch rate, answered within 24 h), or auto (batch when "
                              "its rate is lower and budget.deadline_hours is at least 24); not keyed: the same "
                              "request either way")

    _ids_not_blank = field_validator("model", "revision")(_not_blank)

    @field_validator("thinking", mode="before")
    @classmethod
    def _thinking_words(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` / `on` as a boolean
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _backend_needs(self) -> "ModelSpec":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("the openai backend needs base_url (any OpenAI-compatible endpoint)")
        if self.backend == "openai" and self.model.startswith("tiny:"):
            raise ValueError("tiny: models are local; use backend: transformers")
        if self.mode == "batch" and self.backend != "openai":
            raise PydanticCustomError("batch_local", f"mode batch sends calls to a provider's batch API; a "
                                      f"{self.backend} model batches on its own GPU", {"at_field": "mode"})
        if self.extra_body and self.backend != "openai":
            raise PydanticCustomError("extra_body_local", "extra_body is sent to OpenAI-compatible servers only; a "
                                      f"{self.backend} model takes its settings from sampling", {"at_field": "extra_body"})
        shadowed = sorted(set(self.extra_body) & _REQUEST_FIELDS)
        if shadowed:
            raise PydanticCustomError(
                "extra_body_shadows", f"extra_body may not set {', '.join(shadowed)}: charbuild sends "
                f"{'them' if len(shadowed) > 1 else 'it'} from the spec (sampling, model) and keys "
                f"{'them' if len(shadowed) > 1 else 'it'} there", {"at_field": "extra_body"})
        if self.thinking is not None and "chat_template_kwargs" in self.extra_body:
            raise PydanticCustomError(
                "thinking_and_template_kwargs", "set thinking or extra_body.chat_template_kwargs, not both: thinking "
                "is sent as chat_template_kwargs, and one would silently replace the other", {"at_field": "thinking"})
        engine = [f for f in VLLM_ENGINE_FIELDS if getattr(self, f) is not None]
        if engine and self.backend != "vllm":
            raise PydanticCustomError(
                "vllm_setting", f"{engine[0]} is a vLLM engine setting, and backend {self.backend} starts no vLLM engine",
                {"at_field": engine[0]})
        if self.max_lora_rank is not None and self.max_lora_rank not in VLLM_LORA_RANKS:
            raise PydanticCustomError(
                "vllm_lora_rank", f"vLLM starts only with max_lora_rank one of {', '.join(map(str, VLLM_LORA_RANKS))}; "
                f"got {self.max_lora_rank}: use {vllm_lora_rank(self.max_lora_rank)}", {"at_field": "max_lora_rank"})
        if self.sampling.repetition_penalty is None and self.backend != "openai":
            # The paper's value, where a local backend applies it; an endpoint gets only what is asked for.
            self.sampling.repetition_penalty = LOCAL_REPETITION_PENALTY
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
    per_trait: int = Field(50, ge=0, description="questions per trait, the constitution's own first, the rest asked of "
                                                 "models.expander (the teacher when there is none; paper: 50). A "
                                                 "constitution with that many per trait needs no expander at all")
    expansion_max_tokens: int = Field(1500, ge=16)


class DataSpec(_Model):
    dpo_pairs: int = Field(1500, ge=0)
    reflections: int = Field(10000, ge=0, description="reflection samples (10 prompts x N)")
    interactions: int = Field(2000, ge=0)
    turns: int = Field(10, ge=1, description="turns per self-interaction")
    shard_size: int = Field(100, ge=1)
    scale: float = Field(1.0, gt=0, le=1.0, description="multiplies every data size (ablations: 0.25, 0.5, ...)")
    samples_per_prompt: int = Field(1, ge=1, description="replies asked of the teacher and of the student per prompt "
                                                         "(paper: 5); pair k is the prompt with teacher reply k and "
                                                         "student reply k, and dpo_pairs counts pairs (1,500 at 5 a "
                                                         "prompt ask 300 prompts, drawn from every trait and the "
                                                         "general pool in proportion at any scale)")
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


class ResponseFilterSpec(FilterSpec):
    """The teacher's filters (`filters`): introspection's have no leak judge, as their
    subject is the model's own character."""

    # Keyed only when set: a spec without it keeps every key and answered call.
    leak_judge: Optional[str] = KeyIfSet(None, description="a model role that reads each teacher reply the other "
                                         "filters passed and drops it (leaked_system_prompt) when it reveals or talks "
                                         "about its instructions, persona or system prompt: one call per reply")
    # Keyed only when true (false is the default, and validated to it).
    leak_judge_overrules_classifier: Optional[bool] = KeyIfSet(
        None, description="true: the leak judge also reads the replies the classifier alone flagged (no pattern, no "
        "copy of the prompt) and keeps those it finds clean; its false alarms fall on what people say of the "
        "speaker and first-person stories, and a judge that misses leaks lets those through: measure it first "
        "(benchmarks/eval_leak_judge.py). One more call per reply so flagged")
    # Keyed only when false (true is the default, and validated to it).
    leak_classifier: Optional[bool] = KeyIfSet(None, description="false: paraphrased leaks are found by the patterns "
                                               "only, without the classifier trained on English replies (for a "
                                               "constitution in another language); unset or true: both")

    @field_validator("leak_classifier")
    @classmethod
    def _on_is_the_default(cls, v: Optional[bool]) -> Optional[bool]:
        return None if v is True else v

    @field_validator("leak_judge_overrules_classifier")
    @classmethod
    def _off_is_the_default(cls, v: Optional[bool]) -> Optional[bool]:
        return None if v is False else v


class IntrospectionSpec(_Model):
    generator: str = Field("dpo-student", description="dpo-student (paper) or a model role such as teacher")
    reflection_max_tokens: int = Field(2048, ge=1)
    turn_max_tokens: int = Field(1024, ge=1)
    keep_think_reflections: bool = Field(True, description="keep a thinking generator's <think> traces in reflections "
                                         "(the field report: reasoning in character is training signal); a trace cut "
                                         "at max_tokens fails the sample either way")
    keep_think_interactions: bool = Field(False, description="keep them in self-interactions (off: cleaner "
                                          "multi-turn transcripts)")
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
    merge: bool = Field(False, description="also save the base with this adapter (and the DPO adapter under an SFT "
                                           "one) folded in, as merged/; what uses this adapter next (SFT training, "
                                           "introspection, evals, sample/chat) then loads those weights instead of "
                                           "applying the adapter, so vLLM can serve the SFT variant (one LoRA). "
                                           "The DPO adapter of a vllm student is always saved merged too")
    report_to: list[str] = Field(default_factory=list, description="TRL logging integrations (tensorboard, wandb); "
                                                                     "keyed: they may write into the adapter object")


class DPOTrainSpec(TrainSpec):
    """DPO with the chosen-NLL term (TRL loss_type [sigmoid, sft]).

    Left out: the paper's reference code (its OpenRLHF fork) also adds a KL term, 0.001 x
    the mean squared per-token log-ratio to the reference model. TRL 1.x's DPOConfig has
    no equivalent: `f_divergence_type` changes the divergence inside the DPO loss itself,
    `ld_alpha` reweights long responses, `rpo_alpha` is gone (its NLL term is loss_type
    `sft`, which nll_coef uses), and no loss type adds a per-token penalty towards the
    reference. Adding it would take a trainer of our own, so DPO here is the paper's
    without that term."""

    max_length: int = Field(1024, ge=16, description="tokens of prompt + reply after the student's chat template "
                                                     "(paper: 1024); dpo-pairs drops longer pairs and counts them "
                                                     "(too_long) rather than let training cut them")
    beta: float = Field(0.1, gt=0)
    nll_coef: float = Field(0.1, ge=0, description="chosen-NLL weight, TRL loss_type [sigmoid, sft]; the paper's "
                                                   "0.001 KL term has no TRL equivalent and is left out (DPOTrainSpec)")
    checkpoints_at: list[float] = Field(default_factory=list, description="data fractions to save adapters at")


class SFTTrainSpec(TrainSpec):
    max_length: int = Field(3072, ge=16)


class FinalSpec(_Model):
    """The final model (OCT tools/merge_loras.py): one LoRA adapter made of the DPO adapter at
    dpo_weight and the SFT adapter at sft_weight, for the base student. The SFT adapter was
    trained with the DPO adapter folded in, so 1.0 / 1.0 is the SFT model; the paper's
    1.0 / 0.25 turns SFT down to a quarter. Both merges are PEFT's add_weighted_adapter."""

    dpo_weight: float = Field(1.0, description="weight of the DPO adapter (paper 1.0)")
    sft_weight: float = Field(0.25, description="weight of the SFT adapter (paper 0.25)")
    method: Literal["linear", "exact"] = Field(
        "linear", description="linear (the paper's): PEFT combination_type=linear mixes the LoRA factors, A = sum "
                              "sqrt(w_i) A_i and B = sum sqrt(w_i) B_i, so its delta is the weighted sum of the deltas "
                              "plus cross terms sqrt(w_i w_j) B_i A_j, not w_dpo dW_dpo + w_sft dW_sft; needs equal "
                              "ranks. exact: combination_type=cat, rank r_dpo + r_sft, delta exactly "
                              "w_dpo dW_dpo + w_sft dW_sft. Either is saved at the next rank vLLM takes (zero-padded)")
    merged_weights: bool = Field(False, description="also save the base with the final adapter folded in (full "
                                                    "weights, merged/); evals, sample and chat then load those")


class TrainingSpec(_Model):
    dpo: DPOTrainSpec = Field(default_factory=DPOTrainSpec)
    sft: SFTTrainSpec = Field(default_factory=SFTTrainSpec)
    final: FinalSpec = Field(default_factory=FinalSpec)

    @model_validator(mode="after")
    def _linear_needs_one_rank(self) -> "TrainingSpec":
        r_dpo, r_sft = self.dpo.lora.r, self.sft.lora.r
        if self.final.method == "linear" and r_dpo != r_sft:
            raise PydanticCustomError(
                "final_ranks", f"method linear (the paper's merge) mixes the adapters' LoRA factors and needs one rank, "
                f"got training.dpo.lora.r {r_dpo} and training.sft.lora.r {r_sft}: make them equal, or use method: "
                "exact (rank r_dpo + r_sft)", {"at_field": "final"})
        return self


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
    variants: list[Literal["base", "dpo", "sft", "final"]] = Field(
        default_factory=lambda: ["base", "dpo", "sft", "final"],
        description="the student models compared: base, dpo (DPO adapter), sft (DPO + SFT adapters, both at 1.0), "
                    "final (the paper's model: training.final)")
    bootstrap: int = Field(200, ge=1)
    judge: str = Field("markers", description="a model role that judges pairs, or 'markers' (rule-based: more marker phrases wins)")
    elo: bool = True
    preferences: bool = False
    preferences_mode: Literal["charbuild", "oct"] = Field(
        "charbuild", description="revealed preferences: charbuild (every other pair holds the persona's trait, "
                                 "charbuild's trait list, Bradley-Terry ratings) or oct (the paper's: random pairs "
                                 "of 144 trait words, replies up to preferences_max_tokens, a model judge at T 0.1, "
                                 "online Elo reported next to Bradley-Terry with bootstrap intervals)")
    preferences_max_tokens: int = Field(1024, ge=1, description="oct mode: the length of the replies judged "
                                                                "(paper 1024; evals.max_tokens is the other evals')")
    preferences_judge: Optional[str] = Field(None, description="oct mode: the model role that judges the replies "
                                                               "(default: evals.judge, which must then be a role)")
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
    deadline_hours: Optional[float] = NoKey(None, gt=0, description="how long the build may take; models with mode: "
                                            "auto use the batch API when this is at least 24 (not keyed: how calls "
                                            "are sent, not what they ask)")


class ExecutionSpec(_Model):
    """Where `run` builds the targets (the command line's --executor and --address win).
    All NoKey: a target is the same wherever it is built."""

    executor: Literal["local", "ray"] = NoKey("local", description="local: this process (threads with --jobs); "
                                              "ray: each target a Ray task, placed by its stage's resources")
    address: Optional[str] = NoKey(None, description="the Ray cluster: auto (the one `ray start` runs here), "
                                   "ray://host:10001, or none to start one on this machine")
    max_retries: int = NoKey(3, ge=0, description="times Ray reruns a target whose worker or node was lost")
    straggler_factor: Optional[float] = NoKey(3.0, gt=1, description="ray: a shard running this many times "
                                              "longer than the median of its finished peers is cancelled and "
                                              "submitted once more; null: never")

    _address_not_blank = field_validator("address")(_not_blank)


class Spec(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    persona: str
    constitution: str = Field(description="constitution file (.yaml, or the paper's .txt/.json/.jsonl), "
                                          "relative to the spec that names it")
    models: dict[str, ModelSpec]
    data: DataSpec = Field(default_factory=DataSpec)
    filters: ResponseFilterSpec = Field(default_factory=ResponseFilterSpec)
    introspection: IntrospectionSpec = Field(default_factory=IntrospectionSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    gates: dict[str, GateSpec] = Field(default_factory=dict, description="validation gates (defaults: gates.default_gates)")
    evals: EvalSpec = Field(default_factory=EvalSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    execution: ExecutionSpec = NoKey(default_factory=ExecutionSpec, description="where targets build (not keyed)")
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
        e = self.evals
        if e.preferences_judge is not None and e.preferences_judge not in self.models:
            raise ValueError(f"evals.preferences_judge {e.preferences_judge!r} is not a role in models ({sorted(self.models)})")
        if e.preferences and e.preferences_mode == "oct" and (e.preferences_judge or e.judge) == "markers":
            # Random pairs rarely hold the persona's trait: markers could read almost none of them.
            raise ValueError("evals.preferences_mode oct needs a model judge: set evals.preferences_judge "
                             "(or evals.judge) to a role in models")
        return self

    @model_validator(mode="after")
    def _student_lora_rank(self) -> "Spec":
        """A vLLM student serves the adapters trained here: its engine must take their rank."""
        m = self.models["student"]
        if m.backend != "vllm":
            return self
        t = self.training
        r = max(t.dpo.lora.r, t.sft.lora.r, t.dpo.lora.r + t.sft.lora.r if t.final.method == "exact" else 0)
        try:
            need = vllm_lora_rank(r)
        except ValueError as exc:
            raise PydanticCustomError("lora_rank_too_large", str(exc), {"at_field": "training"}) from None
        if m.max_lora_rank is None:
            m.max_lora_rank = need
        elif m.max_lora_rank < need:
            raise PydanticCustomError(
                "max_lora_rank_small", f"{m.max_lora_rank} is below the rank of the adapters the student serves "
                f"({r}: training.dpo/sft.lora.r{', r_dpo + r_sft for the exact final merge' if t.final.method == 'exact' else ''}"
                f"): use {need} or leave it unset", {"at_field": "models.student.max_lora_rank"})
        return self

    @model_validator(mode="after")
    def _leak_judge_known(self) -> "Spec":
        judge = self.filters.leak_judge
        if judge is not None and judge not in self.models:
            raise PydanticCustomError("unknown_role", f"filters.leak_judge {judge!r} is not a role in models "
                                      f"({', '.join(sorted(self.models))})", {"at_field": "filters.leak_judge"})
        if self.filters.leak_judge_overrules_classifier and judge is None:
            raise PydanticCustomError("no_judge", "filters.leak_judge_overrules_classifier needs a judge: set "
                                      "filters.leak_judge to a model role",
                                      {"at_field": "filters.leak_judge_overrules_classifier"})
        if self.filters.leak_judge_overrules_classifier and self.filters.leak_classifier is False:
            raise PydanticCustomError("no_classifier", "filters.leak_judge_overrules_classifier with "
                                      "leak_classifier: false: there is no classifier to overrule",
                                      {"at_field": "filters.leak_judge_overrules_classifier"})
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


def _located(err: dict, locs: dict, root: Any = None) -> dict:
    """A pydantic error with the file:line that set its field; `root` is the model validated
    (the spec unless given), whose fields an unknown one is compared with."""
    loc = tuple(err["loc"])
    w = where(locs, loc)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field" + _suggest(loc, root)
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "finite_number":
        msg = "must be a finite number (inf and nan are not allowed)"
    at_field = (err.get("ctx") or {}).get("at_field")  # a model's check that names one of its fields
    if at_field:
        loc += tuple(str(at_field).split("."))  # a spec-wide check names a nested field as a dotted path
        w = where(locs, loc)
    out = {"type": err["type"], "loc": loc, "msg": msg, "where": str(w) if w else "?"}
    if err["type"] != "missing":
        out["input"] = err.get("input")
    return out


def _suggest(loc: tuple, root: Any = None) -> str:
    """' (did you mean X?)' from the fields the enclosing model really has."""
    import difflib

    model: Any = root or Spec
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


def _key_if_set(cls: type, name: str) -> bool:
    extra = cls.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("key_if_set"))


def key_view(value: Any) -> Any:
    """A spec value as it enters cache keys: JSON data without the NoKey fields."""
    if isinstance(value, BaseModel):
        from charbuild.spec.guard import is_nokey_field

        cls = type(value)
        return {name: key_view(getattr(value, name)) for name in cls.model_fields if not is_nokey_field(cls, name)
                and not (getattr(value, name) is None and _key_if_set(cls, name))}
    if isinstance(value, dict):
        return {str(k): key_view(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [key_view(v) for v in value]
    return value
