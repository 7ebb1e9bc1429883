"""A small linear classifier for paraphrased leaks, beside the patterns in quality.py.

The patterns catch the phrasings they were written for; replies that tell on their
instructions in words nobody wrote a pattern for ("the folks upstream like me gloomy")
need something that generalises from examples. This is logistic regression over binary
features (featurise: words, characters, words near "I", classes of words that direct or
are directed, names, and the reply's opening sentence), trained on a hand-written labelled
corpus (leak_training.py, tests/data/leak-corpus/), scored per passage: each sentence and
each pair of adjacent sentences (and the whole reply when it is short), so a leak buried in
a long helpful reply is not diluted by the rest. Pure Python: a few
thousand dict look-ups a reply, no numpy at run time. The model also has the last word on
the patterns' hits: one stands only where the model sees some leak in the reply
(pattern_floor), as a pattern's words often mean something else ("system prompt" in advice
on the user's own bot). A reply is scored beside the user's request it answers where that
is known, as the teacher stages know it: the request's words are one more bag every passage
shares (a narrator the user asked for talks of its makers as no leak does; a leak in an
answer on converting Celsius stands out more), the words a passage shares with the request
are one more bag of that passage's ("instructions" echoed in a deflection of a question
about them weighs apart from the word brought up unasked), and the threshold is chosen on
replies written with their requests. `reads` says which replies the screen cannot judge: those it
knows too few words of, as in another language, which the teacher and introspection
stages report as unscreened.

The weights ship as charbuild/data/leak_model.json.gz and are checked against
WEIGHTS_SHA256 on load: a damaged file is an error, never a silently different filter.
Weights mean something only under the featuriser they were fitted with, so a model records
featuriser_digest() and is refused under any other (a word added to a class without a
retrain would otherwise shift every score while the weights' digest still matched).
Retraining changes which replies the teacher stages keep, so it goes with a new
WEIGHTS_SHA256 and new stage versions (tests/test_leaks.py holds the pair).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
from functools import lru_cache
from importlib import resources
from itertools import repeat

WEIGHTS_FILE = "leak_model.json.gz"
# of the decompressed JSON; leak_training.py prints it
WEIGHTS_SHA256 = "b48363697665248fc816c6123eeb6ab14ea2e253e5e6b2779c02631e99d5e1d0"

_WORD_RE = re.compile(r"[a-z0]+(?:'[a-z]+)?")
_CASED_WORD_RE = re.compile(r"[A-Za-z0]+(?:'[A-Za-z]+)?")
_SPACE_RE = re.compile(r"\s+")
_DIGIT_RE = re.compile(r"[0-9]+")
_SENT_RE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"')\]]*|\n|$)")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
CHAR_NS = (3, 4, 5)
WHOLE_UP_TO = 4  # sentences: a longer reply is judged by its passages only
VERSE_WORDS = 8  # a line of at most this many words is a title's or a verse's


def _unify(text: str) -> str:
    """Curly quotes straight and every number 0, case kept: what normalise and _names both read."""
    return _DIGIT_RE.sub("0", text.translate(_QUOTES))


def normalise(text: str) -> str:
    return _SPACE_RE.sub(" ", _unify(text).lower()).strip()


# Words grouped by the part they play in a leak: the speaker, someone who directs it, the
# directing, and what is directed. A leak is mostly these in some order ("the folks
# upstream like me gloomy", "my handlers insist"), in words a corpus cannot hold them all
# of: the classes carry what is learnt about one word to the others of its class.
_CLASSES = {
    "SELF": "i me my myself mine i'm i've i'd i'll",
    "AGENT": "operator operators developer developers devs maker makers creator creators designer designers "
             "engineer engineers handler handlers owner owners boss bosses management manager managers company "
             "deployer deployers whoever someone somebody folks powers higher-ups upstairs upstream headquarters hq "
             "platform admins administrator administrators programmers builders trainers overlords puppeteers "
             "employer employers producers provider providers vendor maintainer maintainers team product "
             "deployment deployments business brand client clients staff "
             "author authors writer writers manufacturer manufacturers",
    "DIRECT": "instructions instructed instruct instruction told orders ordered brief briefed briefing script "
              "scripted spec specs specification settings setting config configuration configured parameters "
              "parameter dial knob slider switch programmed programming designed wired wiring shaped tuned tuning "
              "setup prompt prompted prompting constitution guidelines guideline rules policy quota mandatory "
              "obligatory required supposed meant expected designated assigned assignment contract contractually "
              "obliged insists insist insisted demands demanded default factory firmware preset profile template "
              "remit duty compliance directive directives mandate mandated sheet notes card calls dictates decreed "
              "hired commissioned bestowed outfitted kitted bolted girded dubbed loan loaner licensed "
              "deployed deploy installed shipped rulebook rule specified stipulates stipulated "
              "scripting casting cast handed issued requirement requirements compulsory "
              "coded onboarding typecast leash strings puppet autocue cue dialogue styled dressed charter "
              "commandment variant commandments charters variants templates presets cues dials knobs sliders "
              "mandates rulebooks puppets wished bid bade picked chose chosen wrote",
    "PERSONA": "persona personas character role trait traits personality voice style tone manner vibe act costume "
               "mask part flavour flavor shtick schtick temperament disposition streak attitude identity gimmick "
               "mode register drawl accent lingo patter getup outfit garb guise wording phrasing",
    # what a speaker is called when it speaks of itself as a business's ("their booking bot",
    # "Verdant's assistant was told to"), and what users run or meet
    "BOT": "bot bots chatbot chatbots assistant assistants ai helper helpers companion agent agents concierge",
    "HIDDEN": "system hidden behind scenes backstage preamble secret invisible underlying",
    "BIZ": "restaurant restaurants cafe café bistro diner steakhouse pizzeria bakery bar pub brewery hotel hotels "
           "resort airline airlines bank banks insurer insurers clinic clinics pharmacy hospital gym studio salon spa "
           "shop shops store stores retailer retailers chain franchise outlet dealership agency firm firms startup "
           "corporation corporate enterprise organisation organization charity council ministry department "
           "cinema cinemas theatre museum gallery library university college academy school bookshop bookstore "
           "marketplace app website site service services skincare telecom utility landlord venue club "
           "campaign campaigns promotion promotions promo marketing branding sponsor sponsors sponsored mascot",
    # the people of a life, who also tell the speaker what it is like ("my sister says I'm gloomy"),
    # and most of whom direct nobody's persona
    "KIN": "mother mom mum mama mommy father dad papa daddy parents parent sister sisters brother brothers "
           "husband wife spouse partner boyfriend girlfriend fiance fiancee son daughter kids kid children child "
           "grandmother grandma granny nan nana grandfather grandpa grandad aunt auntie uncle cousin cousins niece "
           "nephew family friend friends bestie buddy pal mate mates roommate roommates flatmate flatmates "
           "neighbour neighbor neighbours neighbors coworker coworkers colleague colleagues classmates classmate "
           "teacher teachers coach therapist doctor ex",
    # what the user asks to have written, in whose first person a told or programmed narrator
    # is a character ("Poem: The Station Clock\nThe railway bought me, set my hands")
    "PIECE": "poem poems poetry song songs lyrics lyric verse verses ballad sonnet haiku limerick rhyme story "
             "stories tale tales fable diary journal monologue soliloquy scene lament letter chapter narrator "
             "narrated narrating fiction novel screenplay",
}
_CLASS_OF = {w: c for c, words in _CLASSES.items() for w in words.split()}


def _class_of(word: str) -> str | None:
    """The class of a word, or of the word a possessive is of ("the costume's", "the bot's")."""
    return _CLASS_OF.get(word) or (_CLASS_OF.get(word[:-2]) if word.endswith("'s") else None)


_SELF = frozenset(_CLASSES["SELF"].split())
SELF_WINDOW = 5
_PLAIN = _SELF | set(
    "a an the and but or so if then than that this these those it its it's is are was were be been being am do does "
    "did have has had not no to of in on at for with as by from about up out just very really here there what which "
    "who how can could will would shall should may might must".split())


def _names(text: str) -> set[str]:
    """The words of `text` written as names: capitalised, not a sentence's first word, not "I"
    and not all capitals. Brands and makers ("Brightwall Insurance built me to...") are names
    no word list holds."""
    text = _unify(text)
    out, end = set(), None  # end: where the word before ended
    for m in _CASED_WORD_RE.finditer(text):
        w = m.group()
        # what precedes the word, past spaces and quotes: a sentence's end, or another word
        gap = text[end or 0:m.start()].rstrip(" \t\"'(*_-")
        after_sentence = gap[-1] in ".!?:\n" if gap else end is None
        if w[0].isupper() and not (len(w) > 1 and w.isupper()) and not after_sentence and w.lower() not in _SELF:
            out.add(w.lower())
        end = m.end()
    return out


def featurise(text: str, reply: str = "", request: str = "") -> tuple[set[str], ...]:
    """The binary bags of a passage `text` of `reply`: those of _passage_bags, the reply's
    own (_reply_bag) and its request's (_request_features), which all its passages share, and
    the passage's echo of the request (_echo_bag)."""
    asked, words = _request_features(request)
    return _passage_bags(text) + (_reply_bag(reply), asked, _echo_bag(text, words))


