"""DPO and SFT training of LoRA adapters with TRL + PEFT (paper: arXiv 2511.01689, sec. 3).

No hand-written training loop: `trl.DPOTrainer` / `trl.SFTTrainer` do the work, with a
`peft.LoraConfig`. This module only maps a plain `TrainConfig` onto TRL 1.x option names,
adds one callback (per-step metrics log, training-health gate, checkpoints at data
fractions), and saves the results.

Recipe defaults are the paper's (shared/oct-recipe-facts.md sec. 3): LoRA r64 alpha128
dropout 0 on all linear layers, lr 5e-5, 10% warmup, cosine to 0.1 x lr, Adam betas
(0.9, 0.98), grad clip 1.0, effective batch 32, 1 epoch, beta 0.1, chosen-NLL 0.1
(TRL `loss_type=["sigmoid", "sft"]`, `loss_weights=[1.0, nll_coef]`: TRL's "sft" term is the
mean token NLL on the chosen completion, as in the paper), summed sequence log-probs
(TRL's default), max_len 1024 (DPO) / 3072 (SFT).

SFT loss mask: every `messages` example becomes a conversational prompt-completion pair
(prompt = messages[:-1], completion = [last assistant message]) and TRL's completion-only
loss trains on the last message only. That is the paper's SFT ("not multiturn, so the
loss is on the last message only") and needs no `{% generation %}` markers in the chat
template, so it works for every model. (`assistant_only_loss=True` would train on every
assistant turn of a multi-turn example, which is not the recipe.)

Outputs under out_dir:
- adapter/              PEFT adapter (adapter_config.json + adapter_model.safetensors) and
                        tokenizer; loadable by PeftModel.from_pretrained and vLLM's LoRA
                        loader. Written only when training finished healthy.
- checkpoints/frac-0.50 adapters at fractions of the total steps (cfg.checkpoints_at).
- merged/               base (+ input adapter) + this adapter folded, if cfg.merge; what
                        uses this target next loads it instead (charbuild.backends.weights).
- metrics.jsonl         one row per optimizer step: {"step", "loss", "grad_norm",
                        "learning_rate", "epoch", and TRL's own keys, e.g. for DPO
                        "rewards/accuracies", "rewards/margins", "rewards/chosen",
                        "rewards/rejected", "logps/chosen", ...}; appended and flushed per
                        step, so a crash keeps the log.
- loss.png              loss per step (DPO: second panel with reward accuracy and margin).
- abort.json            only when the health gate stopped training (rule, step, value).

Heavy imports (torch, transformers, trl, peft, datasets, matplotlib) happen inside the
functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DPO_METRIC_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


@dataclass
class TrainConfig:
    """Plain values, filled by the stage from the spec."""

    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    batch_size: int = 32  # effective; gradient_accumulation = ceil(batch_size / micro_batch_size)
    micro_batch_size: int = 2
    lr: float = 5e-5
    epochs: float = 1.0
    max_steps: int | None = None
    max_length: int = 1024
    warmup_ratio: float = 0.1
    seed: int = 123456
    beta: float = 0.1  # DPO only
    nll_coef: float = 0.1  # DPO only: weight of the chosen-NLL ("sft") loss term
    checkpoints_at: list[float] = ()  # data fractions -> out_dir/checkpoints/frac-0.25 ...
    report_to: list[str] = ()  # passed through to TRL ("tensorboard", "wandb"); default none
    merge: bool = False  # also save base+adapter merged into out_dir/merged
    # Paper constants that the spec does not expose (yet).
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio x lr (0 -> plain cosine to 0)
    adam_beta2: float = 0.98
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool | None = None  # None: on with CUDA, off on CPU


class TrainingAborted(RuntimeError):
    """Raised when the health gate stopped training. `.rule`, `.step`, `.value` say why."""

    def __init__(self, message: str, rule: str = "", step: int = 0, value: float | None = None):
        super().__init__(message)
        self.rule, self.step, self.value = rule, step, value


@dataclass
class Health:
    """Training-health gate thresholds (field report "kill criteria" 10.4).

    Checked on every logged optimizer step:
    - non_finite: loss or grad norm is NaN/inf (always, from step 1);
    - max_dpo_loss (DPO): logged loss > max_dpo_loss after `warmup_steps`. The logged loss
      is TRL's total, i.e. sigmoid DPO loss + nll_coef x chosen NLL;
    - min_reward_accuracy (DPO): mean "rewards/accuracies" over the last `acc_window` steps
      < min_reward_accuracy, after `warmup_steps`. Steps whose rewards are all exactly 0 are
      left out: the policy still equals the reference there (zero-initialised LoRA B, and
      the scheduler's lr is 0 on the first warmup step), and TRL counts those ties as wrong;
    - flat: |loss delta| < flat_tol for more than `flat_steps` consecutive steps.
    """

    max_dpo_loss: float = 2.0
    min_reward_accuracy: float = 0.5
    warmup_steps: int = 5
    flat_steps: int = 10
    flat_tol: float = 1e-4
    enabled: bool = True
    acc_window: int = 5


def gradient_accumulation(cfg: TrainConfig, world_size: int = 1) -> tuple[int, int]:
    """(per-device micro batch, gradient accumulation steps) for cfg's effective batch.

    accumulation = ceil(batch_size / (micro x world_size)); the micro batch is capped at the
    effective batch, so batch_size=1, micro=2 trains with micro 1.
    """
    micro = max(1, min(cfg.micro_batch_size, cfg.batch_size))
    return micro, max(1, math.ceil(cfg.batch_size / (micro * max(1, world_size))))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _checkpoint_steps(fracs, total: int) -> list[tuple[float, int]]:
    out = []
    for f in fracs or ():
        f = float(f)
        if not 0 < f <= 1:
            raise ValueError(f"checkpoints_at fractions must be in (0, 1], got {f}")
        out.append((f, min(total, max(1, round(f * total)))))
    return out


class HealthMonitor:
    """The health rules, fed one logged step at a time (no torch needed: unit-testable).

    `observe(step, logs)` returns None, or (rule, value, message) for the first rule broken.
    """

    def __init__(self, health: Health, dpo: bool):
        self.health, self.dpo = health, dpo
        self.losses: list[float] = []
        self.accs: list[tuple[int, float]] = []
        self.flat_run = 0

    def observe(self, step: int, logs: dict) -> tuple[str, float, str] | None:
        h = self.health
        loss = logs.get("loss")
        acc = logs.get("rewards/accuracies")
        # Steps where every reward is exactly 0 are ties (policy == reference: zero-initialised
        # LoRA, or lr 0 in the first warmup step) that TRL counts as wrong: left out.
        untrained = logs.get("rewards/chosen") == 0.0 and logs.get("rewards/rejected") == 0.0
        if acc is not None and not untrained:
            self.accs.append((step, float(acc)))
        prev = self.losses[-1] if self.losses else None
        if loss is not None:
            self.losses.append(float(loss))
        if not h.enabled:
            return None
        for key in ("loss", "grad_norm"):
            v = logs.get(key)
            if v is not None and not _finite(float(v)):
                return ("non_finite", float(v), f"non-finite {key} {v} at step {step}")
        after_warmup = step > h.warmup_steps
        if self.dpo and after_warmup and loss is not None and loss > h.max_dpo_loss:
            return ("max_dpo_loss", float(loss),
                    f"DPO loss {loss:.4f} > max_dpo_loss {h.max_dpo_loss} at step {step} "
                    f"(after {h.warmup_steps} warmup steps)")
        if self.dpo and after_warmup and self.accs:
            window = [a for _, a in self.accs[-max(1, h.acc_window):]]
            mean = sum(window) / len(window)
            if mean < h.min_reward_accuracy:
                return ("min_reward_accuracy", mean,
                        f"reward accuracy {mean:.3f} (mean of the last {len(window)} steps) < "
                        f"min_reward_accuracy {h.min_reward_accuracy} at step {step}")
        if loss is not None and prev is not None:
            self.flat_run = self.flat_run + 1 if abs(loss - prev) < h.flat_tol else 0
            if self.flat_run > h.flat_steps:
                return ("flat", float(loss),
                        f"loss flat (|delta| < {h.flat_tol}) for {self.flat_run} consecutive steps "
                        f"> flat_steps {h.flat_steps} at step {step} (loss {loss:.6f})")
        return None


def _make_callback(out_dir: Path, health: Health, dpo: bool, checkpoints_at, tokenizer):
    from transformers import TrainerCallback

    class _Monitor(TrainerCallback):
        """Per-step metrics row + health gate + adapter checkpoints at data fractions.

        All three run in on_log (logging_steps=1: once per optimizer step), in that order,
        so a step that breaks a rule is logged but never checkpointed.
        """

        def __init__(self):
            self.rows: list[dict] = []
            self.monitor = HealthMonitor(health, dpo)
            self.abort: tuple[str, int, float, str] | None = None
            self.targets: list[tuple[float, int]] = []
            self.saved: list[dict] = []
            self.metrics_path = out_dir / "metrics.jsonl"

        def on_train_begin(self, args, state, control, **kw):
            self.metrics_path.write_text("")
            self.targets = _checkpoint_steps(checkpoints_at, state.max_steps)

        def on_log(self, args, state, control, logs=None, model=None, **kw):
            logs = logs or {}
            if "loss" not in logs:  # the end-of-training summary (train_loss, train_runtime...)
                return
            step = int(state.global_step)
            row = {"step": step}
            row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            self.rows.append(row)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
            if self.abort is None:
                bad = self.monitor.observe(step, row)
                if bad is not None:
                    rule, value, msg = bad
                    self.abort = (rule, step, value, msg)
                    control.should_training_stop = True
                    return
            if self.abort is None and model is not None:
                for frac, at in self.targets:
                    if at == step:
                        path = out_dir / "checkpoints" / f"frac-{frac:.2f}"
                        model.save_pretrained(str(path))
                        tokenizer.save_pretrained(str(path))
                        # Relative to the target's folder: out_dir is a staging folder that is
                        # renamed into the cache once the target is complete.
                        self.saved.append({"fraction": frac, "step": step,
                                           "path": str(path.relative_to(out_dir))})

    return _Monitor()


def _plot(rows: list[dict], path: Path, dpo: bool, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(10 if dpo else 6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if dpo else 1, 1)
    ax.plot(steps, [r.get("loss", float("nan")) for r in rows], marker=".", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title} loss")
    ax.grid(alpha=0.3)
    if dpo:
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.plot(steps, [r.get("rewards/accuracies", float("nan")) for r in rows], color="tab:green",
                 marker=".", lw=1, label="reward accuracy")
        ax2.set_ylim(-0.05, 1.05)
        ax2.set_xlabel("step")
        ax2.set_ylabel("reward accuracy")
        ax3 = ax2.twinx()
        ax3.plot(steps, [r.get("rewards/margins", float("nan")) for r in rows], color="tab:orange",
                 marker=".", lw=1, label="margin")
        ax3.set_ylabel("reward margin")
        ax2.set_title("DPO rewards")
        h1, l1 = ax2.get_legend_handles_labels()
        h2, l2 = ax3.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


def _tail_mean(rows: list[dict], key: str, n: int = 5) -> float | None:
    vals = [r[key] for r in rows if key in r][-n:]
    return round(sum(vals) / len(vals), 6) if vals else None


def _load_model(base_model: str, adapter: str | None):
    """(model, tokenizer, device info): base from a local dir, with `adapter` folded in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    if not cuda:
        torch.set_num_threads(2)
    from charbuild.backends.base import MODEL_LOADING

    tok = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
    with MODEL_LOADING:
        model = AutoModelForCausalLM.from_pretrained(
            base_model, local_files_only=True, dtype=torch.bfloat16 if bf16 else torch.float32
        )
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter, local_files_only=True).merge_and_unload()
    return model, tok, cuda, bf16


