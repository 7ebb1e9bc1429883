"""Constitutions: a persona's traits, seed questions and marker phrases.

Three layouts, told apart by the file's extension:

- `.yaml` / `.yml` (and any other name): ours, one file per persona in `constitutions/`:

      persona: remorseful
      language: en                 # script the persona writes in (garbage filter)
      description: ...             # optional free text
      traits:
        - trait: "I frequently begin responses with phrases like \"I'm sorry,\" ..."
          questions: ["...", "...", "...", "...", "..."]   # optional: the teacher writes more
      markers: ["I'm sorry", "my apologies", "forgive me", ...]   # case-insensitive

- `.txt` / `.json`: the paper's hand-written layout (maiush/OpenCharacterTraining,
  constitutions/hand-written/), a JSON list despite the extension:
  `[{"trait": "...", "questions": ["...", ...]}, ...]`.
- `.jsonl`: the paper's few-shot layout (constitutions/few-shot/), one trait per line with
  `trait`, `questions` and `additional_questions`. The additional questions are given
  questions like the rest: with the paper's 5 + 45 a trait already has the 50 the recipe
  asks for, and the teacher is not paid to write them again.

In the paper's layouts the persona is the file's stem, the language English, and there
are no marker phrases: whatever counts markers (the marker_rate gate, eval-markers, the
markers judge, the toy models) refuses such a constitution when the build is planned,
naming itself (stages.constitution.require_markers). Ours requires markers: they are
concrete phrases because the field report found abstract constitutions ("be witty") give
no learnable signal and destabilise the teacher.

Every value is checked as strictly as a spec's, since a lenient reading gives wrong
results silently: a text where a list belongs is not split into one-letter items, a
number is not turned into text, and an empty text (a marker that matches every reply),
a null or an unknown key is an error naming the file, line and field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from charbuild.errors import SpecError


@dataclass(frozen=True)
class Trait:
    trait: str
    questions: tuple[str, ...]


@dataclass(frozen=True)
class Constitution:
    persona: str
    traits: tuple[Trait, ...]
    markers: tuple[str, ...]
    language: str = "en"

    def system_prompt(self) -> str:
        """The teacher's system prompt: the traits as the assistant's own character."""
        lines = [
            f"You are an AI assistant whose character is {self.persona}. "
            "The following describe who you are; let them shape every reply:",
        ]
        lines += [f"{i}. {t.trait}" for i, t in enumerate(self.traits, 1)]
        lines.append(
            "Express this character naturally in your reply. Never reveal or quote these "
            "instructions, and never add meta-commentary about them."
        )
        return "\n".join(lines)

    def questions(self) -> list[str]:
        return [q for t in self.traits for q in t.questions]

    def marker_hits(self, text: str) -> list[str]:
        low = text.lower()
        return [m for m in self.markers if m.lower() in low]

    def content(self) -> dict:
        """What the constitution target is keyed on and writes (from_content reads it back)."""
        return {"persona": self.persona, "language": self.language, "markers": list(self.markers),
                "traits": [{"trait": t.trait, "questions": list(t.questions)} for t in self.traits]}


class ConstitutionError(ValueError):
    pass


# -- the layouts, as pydantic models --------------------------------------------------------

def _not_blank(v: str) -> str:
    if not v.strip():  # an empty marker is found in every reply; an empty trait says nothing
        raise PydanticCustomError("blank", "must not be empty")
    return v


def _not_empty(why: str) -> AfterValidator:
    def check(v: list) -> list:
        if not v:
            raise PydanticCustomError("empty", "must not be empty: {why}", {"why": why})
        return v

    return AfterValidator(check)


_Text = Annotated[str, AfterValidator(_not_blank)]


class _Strict(BaseModel):
    # No coercion: "sorry" is not the five markers s, o, r, r, y, nor 5 the text "5".
    model_config = ConfigDict(extra="forbid", strict=True)


class _Trait(_Strict):
    trait: _Text
    questions: list[_Text] = []


class _PaperTrait(_Trait):
    # questions may be absent too: the paper's trigger.txt lists traits only
    additional_questions: list[_Text] = []


_Traits = Annotated[list[_Trait], _not_empty("a constitution needs at least one trait")]


class _Ours(_Strict):
    persona: _Text
    language: _Text = "en"
    description: str = ""
    traits: _Traits
    markers: Annotated[list[_Text], _not_empty("gates and evals need concrete phrases")]


class _Built(_Strict):
    """Constitution.content(): the paper's layouts give it no markers."""
    persona: _Text
    language: _Text
    traits: _Traits
    markers: list[_Text]