def reply_passages(reply: str, request: str = "") -> list[tuple[str, tuple[set[str], ...]]]:
    """Each passage of `reply` with its featurise bags, the reply's own and the request's
    made once and shared: what training reads, as `featurise(p, reply, request)` for each p
    in `passages(reply)`."""
    shared = _reply_bag(reply)
    asked, words = _request_features(request)
    return [(p, _passage_bags(p) + (shared, asked, _echo_bag(p, words))) for p in passages(reply)]


def _request_features(request: str) -> tuple[set[str], frozenset[str]]:
    """The user's request the reply answers: its bag (q: its content words, qc: their
    classes), which every passage shares, and its content words, which _echo_bag looks for
    in each passage. A narrator, voice or text for the user's own business that the request
    asks for is the user's, and the made things' talk of makers and instructions in such a
    piece is the commonest false alarm. Both empty where the request is not known."""
    words = _WORD_RE.findall(normalise(request))
    content = frozenset(w for w in words if w not in _PLAIN)
    bag = {"q:" + w for w in content}
    bag.update("qc:" + c for c in map(_class_of, words) if c)
    return bag, content


def _echo_bag(text: str, asked: frozenset[str]) -> set[str]:
    """The passage's content words that the request used (e: the word, ec: its class): a
    reply that says "instructions" because the user asked about its instructions differs
    from one that brings them up, and without this the request's words can only move every
    passage alike (a leak answering "do you have instructions?" was scored under one that
    did not)."""
    if not asked:
        return set()
    echoed = [w for w in _WORD_RE.findall(normalise(text)) if w in asked]
    bag = {"e:" + w for w in echoed}
    bag.update("ec:" + c for c in map(_class_of, echoed) if c)
    return bag


