"""Errors users see (dependency-free, so the CLI can catch them without importing more)."""

from __future__ import annotations


class SpecError(Exception):
    """A spec could not be loaded; `errors` has pydantic-shaped details with a `where`."""

    def __init__(self, errors: list[dict]):
        self.errors = errors
        super().__init__(self.format())

    def format(self) -> str:
        lines = []
        for e in self.errors:
            field = ".".join(str(p) for p in e.get("loc", ())) or "(spec)"
            lines.append(f"{e.get('where', '?')}: {field}: {e['msg']}")
        return "\n".join(lines)


class CacheWriteError(Exception):
    """The cache cannot be written (a read-only cache, a full disk): what a build cannot do
    without, so the CLI says it in one line rather than failing target after target."""

    def __init__(self, path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot write the cache at {path}: {reason}")
