"""Guarded reads of a spec: a stage sees only what it declared (`targets`, `estimate`) or
what its target is keyed on (`run`), and every path it reads is recorded.

The guard wraps the validated `Spec` (and the models, dicts and lists inside it) in
read-only proxies. Reading a path walks the proxies: a path the reader may read comes back
as a plain value (numbers and strings as they are, lists and dicts of them as copies) or,
for a model, as another proxy. Any other path comes back as a proxy too, one that only
lets the walk go on (`spec.models` on the way to `models.teacher`): reading a value
through it (a number, a string, its keys, its length, comparing it) raises
`UndeclaredRead`, naming the stage, the target, the full path and what it may read.
Methods and properties of the spec models run on the proxy (`spec.data.count(...)` reads
`data.<field>` and `data.scale` through the guard), so no raw model ever reaches a stage
to be passed around unguarded.

The rule (`Access`):
- `targets()`, `enabled()`, `sub_builds()`, `estimate()`, `resources()`: the stage's
  declared `reads`, with the prefix rule (`models` allows `models.teacher.sampling.top_p`).
- `run()` (and `count_calls`, which renders the calls `run` will send): the target's keyed
  fields, with the same prefix rule, plus any field marked `NoKey` (those cannot change an
  output byte or an accept/reject decision: see charbuild.spec.model).

Setting CHARBUILD_RECORD_READS=<file> appends one JSON line per path first read by a
target's run (stage, target, key, path): the smoke build's test compares them with the keys.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import types
from typing import Any, Iterable

from pydantic import BaseModel

RECORD_ENV = "CHARBUILD_RECORD_READS"
_record_lock = threading.Lock()


class UndeclaredRead(RuntimeError):
    """A stage read a spec path it did not declare (or, in run(), that its key does not hold)."""

    def __init__(self, message: str, path: str, stage: str = "", target: str | None = None):
        super().__init__(message)
        self.path = path
        self.stage = stage
        self.target = target


def is_nokey_field(model_cls: type, name: str) -> bool:
    return _fields_of(model_cls).get(name, False)


_FIELDS: dict[type, dict[str, bool]] = {}


def _fields_of(model_cls: type) -> dict[str, bool]:
    """A model class's field names -> whether the field is NoKey (read once per class: the
    hot path of every guarded read)."""
    table = _FIELDS.get(model_cls)
    if table is None:
        table = {}
        for name, f in model_cls.model_fields.items():
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            table[name] = bool(extra.get("nokey"))
        _FIELDS[model_cls] = table
    return table


def nokey_path(spec: BaseModel, path: str) -> bool:
    """Whether a dotted path of a spec lies at or under a field marked NoKey."""
    value: Any = spec
    parts = path.split(".")
    i = 0
    while i < len(parts):
        if isinstance(value, BaseModel):
            name = parts[i]
            if name not in type(value).model_fields:
                return False
            if is_nokey_field(type(value), name):
                return True
            value = getattr(value, name)
            i += 1
        elif isinstance(value, dict):
            # dict keys may hold dots (model ids in `prices`): take the longest key that matches
            for j in range(len(parts), i, -1):
                k = ".".join(parts[i:j])
                if k in value:
                    value, i = value[k], j
                    break
            else:
                return False
        elif isinstance(value, (list, tuple)) and parts[i].isdigit() and int(parts[i]) < len(value):
            value, i = value[int(parts[i])], i + 1
        else:
            return False
    return False


def covered(path: str, allowed: Iterable[str]) -> bool:
    """`path` is an allowed path or lies under one."""
    return any(path == a or path.startswith(a + ".") for a in allowed)


def _leads_to(path: str, allowed: Iterable[str]) -> bool:
    return any(a.startswith(path + ".") for a in allowed)


def _holds_model(value: Any) -> bool:
    if isinstance(value, BaseModel):
        return True
    if isinstance(value, dict):
        return any(_holds_model(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_model(v) for v in value)
    return False


class Access:
    """Who reads (stage, hook, target), what it may read, and what it read."""

    def __init__(self, stage: str, allowed: Iterable[str], hook: str, target: str | None = None,
                 key: str | None = None, nokey: bool = False, parent: "Access | None" = None):
        self.stage = stage
        self.allowed = tuple(allowed)
        self.hook = hook
        self.target = target
        self.key = key
        self.nokey = nokey  # NoKey fields may be read too (run: they cannot change an output)
        self.parent = parent  # a view made from an already guarded spec can only narrow it
        self.touched: set[str] = set()
        self._record = os.environ.get(RECORD_ENV) if hook in ("run", "count_calls") else None
        self._may: dict[tuple[str, bool], bool] = {}  # the rule is fixed at construction: memoized

    def may(self, path: str, nokey: bool) -> bool:
        ok = self._may.get((path, nokey))
        if ok is None:
            ok = covered(path, self.allowed) or (self.nokey and nokey)
            ok = self._may[(path, nokey)] = ok and (self.parent is None or self.parent.may(path, nokey))
        return ok

    def leads_to(self, path: str) -> bool:
        """Something it may read lies under `path` (so whether `path` exists is no secret)."""
        return _leads_to(path, self.allowed) and (self.parent is None or self.parent.may(path, False)
                                                  or self.parent.leads_to(path))

    def touch(self, path: str) -> None:
        if path in self.touched:
            return
        self.touched.add(path)
        if self.parent is not None:
            self.parent.touch(path)
        elif self._record:
            line = json.dumps({"hook": self.hook, "stage": self.stage, "target": self.target, "key": self.key,
                               "path": path})
            with _record_lock, open(self._record, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def refuse(self, path: str, what: str = "") -> UndeclaredRead:
        where = f"stage {self.stage!r} read {path!r}{what} in {self.hook}()"
        if self.target:
            where += f" of target {self.target!r}"
        if self.hook in ("run", "count_calls"):
            msg = (f"{where}, which is not in the target's key (keyed fields: {sorted(self.allowed)}). "
                   f"Key it in targets() with view.read(...), or pass what run() needs in the target's params.")
        else:
            msg = (f"{where} but declares only {self.allowed}: add it to the stage's `reads`.")
        if self.parent is not None and not self.parent.may(path, False):
            return self.parent.refuse(path, what)
        return UndeclaredRead(msg, path, self.stage, self.target)


def guard(spec: BaseModel, access: Access) -> "_ModelProxy":
    """The spec as `access` may read it."""
    return _ModelProxy(spec, "", access, False)


def read_path(proxy: Any, dotted: str) -> Any:
    """Walk a dotted path through a guarded spec (dict keys are path parts)."""
    value = proxy
    for part in dotted.split("."):
        value = value[part] if isinstance(value, (_DictProxy, dict)) else getattr(value, part)
    return value


def _child(access: Access, value: Any, path: str, nokey: bool) -> Any:
    """What reading `value` at `path` gives (touching it when it may be read), or raises."""
    if access.may(path, nokey):
        access.touch(path)
        return _wrap(access, value, path, nokey, True)
    if isinstance(value, (BaseModel, dict, list, tuple)):
        return _wrap(access, value, path, nokey, False)  # only a way through: reading from it is checked
    raise access.refuse(path)


def _wrap(access: Access, value: Any, path: str, nokey: bool, full: bool) -> Any:
    if isinstance(value, BaseModel):
        return _ModelProxy(value, path, access, nokey, full)
    if full and not _holds_model(value):
        return copy.deepcopy(value) if isinstance(value, (dict, list)) else value
    if isinstance(value, dict):
        return _DictProxy(value, path, access, nokey, full)
    if isinstance(value, (list, tuple)):
        return _SeqProxy(value, path, access, nokey, full)
    return value


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


def _spec_attr(cls: type, name: str) -> Any:
    """A method or property the spec's own classes define (never pydantic's)."""
    for klass in cls.__mro__:
        if klass is BaseModel or not issubclass(klass, BaseModel):
            break
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


_MISSING = object()
# Results of a read that can be handed out again: proxies (read-only) and immutable values.
# Lists and dicts are fresh copies on every read, so a stage mutating one changes nothing.
_SHAREABLE = (str, int, float, bool, type(None), tuple, frozenset)


class _Proxy:
    # _cb_kids: name -> (raw value read, what the read gave), for reads that may be repeated
    # without walking the guard again (hot loops read `m.sampling.temperature` per request).
    # The read was allowed and touched the first time; the entry is used only while the
    # raw value is still the very same object, so a spec changed underneath is read afresh.
    __slots__ = ("_cb_value", "_cb_path", "_cb_access", "_cb_nokey", "_cb_full", "_cb_kids")

    def __init__(self, value: Any, path: str, access: Access, nokey: bool, full: bool = False):
        object.__setattr__(self, "_cb_value", value)
        object.__setattr__(self, "_cb_path", path)
        object.__setattr__(self, "_cb_access", access)
        object.__setattr__(self, "_cb_nokey", nokey)
        object.__setattr__(self, "_cb_full", full)
        object.__setattr__(self, "_cb_kids", {})

    def _cb_remember(self, name: Any, raw: Any, out: Any) -> Any:
        if isinstance(out, (_Proxy, _SHAREABLE)) and (not isinstance(out, tuple) or out is raw):
            self._cb_kids[name] = (raw, out)
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the spec is read-only here (setting {_join(self._cb_path, name)!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("the spec is read-only here")

    def _cb_whole(self, what: str) -> None:
        """Operations that read the whole node (its keys, its length) need the whole node."""
        if not self._cb_full:
            raise self._cb_access.refuse(self._cb_path or "<spec>", what)

    def __repr__(self) -> str:
        return f"<guarded {self._cb_path or 'spec'}>"

    def __eq__(self, other: Any) -> bool:
        self._cb_whole(" (comparing it)")
        other = other._cb_value if isinstance(other, _Proxy) else other
        return self._cb_value == other

    def __ne__(self, other: Any) -> bool:
        return not self == other

    __hash__ = object.__hash__

    def __reduce_ex__(self, protocol):
        raise TypeError("a guarded spec cannot be pickled or copied; read the values you need")


class _ModelProxy(_Proxy):
    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        v = self._cb_value
        hit = self._cb_kids.get(name)
        if hit is not None and getattr(v, name, _MISSING) is hit[0]:
            return hit[1]
        path, access = self._cb_path, self._cb_access
        cls = type(v)
        fields = _fields_of(cls)
        if name in fields:
            raw = getattr(v, name)
            return self._cb_remember(name, raw, _child(access, raw, _join(path, name), self._cb_nokey or fields[name]))
        if not name.startswith("_"):
            attr = _spec_attr(cls, name)
            if isinstance(attr, property) and attr.fget is not None:
                return attr.fget(self)
            if isinstance(attr, types.FunctionType):
                return types.MethodType(attr, self)  # the method reads through the guard
            if name in ("model_dump", "model_dump_json"):
                self._cb_whole(f" (all of it, by {name})")
                return getattr(v, name)  # a copy: plain data
        raise AttributeError(f"{cls.__name__} has no attribute {name!r} (guarded spec at {path or 'the top'})")

    def __iter__(self):
        self._cb_whole(" (all its fields)")
        for name in type(self._cb_value).model_fields:
            yield name, getattr(self, name)


class _DictProxy(_Proxy):
    __slots__ = ()

    def _cb_item(self, key: Any, default: Any, missing_ok: bool) -> Any:
        v, access = self._cb_value, self._cb_access
        hit = self._cb_kids.get(key)
        if hit is not None and v.get(key, _MISSING) is hit[0]:
            return hit[1]
        path = _join(self._cb_path, str(key))
        if key not in v:
            if self._cb_full or access.may(path, self._cb_nokey) or access.leads_to(path):
                if missing_ok:
                    return default
                raise KeyError(key)
            raise access.refuse(path, " (whether it exists)")
        raw = v[key]
        return self._cb_remember(key, raw, _child(access, raw, path, self._cb_nokey))

    def __getitem__(self, key: Any) -> Any:
        return self._cb_item(key, None, False)

    def get(self, key: Any, default: Any = None) -> Any:
        return self._cb_item(key, default, True)

    def __contains__(self, key: Any) -> bool:
        path = _join(self._cb_path, str(key))
        if not (self._cb_full or self._cb_access.may(path, self._cb_nokey) or self._cb_access.leads_to(path)):
            raise self._cb_access.refuse(path, " (whether it exists)")
        return key in self._cb_value

    def __iter__(self):
        self._cb_whole(" (its keys)")
        return iter(list(self._cb_value))

    def __len__(self) -> int:
        self._cb_whole(" (its length)")
        return len(self._cb_value)

    def keys(self):
        self._cb_whole(" (its keys)")
        return list(self._cb_value)

    def values(self):
        return [self[k] for k in self.keys()]

    def items(self):
        return [(k, self[k]) for k in self.keys()]


class _SeqProxy(_Proxy):
    __slots__ = ()

    def __getitem__(self, i: int) -> Any:
        v = self._cb_value
        n = len(v)
        if not isinstance(i, int) or not -n <= i < n:
            self._cb_whole(" (by slice or out of range)")
            return [self[j] for j in range(n)][i] if isinstance(i, slice) else v[i]
        return _child(self._cb_access, v[i], _join(self._cb_path, str(i % n)), self._cb_nokey)

    def __iter__(self):
        self._cb_whole(" (all its items)")
        return iter([self[i] for i in range(len(self._cb_value))])

    def __len__(self) -> int:
        self._cb_whole(" (its length)")
        return len(self._cb_value)


class GuardedLoaded:
    """A LoadedSpec as a stage sees it: the guarded spec, where fields were set, and (where
    the stage may read `constitution`, never in run()) the constitution file's path."""

    __slots__ = ("_cb_loaded", "_cb_access", "_cb_spec")

    def __init__(self, loaded: Any, access: Access):
        object.__setattr__(self, "_cb_loaded", loaded)
        object.__setattr__(self, "_cb_access", access)
        object.__setattr__(self, "_cb_spec", guard(loaded.spec, access))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the loaded spec is read-only here")

    @property
    def spec(self) -> Any:
        return self._cb_spec

    @property
    def path(self):
        return self._cb_loaded.path

    def where(self, loc: tuple):
        """The file and line that set a field (locations, not values: relative paths)."""
        return self._cb_loaded.where(loc)

    @property
    def constitution_path(self):
        access = self._cb_access
        if access.hook in ("run", "count_calls"):
            raise UndeclaredRead(
                f"stage {access.stage!r} read the constitution file in {access.hook}() of target {access.target!r}: "
                f"the file may have changed since the graph was keyed; read the built `constitution` input "
                f"(stages.constitution.load_built) or the target's keyed fields instead", "constitution",
                access.stage, access.target)
        if not access.may("constitution", False):
            raise access.refuse("constitution", " (the constitution file)")
        access.touch("constitution")
        return self._cb_loaded.constitution_path

    def with_scale(self, scale: float):
        """The same spec at another data scale, for a sub-build (returned to the engine)."""
        return self._cb_loaded.with_scale(scale)

    def __repr__(self) -> str:
        return f"<guarded loaded spec for {self._cb_access.stage}>"


def raw_loaded(loaded: Any) -> Any:
    """The LoadedSpec behind a guarded one (for the engine's own bookkeeping, not stages)."""
    return object.__getattribute__(loaded, "_cb_loaded") if isinstance(loaded, GuardedLoaded) else loaded


def access_of(loaded: Any) -> Access | None:
    return object.__getattribute__(loaded, "_cb_access") if isinstance(loaded, GuardedLoaded) else None