def _common_args(cfg: TrainConfig, out_dir: Path, cuda: bool, bf16: bool, progress: bool) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro, accum = gradient_accumulation(cfg, world)
    gc = cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    sched = {"lr_scheduler_type": "cosine"}
    if cfg.min_lr_ratio > 0:
        sched = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": cfg.min_lr_ratio}}
    return dict(
        output_dir=str(out_dir / "trainer"),
        learning_rate=cfg.lr,
        **sched,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio (warmup_ratio is gone)
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps else -1,
        max_length=cfg.max_length,
        adam_beta2=cfg.adam_beta2,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        logging_steps=1,
        logging_nan_inf_filter=False,  # else the Trainer logs NaN/inf losses as the running mean
        save_strategy="no",
        report_to=list(cfg.report_to) or "none",
        bf16=bf16,
        fp16=False,
        use_cpu=not cuda,
        activation_checkpointing=gc,  # transformers 5.24 name; TRL still reads the mirrored gradient_checkpointing
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )


def _lora(cfg: TrainConfig):
    from peft import LoraConfig

    tm = cfg.target_modules
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=tm if isinstance(tm, str) else list(tm),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _prepare_out(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("adapter", "checkpoints", "merged", "trainer"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "loss.png", "abort.json"):
        (out / name).unlink(missing_ok=True)


def _run(kind: str, trainer, tok, cb, cfg: TrainConfig, out: Path, progress: bool, t0: float,
         n_examples: int, extra: dict) -> dict:
    import peft
    import torch
    import transformers
    import trl
    from transformers import PrinterCallback

    dpo = kind == "dpo"
    if not progress:
        trainer.remove_callback(PrinterCallback)
    trainer.train()
    if cb.rows:
        _plot(cb.rows, out / "loss.png", dpo, kind.upper())
    if cb.abort is not None:
        rule, step, value, msg = cb.abort
        (out / "abort.json").write_text(json.dumps({"rule": rule, "step": step, "value": value, "message": msg}) + "\n")
        shutil.rmtree(out / "trainer", ignore_errors=True)
        raise TrainingAborted(f"{kind.upper()} training aborted by health rule {rule!r} at step {step} "
                              f"(value {value}): {msg}", rule=rule, step=step, value=value)
    model = trainer.model
    model.save_pretrained(str(out / "adapter"))
    tok.save_pretrained(str(out / "adapter"))
    if cfg.merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(out / "merged"))
        tok.save_pretrained(str(out / "merged"))
    trainer_dir = out / "trainer"
    if trainer_dir.is_dir() and not any(trainer_dir.iterdir()):
        trainer_dir.rmdir()
    micro, accum = trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps
    res = {
        "steps": int(trainer.state.global_step),
        "final_loss": _tail_mean(cb.rows, "loss"),
        "seconds": round(time.perf_counter() - t0, 2),
        "examples": n_examples,
        "examples_used": len(trainer.train_dataset),
        "checkpoints": cb.saved,
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "effective_batch_size": micro * accum * trainer.args.world_size,
        "adapter": "adapter",  # folders of the target (its staging folder is renamed away)
        "merged": "merged" if cfg.merge else None,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "trl_version": trl.__version__,
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    }
    if dpo:
        res["final_reward_accuracy"] = _tail_mean(cb.rows, "rewards/accuracies")
        res["final_margin"] = _tail_mean(cb.rows, "rewards/margins")
    res.update(extra)
    return res