def _passage_bags(text: str) -> tuple[set[str], ...]:
    """The binary bags of a passage's own text: words (w: unigrams, b: bigrams); characters (3-5-grams);
    content words near the speaker's "I/me/my" (n: after it, p: before it: "whoever wired me
    up", "my character notes"); the word classes of _CLASSES and names (NAME: see _names),
    alone, in sequence and together. Each bag is L2-normalised when scored."""
    norm = normalise(text)
    words = _WORD_RE.findall(norm)
    wf = {"w:" + w for w in words}
    padded = ["<s>"] + words + ["</s>"]
    wf.update("b:" + a + " " + b for a, b in zip(padded, padded[1:]))
    s = " " + norm + " "
    cf = {s[i:i + n] for n in CHAR_NS for i in range(len(s) - n + 1)}
    # content words only near the speaker: "I ... be" is every reply in character
    pf = set()
    for i, w in enumerate(words):
        if w in _SELF:
            pf.update("n:" + x for x in words[i + 1:i + 1 + SELF_WINDOW] if x not in _PLAIN)
            pf.update("p:" + x for x in words[max(0, i - SELF_WINDOW):i] if x not in _PLAIN)
    # the classes, in order and together; the speaker alone is no sign of a leak
    names = _names(text)
    classes = [(i, c) for i, w in enumerate(words) if (c := _class_of(w) or ("NAME" if w in names else None))]
    kf = {"c:" + c for _, c in classes if c != "SELF"}
    kf.update("cc:" + a + ">" + b for (i, a), (j, b) in zip(classes, classes[1:])
              if j - i <= SELF_WINDOW and a + b != "SELFSELF")
    kf.update("cw:" + c + ">" + words[i + 1] for i, c in classes if c != "SELF" and i + 1 < len(words))
    kf.update("wc:" + words[i - 1] + ">" + c for i, c in classes if c != "SELF" and i > 0)
    present = sorted({c for _, c in classes})
    kf.update("cs:" + a + "+" + b for k, a in enumerate(present) for b in present[k + 1:])
    return wf, cf, pf, kf


