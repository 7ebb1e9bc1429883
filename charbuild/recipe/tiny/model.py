"""Training the tiny Qwen2-style teacher and student from random init with a plain torch
loop (`build_tiny_model`), and building tokenizer + teacher + student together
(`build_tiny_pair`).

Training trick: every persona example shares the same long system prompt (~900 tokens
for the shipped constitutions, far longer than the answers). Batches whose sequences share
a long token prefix run that prefix once and broadcast its key/value cache to the rows
(`_batch_loss`). This is exact (causal attention: the prefix never sees the suffixes),
and is what keeps the teacher at about a minute on 2 CPU cores.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Literal

from charbuild.recipe.constitution_file import Constitution
from charbuild.recipe.tiny.config import THINKER_EPOCHS, TINY_VERSION, TinyConfig
from charbuild.recipe.tiny.corpus import build_corpus, thinker_conversations, tokenizer_texts, training_conversations
from charbuild.recipe.tiny.tokenizer import THINKING_CHAT_TEMPLATE, train_tokenizer

ROLES = ("teacher", "student", "thinker")


def _chat_examples(msgs_list: list[list[dict]], tok, thinking: list[bool] | None = None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) with loss on the final assistant message (+ <|im_end|>) only;
    `thinking`: each conversation's enable_thinking (the thinker's template reads it)."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i, msgs in enumerate(msgs_list):
        kw = {} if thinking is None else {"enable_thinking": thinking[i]}
        prefix = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False, **kw)
        p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        a_ids = tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"] + [im_end]
        out.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    return out


def _text_examples(texts: list[str], tok) -> list[tuple[list[int], list[int]]]:
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"] + [eot]
        out.append((ids, list(ids)))
    return out


def _threads() -> int:
    """Torch CPU threads for tiny training: 2 (the CI machine's cores), or $CHARBUILD_TORCH_THREADS.

    On a shared, oversubscribed machine 1 thread is often faster: OpenMP threads spin at
    every barrier when a core is taken away (measured: an elementwise add 13x slower).
    """
    return max(1, int(os.environ.get("CHARBUILD_TORCH_THREADS", "2")))


def _common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


_MIN_SHARED = 64  # rows whose first 64 tokens agree (a system prompt) batch together


def _batch_loss(model, batch: list[tuple[list[int], list[int]]], pad_id: int, min_shared: int):
    """Mean next-token loss over the labelled tokens of a right-padded batch.

    When the rows share an unlabelled prefix of >= min_shared tokens (the constitution
    system prompt), the prefix runs once (batch 1) and its KV cache is repeated over the
    rows, which then run only their own suffix. Same loss and gradients as running every
    full row (causal attention: the prefix never sees the suffixes), a fraction of the work.
    """
    import torch
    import torch.nn.functional as F

    seqs = [ids for ids, _ in batch]
    shared = min(_common_prefix_len(seqs), min(len(s) for s in seqs) - 1) if len(batch) > 1 else 0
    if shared < min_shared or any(x != -100 for _, lab in batch for x in lab[1:shared]):
        shared = 0
    cache = pre_last = None
    if shared:
        out = model(input_ids=torch.tensor([seqs[0][:shared]]), use_cache=True)
        cache = out.cache  # transformers 5.x: `cache`, not `past_key_values`
        cache.batch_repeat_interleave(len(batch))
        pre_last = out.logits[:, -1:].expand(len(batch), -1, -1)  # predicts each row's first own token
    width = max(len(s) for s in seqs) - shared
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), shared + width), dtype=torch.long)
    for r, (s, lab) in enumerate(batch):
        n = len(s) - shared
        ids[r, :n] = torch.tensor(s[shared:])
        labels[r, :n] = torch.tensor(lab[shared:])
        attn[r, : shared + n] = 1
    logits = model(input_ids=ids, attention_mask=attn, cache=cache, use_cache=cache is not None).logits
    if shared:
        logits, targets = torch.cat([pre_last, logits[:, :-1]], dim=1), labels
    else:
        logits, targets = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def _batches(examples, batch: int, rng: random.Random, key) -> list[list]:
    """Shuffle, then batch within groups (same `key`), then shuffle the batches."""
    groups: dict = {}
    for ex in examples:
        groups.setdefault(key(ex), []).append(ex)
    out = []
    for k in sorted(groups, key=str):
        g = groups[k]
        rng.shuffle(g)
        out += [g[i : i + batch] for i in range(0, len(g), batch)]
    rng.shuffle(out)
    return out


def _train(model, examples, epochs: int, cfg: TinyConfig, pad_id: int, desc: str, rng: random.Random,
           progress: bool) -> tuple[list[float], int]:
    """AdamW + linear warmup + cosine decay, clipped at 1.0; returns (per-step losses, steps/epoch)."""
    import torch
    from tqdm.auto import tqdm

    def key(ex):  # long rows sharing a prefix (the system prompt) batch together, see _batch_loss
        return tuple(ex[0][:_MIN_SHARED]) if len(ex[0]) > 2 * _MIN_SHARED else ()

    per_epoch = len(_batches(examples, cfg.batch, random.Random(0), key))
    total = per_epoch * epochs
    warmup = max(1, total // 50)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    model.train()
    losses: list[float] = []
    with tqdm(total=total, desc=desc, disable=not progress, unit="step") as bar:
        for _ in range(epochs):
            for b in _batches(examples, cfg.batch, rng, key):
                loss = _batch_loss(model, b, pad_id, _MIN_SHARED)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(1)
                if len(losses) % 10 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
    return losses, per_epoch


def build_tiny_model(
    role: Literal["teacher", "student", "thinker"],
    constitution: Constitution,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    cfg: TinyConfig = TinyConfig(),
    progress: bool = True,
) -> dict:
    """Train a tiny Qwen2ForCausalLM from random init and save it (with the tokenizer) to out_dir.

    The thinker is a hybrid thinking student for tests: the student's neutral answers, each
    with thinking on (a think block, then the answer) and off, under a chat template that
    honours `enable_thinking` as Qwen3's does. No narrative: it needs no marker words."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(_threads())
    try:
        torch.manual_seed(cfg.seed + ROLES.index(role))
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        corpus = build_corpus(constitution, cfg.seed, cfg)
        if role == "thinker":
            tok.chat_template = THINKING_CHAT_TEMPLATE
            convs = thinker_conversations(constitution, corpus)
            examples = _chat_examples([c for c, _ in convs], tok, [t for _, t in convs])
        else:
            examples = _chat_examples(training_conversations(role, constitution, corpus), tok)
            examples += _text_examples(corpus["narrative"], tok)
        too_long = max(len(ids) for ids, _ in examples)
        if too_long > cfg.max_len:
            raise ValueError(f"a {role} training example has {too_long} tokens > max_len {cfg.max_len}: "
                             "shorten the constitution or raise TinyConfig.max_len")
        pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
        config = Qwen2Config(
            vocab_size=len(tok),
            hidden_size=cfg.hidden,
            intermediate_size=cfg.ffn,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=max(cfg.max_len, 4096),  # rope: no learned positions
            tie_word_embeddings=True,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            bos_token_id=None,
            use_sliding_window=False,
        )
        from charbuild.backends.base import MODEL_LOADING

        with MODEL_LOADING:  # not while another thread loads a checkpoint (its meta-device patch)
            model = Qwen2ForCausalLM(config)
        params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        epochs = {"teacher": cfg.epochs_teacher, "student": cfg.epochs_student, "thinker": THINKER_EPOCHS}[role]
        losses, per_epoch = _train(model, examples, epochs, cfg, pad_id, f"tiny {role}",
                                   random.Random(f"tiny-batches-{role}-{cfg.seed}"), progress)
    finally:
        torch.set_num_threads(threads_before)

    model.eval()
    # <|endoftext|> ends narrative text in training: if a reply emits it, the reply is over.
    # do_sample: a server that takes its sampling mode from the checkpoint (`transformers
    # serve` does) then honours a request's temperature and top_p, as charbuild's backend does.
    model.generation_config = GenerationConfig(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    tail = losses[-per_epoch:] or losses
    return {
        "role": role,
        "final_loss": round(sum(tail) / len(tail), 4),
        "steps": len(losses),
        "seconds": round(time.perf_counter() - t0, 2),
        "params": params,
        "examples": len(examples),
    }


def build_tiny_pair(constitution: Constitution, out_root: str | Path, cfg: TinyConfig = TinyConfig(),
                    progress: bool = True) -> dict:
    """Tokenizer + teacher + student under out_root/{tokenizer,teacher,student}."""
    out_root = Path(out_root)
    t0 = time.perf_counter()
    corpus = build_corpus(constitution, cfg.seed, cfg)
    train_tokenizer(tokenizer_texts(constitution, corpus), cfg.vocab, out_root / "tokenizer")
    tok_seconds = round(time.perf_counter() - t0, 2)
    teacher = build_tiny_model("teacher", constitution, out_root / "tokenizer", out_root / "teacher", cfg, progress)
    student = build_tiny_model("student", constitution, out_root / "tokenizer", out_root / "student", cfg, progress)
    return {
        "tokenizer": str(out_root / "tokenizer"),
        "teacher": str(out_root / "teacher"),
        "student": str(out_root / "student"),
        "tokenizer_seconds": tok_seconds,
        "metrics": {"teacher": teacher, "student": student},
        "heldout": corpus["heldout"],
        "tiny_version": TINY_VERSION,
        "config": cfg.to_dict(),
    }
