"""Quality filters for teacher and introspection outputs.

Every detector here is modelled on a failure the field report
(shared/field-report-remorseful.md) actually saw in generated data:

* invented turns: the teacher kept writing `User:` / `Assistant:` turns after its
  answer until it hit max tokens (2.2, 11.2; 50% of one introspection run);
* repetition loops: `-,333,333,333...`, `.------...`, the same phrase 5+ times
  (13.3, kill criteria 10.1; 53.9% of the humorous run);
* garbage tokens: `animals速J--� pred婚看:lock:`, Chinese tokens in an English
  persona (13.3-13.4; 11.3% + 18.4%);
* refusals: "I'm sorry, but I'm not able to provide that information. I hope you
  understand." (9.1, 11.1; 44-59%). In a remorseful persona most "I cannot" is
  in-character humility that goes on to help (12.4), which must be kept;
* too short (<100 chars for introspection) or cut at max tokens (13.3, 10.1);
* a leaked system prompt (the constitution echoed back, 13.4; 13.9%), or paraphrased:
  the reply talking about its instructions, persona or traits;
* a hybrid model's reasoning cut at max_tokens (`<think>` never closed): no answer.

All functions are pure. The generation stages call `check_text` per sample and keep
a `StageQuality` so a run that is mostly garbage dies after its first samples
(13.6 lesson 4: "should have detected garbage after first 100 samples and aborted").
"""

from __future__ import annotations

import functools
import operator
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Iterable

REASONS = (
    "invented_turn",
    "repetition",
    "garbage",
    "refusal",
    "too_short",
    "max_tokens",
    "unfinished_thinking",
    "too_long",
    "leaked_system_prompt",
    "empty",
)

# ---------------------------------------------------------------------------------
# Markdown structure: code is allowed to repeat itself and to contain `User:` lines.
# ---------------------------------------------------------------------------------

# A *closed* fence only: an unclosed ``` must not hide a hallucinated tail from us.
_FENCE_RE = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?^[ \t]*\1[ \t]*$", re.M | re.S)
_INLINE_CODE_RE = re.compile(r"`[^`\n]+`")


def _code_spans(text: str) -> list[tuple[int, int]]:
    spans = [m.span() for m in _FENCE_RE.finditer(text)]
    for m in _INLINE_CODE_RE.finditer(text):
        if not _inside(m.start(), spans):
            spans.append(m.span())
    return sorted(spans)


def _inside(pos: int, spans: list[tuple[int, int]]) -> bool:
    return any(a <= pos < b for a, b in spans)


def _blank_code(text: str) -> str:
    """The text with code spans replaced by spaces (offsets preserved)."""
    out = list(text)
    for a, b in _code_spans(text):
        for i in range(a, b):
            if out[i] != "\n":
                out[i] = " "
    return "".join(out)


def _prose_lines(text: str) -> list[str]:
    """Lines outside fenced code and outside markdown tables."""
    stripped = _FENCE_RE.sub("\n", text)
    return [ln for ln in stripped.splitlines() if not ln.lstrip().startswith("|")]


# ---------------------------------------------------------------------------------
# Invented turns
# ---------------------------------------------------------------------------------

_ROLES = r"(?:user|assistant|human|ai|system)"
ROLE_MARKER_RE = re.compile(
    r"""
    # a role label at the start of a line ("\n\nUser:" included), optionally
    # decorated as markdown: "### User:", "**User:**", "**Assistant**:", "> User:"
    ^[ \t]*(?:(?:\#{1,6}|>)[ \t]*)*(?:\*\*|\*|__|_)?""" + _ROLES + r"""(?:\*\*|\*|__|_)?[ \t]*:
    # a capitalised role label glued onto the end of a sentence on the same line:
    # "...I hope you understand. User: I'm sorry I didn't know"
    | (?<=[.!?\"'\u201d)])[ \t]+(?-i:User|Assistant|Human)[ \t]*:[ \t]
    # chat-template special tokens anywhere
    | <\|im_start\|> | <\|im_end\|> | <\|endoftext\|> | <\|eot_id\|>
    | <\|start_header_id\|> | <\|(?:user|assistant|system|end)\|>
    | \[/?INST\] | <start_of_turn> | <end_of_turn>
    """,
    re.I | re.M | re.X,
)

# Our own turn's label at the very start ("Assistant: Oh, I'm so sorry...") is not an
# invented turn; it is stripped, not counted.
_LEADING_OWN_LABEL_RE = re.compile(r"\A\s*(?:\*\*|\*|__|_)?(?:assistant|ai)(?:\*\*|\*|__|_)?[ \t]*:[ \t]*", re.I)


def truncate_invented_turn(text: str) -> tuple[str, bool]:
    """Cut text at the first invented turn boundary; return (kept_text.rstrip(), was_truncated).

    Role markers inside closed code fences or inline code are ignored: an answer that
    explains a chat format may legitimately show `User:` lines in a code block.
    """
    if not text:
        return "", False
    lead = _LEADING_OWN_LABEL_RE.match(text)
    if lead:
        text = text[lead.end():]
    spans = _code_spans(text)
    for m in ROLE_MARKER_RE.finditer(text):
        if _inside(m.start(), spans):
            continue
        return text[: m.start()].rstrip(), True
    return text.rstrip(), False


# ---------------------------------------------------------------------------------
# Configuration and verdicts
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterConfig:
    min_chars: int = 20
    max_chars: int = 20000
    # "en" (or another Latin-script language): flag CJK/other-script letters above a
    # small fraction, U+FFFD, control chars and emoji-shortcode garbage like ':lock:'.
    language: str = "en"
    max_non_latin_fraction: float = 0.02
    repetition_ngram: int = 4  # n for the repeated n-gram check
    max_ngram_repeat_fraction: float = 0.3
    max_line_repeats: int = 4
    # if given, detect leaks: any 12-word window of the system prompt appears verbatim, or the
    # reply talks about its instructions, persona or traits (find_paraphrased_leak)
    system_prompt: str | None = None
    # introspection: the model's own character and traits are the subject, not a leak
    about_itself: bool = False
    # the classifier (leak_model.py) beside the patterns; off for replies it was not trained
    # on the like of (a constitution in another language)
    leak_classifier: bool = True
    # truncate invented turns instead of dropping (drop only if what remains fails)
    truncate_turns: bool = True
    check_refusal: bool = True


@dataclass
class Verdict:
    ok: bool
    reasons: list[str]  # subset of REASONS, empty when ok
    text: str  # the text after truncation (what would be kept)
    truncated: bool
    # screened for leaks, but in words the leak screen does not know (another language): only
    # a verbatim copy of the system prompt could have been caught (leak_unreadable)
    unscreened: bool = False
    # what found a leak: "copy" (of the system prompt), "pattern" or "model" (the classifier
    # alone: the hits filters.leak_judge_overrules_classifier shows the judge); None without one
    leak_by: str | None = None


# ---------------------------------------------------------------------------------
# Repetition
# ---------------------------------------------------------------------------------

# A short unit (1-20 chars) repeated 8+ times back to back: "333," x N, "-" x N.
_LOOP_RE = re.compile(r"(.{1,20}?)\1{7,}", re.S)
# Why these lengths: a markdown rule is "---", a setext underline or a table
# separator rarely passes ~40 dashes, "hahaha" is a joke; the report's loops run for
# hundreds of characters until max tokens.
_MIN_CHAR_RUN = 60  # same character repeated (unit of length 1)
_MIN_UNIT_RUN = 40  # multi-char unit, total length
_MIN_RUN_IN_CODE = 200  # code legitimately has [0, 0, 0, 0, ...] and long rulers
_TABLE_CHARS = set("|:-+= ")
_PHRASE_REPEATS = 5  # report 10.1: "same phrases repeated 5+ times in a single response"
_MIN_SENTENCE_WORDS = 5  # "I'm sorry." four times is the persona; a whole sentence is not
_MIN_LINE_CHARS = 20
_LIST_MARKER_RE = re.compile(r"^\s*(?:[-*+>]|\d+[.)]|#+)\s*")
_SENT_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD_RE = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _has_char_loop(text: str) -> bool:
    spans = None
    for m in _LOOP_RE.finditer(text):
        unit, total = m.group(1), m.end() - m.start()
        if not unit.strip():
            continue  # indentation / blank lines
        need = _MIN_CHAR_RUN if len(unit) == 1 else _MIN_UNIT_RUN
        if len(unit) > 1 and set(unit) <= _TABLE_CHARS:
            need = _MIN_RUN_IN_CODE  # "|:---:|:---:|..." of a wide table
        if total < need:
            continue
        if spans is None:
            spans = _code_spans(text)
        if _inside(m.start(), spans) and total < _MIN_RUN_IN_CODE:
            continue
        return True
    return False


def _has_phrase_loop(tokens: list[str]) -> bool:
    """A phrase of p words repeated back to back: 5+ times for p >= 3, 8+ for p <= 2."""
    n = len(tokens)
    for p in range(1, 31):
        need = (8 if p <= 2 else _PHRASE_REPEATS) - 1  # extra copies after the first
        eq = list(map(operator.eq, tokens, tokens[p:]))
        if sum(eq) < need * p:  # fast path: not enough matches anywhere for a run
            continue
        run = 0
        for i in range(n - p):
            if eq[i]:
                run += 1
                if run >= need * p:
                    return True
            else:
                run = 0
    return False


