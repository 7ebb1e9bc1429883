"""YAML loading that remembers where every value came from.

`load_layers` reads a spec file, follows its `extends:` chain, deep-merges the layers and
applies `--set` overrides, returning the merged data and a map from each field path to
the file and line that set it. Validation errors are then reported as `file:line`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from charbuild.errors import SpecError

try:  # the C loader is several times faster; fall back where libyaml is absent
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader  # type: ignore

Path_ = tuple  # a field path such as ("models", "teacher", "model")

# What a spec may be (README, "Specs"): past these, loading stops with an error instead of
# blocking, reading without end or filling memory. Checked before the file is read whole
# (size), and on the parsed document before any value is built (the rest).
MAX_SPEC_BYTES = 1 << 20  # one spec file: 1 MiB
MAX_SPEC_NODES = 100_000  # YAML values (mappings, lists, keys, scalars), an alias counted each time it is used
MAX_SPEC_TEXT = 4 << 20  # characters in those scalars, aliases counted the same way
MAX_SPEC_DEPTH = 64  # mappings and lists inside each other


@dataclass(frozen=True)
class Loc:
    file: str
    line: int | None  # 1-based; None for command-line overrides

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    @property
    def on_command_line(self) -> bool:
        """Set by `--set` or `--scale`, not by a line of a file."""
        return self.line is None and self.file.startswith("--")


class YAMLLimitError(yaml.MarkedYAMLError):
    """A document past MAX_SPEC_NODES, MAX_SPEC_TEXT or MAX_SPEC_DEPTH once its aliases are
    expanded: a yaml.YAMLError, so whoever reports invalid YAML reports this too."""


def _load_bounded(text: str) -> tuple[yaml.Node | None, Any]:
    """A document's node and value (None, None when it is empty). Past the limits it raises
    YAMLLimitError before anything walks or builds the document."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        problem = _expansion_problem(node)
        if problem:
            raise YAMLLimitError(problem=problem[0], problem_mark=problem[1])
        return node, loader.construct_document(node)
    finally:
        loader.dispose()


def fast_safe_load(text: str):
    """yaml.safe_load with libyaml's C loader where present (several times faster), within
    the limits a spec has (a constitution's alias bomb is refused as fast as a spec's)."""
    return _load_bounded(text)[1]


def _error(where: Loc | str, loc: tuple, msg: str, type_: str = "spec_error") -> SpecError:
    return SpecError([{"type": type_, "loc": loc, "msg": msg, "where": str(where)}])


def _parse_yaml(text: str, file: str) -> tuple[Any, dict[Path_, Loc]]:
    try:
        node, data = _load_bounded(text)
    except YAMLLimitError as exc:
        mark = exc.problem_mark
        raise _error(Loc(file, mark.line + 1 if mark else None), (), exc.problem, "spec_too_large") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else None
        raise _error(Loc(file, line), (), f"invalid YAML: {exc.problem}", "yaml_syntax") from None
    except yaml.reader.ReaderError as exc:
        # Control characters are rejected by the reader, which knows only an offset.
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        raise _error(Loc(file, line), (), f"invalid YAML: unacceptable character #x{_ord(exc.character):04x}: "
                     f"{exc.reason}", "yaml_syntax") from None
    except yaml.YAMLError as exc:
        raise _error(Loc(file, None), (), f"invalid YAML: {' '.join(str(exc).split())}", "yaml_syntax") from None
    if node is None:
        # Nothing but comments or whitespace: validating {} would list missing fields
        # with no file to point at, which hides the real mistake.
        raise _error(Loc(file, None), (), "the spec file is empty (a spec is a YAML mapping: name, persona, "
                     "constitution, models, ...)", "spec_empty")
    locs: dict[Path_, Loc] = {}
    _walk(node, (), file, locs)
    return data, locs


_EACH_USE = " (each use of an alias counts again)"