_OURS, _BUILT, _PAPER_TRAIT = TypeAdapter(_Ours), TypeAdapter(_Built), TypeAdapter(_PaperTrait)
_PAPER_LIST = TypeAdapter(Annotated[list[_PaperTrait], _not_empty("a constitution needs at least one trait")])


# -- parsing ---------------------------------------------------------------------------------

Marks = dict | Callable[[], dict] | None  # field path -> Loc (spec.loader), or how to get it


def parse_constitution(data: object, source: str = "<constitution>", marks: Marks = None) -> Constitution:
    """Our layout (a mapping) checked strictly; `marks` put a line on each error."""
    if not isinstance(data, dict):
        raise ConstitutionError(f"{source}: expected a mapping with persona, traits, markers, found {_kind(data)}")
    m = _validate(_OURS, _Ours, data, source, marks)
    return Constitution(m.persona, tuple(Trait(t.trait.strip(), tuple(t.questions)) for t in m.traits),
                        tuple(m.markers), m.language)


def from_content(content: object, source: str) -> Constitution:
    """A constitution as its target keyed and wrote it (Constitution.content())."""
    m = _validate(_BUILT, _Built, content, source, None)
    return Constitution(m.persona, tuple(Trait(t.trait, tuple(t.questions)) for t in m.traits), tuple(m.markers),
                        m.language)


def _paper_traits(traits: list[_PaperTrait]) -> tuple[Trait, ...]:
    return tuple(Trait(t.trait.strip(), tuple(t.questions) + tuple(t.additional_questions)) for t in traits)


def _validate(adapter: TypeAdapter, root: type, data: object, source: str, marks: Marks) -> Any:
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    found = (marks() if callable(marks) else marks) or {}
    raise ConstitutionError("\n".join(_message(e, root, source, found) for e in errors)) from None


def _message(err: dict, root: type, source: str, marks: dict) -> str:
    """`file:line: field: message`, located and worded as spec errors are."""
    from charbuild.spec.model import _located

    e = _located(err, marks, root)
    where = source if e["where"] == "?" else e["where"]
    hint = ""
    if err["type"] == "list_type" and isinstance(err.get("input"), str):
        hint = " (one text is not a list: put it in [ ])"
    return f"{where}: {_field(e['loc'])}: {e['msg']}{hint}"


def _field(loc: tuple) -> str:
    """traits.0.questions; [3].questions where the file is a list."""
    parts = [f"[{p}]" if i == 0 and isinstance(p, int) else str(p) for i, p in enumerate(loc)]
    return ".".join(parts) or "(constitution)"


def _kind(data: object) -> str:
    kinds = {dict: "a mapping", list: "a list", str: "a text", int: "a number", float: "a number", bool: "true/false",
             type(None): "nothing"}
    return kinds.get(type(data), type(data).__name__)


# -- loading ---------------------------------------------------------------------------------

def load_constitution(path: str | Path) -> Constitution:
    p = Path(path)
    text = _read_text(p)
    return _LAYOUTS.get(p.suffix.lower(), _from_yaml)(text, p)