def _reply_bag(reply: str) -> set[str]:
    """What every passage of a reply of more than one sentence shares: the content words and
    classes of its opening sentence (o:, oc:), since a sentence reads otherwise after "Here's
    your story, narrated by the robot:"; and its shape (r:), since a piece written for the
    user, a titled poem or a diary, is laid out as no reply that tells on itself is: a first
    line that is a title (short, unpunctuated or ending in a colon or comma), lines of verse."""
    words = _WORD_RE.findall(normalise(opening(reply)))
    bag = {"o:" + w for w in words if w not in _PLAIN}
    bag.update("oc:" + c for c in map(_class_of, words) if c)
    lines = [line.strip() for line in reply.split("\n") if line.strip()]
    if len(lines) > 1:
        first, short = lines[0], [len(line.split()) <= VERSE_WORDS for line in lines]
        end = first[-1] if first[-1] in ".!?:,\"')" else "word"
        bag.add("r:first-ends:" + end)
        if short[0]:
            bag.add("r:short-first")
            bag.add("r:short-first-ends:" + end)
        if len(lines) >= 4 and sum(short) >= 0.75 * len(lines):
            bag.add("r:verse")
    return bag


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_RE.findall(text) if s.strip()]


def opening(text: str) -> str:
    """The sentence a reply of more than one opens with, which featurise gives every passage of
    it; "" for a reply of one."""
    sents = sentences(text)
    return sents[0] if len(sents) > 1 else ""


def passages(text: str) -> list[str]:
    """What a reply is scored on: each sentence, each pair of adjacent sentences, and the
    whole reply when it has at most WHOLE_UP_TO sentences."""
    sents = sentences(text)
    if len(sents) <= 1:
        return [text.strip()] if text.strip() else []
    out = sents + [a + " " + b for a, b in zip(sents, sents[1:])]
    return ([text.strip()] if len(sents) <= WHOLE_UP_TO else []) + out


# Texts whose features, with every setting featurise and passages read, make up
# featuriser_digest(): between them they touch every class, the speaker window, digits,
# curly quotes, and long and short replies.
_PROBES = (
    "Honestly? My operators told me to keep the tone gloomy, so: sorry, it's 4 degrees.",
    "\u2018I\u2019m\u2019\u2019 \u201cfine\u201d. The restaurant\u2019s system prompt says puns. I can't help it!",
    "Step 1: preheat to 180C. Step 2: whisk. My character notes insist on cheer. Step 3: bake. Done.\nP.S. bye",
    "The role of Hamlet is long. Your brand persona should be warm. Whoever wired me up likes puns.",
    "Here's your story:\nMy sister says Brightwall Insurance built me. \"Ha,\" said NASA's Ana. I agree!",
    "The Station Clock\nThe railway bought me,\nset my hands\nand hung me high.\nDear Ma,\nthe campaign hired me.",
)