def _expansion_problem(node: yaml.Node) -> tuple[str, Any] | None:
    """Why a document is too large once its aliases are expanded (past MAX_SPEC_NODES values,
    MAX_SPEC_TEXT characters or MAX_SPEC_DEPTH levels), and the mark where the count ran
    out; None if it is not. The line-number walk, merging, validation and keys all visit an
    alias once per use, so a few hundred bytes of nested aliases (a "billion laughs") would
    otherwise take gigabytes, and one that contains itself would never end. Counts without
    recursion, stopping at the first limit."""
    nodes = chars = 0
    stack = [(node, 1)]
    while stack:
        n, depth = stack.pop()
        nodes += 1
        why = None
        if nodes > MAX_SPEC_NODES:
            why = f"more than {MAX_SPEC_NODES:,} values once its aliases are expanded{_EACH_USE}"
        elif depth > MAX_SPEC_DEPTH:
            why = f"values are nested more than {MAX_SPEC_DEPTH} levels deep (or an alias contains itself)"
        elif isinstance(n, yaml.ScalarNode):
            chars += len(n.value)
            if chars > MAX_SPEC_TEXT:
                why = f"more than {MAX_SPEC_TEXT >> 20} MiB of text once its aliases are expanded{_EACH_USE}"
        if why:
            return why, n.start_mark
        if isinstance(n, yaml.MappingNode):
            stack += [(x, depth + 1) for kv in n.value for x in kv]
        elif isinstance(n, yaml.SequenceNode):
            stack += [(x, depth + 1) for x in n.value]
    return None


def _ord(c: Any) -> int:
    return ord(c) if isinstance(c, str) and len(c) == 1 else c if isinstance(c, int) else 0


def _walk(node: yaml.Node, path: Path_, file: str, locs: dict[Path_, Loc]) -> None:
    locs[path] = Loc(file, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for knode, vnode in node.value:
            key = knode.value
            if key in seen:
                # PyYAML keeps the last silently; a duplicated key is almost always a mistake.
                raise _error(Loc(file, knode.start_mark.line + 1), path + (key,),
                             f"duplicate key (first set on line {seen[key]})", "duplicate_key")
            seen[key] = knode.start_mark.line + 1
            locs[path + (key,)] = Loc(file, knode.start_mark.line + 1)
            _walk(vnode, path + (key,), file, locs)
            locs[path + (key,)] = Loc(file, knode.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), file, locs)


def deep_merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; anything else (lists included) is replaced whole."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base[k], v) if k in base else v
        return out
    return over


def _read(path: Path, referrer: Loc | None) -> str:
    shown = _display(path)
    try:
        raw = _read_regular(path)
    except FileNotFoundError:
        raise _error(referrer or Loc(str(path), None), ("extends",) if referrer else (),
                     f"spec file not found: {path}", "file_missing") from None
    except OSError as exc:  # a directory, a FIFO, too large, no permission: no traceback, no hang
        why = "is a directory" if isinstance(exc, IsADirectoryError) else exc.strerror.lower() if exc.strerror \
            else str(exc)
        if referrer:  # named at the `extends:` line that reached it
            raise _error(referrer, ("extends",), f"cannot read the spec file {shown}: {why}", "file_unreadable") from None
        raise _error(Loc(shown, None), (), f"cannot read the spec file: {why}", "file_unreadable") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(raw, exc.start, shown) from None


def _read_regular(path: Path) -> bytes:
    """A regular file's bytes, at most MAX_SPEC_BYTES of them, or OSError: a FIFO would
    block, /dev/zero would never end, a huge file would fill memory. The type is checked
    before opening, and again on the open file (opened non-blocking, so a FIFO swapped in
    between cannot block); the size by reading one byte past the limit."""
    _refuse_non_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        _refuse_non_regular(os.fstat(fd).st_mode)
        raw = f.read(MAX_SPEC_BYTES + 1)
    if len(raw) > MAX_SPEC_BYTES:
        raise OSError(f"larger than {MAX_SPEC_BYTES >> 20} MiB, the limit for a spec file")
    return raw


def _refuse_non_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError("is a directory")
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    raise OSError(f"is {kind}, not a regular file")


def _not_utf8(raw: bytes, start: int, shown: str) -> SpecError:
    """Where the first bad byte is, as an editor counts it (line, and characters in the line)."""
    line = raw.count(b"\n", 0, start) + 1
    line_start = raw.rfind(b"\n", 0, start) + 1
    column = len(raw[line_start:start].decode("utf-8", "replace")) + 1
    hint = ": it looks like UTF-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return _error(Loc(shown, line), (), f"not UTF-8 text (byte 0x{raw[start]:02x} at line {line}, column {column})"
                  f"{hint}; save the file as UTF-8", "file_encoding")