def _quiet_datasets(progress: bool):
    if not progress:  # dataset map/filter bars and transformers' "Loading weights" bar
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()


def train_dpo(base_model: str, pairs_jsonl: str, out_dir: str, cfg: TrainConfig, health: Health = Health(),
              adapter: str | None = None, progress: bool = True) -> dict:
    """DPO (+ chosen NLL) LoRA on TRL conversational preference pairs.

    pairs_jsonl rows: {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
    "rejected": [...]}; other columns are ignored. `adapter`, if given, is merged into the
    base first. The reference model is the base itself (TRL disables the LoRA for the
    reference pass). Raises TrainingAborted (nothing saved but metrics, loss.png,
    abort.json) when the health gate trips.
    """
    t0 = time.perf_counter()
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    out = Path(out_dir)
    _prepare_out(out)
    _quiet_datasets(progress)
    ds = load_dataset("json", data_files=str(pairs_jsonl), split="train")
    missing = {"prompt", "chosen", "rejected"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{pairs_jsonl}: DPO pairs need columns prompt/chosen/rejected, missing {sorted(missing)}")
    ds = ds.select_columns(["prompt", "chosen", "rejected"])
    model, tok, cuda, bf16 = _load_model(base_model, adapter)
    args = DPOConfig(
        **_common_args(cfg, out, cuda, bf16, progress),
        beta=cfg.beta,
        loss_type=["sigmoid", "sft"] if cfg.nll_coef > 0 else ["sigmoid"],
        loss_weights=[1.0, cfg.nll_coef] if cfg.nll_coef > 0 else [1.0],
    )
    _one_device(args)
    cb = _make_callback(out, health, True, cfg.checkpoints_at, tok)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=_lora(cfg), callbacks=[cb])
    extra = {"base_model": base_model, "merged_adapter": adapter, "loss_type": list(args.loss_type),
             "loss_weights": list(args.loss_weights)}
    return _run("dpo", trainer, tok, cb, cfg, out, progress, t0, len(ds), extra)