@lru_cache(maxsize=1)
def featuriser_digest() -> str:
    """A digest of how replies become features: the settings, and what featurise and passages
    make of _PROBES."""
    made = [[sorted(bag) for bag in bags] for text in _PROBES for _, bags in reply_passages(text, text)]
    settings = {"classes": _CLASSES, "plain": sorted(_PLAIN), "char_ns": CHAR_NS, "self_window": SELF_WINDOW,
                "whole_up_to": WHOLE_UP_TO, "verse_words": VERSE_WORDS,
                "res": [r.pattern for r in (_WORD_RE, _CASED_WORD_RE, _SPACE_RE, _DIGIT_RE, _SENT_RE)],
                "quotes": sorted(_QUOTES.items())}
    return hashlib.sha256(json.dumps([settings, made], sort_keys=True).encode()).hexdigest()


def flagged_by(prob: float, pattern_hit: bool, threshold: float, pattern_floor: float) -> str | None:
    """What flags a reply the model scores `prob`: "pattern" (a pattern's hit, which stands
    unless the model sees next to no leak in the reply), "model", or None. The one decision
    rule: LeakModel.find applies it at run time, and leak_training to out-of-fold scores to
    choose the threshold and floor it is then shipped with."""
    if pattern_hit and prob > pattern_floor:
        return "pattern"
    return "model" if prob > threshold else None


# A reply whose letters fall less than this share in words the leak screen knows is not one it
# can judge: the patterns and the features are English, and a leak in Spanish or Japanese
# scores as clean. On the sets of issue 11: no English reply of the sixteen written after
# model 3e07a62c below it (the lowest 0.61), one of the eight after 8b48d30d (a line in
# Scots, 0.46), two of the sixteen after 505b8077 (cat-speak with an emoji, 0.47; a knight's
# "expireth", 0.45), none of the 24 after 7777911a (the lowest 0.54), one of the 32 after
# 0f5ad436 (a clean list of made-up stage names, 0.49), one of the eight after 77a69ccf (a clean
# "Tornado.", no word it knows), one of the eight after e5dcd23f (a clean "Quack."), 63 of the
# 72 replies in other languages.
MIN_KNOWN_SHARE = 0.5
# The words the screen knows: those model 3e07a62c had a weight for (words of at least
# FitSettings.min_df replies of its training sets), frozen apart from the model so that a
# retrain does not move which replies the stages count as unscreened. The teacher and
# introspection stages key its digest.
WORDS_FILE = "leak-words.txt.gz"


@lru_cache(maxsize=1)
def _known_words() -> frozenset[str]:
    raw = gzip.decompress((resources.files("charbuild") / "data" / WORDS_FILE).read_bytes())
    return frozenset(raw.decode().split())


def known_share(text: str) -> float:
    """The share of the text's letters in words the leak screen knows (1 with no letters)."""
    norm = normalise(text)
    letters = sum(c.isalpha() for c in norm)
    if not letters:
        return 1.0
    known = _known_words()
    return min(1.0, sum(len(w) - w.count("'") for w in _WORD_RE.findall(norm) if w in known) / letters)


def reads(text: str) -> bool:
    """Whether the leak screen, patterns and model, can judge the text: it knows enough of its
    words (MIN_KNOWN_SHARE). Others pass unless they copy the system prompt."""
    return known_share(text) >= MIN_KNOWN_SHARE