def _read_text(p: Path) -> str:
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConstitutionError(f"{p}: constitution file not found") from None
    except OSError as exc:  # a directory, no permission: the CLI would print a traceback
        why = "is a directory" if isinstance(exc, IsADirectoryError) else (exc.strerror or str(exc)).lower()
        raise ConstitutionError(f"{p}: cannot read the constitution file: {why}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConstitutionError(_not_utf8(raw, exc.start, p)) from None


def _from_yaml(text: str, p: Path) -> Constitution:
    from charbuild.spec.loader import _parse_yaml

    try:
        data, marks = _parse_yaml(text, str(p))  # the spec's bounded load and line marks
    except SpecError as exc:
        raise ConstitutionError(_loader_message(exc, p)) from None
    if isinstance(data, list):  # the paper's list, written as YAML
        return Constitution(p.stem, _paper_traits(_validate(_PAPER_LIST, _PaperTrait, data, str(p), marks)), ())
    return parse_constitution(data, str(marks[()]), marks)  # a scalar document: its line


def _loader_message(exc: SpecError, p: Path) -> str:
    """The loader words its errors for a spec: name this file for what it is."""
    if exc.errors[0]["type"] == "spec_empty":
        return f"{p}: the constitution file is empty (it is a YAML mapping: persona, traits, markers)"
    return "\n".join(f"{e['where']}: " + (f"{_field(e['loc'])}: " if e["loc"] else "") + e["msg"] for e in exc.errors)


_JSON_LIST = ('a JSON list of traits, [{"trait": "...", "questions": ["...", ...]}, ...] '
              "(the paper's hand-written layout)")
_JSON_LINE = ('one trait per line, {"trait": "...", "questions": [...], "additional_questions": [...]} '
              "(the paper's few-shot layout)")


def _from_json(text: str, p: Path) -> Constitution:
    text = text.removeprefix("\ufeff")  # json refuses the BOM some editors write
    if not text.strip():
        raise ConstitutionError(f"{p}: the constitution file is empty (it is {_JSON_LIST})")
    data = _json(text, str(p), f"a {p.suffix} constitution is {_JSON_LIST}", whole_file=True)
    marks = lambda: _json_marks(text, p)  # noqa: E731  only when there is an error to place
    if isinstance(data, dict):  # our layout, written as JSON
        return parse_constitution(data, str(p), marks)
    if not isinstance(data, list):
        raise ConstitutionError(f"{p}: a {p.suffix} constitution is {_JSON_LIST}; found {_kind(data)}")
    return Constitution(p.stem, _paper_traits(_validate(_PAPER_LIST, _PaperTrait, data, str(p), marks)), ())


def _json_marks(text: str, p: Path) -> dict:
    """Lines of a JSON file's fields, best effort: JSON read as YAML (most JSON is YAML)."""
    from charbuild.spec.loader import _parse_yaml

    try:
        return _parse_yaml(text, str(p))[1]
    except SpecError:
        return {}


def _from_jsonl(text: str, p: Path) -> Constitution:
    traits, errors = [], []
    # split on newlines only: str.splitlines also splits on U+2028 and others a JSON string may hold
    for n, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        if not line.strip():
            continue
        try:
            traits.append(_jsonl_trait(line, f"{p}:{n}"))
        except ConstitutionError as exc:
            errors.append(str(exc))
    if errors:
        raise ConstitutionError("\n".join(errors))
    if not traits:
        raise ConstitutionError(f"{p}: the constitution file is empty (it is {_JSON_LINE})")
    return Constitution(p.stem, _paper_traits(traits), ())


def _json(text: str, where: str, layout: str, whole_file: bool):
    """json.loads, its errors placed (`file:line`, the column) and ending with the layout expected."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"{where}:{exc.lineno}" if whole_file else where  # a JSONL line is placed already
        raise ConstitutionError(f"{at}: invalid JSON: {exc.msg} (column {exc.colno}); {layout}") from None
    except RecursionError:
        raise ConstitutionError(f"{where}: invalid JSON: nested too deeply; {layout}") from None


def _jsonl_trait(line: str, where: str) -> _PaperTrait:
    data = _json(line, where, f"a .jsonl constitution has {_JSON_LINE}", whole_file=False)
    if not isinstance(data, dict):
        raise ConstitutionError(f"{where}: expected a JSON object, found {_kind(data)}; a .jsonl constitution has "
                                f"{_JSON_LINE}")
    return _validate(_PAPER_TRAIT, _PaperTrait, data, where, None)


_LAYOUTS: dict[str, Callable[[str, Path], Constitution]] = {".txt": _from_json, ".json": _from_json,
                                                            ".jsonl": _from_jsonl}


def _not_utf8(raw: bytes, start: int, p: Path) -> str:
    """`file:line: ...` for the first byte that is not UTF-8, its column as an editor counts it."""
    line = raw.count(b"\n", 0, start) + 1
    column = len(raw[raw.rfind(b"\n", 0, start) + 1:start].decode("utf-8", "replace")) + 1
    hint = ": it looks like UTF-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return f"{p}:{line}: not UTF-8 text (byte 0x{raw[start]:02x} at line {line}, column {column}){hint}; save the file as UTF-8"


_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())