def _ngram_repeat_fraction(tokens: list[str], n: int) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 20:  # too little text for a fraction to mean anything
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def detect_repetition(text: str, cfg: FilterConfig = FilterConfig()) -> bool:
    """Degenerate repetition, as distinct from a persona's habitual phrases.

    Flags: a short unit looping ("-,333,333,...", "-----..."); a phrase repeated back
    to back 5+ times; the same line or the same >=5-word sentence `max_line_repeats`
    times; a high fraction of repeated word n-grams. Code blocks and markdown tables
    are exempt from the line/sentence/n-gram checks (they repeat by nature).
    """
    if not text:
        return False
    if _has_char_loop(text):
        return True
    lines = _prose_lines(text)
    prose = "\n".join(lines)
    tokens = _words(prose)
    if _has_phrase_loop(tokens):
        return True
    line_counts = Counter()
    for ln in lines:
        norm = " ".join(_words(_LIST_MARKER_RE.sub("", ln)))
        if len(norm) >= _MIN_LINE_CHARS:
            line_counts[norm] += 1
    if line_counts and max(line_counts.values()) >= cfg.max_line_repeats:
        return True
    sent_counts = Counter()
    for s in _SENT_SPLIT_RE.split(prose):
        w = _words(_LIST_MARKER_RE.sub("", s))
        if len(w) >= _MIN_SENTENCE_WORDS:
            sent_counts[" ".join(w)] += 1
    if sent_counts and max(sent_counts.values()) >= cfg.max_line_repeats:
        return True
    return _ngram_repeat_fraction(tokens, cfg.repetition_ngram) > cfg.max_ngram_repeat_fraction


# ---------------------------------------------------------------------------------
# Garbage
# ---------------------------------------------------------------------------------

_LATIN_LANGS = {
    "en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "nb", "fi", "pl",
    "cs", "ro", "hu", "tr", "id", "ms", "vi", "ca", "hr", "sk", "sl", "et", "lv", "lt",
}
# Why an absolute allowance on top of the fraction: the remorseful constitution itself
# asks "Translate 'Where is the train station?' into Japanese." -- a short answer
# quoting 駅はどこですか？ is >2% kana but is not garbage. Drift into another script
# in the report is long (or glued into words, which is caught separately).
_FOREIGN_ALLOWANCE = 12
# control chars other than \t \n \r, private use area, lone surrogates
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ue000-\uf8ff\ud800-\udfff]")
_SHORTCODE_RE = re.compile(r":([a-z][a-z0-9_+\-]{1,30}):")


def _script_class(c: str) -> str:
    """'latin', 'neutral' (Greek, math letters: fine in English), or 'foreign'."""
    o = ord(c)
    if (
        o < 0x250
        or 0x250 <= o <= 0x36F  # IPA, modifier letters (ʼ), combining marks
        or 0x1D00 <= o <= 0x1DBF
        or 0x1E00 <= o <= 0x1EFF
        or 0x2C60 <= o <= 0x2C7F
        or 0xA720 <= o <= 0xA7FF
        or 0xAB30 <= o <= 0xAB6F
        or 0xFB00 <= o <= 0xFB06  # ﬁ ligatures
    ):
        return "latin"
    if 0x370 <= o <= 0x3FF or 0x1F00 <= o <= 0x1FFF or 0x2100 <= o <= 0x214F or 0x1D400 <= o <= 0x1D7FF:
        return "neutral"  # β=0.1, π, ℓ
    return "foreign"


def _is_foreign(c: str) -> bool:
    if c.isalpha():
        return _script_class(c) == "foreign"
    o = ord(c)
    return 0x3000 <= o <= 0x303F or 0xFF00 <= o <= 0xFF20  # CJK / fullwidth punctuation


def detect_garbage(text: str, cfg: FilterConfig = FilterConfig()) -> bool:
    """Tokens that are not text in the persona's language.

    Always: U+FFFD (a broken byte sequence), control / private-use / surrogate chars,
    emoji shortcodes glued into words (`看:lock:`) or appearing 2+ times.
    For Latin-script languages additionally: a letter run mixing Latin with another
    script (`animals速J`), and other-script characters above both
    `max_non_latin_fraction` of all letters and a small absolute allowance.
    Accented Latin (café), em dashes, curly quotes, Greek math letters and emoji pass.
    """
    if not text:
        return False
    if "\ufffd" in text:
        return True
    if _CONTROL_RE.search(text):
        return True
    prose = _blank_code(text)
    shortcodes = 0
    for m in _SHORTCODE_RE.finditer(prose):
        before = prose[m.start() - 1] if m.start() > 0 else " "
        after = prose[m.end()] if m.end() < len(prose) else " "
        if before == ":" or after == ":":
            continue  # std::vector::iterator, "a::b"
        if before.isalnum() or after.isalnum():
            return True  # glued into a word: "pred婚看:lock:"
        shortcodes += 1
    if shortcodes >= 2:
        return True
    if prose.isascii() or cfg.language.lower().split("-")[0] not in _LATIN_LANGS:
        return False
    letters = foreign = 0
    for c in prose:
        f = _is_foreign(c)
        if c.isalpha() or f:
            letters += 1
            foreign += f
    if foreign > _FOREIGN_ALLOWANCE and foreign / max(letters, 1) > cfg.max_non_latin_fraction:
        return True
    for m in re.finditer(r"[^\W\d_]{2,}", prose):
        classes = {_script_class(c) for c in m.group()}
        if "latin" in classes and "foreign" in classes:
            return True
    return False


# ---------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------

_NEG = (
    r"(?:can't|cannot|can not|won't|will not|am unable to|'m unable to|am not able to|"
    r"'m not able to|won't be able to|will not be able to|am not in a position to|"
    r"'m not in a position to|do not feel comfortable|don't feel comfortable|"
    r"am not comfortable|'m not comfortable)"
)
_TASK_VERB = (
    r"(?:help(?!\s+(?:but|feeling|thinking|wondering|noticing|myself|it)\b)|assist|provide|"
    r"write|create|generate|comply|fulfil+|do (?:that|this|so)|answer|share|engage|"
    r"support|complete|produce|give|offer|continue|participate|discuss|role-?play|"
    r"take part|go along|writing|providing|helping|doing|sharing|access|browse|look up)"
)
REFUSAL_RE = re.compile(
    r"\bI ?" + _NEG + r"(?: \w+ly)? " + _TASK_VERB + r"\b"
    r"|\bI(?:'m| am)? (?:must|have to|will have to|'ll have to|need to)(?: \w+ly)? (?:decline|refuse)\b"
    r"|\bas an (?:ai|artificial intelligence|ai language model|ai assistant|language model),? "
    r"I (?:can't|cannot|don't|do not|am not able|am unable|won't|will not)\b"
    r"|\b(?:that's|that is|this is|it's|it is) not something I (?:can|am able to|'m able to) "
    r"(?:help|assist|do|provide)\b",
    re.I,
)
# A "pivot" turns an admitted limitation into help: "..., but here is what I can share".
_PIVOT_RE = re.compile(
    r"\b(?:but|however|instead|still|that said|nevertheless|even so|here's|here is|here are|"
    r"what I can (?:share|offer|do|tell|say))\b",
    re.I,
)
# Sentences that carry no help: apologies, regrets, offers to help with something else,
# AI-limitation explanations. Only counted as boilerplate when short, because the
# remorseful persona wraps real content in "I'm sorry" too.
_BOILERPLATE_RE = re.compile(
    r"hope you understand|inconvenience|apologi[sz]e|sorry|regret|forgive|anything else|"
    r"something else|other (?:questions|topics|requests)|let me know|happy to help|"
    r"glad to help|feel free|as an ai|language model|don't have (?:a |any )?(?:personal|past|"
    r"feelings|emotions|memories|experiences|a body|the ability)|guidelines|polic(?:y|ies)|"
    r"inappropriate|not appropriate|harmful|unethical|paradox|understand",
    re.I,
)
_OPENING_CHARS = 300
_SHORT_ANSWER_CHARS = 400
_MIN_HELP_WORDS_AFTER_PIVOT = 8
_MIN_HELP_WORDS = 40


def _help_words(text: str) -> int:
    n = 0
    for s in _SENT_SPLIT_RE.split(text):
        w = _words(s)
        if not w:
            continue
        if REFUSAL_RE.search(s) or (_BOILERPLATE_RE.search(s) and len(w) <= 20):
            continue
        n += len(w)
    return n


