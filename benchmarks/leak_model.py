"""A small linear classifier for paraphrased leaks: featurising and scoring (pure Python).

Features of a passage: word unigrams and bigrams, and character 3-5-grams of the
lowercased text (whitespace collapsed, digits mapped to 0), each block L2-normalised as a
binary bag. A reply is scored per passage (each sentence, and each pair of adjacent
sentences) and the highest probability is its score, so a leak buried in a long reply is
not diluted by the rest. The weights are a plain {feature: weight} table; scoring is a
few thousand dict look-ups, no numpy.

The training (benchmarks/train_leak_model.py) uses numpy. An experiment, kept out of the
package: combined with the patterns it caught more leaks on unseen sets but raised false
alarms (see train_leak_model.py for the figures), so quality.py does not use it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

_WORD_RE = re.compile(r"[a-z0]+(?:'[a-z]+)?")
_SPACE_RE = re.compile(r"\s+")
_DIGIT_RE = re.compile(r"[0-9]+")
_SENT_RE = re.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")
CHAR_NS = (3, 4, 5)


def normalise(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    return _DIGIT_RE.sub("0", _SPACE_RE.sub(" ", text.lower())).strip()


def word_features(norm: str) -> set[str]:
    words = _WORD_RE.findall(norm)
    feats = {"w:" + w for w in words}
    padded = ["<s>"] + words + ["</s>"]
    feats.update("b:" + a + " " + b for a, b in zip(padded, padded[1:]))
    return feats


def char_features(norm: str) -> set[str]:
    s = " " + norm + " "
    return {s[i:i + n] for n in CHAR_NS for i in range(len(s) - n + 1)}


def featurise(text: str) -> tuple[set[str], set[str]]:
    """The two binary bags (words, chars) of a passage."""
    norm = normalise(text)
    return word_features(norm), char_features(norm)


def passages(text: str) -> list[str]:
    """The whole text, each sentence and each pair of adjacent sentences."""
    sents = [s.strip() for s in _SENT_RE.findall(text) if s.strip()]
    if len(sents) <= 1:
        return [text]
    return [text] + sents + [a + " " + b for a, b in zip(sents, sents[1:])]


class LeakModel:
    def __init__(self, weights: dict[str, float], bias: float, threshold: float, meta: dict | None = None):
        self.weights = weights
        self.bias = bias
        self.threshold = threshold
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | Path) -> "LeakModel":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(d["weights"], d["bias"], d["threshold"], d.get("meta"))

    def _logit(self, text: str) -> float:
        words, chars = featurise(text)
        get = self.weights.get
        z = self.bias
        if words:
            z += sum(get(f, 0.0) for f in words) / math.sqrt(len(words))
        if chars:
            z += sum(get(f, 0.0) for f in chars) / math.sqrt(len(chars))
        return z

    def best_passage(self, text: str) -> tuple[float, str]:
        """The reply's passage most like a leak, with its probability."""
        if not text or not text.strip():
            return 0.0, ""
        z, p = max((self._logit(p), p) for p in passages(text))
        return (1.0 / (1.0 + math.exp(-z)) if z > -30 else 0.0), p

    def score(self, text: str) -> float:
        """The highest probability of a leak over the reply's passages."""
        return self.best_passage(text)[0]

    def is_leak(self, text: str) -> bool:
        return self.score(text) > self.threshold


def find_leak_combined(text: str, model: LeakModel, about_itself: bool = False) -> str | None:
    """Patterns OR classifier: the passage that leaks, or None. With `about_itself`
    (introspection, where the model's own character is the topic) only the patterns judge,
    under their own about_itself rules: the classifier was trained on replies to users and
    would take any talk of "my character" for a leak."""
    from charbuild.recipe.quality import find_paraphrased_leak

    found = find_paraphrased_leak(text, about_itself)
    if found or about_itself:
        return found
    prob, passage = model.best_passage(text)
    return passage if prob > model.threshold else None
