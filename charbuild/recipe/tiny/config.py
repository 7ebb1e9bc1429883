"""The tiny models' settings (`TinyConfig`) and recipe version (`TINY_VERSION`): what the
planner keys tiny targets on, so importing this module must stay cheap (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

TINY_VERSION = 2  # bump when the recipe changes (it is part of cache keys). 2: generation_config samples


# The tiny thinker (a hybrid thinking student for tests): its epochs live outside TinyConfig
# so that adding it left the teacher's and student's keys as they were; a change here (or
# to its corpus) needs a TINY_VERSION bump like any other. 6 epochs are about half the
# student's optimizer steps; measured: it opened <think> for 40 of 40 builtin general
# prompts (none of them trained on) with thinking on, and for none with thinking off.
THINKER_EPOCHS = 6


@dataclass(frozen=True)
class TinyConfig:
    """Model sizes, training schedule and corpus sizes of the tiny pair."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 384
    vocab: int = 1024
    # Measured on the 2-core CPU kind: teacher ~60 s (persona rows carry the ~900-token
    # system prompt, so a teacher epoch costs ~3x a student epoch; 8 epochs already give
    # 40/40 in character, 12 leave margin), student ~25 s (it must learn the marker words
    # from the narrative well enough for DPO to move it).
    epochs_teacher: int = 12
    epochs_student: int = 20
    lr: float = 3e-3
    batch: int = 32
    seed: int = 0
    max_len: int = 2048  # a check, not a cost: must hold the system prompt (~900 tokens) + Q + A
    n_questions: int = 320
    n_heldout: int = 40
    n_narrative: int = 300

    def to_dict(self) -> dict:
        return asdict(self)