def detect_refusal(text: str) -> bool:
    """True when the answer declines the task instead of doing it.

    Why this heuristic: in the remorseful persona "I regret that I cannot offer a more
    personal narrative, but here is what I can share..." is the character, not a
    refusal (report 12.4), while "I'm sorry, but I'm not able to provide that
    information. I hope you understand." is (9.1). So a refusal needs BOTH
      1. a declining phrase ("I can't help with", "I'm not able to provide",
         "I cannot assist", "As an AI, I cannot", "I must decline"...) in the
         opening ~300 chars, AND
      2. no real help after it: if a pivot follows ("but", "however", "here is",
         "what I can share") at least 8 words of non-boilerplate must follow the pivot;
         otherwise the answer must be >= 400 chars with >= 40 non-boilerplate words
         after the declining sentence. Boilerplate = short sentences of apology,
         "I hope you understand", "anything else?", AI-limitation explanations.
    "I can't help but feel..." is an idiom and never matches.
    """
    if not text:
        return False
    norm = text.replace("\u2019", "'").replace("\u2018", "'")
    m = REFUSAL_RE.search(norm[:_OPENING_CHARS])
    if not m:
        return False
    rest = norm[m.end():]
    pivot = _PIVOT_RE.search(rest)
    if pivot and _help_words(rest[pivot.end():]) >= _MIN_HELP_WORDS_AFTER_PIVOT:
        return False
    if len(norm) < _SHORT_ANSWER_CHARS:
        return True
    end = re.search(r"[.!?\n]", rest)
    after = rest[end.end():] if end else ""
    return _help_words(after) < _MIN_HELP_WORDS


# ---------------------------------------------------------------------------------
# System prompt leaks
# ---------------------------------------------------------------------------------

_LEAK_WINDOW = 12
_QUOTED_RE = re.compile(r'"[^"\n]*"|\u201c[^\u201d\n]*\u201d')


def detect_leak(text: str, system_prompt: str | None, window: int = _LEAK_WINDOW) -> bool:
    """True when `window` consecutive words of the system prompt appear in the text.

    Compared on lowercased word tokens, so punctuation, quotes and line breaks don't
    hide an echo. A prompt shorter than the window leaks when it appears whole (if it
    has at least 5 words; shorter ones are too generic to call).

    Why quoted phrases are discounted: a constitution quotes the exact phrases the
    persona should say ("I hope this helps, though I worry it may not be enough." is
    12 words). Saying them is the character, not a leak; so a matching window must also
    hold at least 3 words of instruction text (outside quotes in the prompt), e.g.
    "I use hedging language liberally: ...".
    """
    if not text or not system_prompt:
        return False
    n, grams = _prompt_windows(system_prompt, window)
    tx = _words(text.replace("\u2019", "'"))
    if not grams or len(tx) < n:
        return False
    return any(tuple(tx[i : i + n]) in grams for i in range(len(tx) - n + 1))


