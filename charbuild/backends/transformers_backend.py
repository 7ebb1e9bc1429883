"""Local generation with Hugging Face transformers (CPU or one GPU), optionally with a LoRA adapter.

Batches requests (left padding), renders prompts with the tokenizer's chat template
(`add_generation_prompt=True`), and samples.

Sampling is done by this module, not by transformers' warpers: `generate()` runs greedy
decoding and a logits processor (`_RowSampler`) replaces each row's logits with a one-hot
choice made by that row's own `torch.Generator`. What that guarantees:

- A request with `seed` set gets the same token stream whatever else is in its batch and
  in the call (each row draws from its own generator, one draw per step). The only
  dependence left is floating point: batched and unbatched forward passes (different
  padding, different matmul shapes) can differ in the last bits, which can flip a sample
  that sits exactly on a boundary. On CPU float32 this is practically never; on GPU in
  bf16 it can happen occasionally.
- Requests without a seed draw from torch's global RNG: not reproducible.
- temperature <= 0 is greedy decoding (seed irrelevant).

Order of logit transforms: repetition_penalty (HF, over prompt + output, like vLLM) ->
frequency_penalty (OpenAI style, output tokens only) -> temperature -> top-p -> sample.

Stops: EOS (the model's generation_config eos ids plus the tokenizer's eos), and stop
strings via transformers' `stop_strings` criterion; the decoded text is always also
truncated client-side at the earliest stop string. HF's criterion can also fire on a stop
string that straddles the prompt/completion boundary (e.g. "\\nUser:" where the prompt ends
in "\\n"); that case ends generation early with finish_reason "stop" and keeps the text.
finish_reason is "length" only when max_tokens were generated with no EOS / stop string.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from typing import Sequence

from charbuild.backends.base import MODEL_LOADING, SEED_HONOURED, BackendError, GenRequest, GenResult, Progress, template_kwargs


@dataclass
class TransformersConfig:
    model: str  # local path (or HF id already in the local cache: never downloads)
    adapter: str | None = None  # PEFT LoRA dir, applied with PeftModel.from_pretrained
    # Adapters folded into the base first, in order (SFT trains on the DPO-merged model).
    merged_adapters: tuple[str, ...] = ()
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on GPUs that support it (else float16), float32 on CPU
    batch_size: int = 16


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut text at the earliest occurrence of any stop string; (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _group_key(r: GenRequest) -> tuple:
    temp = float(r.temperature) if r.temperature > 0 else 0.0
    return (r.max_tokens, temp, float(r.top_p) if temp else 1.0, 1.0 if r.repetition_penalty is None else float(r.repetition_penalty),
            float(r.frequency_penalty), tuple(r.stop))


# PEFT still calls transformers' old name; the warning says nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class TransformersBackend:
    """Implements `Backend` with a local transformers model. Loads lazily on first use."""

    def __init__(self, config: TransformersConfig | None = None, **kw):
        self.config = config or TransformersConfig(**kw)
        self._model = None
        self._tok = None
        self._device = None
        self._eos_ids: list[int] = []

    # ---------------------------------------------------------------- loading
    def _load(self) -> None:
        if self._model is not None:
            return
        with MODEL_LOADING:  # one load at a time in the process; a second thread finds it loaded
            if self._model is None:
                self._load_locked()

    def _load_locked(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        cfg = self.config
        dev = cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.dtype == "auto":
            if dev.startswith("cuda"):
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            else:
                dtype = torch.float32
        else:
            dtype = getattr(torch, cfg.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise BackendError(f"unknown dtype {cfg.dtype!r} (use auto, float32, bfloat16, float16)")
        try:
            tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BackendError(f"transformers backend: cannot load model {cfg.model!r} locally: {exc}") from exc
        if cfg.adapter or cfg.merged_adapters:
            try:
                from peft import PeftModel
            except ImportError as exc:  # pragma: no cover
                raise BackendError("a LoRA adapter needs peft installed") from exc
            for merged in cfg.merged_adapters:
                model = PeftModel.from_pretrained(model, merged, local_files_only=True).merge_and_unload()
            if cfg.adapter:
                model = PeftModel.from_pretrained(model, cfg.adapter, local_files_only=True)
        if not tok.chat_template:
            raise BackendError(f"the tokenizer of {cfg.model!r} has no chat_template")
        model.to(dev).eval()

        # EOS ids: the model's generation config (may be a list) plus the tokenizer's eos.
        gc_old = getattr(model, "generation_config", None)
        eos = getattr(gc_old, "eos_token_id", None)
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if tok.eos_token_id is not None and tok.eos_token_id not in eos_ids:
            eos_ids.append(tok.eos_token_id)
        if not eos_ids:
            raise BackendError(f"{cfg.model!r}: neither the model nor the tokenizer defines an EOS token")
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
        tok.padding_side = "left"
        # Replace the checkpoint's sampling defaults (top_k, temperature, repetition_penalty...):
        # in transformers 5.x they fill every generate() argument left unset. We pass all ours.
        model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad,
                                                   bos_token_id=getattr(gc_old, "bos_token_id", None))
        self._model, self._tok, self._device = model, tok, dev
        self._eos_ids, self._pad_id = eos_ids, pad

    # ---------------------------------------------------------------- generation
    def _encode(self, r: GenRequest) -> list[int]:
        text = self._tok.apply_chat_template(list(r.messages), add_generation_prompt=True, tokenize=False,
                                             **template_kwargs(r))
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def generate(self, requests: Sequence[GenRequest], progress: Progress | None = None) -> list[GenResult]:
        if not requests:
            return []
        self._load()
        encoded = [self._encode(r) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(_group_key(r), []).append(i)
        results: list[GenResult | None] = [None] * len(requests)
        bs = max(1, int(self.config.batch_size))
        for key, idxs in groups.items():
            idxs = sorted(idxs, key=lambda i: len(encoded[i]))  # less padding per batch
            for s in range(0, len(idxs), bs):
                chunk = idxs[s : s + bs]
                outs = self._generate_batch([requests[i] for i in chunk], [encoded[i] for i in chunk], key)
                for i, res in zip(chunk, outs):
                    results[i] = res
                if progress:
                    progress(len(chunk))
        return results  # type: ignore[return-value]

    def _generate_batch(self, reqs: list[GenRequest], prompts: list[list[int]], key: tuple) -> list[GenResult]:
        import torch
        from transformers import LogitsProcessorList

        max_tokens, temperature, top_p, rep_pen, freq_pen, stops = key
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        gens = []
        for r in reqs:
            if r.seed is None or temperature == 0:
                gens.append(None)
            else:
                g = torch.Generator(device=self._device)
                g.manual_seed(int(r.seed) & 0xFFFF_FFFF_FFFF_FFFF)
                gens.append(g)
        sampler = _RowSampler(width, temperature, top_p, freq_pen, gens)
        kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(1, int(max_tokens)),
            do_sample=False,  # greedy over the sampler's one-hot logits
            repetition_penalty=rep_pen,
            logits_processor=LogitsProcessorList([sampler]),
            eos_token_id=self._eos_ids,
            pad_token_id=self._pad_id,
        )
        stop_list = [s for s in stops if s]
        if stop_list:
            kwargs.update(stop_strings=stop_list, tokenizer=self._tok)
        with torch.inference_mode():
            out = self._model.generate(**kwargs)
        gen = out[:, width:].tolist()
        results = []
        eos = set(self._eos_ids)
        for p, row in zip(prompts, gen):
            k = next((j for j, t in enumerate(row) if t in eos), None)
            toks = row if k is None else row[:k]
            text = self._tok.decode(toks, skip_special_tokens=True)
            text, stopped = truncate_at_stop(text, stop_list)
            if stopped:
                n, reason = len(toks), "stop"  # tokens after the stop are padding, not output
            elif k is not None:
                n, reason = k + 1, "stop"  # the EOS token counts as generated
            else:
                n = len(row)
                reason = "length" if n >= max_tokens else "stop"  # early end: boundary stop string
            results.append(GenResult(text=text, finish_reason=reason, prompt_tokens=len(p), completion_tokens=n,
                                     meta={"seed": SEED_HONOURED}))  # each row has its own seeded sampler
        return results

    def close(self) -> None:
        dev = self._device
        self._model = None
        self._tok = None
        gc.collect()
        if dev and str(dev).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


class _RowSampler:
    """Logits processor: per-row frequency penalty, temperature, top-p and sampling.

    Returns one-hot logits (0 for the chosen token, -inf elsewhere) so greedy decoding
    picks the token sampled here with each row's own generator.
    """

    def __init__(self, prompt_width: int, temperature: float, top_p: float, freq_pen: float, generators: list):
        self.width = prompt_width
        self.temperature = temperature
        self.top_p = top_p
        self.freq_pen = freq_pen
        self.generators = generators

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float()
        if self.freq_pen and input_ids.shape[1] > self.width:
            counts = torch.zeros_like(scores)
            out = input_ids[:, self.width :]
            counts.scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
            scores = scores - self.freq_pen * counts
        if self.temperature <= 0:
            return scores  # greedy
        probs = torch.softmax(scores / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sp, si = torch.sort(probs, dim=-1, descending=True)
            cum = torch.cumsum(sp, dim=-1)
            drop = (cum - sp) >= self.top_p  # keep the smallest head whose mass reaches top_p
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, si, sp)
        choice = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        for r, g in enumerate(self.generators):
            choice[r] = torch.multinomial(probs[r], 1, generator=g)[0]
        onehot = torch.full_like(scores, float("-inf"))
        onehot.scatter_(1, choice[:, None], 0.0)
        return onehot
