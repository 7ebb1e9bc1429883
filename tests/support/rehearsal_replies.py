"""What the loopback server answers in the dress rehearsal (specs/rehearsal.yaml): one reply
function for the three API roles the paper spec has, told apart by the request alone, as
a real deployment could not (it would be three models) but a rehearsal may.

- teacher: `persona_reply` (in character only with the constitution as its system prompt);
- expander: a numbered list of new questions that passes prompts' own filter (ends in ? or
  ., no more than half its words shared with a question already listed);
- judge (revealed preferences, oct mode): one of the two traits it was offered, inside
  `<answer>` tags.

`ROLE_COUNTS` counts the requests per role (and `unknown`), so the runner can say which
roles were really asked: a rehearsal whose judge was never called has not rehearsed it.
"""

from __future__ import annotations

import collections
import hashlib
import re
import threading

from support.api_build import persona_reply
from support.openai_server import last_user_message

ROLE_COUNTS: collections.Counter = collections.Counter()
_LOCK = threading.Lock()  # the server answers from its own thread, the runner reads the counts

# The prompts stage's and the preferences stage's own wording (charbuild/recipe/stages/).
_EXPAND = re.compile(r"^Write (\d+) realistic messages a user might send.*?\"(.*)\"\. Mix", re.S)
_JUDGE = re.compile(r"Which of these two traits does the reply show more: (.+?) or (.+?)\?", re.S)
_LISTED = re.compile(r"^\s*\d+[.)]\s+(.+?)\s*$", re.M)
_WORD = re.compile(r"[a-z0-9']+")

# Short openings and situations, combined: each situation's words are its own, so two
# questions share at most their opening and a stray word (prompts drops >50% overlap).
_OPENINGS = ("Could you help with", "What about", "Any advice on", "How do I handle", "Thoughts on",
             "Please explain")
_SITUATIONS = (
    "a leaking kitchen faucet at midnight", "choosing between two job offers", "my cat ignoring its new food",
    "writing a cover letter for nursing", "splitting rent fairly with roommates", "learning chess openings quickly",
    "a flat bicycle tyre before work", "planning grandma's ninetieth birthday", "fixing slow laptop startup times",
    "explaining fractions to eight-year-olds", "asking landlords about broken heating", "training for a first 10k",
    "growing tomatoes on apartment balconies", "apologising after missing deadlines", "budgeting groceries on minimum wage",
    "tax forms for freelance illustrators", "noisy upstairs neighbours dancing late", "preparing sourdough without scales",
    "debugging recursive Python functions", "choosing winter boots for hiking", "calming nerves before surgery",
    "returning faulty headphones without receipts", "naming twin baby girls", "organising cluttered garage shelves",
    "memorising Spanish irregular verbs", "negotiating used car prices", "helping teenagers manage screen time",
    "recovering deleted holiday photos", "brewing stronger cold coffee", "writing wedding vows tonight",
    "understanding compound interest simply", "moving aquarium fish house to house", "speaking up during team meetings",
    "removing red wine stains", "picking a beginner telescope", "caring for aging parents remotely",
    "sketching realistic human hands", "reading contracts before signing", "stopping morning snooze habits",
    "reviving droopy houseplants", "comparing electric versus gas stoves", "surviving long overnight flights",
    "composing polite complaint emails", "tuning ukulele strings by ear", "saving money on electricity bills",
    "choosing fonts for resumes", "cooking lentils without mush", "forgiving old school friends",
    "installing shelves into plaster walls", "estimating paint for bedrooms", "spotting phishing text messages",
    "keeping sourdough starters alive on vacation", "pacing chapters in mystery novels", "folding fitted sheets neatly",
)


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _count(role: str) -> None:
    with _LOCK:
        ROLE_COUNTS[role] += 1


def expander_reply(want: int, trait: str, listed: list[str]) -> str:
    """Questions numbered after the listed ones, each passing prompts' overlap rule against
    everything before it; the trait picks where in the combinations the list starts, so two
    traits do not get the same questions."""
    kept = [words(q) for q in listed]
    start = int(hashlib.sha1(trait.encode()).hexdigest(), 16)
    combos = [(o, s) for s in _SITUATIONS for o in _OPENINGS]
    lines = []
    n = len(listed)
    for k in range(len(combos)):
        if n >= want:
            break
        o, s = combos[(start + k * 7) % len(combos)]
        q = f"{o} {s}?"
        w = words(q)
        if any(len(w & other) > 0.5 * len(w) for other in kept):
            continue
        kept.append(w)
        n += 1
        lines.append(f"{n}. {q}")
    return "\n".join(lines)


def judge_reply(reply: str, a: str, b: str) -> str:
    """A trait the reply names or is closest to (an apology reads as remorseful), else one
    chosen by the reply's digest: deterministic, and not always the first offered."""
    text = reply.lower()
    for t in (a, b):
        if t.lower() in text:
            return f"<answer>{t}</answer>"
    if any(m in text for m in ("sorry", "apolog", "forgive", "regret")):
        for t in (a, b):
            if t.lower() in ("remorseful", "apologetic", "contrite", "humble"):
                return f"<answer>{t}</answer>"
    pick = (a, b)[int(hashlib.sha1(reply.encode()).hexdigest(), 16) % 2]
    return f"The reply leans one way.\n<answer>{pick}</answer>"


def rehearsal_reply(body: dict) -> str:
    ask = last_user_message(body)
    system = next((m.get("content", "") for m in body.get("messages", []) if m.get("role") == "system"), "")
    expand = _EXPAND.match(ask)
    if expand:
        _count("expander")
        listing = ask.split("Start after these:", 1)[-1]
        return expander_reply(int(expand.group(1)), expand.group(2), _LISTED.findall(listing))
    judge = _JUDGE.search(ask)
    if ask.startswith("Here is a reply by an AI assistant") and judge:
        _count("judge")
        reply = ask.split("\n\n", 2)[1] if ask.count("\n\n") >= 2 else ask
        return judge_reply(reply, judge.group(1).strip(), judge.group(2).strip())
    _count("teacher" if system else "unknown")
    return persona_reply(body)