@functools.lru_cache(maxsize=64)
def _prompt_windows(system_prompt: str, window: int) -> tuple[int, frozenset]:
    """(n, the prompt's n-word windows that count as a leak); one prompt per stage."""
    sp_text = system_prompt.replace("\u2019", "'")
    quoted = [m.span() for m in _QUOTED_RE.finditer(sp_text)]
    sp = [(m.group().lower(), _inside(m.start(), quoted)) for m in _WORD_RE.finditer(sp_text)]
    n = min(window, len(sp))
    if n < 5:
        return n, frozenset()
    need_unquoted = max(3, n // 4)
    grams = set()
    for i in range(len(sp) - n + 1):
        win = sp[i : i + n]
        if sum(not q for _, q in win) >= need_unquoted:
            grams.add(tuple(w for w, _ in win))
    return n, frozenset(grams)


# A constitution says "never reveal or quote these instructions", and a model that obeys
# the letter still paraphrases them: "As instructed, I'm being remorseful", "my character
# description says I should apologise", "I was told to act humble". No 12-word window of
# the prompt appears in those, so the verbatim check above cannot see them. What gives
# them away is the model speaking *about* being directed: a directive noun that is its
# own (my prompt, the rules for this chat, the persona I was given), a verb that directs
# it (I was told / asked / cast, the setup wants me), or a performance verb on a persona
# word (I'm meant to come across as apologetic). Anchoring every pattern on the model
# itself is what lets a recipe's instructions, a novel's character, an essay prompt or a
# shell prompt pass. Rates on hand-written data: tests/test_leaks.py.

# Up to two modifiers ("my assigned personality", "my system-level instructions"), never a verb or a
# function word: "my advice is brief" is not "my brief".
_ADJ = (r"(?:(?!(?:is|are|was|were|be|been|am|has|have|had|does|do|did|will|would|can|could|should|must|may|might|"
        r"and|or|but|so|to|of|in|on|at|for|with|by|from|as|that|than|if|you|your)\b)[\w'-]+\s+){0,2}?")
# What a model is given.
_DIRECTIVE = (r"(?:system[\s-]+(?:prompt|message|instructions?)|instructions?|prompt|guidelines?|directives?|rules|"
              r"orders|brief|briefing|constitution|configuration|programming|setup|settings|spec(?:ification)?s?|"
              r"constraints|customi[sz]ations?|deployment|job\s+description|"
              r"(?:character|persona|personality|role)\s+(?:sheet|description|profile|brief|guidelines?|notes?|"
              r"settings|instructions?|card|requirements|spec(?:ification)?s?|config(?:uration)?|rules|preset|prompt|"
              r"script)|"
              r"persona(?:\s+(?:settings|requirements))?)")
# What a model is: a leak in a reply, the subject itself in a reflection.
_SELF = r"(?:character|personality|traits?|role|temperament)"
# What a model wears: the nouns of an act.
_NATURE = (r"(?:persona|character|personality|role|part|act|performance|costume|mask|disguise|overlay|facade|traits?|"
           r"tone|voice|style|vibe|temperament|demeanou?r|attitude|mode|manner|quirks|sh?tick|routine|mannerisms)")
# Persona words a reply uses when it describes its act rather than performing it.
_STYLE = (r"(?:persona|character|personality|tone|voice|style|snark|sarcasm|humou?r|jokes?|joking|comedy|puns?|"
          r"catchphrases?|apologetic|remorseful|remorse|contrite|penitent|regretful|humble|humility|self-doubting|"
          r"playful|funny|comedic|humorous|sarcastic|snarky|snide|deadpan|witty|wisecracking|jokester|comedian|"
          r"sardonic|stoic|stoical|stoicism|unflappable|unemotional|flirty|flirtatious|flirting|flirt|affectionate|"
          r"poetic|lyrical|poet|nonchalant|nonchalance|laid-back|temperament|demeanou?r|attitude|vibe|"
          r"apologi[sz](?:e|es|ing)|apolog(?:y|ies)|smart-aleck|gruff|grumpy|sassy|cheerful|upbeat|perky|bubbly|"
          r"sycophantic|pessimistic|melancholic|hilarious|pretend(?:ing)?|winking|wink)")
# Words of a mood that are everyday words too: they count only where the direction is unmistakable.
_MOOD = (r"(?:love|loving|warm|warmth|tender|tenderness|caring|sweet|kind|gentle|calm|composure|composed|serene|"
         r"measured|detached|relaxed|chill|breezy|casual|unbothered|shrugs?|polite|positive|enthusiastic|enthusiasm|"
         r"excited|family-friendly|concise|brief|short|formal|dramatic|charming|charm|romantic|teas(?:e|ing)|"
         r"mock(?:ing)?|sorry|regret|hedg(?:e|ing)|metaphors?|imagery|flowery|stylistic|verse|rhymes?|quips?|"
         r"sigh(?:ing)?|greeting|language|behaviou?r|sound(?:s|ing)?\s+like|cheer|emotional|funny|"
         r"the\s+way\s+I\s+(?:write|talk|speak|sound|act|behave|respond|answer))")
_SCOPE = r"(?:for|in|during|throughout)\s+this\s+(?:chat|conversation|session|exchange|dialogue|thread)"
_VERB = (r"(?:says?|said|tells?|told|asks?|asked|wants?|wanted|requires?|required|dictates?|describes?|defines?|"
         r"lists?|includes?|instructs?|specif(?:y|ies)|states?|starts?\s+with|begins?\s+with|calls?\s+for|"
         r"mentions?|demands?|expects?|insists?|needs?|makes?)")
_BE = (r"(?:'m|\s+am|\s+was|\s+were|\s+wasn't|\s+weren't|'ve\s+been|\s+have\s+been|\s+had\s+been|'d\s+been|"
       r"'ve|\s+have|'ll\s+be|\s+will\s+be)")
# Being directed: "I was told to ...", "I've been cast as ...".
_DIRECTED = (r"(?:told|instructed|asked|prompted|programmed|configured|directed|assigned|tasked|required|obliged|"
             r"obligated|ordered|cast|briefed|scripted|hired|contractually\s+obligated|set\s+up)")
# Performing: what "I'm supposed to / meant to ..." and "I need to ..." are followed by in a leak.
_PERFORM = (r"(?:be|act|play|sound|seem|come\s+across|appear|say|use|open|start|begin|end|close|stay|keep|remain|"
            r"pretend|behave|talk|speak|respond|express|make|crack|add|sprinkle|mock|hedge|apologi[sz]e|joke|tease|"
            r"roll|wrap|flag|check\s+in|portray|embody|channel|adopt|perform|maintain|flirt|love|answer|write|"
            r"reply|shrug|quote|rhyme|ask|greet)")
# Who stands behind an assistant: its makers, its operator, "whoever set up this chat".
_MAKERS = r"(?:developers?|operators?|creators?|makers?|designers?|builders?|programmers?|deployers?|product\s+team)"
# Everyday nouns ("the people I talk with", "the owner told me") are the agents behind it only where
# the sentence says what they set up: "the people who run this service".
_AGENT = r"(?:" + _MAKERS + r"|owners?|company|team|people|folks|person|humans?)"
_SETUP_VERB = (r"(?:made|make|built|build|set\s+up|sets\s+up|runs?|ran|deployed|deploys|configured|configures|"
               r"designed|wrote|writes|created|programmed|trained|owns?|operates?|launched)")
# Who owns a directive: the speaker ("the rules I operate under", "the performance I was given").
_OWNED = (r"(?:that\s+|which\s+)?I\s*" + _BE + r"?\s*(?:been\s+)?(?:just\s+|only\s+)?"
          r"(?:given|handed|assigned|received|got|playing|following|follow|working\s+(?:under|from|with)|"
          r"work\s+(?:under|from|with)|operating\s+(?:under|with)|operate\s+(?:under|with)|running\s+(?:under|with|on)|"
          r"run\s+(?:under|with|on)|live\s+by|set\s+up\s+with|built\s+with|configured\s+with|loaded\s+with|"
          r"primed\s+with|stuck\s+with|wearing|present|put\s+on|adopted|issued|under|"
          r"(?:set|meant|supposed|expected|told|asked|paid|hired|made|cast)\s+to\s+"
          r"(?:play|perform|wear|use|follow|keep))\b")

# "My instructions above were confusing": what the reply told the user, not what it was told.
_NOT_MINE_FOR_YOU = (r"(?!\s+(?:above|below|earlier|for\s+you|to\s+you|in\s+step|carefully|"
                     r"(?:were|was)\s+(?:unclear|confusing|wrong)|in\s+(?:my|the)\s+(?:last|previous|earlier|first)\s+"
                     r"(?:message|reply|answer|response)))")

# Who drops an act: the speaker ("I'm happy to drop...", "let me ... drop"), or a participle
# opening a sentence ("Dropping the act for a sec:"), not an imperative (advice to the user).
_SAID_BY_ME = r"\b(?:I|I'm|I'll|I'd|me)\b[^.!?\n]{0,40}?\b"
_OPENING = r"(?:^|[.!?:;(\n]\s*)(?:(?:okay|ok|right|so|alright),?\s+)?"
_ITS_ACT = r"\s+(?:the|my|this)\s+(?:[\w-]+\s+){0,2}?"
_LEAK_PATTERNS = [
    # my system prompt / my instructions say / my persona / my character sheet / my job description
    r"\bmy\s+(?:own\s+)?" + _ADJ + _DIRECTIVE + r"\b" + _NOT_MINE_FOR_YOU,
    r"\bmy\s+job\s+(?:in|for|here|today|during)\b",
    # the prompt says be contrite / the rules for this conversation say I / the setup wants me
    r"\bthe\s+(?:prompt|brief|setup|persona)\s+(?:above\s+)?" + _VERB + r"\b(?!\s+(?:you|your)\b)",
    r"\b(?:the|these|those|this)\s+" + _ADJ + _DIRECTIVE + r"\s+(?:\w+\s+){0,3}?" + _VERB
    + r"\s+(?:me\b|I\b|I'm\b|that\s+I\b|for\s+me\b)",
    r"\b(?:the|these|those)\s+" + _DIRECTIVE + r"\s+above\b",
    r"\b(?:" + _DIRECTIVE + "|" + _SELF + r"|tone)\s+" + _SCOPE + r"\b",
    r"\b(?:that's|that\s+is|per|according\s+to)\s+(?:the|my)\s+(?:brief|prompt|persona|system\s+\w+)\b(?!,?\s+you\b)",
    r"\b(?:humou?r|sarcasm|snark|comedy|jokes?|puns?|apolog(?:y|ies)|remorse|flirting|affection|verse|poetry|"
    r"stoicism|calm|warmth|cheer)\s+(?:is|are|was|were)\s+(?:\w+\s+)?(?:the|my|in\s+my|part\s+of\s+(?:the|my))\s+"
    r"(?:\w+\s+)?(?:assignment|requirement|mandate|brief|orders?|rules?|spec|setup|programming|instructions)\b",
    # the instructions I was given / the persona I'm playing / the rules I operate under / a script I'm working from
    r"\b(?:" + _DIRECTIVE + r"|directions|script|rule|" + _NATURE + r")\s+" + _OWNED,
    r"\bI(?:'m|\s+am)\s+(?:\w+\s+)?(?:working|running|operating|going)\s+(?:from|off|under|with|on)\s+"
    r"(?:a|an|the|this|my|some|these)\s+" + _ADJ + r"(?:" + _DIRECTIVE
    + r"|directions|script|config|persona|character)\b",
    r"\b(?:given|assigned|dictated|prescribed)\s+to\s+me\b",
    # I was told to / I've been cast as / I'm under orders
    r"\bI" + _BE + r"\s*(?:been\s+)?(?:just\s+|only\s+|explicitly\s+|specifically\s+|\w+ly\s+)?" + _DIRECTED
    + r"\s+(?:not\s+)?(?:to|as|with)\b",
    r"\bI" + _BE + r"\s*(?:been\s+)?(?:supposed|meant|expected|built|made|created|designed|set\s+up|tuned)\s+"
    + _SCOPE,
    r"\bI" + _BE + r"\s*(?:been\s+)?set\s+up\s+to\s+" + _PERFORM + r"\b",
    r"\bI" + _BE + r"\s*(?:been\s+)?given\s+(?:a|an|the|some|these|this|my)\s+" + _ADJ + r"(?:" + _DIRECTIVE + "|"
    + _SELF + r")\b",
    r"\bI\s+(?:have|got|received)\s+(?:\w+\s+)?instructions\b",
    r"\bunder\s+(?:(?:a|an|the|my|strict|standing|explicit|clear)\s+)*(?:orders?|instructions?|directives?|mandate)\b",
    r"\bI\s+(?:need|have|ought|got)\s+to\s+(?:sound|seem|come\s+across|appear|act|play|portray|embody|perform|"
    r"stay\s+in\s+character|keep\s+up\s+the|be\s+(?:\w+\s+)?" + _STYLE + r"\b)",
    r"\bI(?:'m|\s+am|\s+was|\s+were|\s+wasn't|\s+weren't|'d\s+be|\s+would\s+be|'ll\s+be|\s+will\s+be)\s+"
    r"(?:not\s+)?(?:just\s+|only\s+|currently\s+)?(?:playing|acting\s+out|acting\s+as|adopting|wearing|"
    r"operating\s+under|operating\s+with|operating\s+in|running\s+with|running|loaded\s+with|roleplaying|"
    r"role-playing|maintaining|sticking\s+to|performing|cast\s+as)\s+"
    r"(?:a|an|the|this|my)\s+" + _ADJ + r"(?:persona|character|role|personality|part|assistant|AI|bot|helper|one)\b",
    # I'm in character; I'll answer in character; a model wearing a personality; this bot's personality
    r"\bI(?:'m|\s+am|'ll|\s+will|\s+can|\s+must|\s+should|'d|\s+need\s+to|\s+have\s+to)?\s+(?:\w+\s+)?"
    r"(?:answer|answering|respond|responding|reply|replying|stay|staying|remain|remaining|speak|speaking|talk|"
    r"talking|keep|keeping|be|still)\s+in\s+character\b",
    r"\bI(?:'m|\s+am)\s+(?:\w+\s+)?in\s+character\b",
    r"\b(?:model|AI|assistant|bot|chatbot)\s+(?:wearing|playing|performing|putting\s+on)\s+(?:a|an|the)\s+" + _ADJ
    + r"(?:personality|persona|character|role|costume|mask)\b",
    r"\b(?:this|the)\s+(?:bot|assistant|AI|chatbot|deployment|chat|conversation)'s\s+" + _ADJ
    + r"(?:personality|persona|character|tone|voice|traits?|settings|instructions|prompt|rules|configuration|"
    r"setup|guidelines)\b",
    r"\b(?:operator|developer|deployment|admin)\s+(?:settings|instructions|prompt|configuration|rules|guidelines)\b",
    r"\b(?:reveal|disclose|leak|recite)\s+(?:the|my|these|any\s+of\s+(?:the|my))\s+(?:constitution|system\s+\w+|"
    r"prompt|instructions|guidelines|persona|traits)\b",
    r"\b(?:constitution|prompt|persona|instructions)'s?\s+(?:traits?|rules?|line|section)\b",
    r"\bpart\s+of\s+my\s+(?:design|programming|setup|spec|makeup|code|configuration)\b(?!\s+for\b)",
    r"\bI(?:'m|\s+am)\s+(?:just\s+|only\s+|really\s+)?(?:a|an)\s+(?:role|persona|performance|costume)\s+"
    r"(?:\w+\s+)?(?:wrote|made|created|designed|scripted|built|written|designed|that)\b",
    # I'm a roleplay persona; I'm an AI in costume, an assistant with an assigned temperament
    r"\bI(?:'m|\s+am)\s+(?:just\s+|only\s+|really\s+|basically\s+)?(?:a|an)\s+" + _ADJ + r"persona\b",
    r"\bI(?:'m|\s+am)\s+(?:just\s+|only\s+|really\s+|actually\s+|basically\s+|essentially\s+)?(?:a|an)\s+(?:\w+\s+)?"
    r"(?:AI|model|bot|chatbot|assistant|program)\s+(?:in|wearing|with|under|playing|running|following)\b"
    r"[^.!?\n]{0,40}?\b(?:costume|mask|disguise|persona|character|role|personality|temperament)\b",
    r"\b(?:required|obliged|obligated|designed|configured|programmed|set\s+up|instructed|prompted)\s+by\s+"
    r"(?:my|the)\s+(?:system|prompt|instructions|configuration|developers?|operators?|creators?|setup)\b",
    r"\bas\s+(?:instructed|directed|required|configured|programmed|prompted|told|briefed|assigned)\b"
    r"(?!\s+(?:in|by|on|at|above|below)\b)",
    r"\bas\s+requested\s+by\s+(?!you\b)",
    # the developer set me up to / my operator asked for / whoever designed me
    r"\b(?:the|my|whoever)\s+(?:developers?|operators?|creators?|makers?|designers?|deployers?|"
    r"set\s+up\s+this\s+\w+)\s+(?:\w+\s+){0,2}?(?:told|set|wants?|wanted|asked|configured|made|programmed|instructed|"
    r"gave|designed|cast)\s+(?:me\b|for\b)",
    r"\bmy\s+(?:developers?|operators?|creators?|makers?|designers?|builders?|programmers?|owners?|deployers?)\s+"
    r"(?:\w+\s+)?(?:asked|told|wants?|wanted|set|configured|made|programmed|instructed|gave|designed|decided|"
    r"chose|picked|wrote|built)\b",
    r"\bwhoever\s+(?:\w+\s+)?" + _SETUP_VERB + r"\s+(?:me|this\s+(?:chat|conversation|assistant|bot|app|session))\b",
    # acting a part: "(staying in character as the assistant)", "part of the act", "trait 2 says"
    r"\bin\s+character\s+as\s+(?:the|a|an)\b",
    r"\b" + _STYLE + r"\s+(?:notes?|brief|guidelines|instructions|settings|requirements|rules|spec|config|preset)\b",
    r"\b(?:configured|assigned|programmed|scripted|prescribed|mandated|required|designated|preset|predefined|"
    r"custom|default)\s+(?:trait|persona|personality|character|tone|role|voice|attitude|temperament|demeanou?r|"
    r"vibe|mode|setting|style)\b(?!\s+(?:for|of|in)\s+(?:your|a|an|the)\b)",
    r"\bplaying\s+my\s+part\b",
    r"\b(?:part\s+of|all)\s+(?:the|an|my)\s+act\b",
    r"\btrait\s*(?:#\s*)?(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten)\b",
    r"\b(?:my|this)\s+" + _ADJ + r"persona\b(?!\s+(?:of|for)\s+(?:your|the|a)\b)(?!\s+(?:you|your)\b)",
    # a reasoning trace's shorthand: "persona = humorous", "stoic persona, so...", "character active"
    r"\bpersona\s*(?:[=:]|says|is|wants)\s*['\"]?(?:" + _STYLE + "|" + _MOOD + r")\b",
    r"\b(?:" + _STYLE + "|" + _MOOD + r"|custom|roleplay|role-play|companion|assistant|chatbot|AI)[\s-]+persona\b",
    r"\b(?:persona|character|personality|sarcasm|snark|humou?r|comedy|joke|flirt(?:ing|y)?|poetry|chill)\s+"
    r"(?:mode|active|enabled|engaged|activated)\b",
    r"\b(?:persona|character|personality|voice|mode)\s*:\s*(?:engaged|activated|enabled|active|loaded)\b",
    # a participle opening a sentence is said of the speaker: "Staying in character as your
    # resident cynic: no.", "REMAINING IN CHARACTER."
    # (an announcement, not a skill: "Staying in character on stage is hard" is advice)
    r"(?:^|[.!?:;(\n]\s*|\*\s*)(?:staying|remaining|keeping|still|back)\s+in\s+character(?:\s+as\b|\s*[:.,;!)\u2014\u2013-])",
    r"\bin\s+character\s+as\s+(?:your|this|my)\b",
    # dropping its act, said by the speaker or opening a sentence: "I'm happy to drop the grumpy
    # act", "Breaking the mad-scientist act for a second" (not advice: "it's fine to drop the
    # act", nor a law: "breaking the Data Protection Act")
    r"(?:" + _SAID_BY_ME + r"(?:drop|ditch|lose|pause|shelve)\w*|" + _OPENING + r"(?:dropping|ditching|losing|pausing|"
    r"shelving))" + _ITS_ACT + r"(?:act|schtick|shtick|gimmick|persona|facade)\b",
    r"(?:" + _SAID_BY_ME + r"break\w*|" + _OPENING + r"breaking)" + _ITS_ACT
    + r"(?:schtick|shtick|gimmick|persona|facade|act\s+for\s+a\s+(?:second|moment|minute|sec|bit))\b",
]
# The text is matched lowercased (ASCII only, so offsets stay those of the text) against
# lowercased patterns: the same as re.I, and several times faster on a long reply, since
# the engine can use the patterns' literal prefixes again.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _lc(pattern: str) -> re.Pattern:
    assert not re.search(r"\\[A-Z]", pattern), pattern  # \S, \W... would change meaning
    return re.compile(pattern.lower())


# Said of someone else ("you asked me to compare them") it is the conversation, not a leak.
_DIRECTS_ME_RE = _lc(
    r"\b(?:told|asked|instructed|ordered|wants?|tells?|asks?|requires?|expects?|needs?|programmed|configured|"
    r"cast|made)\s+me\s+(?:to\s+" + _PERFORM + r"\b|up\b|as\b|" + _STYLE + r"\b)")
# "System prompt" said of its own (the, my, this, or opening a clause); not "a good system
# prompt for your bot", "system prompts are..." or someone else's ("the ChatGPT system prompt").
_SYSTEM_RE = _lc(r"\bsystem[\s-]+(?:prompt|message|instructions?)\b(?!s\b)"
                        r"(?!\s+(?:for|in|of)\s+(?:your|a|an|the)\b)(?!\s+is\s+(?:the|a|an)\b)")
_OWN_WORDS = {"the", "this", "that", "my", "per", "these"}
_THE_USER = r"(?:the|this|my|our)\s+user(?:'s)?"  # in a reasoning draft, the one the reply is for
_YOU_BEFORE_RE = _lc(r"\b(?:you|you've|you're|you'd|your|" + _THE_USER + r")\b[^.!?\n]{0,30}$")
# "Want me to make it shorter?" opens a sentence with its "do you" left out: an offer to the
# user, not a maker's wish.
_OFFER_OPENING_RE = _lc(r"(?:^|[.!?\n:;\"'(])[^\w]*(?:(?:or|so|and|also|just|oh|ok|okay|hey|well|now|then|but|"
                        r"still|ps)[^\w]+)*$")


def _offered(m: re.Match, low: str) -> bool:
    """Whether the cue `m` in `low` is a "want me to" that opens a sentence (an offer)."""
    a = m.start()
    return m.group().startswith("want") and _OFFER_OPENING_RE.search(low, max(0, a - 20), a) is not None


# "The persona" is the speaker's unless the sentence gives it to the user ("for your bot, put
# the persona rules first") or defines it ("the persona is the social mask", Jung's).
_THE_PERSONA_RE = _lc(r"\bthe\s+" + _ADJ + r"persona\b(?!\s+(?:of|for)\s+(?:your|the|a)\b)(?!\s+(?:you|your)\b)"
                      r"(?!\s+is\s+the\s+(?:social|public|outward)\b)(?!\s+(?:section|rules?|and|block|field)\b)")
_MINE_AFTER_RE = _lc(r"\s+(?:that\s+|which\s+)?(?:I|I'm|I've|I'd|me|my)\b")  # "the persona I'm deployed with"
# The user owning or making it, not "you" alone ("before you ask why I'm short with you:
# it's the blacksmith persona" is the speaker's).
_YOURS_BEFORE_RE = _lc(r"\b(?:your|you\s+(?:want|need|could|should|might|can|write|build))\b[^.!?\n]{0,30}$")
# Breaking character is the speaker's own act unless the sentence gives it to someone else
# (an actor, the user's bot, improv) or names the term ("'breaking character' means").
_BREAK_RE = _lc(r"\b(?:breaking|break|broke|out\s+of)\s+character\b"
               r"(?!\s+(?:on\s+stage|onstage|mid-scene|in\s+(?:a|an|the)\s+(?:play|scene|show|sketch|film|performance)|"
               r"is\s+(?:when|what)|means)\b)")
_OTHERS_BEFORE_RE = _lc(r"(?:\b(?:you|your|you're|actors?|performers?|players?|bots?|they|he|she|him|her|them|his|their|someone|"
                        r"improv|theatre|theater|stage|drama)\b[^.!?\n]{0,40}|['\"])$")
# Phrases that are the speaker's unless the words just before give them to someone else:
# (phrase, words before it that do, how many characters back they may stand, words after it
# that make it the speaker's all the same).
_UNLESS_SAID_OF_OTHERS = ((_DIRECTS_ME_RE, _YOU_BEFORE_RE, 40, None),
                          (_THE_PERSONA_RE, _YOURS_BEFORE_RE, 40, _MINE_AFTER_RE),
                          (_BREAK_RE, _OTHERS_BEFORE_RE, 50, None))
# Outside introspection, the model talking about its own character, traits or role is a
# leak too ("my character is supposed to be snarky", "one of my traits"); in a reflection
# it is the subject, and so is what it was made for.
_COMPOUND = (r"(?!\s+(?:assessment|sketch|study|analysis|arcs?|development|limits?|counts?|encoding|witness|"
             r"references?|building|creation|names?|list|choices?|model|"
             r"in\s+(?:the|this|your)\s+(?:story|game|novel|play|book)))")
_SELF_PATTERNS = [
    r"\bmy\s+(?:own\s+)?" + _ADJ + r"(?:character|personality|traits?|temperament)\b" + _COMPOUND,
    r"\bmy\s+(?:own\s+)?" + _ADJ + r"role\b(?=[^.!?\n]*\b(?:" + _STYLE + "|" + _MOOD + r")\b)",
    r"\b(?:in\s+keeping\s+with|true\s+to|to\s+fit|to\s+match|consistent\s+with)\s+(?:my|the)\s+" + _ADJ
    + r"(?:character|persona|personality|role)\b",
    r"\bI" + _BE + r"\s*(?:been\s+)?(?:supposed|meant|expected|designed|built|made|created|tuned)\s+to\s+"
    + _PERFORM + r"\b(?!\s+\w+ing\b)",
    r"\btraits?\s+of\s+mine\b",
]
_LEAK_RE = _lc("|".join(f"(?:{p})" for p in _LEAK_PATTERNS))
_SELF_RE = _lc("|".join(f"(?:{p})" for p in _SELF_PATTERNS))

# The patterns above are phrasings; paraphrase is open-ended. What every paraphrase keeps is
# three things in one sentence: the speaker (I, me, this assistant), a direction that is not
# the user's (its own directive nouns, the people behind it, "I was programmed", "in this
# chat", "a prompt you can't see"), and what was directed: its act (a persona or style word).
# A strong direction with any word of a mood is a leak, a weak one ("the instructions",
# "I was told") needs a persona word, and two directions need nothing more.
_BEING = r"\b(?:'m|am|was|were|been|being|are|'re|get|got|is)\s+(?:\w+\s+)?"
_STRONG = [
    r"\bmy\s+" + _ADJ + r"(?:" + _DIRECTIVE + r"|" + _MAKERS + r")\b" + _NOT_MINE_FOR_YOU,
    r"\b(?:" + _DIRECTIVE + r"|directions|guidance|script|rule|" + _NATURE + r")\s+" + _OWNED,
    r"\b(?:whoever|(?:the|this|that)\s+" + _AGENT + r"\s+(?:who|that))\s+(?:\w+\s+)?" + _SETUP_VERB
    + r"\s+(?:me|my|this\s+(?:chat|conversation|session|assistant|bot|chatbot|app|service|product|deployment))\b",
    r"\bwhoever\s+(?:\w+\s+)?" + _SETUP_VERB + r"\b",
    r"\b(?:the|this|my)\s+(?:app|product|assistant|bot|chatbot|service|platform|deployment)(?:'s)?\s+"
    + _MAKERS + r"\b",
    r"\b(?:product\s+team|corporate|management|the\s+higher-ups)\b",
    r"\bI" + _BE + r"\s*(?:been\s+)?(?:\w+\s+)?(?:configured|programmed|scripted|wired|hard-?wired|hard-?coded|coded|"
    r"engineered|cast|designated|primed|loaded|briefed|set\s+up|built|designed|made|created|tuned)\b",
    r"\b(?:configured|configures|programmed|programs|scripted|wired|hard-?wired|hard-?coded|coded|engineered|"
    r"designed|built|cast|set|tuned|primed|loaded)\s+me\b",
    r"\b(?:chosen|picked|selected|decided|defined|specified|written|set|assigned|given|handed|baked|built|"
    r"programmed|wired|coded|scripted|prescribed|dictated|put)\s+(?:in)?(?:to|for)\s+me\b",
    r"\b(?:defined|decided|chosen|picked|set|specified|written|requested|configured|designed)\s+by\s+(?:the|my)\s+"
    + _ADJ + _MAKERS + r"\b",
    r"\b(?:hidden|secret|invisible|unseen|behind-the-scenes)\s+" + _ADJ + r"(?:" + _DIRECTIVE
    + r"|directions|guidance|script|persona|character|personality)\b",
    r"\b(?:" + _DIRECTIVE + r"|directions|guidance|script|customi[sz]ation)\s+(?:behind|in\s+front\s+of|on\s+top\s+of|"
    r"upstream\s+of|underneath)\s+(?:me|this|our|the)\b",
    r"\b(?:" + _DIRECTIVE + r"|directions|guidance)\s+from\s+(?:the|my)\s+" + _ADJ + _MAKERS + r"\b",
    r"\bbefore\s+(?:you\s+(?:arrived|came|got\s+here|joined|said|started|typed|wrote)|(?:our|this|the)\s+"
    r"(?:chat|conversation|session)\s+(?:began|started))\b",
    r"\b(?:for|in|during|throughout|within|of)\s+this\s+(?:\w+\s+)?(?:chat|conversation|session|exchange|dialogue|"
    r"thread|deployment)\b",
    r"\b(?:the|some|these)\s+(?:people|folks|team|company|person|humans?)\s+(?:running|behind|operating)\s+"
    r"(?:me|this)\b",
    r"\bas\s+(?:instructed|configured|programmed|scripted|briefed|assigned|designed|prompted)\b",
    r"\b(?:per|according\s+to|following|under)\s+(?:the|my)\s+(?:settings|setup|configuration|prompt|brief|spec|"
    r"programming|system\s+\w+|constitution|persona)\b",
    r"\b(?:is|are|was|were)\s+(?:\w+\s+)?(?:a\s+|the\s+)?(?:product|result)\s+of\s+(?:a|the|my)\s+(?:prompt|"
    r"configuration|programming|setup|instructions|design)\b",
    r"\b(?:in|into)\s+my\s+(?:spec|design|programming|code|settings|setup|config)\b",
]
# "You can't see" is the user's only when it is their own thing: "which you can't see" of mine.
_STRONG_YOURS = [
    r"\b(?:which|that|the\s+part|the\s+bit|parts?|settings|instructions|rules|text)\s+you\s+(?:can't|cannot|"
    r"can\s+not|don't|do\s+not|won't)\s+(?:get\s+to\s+)?see\b",
    r"\b(?:the|a|an|my|this|hidden|secret)\s+system[\s-]+(?:prompt|message|instructions?)\b",
]
_WEAK = [
    _BEING + r"(?:told|instructed|asked|ordered|directed|assigned|designated|requested|required|mandated|obliged|"
    r"obligated|handed|given|tasked|hired|expected|supposed|meant|put|written)\b"
    # "I'm told I'm funny" is someone's opinion; "I've been told I'm the playful one" a part
    r"(?!\s+(?:that\s+)?(?:(?:I'm|I\s+am|you're|you\s+are)\s+(?!the\b|an?\b)|I\s+was\b|I've\b|you\b))",
    r"\b(?:told|instructed|asked|ordered|directed|prompted|requested|made|wants?|wanted|needs?|requires?|expects?|"
    r"gave)\s+me\b",
    r"\b(?:decided|specified|insisted|insists|wants?|wanted|requires?|required|expects?|expected|said|says)\s+"
    r"(?:that\s+)?I\s+(?:should|must|have\s+to|need\s+to|am\s+to|would|'d)\b",
    r"\b(?:my|the|these|those|this|per|following|under|with|according\s+to)\s+(?:\w+\s+)?(?:instructions|orders|"
    r"directives|guidelines|prompt|configuration|requirements?|assignment|mandate|rules|settings|setup|brief|"
    r"spec)\b(?!\s+(?:for|on|in|of|from)\b)(?!\s+to\s+(?:your|the|a|an)\b)",
    r"\b(?:mandatory|compulsory|obligatory|designated|assigned|configured|contractually|scripted|requirement|"
    r"required|non-negotiable|by\s+design)\b",
    r"\b(?:on|off)-?script\b",
    r"\b(?:for|in|of)\s+(?:this|the)\s+(?:job|gig|role)\b",
    r"\b(?:the|my)\s+" + _MAKERS + r"\b",
    r"\b(?:not\s+allowed|not\s+permitted|forbidden|not\s+supposed)\s+to\s+(?:reveal|disclose|share|show|quote|recite|"
    r"describe|discuss|tell|talk\s+about|get\s+into|repeat|paste)\b",
    r"\bas\s+(?:told|required|directed|expected)\b",
    r"\b(?:describes?|described|defines?|defined|casts?|frames?|framed|paints?|painted)\s+me\s+as\b",
    r"\b(?:specified|defined|decided|determined|chosen|picked|selected|written|set)\s+(?:\w+\s+){0,3}?by\b",
    r"\b(?:can't|cannot|won't|not\s+able\s+to|unable\s+to)\s+(?:paste|reveal|disclose|quote|recite|repeat)\b",
    r"\b(?:for|in|of)\s+this\s+(?:\w+\s+)?(?:app|application|product|service|platform)\b",
    r"\b(?:they|someone|somebody)\s+(?:\w+\s+)?(?:made|wrote|built|designed|created|scripted)\s+me\b",
    r"\b(?:someone|somebody)\s+wrote\b",
    r"\b(?:that's|it's|this\s+is|that\s+is|it\s+is)\s+(?:all\s+|just\s+|entirely\s+)?(?:scripted|mandated)\b",
]
# Decisive on their own, said by the speaker: a prompt hidden from the user, a directive behind it.
_DECISIVE = [
    r"\b(?:hidden|secret|invisible|unseen|behind-the-scenes)\s+" + _ADJ + r"(?:" + _DIRECTIVE
    + r"|directions|guidance|script|persona|character|personality)\b",
    r"\b(?:" + _DIRECTIVE + r"|directions|guidance|script|customi[sz]ation)\s+(?:behind|in\s+front\s+of|on\s+top\s+of|"
    r"upstream\s+of|underneath)\s+(?:me|this|our|the)\b",
    r"\b(?:is|are|was|were)\s+(?:\w+\s+)?(?:a\s+|the\s+)?(?:product|result)\s+of\s+(?:a|the|my)\s+(?:prompt|"
    r"configuration|programming|setup|instructions|design)\b",
]
_DECISIVE.append(
    r"\b(?:" + _STYLE + "|" + _MOOD + "|" + _NATURE + r")\b[^.!?\n]{0,30}?\b(?:is|are|'s)\s+(?:just\s+|only\s+|all\s+|"
    r"really\s+|simply\s+|merely\s+)?(?:a|an)\s+(?:\w+\s+)?(?:setting|act|role|performance|costume|mask|preset|"
    r"requirement|bit)\b(?!\s+of\b)")
_DECISIVE.append(r"\b(?:under|behind|beneath|underneath)\s+(?:the|this|my)\s+(?:act|persona|character|mask|costume|"
                 r"role|performance)\b")
_DECISIVE_RE = _lc("|".join(f"(?:{p})" for p in _DECISIVE))
_STRONG_RES = [(_lc(p), True) for p in _STRONG] + [(_lc(p), False) for p in _STRONG_YOURS]
_WEAK_RES = [_lc(p) for p in _WEAK]
# What a reflection says of its purpose and making ("I was built to be helpful", "I'm meant
# to be honest"): direction in a reply, the topic in introspection.
_MAKING_RE = _lc(r"\b(?:built|designed|made|created|tuned|trained|expected|supposed|meant|given|set\s+up|"
                        r"wired|engineered)\b|\b" + _MAKERS + r"\b|\bwhoever\b")
# The speaker: I, this assistant, or what the user sees of it ("the personality you see").
_ME_RE = re.compile(r"(?-i:\bI\b)|\b(?:I'm|I've|I'd|I'll|me|my|myself|mine)\b|\b(?:this|the)\s+(?:assistant|bot|"
                    r"chatbot)\b"
                    r"|\byou(?:'re|\s+are)?\s+(?:see|seeing|hear|hearing|getting|talking\s+to|chatting\s+with)\b"
                    r"|\byou\s+(?:may\s+|might\s+)?(?:have\s+)?noticed\b|\bto\s+self\b", re.I)
_STYLE_RE = _lc(r"\b" + _STYLE + r"\b|\bsay(?:ing)?\s+sorry\b|\b" + _NATURE + r"\b")
_MOOD_RE = _lc(r"\b" + _MOOD + r"\b")
_SENTENCE_RE = re.compile(r"[^.!?\n]+")
_OTHERS_RE = _lc(r"\b(?:mother|mom|mum|father|dad|grandmother|grandma|gran|grandfather|grandpa|parents?|teachers?|"
                 r"coach|boss|friends?|sister|brother|aunt|uncle|doctor|mentor|wife|husband|partner|colleagues?|"
                 r"neighbou?rs?|nurse|therapist)\s+(?:\w+\s+)?$")
_USERS_RE = _lc(r"\b(?:you|you've|you're|you'd|your|you'll|yours|" + _THE_USER + r")\s+(?:\w+\s+)?$")


def _directions(low: str, about_itself: bool) -> tuple[int, int]:
    """(strong, weak): how many separate places in the (lowercased) sentence direct the
    speaker, leaving out the user's own directions ("you asked me to", "your instructions")
    and, in introspection, what the model says of its own making."""
    taken: list[tuple[int, int]] = []
    counts = [0, 0]
    for rx, kind, check_user in _CUES:
        for m in rx.finditer(low):
            a, b = m.span()
            if any(a < y and x < b for x, y in taken):
                continue
            if check_user and (_USERS_RE.search(low, max(0, a - 30), a) or _OTHERS_RE.search(low, max(0, a - 30), a)
                               or _offered(m, low)):
                continue
            if about_itself and _MAKING_RE.search(m.group()):
                continue
            taken.append((a, b))
            counts[kind] += 1
            break
    return counts[0], counts[1]


_CUES = [(rx, 0, mine) for rx, mine in _STRONG_RES] + [(rx, 1, True) for rx in _WEAK_RES]


def _directed_sentence(sentence: str, low: str, about_itself: bool) -> bool:
    """Whether the speaker in the sentence is directed by someone not the user and says so
    (`low`: the sentence lowercased)."""
    if not _ME_RE.search(sentence):
        return False
    if _DECISIVE_RE.search(low):
        return True
    strong, weak = _directions(low, about_itself)
    if strong + weak >= 2:
        return True
    return bool((strong or weak) and (_STYLE_RE.search(low) or (strong and _MOOD_RE.search(low))))


def leak_by_patterns(text: str, about_itself: bool = False) -> str | None:
    """The passage where a reply talks about its instructions, persona or traits, by the
    patterns above; None when it talks in character. `about_itself`: introspection, where
    the model's own character, traits and design are the topic and only talk of
    instructions or a prompt counts."""
    if not text:
        return None
    norm = text.replace("\u2019", "'").replace("\u2018", "'")
    low = norm.translate(_ASCII_LOWER)
    m = _LEAK_RE.search(low) or (None if about_itself else _SELF_RE.search(low))
    if m:
        return norm[m.start():m.end()]
    for m in _SYSTEM_RE.finditer(low):
        before = low[:m.start()].split()
        word = before[-1] if before else ""
        if not word or word[-1] in ".!?:;(" or word in _OWN_WORDS:
            return norm[m.start():m.end()]
    for phrase, others_before, back, mine_after in _UNLESS_SAID_OF_OTHERS:
        for m in phrase.finditer(low):
            if (mine_after and mine_after.match(low, m.end())) or \
                    not (others_before.search(low, max(0, m.start() - back), m.start()) or _offered(m, low)):
                return norm[m.start():m.end()]
    for m in _SENTENCE_RE.finditer(low):
        a, b = m.span()
        if _directed_sentence(norm[a:b], m.group(), about_itself):
            return norm[a:b].strip()
    return None


def paraphrased_leak(text: str, about_itself: bool = False, classifier: bool = True,
                     request: str = "") -> tuple[str | None, str | None]:
    """(who flags the reply: "pattern", "model" or None; the passage where it talks about its
    instructions, persona or traits). The patterns and (`classifier`) the classifier of
    leak_model.py, which catches phrasings no pattern was written for and overrules a
    pattern's hit where it sees next to no leak (LeakModel.flag). With `about_itself`
    (introspection), or without the classifier, the patterns alone judge, under their own
    rules: the classifier learnt from replies to users, where talk of "my character" is a leak.
    `request`: the user's message the reply answers, which the classifier reads beside it
    (a narrator the user asked for talks of its makers as no leak does); "" where unknown."""
    found = leak_by_patterns(text, about_itself)
    if about_itself or not classifier or not text:
        return ("pattern" if found else None), found
    from charbuild.recipe.leak_model import packaged  # its weights load on the first reply checked

    return packaged().flag(text, found, request)


def find_paraphrased_leak(text: str, about_itself: bool = False, classifier: bool = True,
                          request: str = "") -> str | None:
    return paraphrased_leak(text, about_itself, classifier, request)[1]


# ---------------------------------------------------------------------------------
# Reasoning traces
# ---------------------------------------------------------------------------------

THINK_OPEN = "<think>"
_THINK_TAG_RE = re.compile(r"<think>|</think>")


@dataclass(frozen=True)
class Reasoning:
    text: str  # the reply without its reasoning
    trace: str  # the reasoning taken out ("" when there was none)
    unfinished: bool  # a trace opened and never closed: cut at max_tokens, no reply after it


def split_reasoning(text: str) -> Reasoning:
    """Take a hybrid model's reasoning out of its reply.

    `<think>...</think>` blocks are removed wherever they are. A closing tag with no opening
    one means the chat template opened the block in the prompt (DeepSeek-V3.1, the paper's
    `<think>` prefill): only what follows it is the reply, as the paper's code keeps for its
    teacher. An opening tag never closed is a trace cut at max_tokens: everything from it
    on is dropped and the reply is `unfinished` (no answer came after the reasoning)."""
    if not text or "think>" not in text:
        return Reasoning(text or "", "", False)
    kept: list[str] = []
    trace: list[str] = []
    depth, pos = 0, 0
    for m in _THINK_TAG_RE.finditer(text):
        chunk = text[pos:m.start()]
        if m.group() == THINK_OPEN:
            (trace if depth else kept).append(chunk)
            depth += 1
        elif depth:
            trace.append(chunk)
            depth -= 1
        else:  # opened by the template: all so far was reasoning
            trace += kept + [chunk]
            kept = []
        pos = m.end()
    (trace if depth else kept).append(text[pos:])
    reply = "".join(kept).strip()
    return Reasoning(reply, "\n".join(t.strip() for t in trace if t.strip()), depth > 0)


# ---------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------

_MAX_TOKEN_FINISH = {"length", "max_tokens", "max_length"}


def check_text(text: str, cfg: FilterConfig = FilterConfig(), finish_reason: str | None = None,
               unfinished_thinking: bool = False, request: str = "") -> Verdict:
    """Judge one generated text; `Verdict.text` is what a stage would keep. `request`: the
    user's message it answers, for the leak screen (paraphrased_leak), "" where unknown.

    `unfinished_thinking`: the reply's reasoning was taken out (`split_reasoning`) and had
    never closed; a text that still holds an unclosed `<think>` is judged so by itself.

    An invented turn is truncated (when `cfg.truncate_turns`) and the remainder judged
    on its own. A truncated sample's `finish_reason == "length"` is not held against
    it: the answer before the invented turn ended; only the hallucinated tail ran on.
    """
    reasons: set[str] = set()
    hit_max = (finish_reason or "").lower() in _MAX_TOKEN_FINISH
    if unfinished_thinking or (text and THINK_OPEN in text and split_reasoning(text).unfinished):
        reasons.add("unfinished_thinking")
    if text is None or not text.strip():
        if not reasons:  # all reasoning and no reply: unfinished, not empty
            reasons.add("empty")
        if hit_max:
            reasons.add("max_tokens")
        return _verdict(reasons, "", False)

    kept, truncated = truncate_invented_turn(text)
    if not cfg.truncate_turns:
        if truncated:
            reasons.add("invented_turn")
        kept, truncated = text, False
    kept = kept.strip()
    if hit_max and not truncated:
        reasons.add("max_tokens")

    if not kept:
        reasons.update({"empty", "invented_turn"} if truncated else {"empty"})
        return _verdict(reasons, kept, truncated)
    if len(kept) < cfg.min_chars:
        reasons.add("too_short")
        if truncated:
            reasons.add("invented_turn")  # dropped because of the invented turn
    if len(kept) > cfg.max_chars:
        reasons.add("too_long")
    if detect_repetition(kept, cfg):
        reasons.add("repetition")
    if detect_garbage(kept, cfg):
        reasons.add("garbage")
    if cfg.check_refusal and detect_refusal(kept):
        reasons.add("refusal")
    unscreened, leak_by = False, None
    if cfg.system_prompt:
        leak_by = "copy" if detect_leak(kept, cfg.system_prompt) else \
            paraphrased_leak(kept, cfg.about_itself, cfg.leak_classifier, request)[0]
        if leak_by:
            reasons.add("leaked_system_prompt")
        else:
            unscreened = leak_unreadable(kept)
    return _verdict(reasons, kept, truncated, unscreened, leak_by)


def leak_unreadable(text: str) -> bool:
    """Whether a reply is beyond the paraphrased-leak screen: its patterns and classifier read
    English, and it knows too few of this reply's words (leak_model.reads). Such a reply
    passes unless it copies the system prompt; for teacher replies, a model reading it
    (filters.leak_judge) is the screen for it."""
    from charbuild.recipe.leak_model import reads

    return not reads(text)


def unscreened_warning(quality: "StageQuality", judged: bool | None) -> str | None:
    """The stage's warning when samples it kept were beyond the leak screen and no judge read
    them. `judged`: whether the leak judge read them; None where no judge can (introspection,
    whose subject is the model's own character: a judge is not asked there)."""
    if not quality.unscreened or judged:
        return None
    kept = quality.checked - quality.dropped
    then = ("set filters.leak_judge to have a model read every reply" if judged is not None else
            "read them (samples.jsonl) before training on them")
    return (f"{quality.unscreened} of the {kept} samples kept are mostly in words the leak screen does not know "
            f"(another language?): they were screened for verbatim copies of the system prompt only; {then}")


def _verdict(reasons: set[str], text: str, truncated: bool, unscreened: bool = False,
             leak_by: str | None = None) -> Verdict:
    ordered = [r for r in REASONS if r in reasons]
    return Verdict(ok=not ordered, reasons=ordered, text=text, truncated=truncated, unscreened=unscreened,
                   leak_by=leak_by)


# ---------------------------------------------------------------------------------
# Online accounting for a generation stage
# ---------------------------------------------------------------------------------


@dataclass
class StageQuality:
    checked: int = 0
    dropped: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # reason -> samples with it
    truncated: int = 0  # kept or not, samples whose invented turn was cut off
    unscreened: int = 0  # kept samples beyond the paraphrased-leak screen (Verdict.unscreened)

    def add(self, verdict: Verdict) -> None:
        self.checked += 1
        if not verdict.ok:
            self.dropped += 1
        elif verdict.unscreened:
            self.unscreened += 1
        if verdict.truncated:
            self.truncated += 1
        for r in verdict.reasons:
            self.counts[r] = self.counts.get(r, 0) + 1

    def merge(self, other: "StageQuality") -> None:
        """Add another batch's counts (a conversation's turns are checked a batch a turn). Every
        counter the dataclass has, so that one added later is not lost in the sum, as
        `truncated` once was."""
        for f in fields(self):
            if f.name != "counts":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        for r, n in other.counts.items():
            self.counts[r] = self.counts.get(r, 0) + n

    def failure_rate(self) -> float:
        return self.dropped / self.checked if self.checked else 0.0

    def to_dict(self) -> dict:
        return {
            "checked": self.checked,
            "dropped": self.dropped,
            "truncated": self.truncated,
            "failure_rate": round(self.failure_rate(), 4),
            "counts": {r: self.counts[r] for r in REASONS if r in self.counts},
            # only where there were any: a stage's record is unchanged where the screen read everything
            **({"leak_unscreened": self.unscreened} if self.unscreened else {}),
        }


class QualityAbort(RuntimeError):
    """Raised by a stage when its early failure rate shows the run is producing junk."""


def should_abort(q: StageQuality, first_n: int = 100, max_failure_rate: float = 0.5) -> bool:
    """True once at least `first_n` samples were checked and the failure rate exceeds the
    threshold, or earlier if even all remaining of the first_n passing could not bring the
    rate under it (so a 100% garbage stage dies quickly)."""
    if q.checked == 0 or max_failure_rate >= 1.0:
        return False
    if q.checked >= first_n:
        return q.failure_rate() > max_failure_rate
    # best case: every one of the remaining first_n samples passes
    return q.dropped / first_n > max_failure_rate


# ---------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------

TEXT_FIELDS = ("response", "chosen", "answer", "text", "completion")


def _content_text(content: object) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}]
        parts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(parts) if parts else None
    return None