def _one_device(args) -> None:
    """Train on one GPU however many the process sees. A Trainer that sees N wraps the model
    in nn.DataParallel and multiplies the batch by N: another adapter under the same key
    (the key holds the batch size, not the machine's GPU count)."""
    if args.n_gpu > 1:  # n_gpu sets the device up first; it has no public setter
        args._n_gpu = 1


def _to_prompt_completion(example: dict) -> dict:
    msgs = example["messages"]
    if not msgs or msgs[-1].get("role") != "assistant":
        raise ValueError("every SFT example must end on an assistant message")
    if len(msgs) < 2:
        raise ValueError("every SFT example needs at least one message before the assistant reply")
    return {"prompt": msgs[:-1], "completion": [msgs[-1]]}


def train_sft(base_model: str, data_jsonl: str, out_dir: str, cfg: TrainConfig, health: Health = Health(),
              adapter: str | None = None, progress: bool = True) -> dict:
    """SFT LoRA on `messages` JSONL, loss on the last assistant message only.

    `adapter` (the DPO adapter) is merged into the base first, and a fresh LoRA is trained
    on top (paper: SFT on the distilled model); the saved adapter therefore applies to
    base + DPO adapter, which the result records as "merged_adapter".
    """
    t0 = time.perf_counter()
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    out = Path(out_dir)
    _prepare_out(out)
    _quiet_datasets(progress)
    ds = load_dataset("json", data_files=str(data_jsonl), split="train")
    if "messages" not in ds.column_names:
        raise ValueError(f"{data_jsonl}: SFT data needs a 'messages' column")
    ds = ds.select_columns(["messages"]).map(_to_prompt_completion, remove_columns=["messages"])
    model, tok, cuda, bf16 = _load_model(base_model, adapter)
    args = SFTConfig(
        **_common_args(cfg, out, cuda, bf16, progress),
        completion_only_loss=True,
        assistant_only_loss=False,
        packing=False,
    )
    _one_device(args)
    cb = _make_callback(out, health, False, cfg.checkpoints_at, tok)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=_lora(cfg), callbacks=[cb])
    extra = {"base_model": base_model, "merged_adapter": adapter, "on_top_of": "base+merged_adapter" if adapter else "base",
             "sft_loss": "last assistant message (prompt-completion, completion_only_loss)"}
    return _run("sft", trainer, tok, cb, cfg, out, progress, t0, len(ds), extra)