def load_layers(path: str | Path, _chain: tuple[Path, ...] = (), _referrer: Loc | None = None
                ) -> tuple[dict, dict[Path_, Loc], list[Path]]:
    """Merged data, field locations, and every file read (for the plan memo's digest)."""
    p = Path(path).resolve()
    if p in _chain:
        cycle = " -> ".join(str(c.name) for c in (*_chain, p))
        raise _error(_referrer or Loc(str(p), None), ("extends",), f"cycle in extends: {cycle}", "extends_cycle")
    shown = _display(p)
    data, locs = _parse_yaml(_read(p, _referrer), shown)
    if not isinstance(data, dict):
        raise _error(Loc(shown, 1), (), "a spec must be a YAML mapping", "spec_type")
    files = [p]
    parents = data.pop("extends", None)
    if parents is None:
        return data, locs, files
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
        raise _error(locs[("extends",)], ("extends",), "extends must be a file name or a list of them")
    if any("\0" in x for x in parents):
        raise _error(locs[("extends",)], ("extends",), "a file name cannot hold a NUL character")
    merged: dict = {}
    merged_locs: dict[Path_, Loc] = {}
    for parent in parents:
        pdata, plocs, pfiles = load_layers(p.parent / parent, (*_chain, p), locs[("extends",)])
        merged = deep_merge(merged, pdata)
        merged_locs.update(plocs)
        files += pfiles
    merged = deep_merge(merged, data)
    merged_locs.update({k: v for k, v in locs.items() if k != ("extends",)})
    return merged, merged_locs, files


def apply_set(data: dict, locs: dict[Path_, Loc], assignment: str) -> None:
    """Apply one `--set a.b.c=value`; the value is parsed as YAML (so 0.5, true, [1,2] work)."""
    if "=" not in assignment:
        raise _error(Loc("--set", None), (), f"expected path=value, got {assignment!r}", "set_syntax")
    dotted, raw = assignment.split("=", 1)
    parts = tuple(p for p in dotted.strip().split(".") if p)
    if not parts:
        raise _error(Loc("--set", None), (), f"empty field path in {assignment!r}", "set_syntax")
    if len(parts) > MAX_SPEC_DEPTH:
        raise _error(Loc("--set", None), (), f"a field path of more than {MAX_SPEC_DEPTH} parts", "set_syntax")
    try:
        value = _set_value(raw, assignment) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for i, key in enumerate(parts[:-1]):
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise _error(Loc(f"--set {assignment}", None), parts[: i + 1], "is not a mapping, cannot set a field inside it")
        node = nxt
    node[parts[-1]] = value
    for k in [k for k in locs if k[: len(parts)] == parts]:
        del locs[k]
    _locate_value(value, parts, Loc(f"--set {assignment}", None), locs)


def _locate_value(value: Any, path: Path_, loc: Loc, locs: dict[Path_, Loc]) -> None:
    """Every field inside a value given whole (on the command line) was set where it was:
    what it leaves out is left at its default, which `origin` can then tell apart."""
    locs[path] = loc
    if isinstance(value, dict):
        for k, v in value.items():
            _locate_value(v, path + (k,), loc, locs)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _locate_value(v, path + (i,), loc, locs)


def _set_value(raw: str, assignment: str) -> Any:
    """A `--set` value parsed as YAML, within the limits on what a spec may hold."""
    try:
        return _load_bounded(raw)[1]
    except YAMLLimitError as exc:
        raise _error(Loc(f"--set {assignment}", None), (), exc.problem, "spec_too_large") from None


def where(locs: dict[Path_, Loc], loc: tuple) -> Loc | None:
    """The location of a field, or of its nearest ancestor that has one."""
    loc = tuple(loc)
    while True:
        if loc in locs:
            return locs[loc]
        if not loc:
            return None
        loc = loc[:-1]


def origin(locs: dict[Path_, Loc], loc: tuple) -> str:
    """Where a field's value came from, for `explain`: the file line (or command-line
    override) that set it, then every command-line override of a field inside it; `default`
    when nothing set it. Unlike `where`, no ancestor stands in for a field: a field missing
    from a mapping a file wrote is at its default, not set on the mapping's line."""
    loc = tuple(loc)
    own = locs.get(loc)
    shown = [own] if own is not None else []
    for k, at in locs.items():
        if len(k) > len(loc) and k[: len(loc)] == loc and at.on_command_line and at not in shown:
            shown.append(at)
    return ", ".join(str(at) for at in shown) or "default"


def _display(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)