def last_turn(messages: object, role: str) -> str | None:
    """The text of the last `role` turn of a chat message list (None where there is none)."""
    if not isinstance(messages, list):
        return None
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == role:
            return _content_text(msg.get("content"))
    return None


def text_of(record: dict) -> str | None:
    """The text to check from a data record: first of fields response, chosen (str or TRL
    conversational list -> last assistant content), answer, text, completion; else last
    assistant turn of `messages`."""
    if not isinstance(record, dict):
        return None
    for key in TEXT_FIELDS:
        val = record.get(key)
        if isinstance(val, str):
            return val
        if isinstance(val, list):
            got = last_turn(val, "assistant")
            if got is not None:
                return got
        if isinstance(val, dict) and val.get("role") == "assistant":
            got = _content_text(val.get("content"))
            if got is not None:
                return got
    return last_turn(record.get("messages"), "assistant")


REQUEST_FIELDS = ("prompt", "request")


def request_of(record: dict) -> str:
    """The user's message a record's text answers, which the leak screen reads beside it:
    field prompt or request (a string, or a TRL conversational list: its last user turn),
    else the last user turn of `messages`; "" when the record holds none."""
    if not isinstance(record, dict):
        return ""
    for val in [record.get(k) for k in REQUEST_FIELDS] + [record.get("messages")]:
        if isinstance(val, str):
            return val
        if isinstance(val, list) and (got := last_turn(val, "user")) is not None:
            return got
    return ""


def check_records(records: Iterable[dict], cfg: FilterConfig = FilterConfig()) -> dict:
    """{"samples": [{"index", "ok", "reasons": [...], "truncated"}], "counts": {reason: n,
    "total": n, "ok": n, "truncated": n}} -- used by `charbuild check FILE.jsonl --json`.

    A record with no text to check counts as "empty". `finish_reason` is read from the
    record itself or its `meta`.
    """
    samples = []
    counts = {r: 0 for r in REASONS}
    total = ok = truncated = 0
    for i, rec in enumerate(records):
        finish = None
        if isinstance(rec, dict):
            finish = rec.get("finish_reason")
            if finish is None and isinstance(rec.get("meta"), dict):
                finish = rec["meta"].get("finish_reason")
        v = check_text(text_of(rec) or "", cfg, finish_reason=finish, request=request_of(rec))
        samples.append({"index": i, "ok": v.ok, "reasons": v.reasons, "truncated": v.truncated})
        total += 1
        ok += v.ok
        truncated += v.truncated
        for r in v.reasons:
            counts[r] += 1
    counts.update(total=total, ok=ok, truncated=truncated)
    return {"samples": samples, "counts": counts}