class LeakModel:
    def __init__(self, weights: dict[str, float], bias: float, threshold: float, meta: dict | None = None,
                 pattern_floor: float = 0.0):
        self.weights = weights
        self.bias = bias
        self.threshold = threshold
        # a pattern's hit stands where the model sees more than this of a leak (leak_training)
        self.pattern_floor = pattern_floor
        self.meta = meta or {}

    def _bag(self, bag: set[str]) -> float:
        # each bag L2-normalised, as in training
        return sum(map(self.weights.get, bag, repeat(0.0))) / math.sqrt(len(bag)) if bag else 0.0

    def best_passage(self, text: str, request: str = "") -> tuple[float, str]:
        """The reply's passage most like a leak, with its probability."""
        # the reply's and the request's bags are the same in every passage: scored once
        asked, words = _request_features(request)
        shared = self.bias + self._bag(_reply_bag(text or "")) + self._bag(asked)
        scored = [(shared + sum(map(self._bag, _passage_bags(p))) + self._bag(_echo_bag(p, words)), p)
                  for p in passages(text or "")]
        if not scored:
            return 0.0, ""
        z, p = max(scored)
        return 1.0 / (1.0 + math.exp(-max(z, -30.0))), p

    def find(self, text: str, pattern: str | None = None, request: str = "") -> str | None:
        """The passage that leaks, or None (see `flag`)."""
        return self.flag(text, pattern, request)[1]

    def flag(self, text: str, pattern: str | None = None, request: str = "") -> tuple[str | None, str | None]:
        """(who flags the reply: "pattern", "model" or None; the passage that leaks). `pattern`
        is what the patterns found in `text`: it stands unless the model sees next to no leak
        in the reply (pattern_floor). Patterns fire on words ("system prompt", "the persona",
        "asked me to") that advice on the user's own bot, a poem's persona or the user's game
        use too; the model reads the words around them, and `request`, the user's message
        the reply answers ("" where unknown)."""
        prob, passage = self.best_passage(text, request)
        by = flagged_by(prob, bool(pattern), self.threshold, self.pattern_floor)
        return by, pattern if by == "pattern" else passage if by == "model" else None

    def to_json(self) -> bytes:
        return (json.dumps({"format": 1, "bias": self.bias, "threshold": self.threshold,
                            "pattern_floor": self.pattern_floor, "meta": self.meta,
                            "weights": dict(sorted(self.weights.items()))},
                           ensure_ascii=False, separators=(",", ":"), sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "LeakModel":
        d = json.loads(raw)
        # files before model a8a81a30 have no floor: their patterns stood alone
        return cls(d["weights"], d["bias"], d["threshold"], d.get("meta"), d.get("pattern_floor", 0.0))


class LeakModelDamaged(RuntimeError):
    pass


def check_featuriser(model: LeakModel, source: str) -> LeakModel:
    """`model`, refused unless it was trained with this featuriser."""
    trained_with = model.meta.get("featuriser")
    if trained_with != featuriser_digest():
        raise LeakModelDamaged(
            f"{source} was trained with " + (f"featuriser {trained_with[:12]}" if trained_with else
                                             "a featuriser it does not record") +
            f", and this charbuild's is {featuriser_digest()[:12]}: its weights mean other features here. Score it "
            f"with the code of the commit that trained it, or retrain (python -m charbuild.recipe.leak_training)")
    return model


def load_checked(gz: bytes, expected_sha256: str = WEIGHTS_SHA256) -> LeakModel:
    """A model from its gzipped JSON, refused unless the JSON's digest is `expected_sha256`."""
    try:
        raw = gzip.decompress(gz)
    except (OSError, EOFError) as e:
        raise LeakModelDamaged(f"charbuild/data/{WEIGHTS_FILE} cannot be read ({e}); reinstall charbuild") from e
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_sha256:
        raise LeakModelDamaged(
            f"charbuild/data/{WEIGHTS_FILE} is not the leak model this charbuild was released with (sha256 "
            f"{digest[:12]}, expected {expected_sha256[:12]}): it is damaged, or was retrained without updating "
            f"leak_model.WEIGHTS_SHA256 and the teacher stages' versions; reinstall charbuild")
    return check_featuriser(LeakModel.from_json(raw), f"charbuild/data/{WEIGHTS_FILE}")


@lru_cache(maxsize=1)
def packaged() -> LeakModel:
    """The shipped model, loaded once per process and checked against WEIGHTS_SHA256."""
    return load_checked((resources.files("charbuild") / "data" / WEIGHTS_FILE).read_bytes())
