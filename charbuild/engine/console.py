"""What a build shows while it runs.

Library output (progress bars, training dicts, warnings) goes to one log file per target
in the cache (`Cache.log_path`), routed by the thread that builds the target, so that two
targets building at once never interleave their logs. The console keeps:

- on a terminal: one live status line (targets done, what is running, calls per second,
  tokens and dollars so far, ETA), redrawn in place, plus one line per finished target or
  group, once the last of the group is done: the shards of a target (`x/shard-*`), and
  siblings that share a name's head (`gate/dpo-*`, `tiny/*`), so a build's
  view fits on a screen however many gates and variants the recipe has;
- elsewhere (a CI log, a pipe, `--no-progress`): plain lines, one per finished target.

Failures name their log file. `-v` leaves library output on the console, as it comes.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

from charbuild.contract import shard_group, shard_of

_local = threading.local()  # .log: the open log file of the target this thread builds


class _Router(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr during a build: text written by a thread that
    is building a target goes to that target's log, the rest to the real stream. Libraries
    imported during the build take it as their stream (logging handlers, tqdm)."""

    def __init__(self, real: TextIO):
        self.real = real

    def _target(self) -> TextIO:
        return getattr(_local, "log", None) or self.real

    def write(self, s: str) -> int:
        self._target().write(s)
        return len(s)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:  # a library deciding whether to draw bars asks this
        return getattr(_local, "log", None) is None and self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers
            if type(h) is logging.StreamHandler]  # not FileHandler (a subclass) nor pytest's own


def _sibling_group(name: str) -> str | None:
    """`gate/dpo-differ` -> `gate/dpo-*`, `tiny/student` -> `tiny/*`: names alike to a reader."""
    parent, sep, last = name.rpartition("/")
    if not sep:
        return None
    stem, dash, _ = last.partition("-")
    return f"{parent}/{stem}-*" if dash else f"{parent}/*"


def groups_of(names: list[str], min_siblings: int = 2) -> dict[str, str]:
    """name -> the group it is shown in on a terminal (names in no group are left out)."""
    siblings: dict[str, list[str]] = {}
    out = {}
    for n in names:
        if shard_of(n) is not None:
            out[n] = shard_group(n)
        elif (g := _sibling_group(n)) is not None:
            siblings.setdefault(g, []).append(n)
    for g, members in siblings.items():
        if len(members) >= min_siblings:
            out.update({n: g for n in members})
    return out


def _counts(states: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in states.items())


def si(n: float) -> str:
    """1234 -> 1.2k: counts a reader takes in at a glance."""
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def _duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Console:
    """The build's view for people. `live`: a terminal that can redraw a status line;
    `capture`: library output to per-target logs (everything but `-v`)."""

    def __init__(self, stream: TextIO | None = None, live: bool = False, capture: bool = True,
                 log: Callable[[str], None] | None = None, interval_s: float = 0.5):
        self.stream = stream or sys.stdout
        self.live = live
        self.capture = capture
        self._log = log
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._status_width = 0
        self._running: dict[str, float] = {}
        self._group_of: dict[str, str] = {}  # target -> the group it is shown in (terminals)
        self._groups: dict[str, list[str]] = {}  # group -> names not finished yet
        self._group_states: dict[str, dict[str, int]] = {}
        self.total = 0
        self.done = 0
        self.expected_calls = 0
        self._ledger = None
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._saved: tuple | None = None
        self._handlers: list = []

    # -- the build's life -------------------------------------------------------------------
    def start(self, names: list[str], ledger=None, expected_calls: int = 0) -> None:
        self.total = len(names)
        self._ledger = ledger
        self.expected_calls = expected_calls
        self._t0 = time.monotonic()
        self._group_of = groups_of(names) if self.live else {}
        for n, g in self._group_of.items():
            self._groups.setdefault(g, []).append(n)
        if self.capture and self._saved is None:
            self._saved = (sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = _Router(sys.stdout), _Router(sys.stderr)
            # Libraries imported before the build hold the real streams in their handlers.
            self._handlers = [(h, h.stream) for h in _stream_handlers() if h.stream in self._saved]
            for h, stream in self._handlers:
                h.setStream(sys.stdout if stream is self._saved[0] else sys.stderr)
        if self.live:
            self._ticker = threading.Thread(target=self._tick, name="charbuild-console", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            self._ticker = None
        # A group a failure or a stop left unfinished still shows what of it was done.
        for g, states in list(self._group_states.items()):
            if self._groups.get(g):
                self._group_states.pop(g)
                mark = "✗" if "failed" in states else "✓"
                self.line(f"{mark} {g} ({_counts(states)}; {len(self._groups[g])} not done)")
        with self._lock:
            self._clear_status()
        if self._saved is not None:
            for h, stream in self._handlers:
                h.setStream(stream)
            self._handlers = []
            sys.stdout, sys.stderr = self._saved
            self._saved = None

    @contextmanager
    def target(self, name: str, log_path: Path | None) -> Iterator[None]:
        """While `name` builds on this thread: its library output to `log_path` (appended:
        a retry's log follows the failed attempt's)."""
        with self._lock:
            self._running[name] = time.monotonic()
        f = None
        if self.capture and log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            f = open(log_path, "a", encoding="utf-8", errors="replace")
            f.write(f"--- {name}: {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            _local.log = f
        try:
            yield
        finally:
            _local.log = None
            if f is not None:
                f.close()
            with self._lock:
                self._running.pop(name, None)

    # -- lines --------------------------------------------------------------------------------
    def line(self, text: str) -> None:
        """A line that stays (above the status line on a terminal)."""
        with self._lock:
            self._clear_status()
            if self._log is not None and not self.live:
                held, _local.log = getattr(_local, "log", None), None  # never into a target's log
                try:
                    self._log(text)
                finally:
                    _local.log = held
            else:
                real = self._saved[0] if self._saved else self.stream
                real.write(text + "\n")
                real.flush()

    def started(self, name: str) -> None:
        """`name` is building elsewhere (a remote worker): shown as running until it ends."""
        with self._lock:
            self._running[name] = time.monotonic()

    def finished(self, name: str, state: str) -> None:
        self.done += 1
        with self._lock:
            self._running.pop(name, None)
        g = self._group_of.get(name)
        if g is not None:
            self._tally(g, name, state)
        elif state != "cached":
            self.line(f"✓ {name} ({state})")

    def _tally(self, g: str, name: str, state: str) -> None:
        left = self._groups.get(g, [])
        if name in left:
            left.remove(name)
        if state != "cached":
            states = self._group_states.setdefault(g, {})
            states[state] = states.get(state, 0) + 1
        if not left and g in self._group_states:  # a group all cached says nothing, as its targets would not
            states = self._group_states.pop(g)
            self.line(f"{'✗' if 'failed' in states else '✓'} {g} ({_counts(states)})")

    def failed(self, name: str, error: str, log_path: Path | None) -> None:
        self.done += 1
        with self._lock:
            self._running.pop(name, None)
        where = f" (log: {log_path})" if log_path is not None and self.capture and log_path.exists() else ""
        self.line(f"✗ {name}: {error}{where}")
        g = self._group_of.get(name)
        if g is not None:  # counted in its group's line too, so that line never reads as all well
            self._tally(g, name, "failed")

    # -- the status line --------------------------------------------------------------------
    def status(self) -> str:
        """targets done, what runs, calls/s, tokens, dollars, ETA: what a person watching wants."""
        elapsed = time.monotonic() - self._t0
        s = self._ledger.snapshot() if self._ledger is not None else {}
        calls = s.get("calls", 0)
        rate = calls / elapsed if elapsed > 0 else 0.0
        with self._lock:
            running = sorted(self._running, key=self._running.get)
        doing = ", ".join(running[:2]) + (f" +{len(running) - 2}" if len(running) > 2 else "")
        parts = [doing or "starting", f"{calls} calls ({rate:.1f}/s)",
                 f"{si(s.get('tokens_in', 0) + s.get('tokens_out', 0))} tok", f"${s.get('usd', 0.0):.2f}"]
        eta = self._eta(elapsed, calls, rate)
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        return f"[{self.done}/{self.total}] " + " · ".join(parts)

    def _eta(self, elapsed: float, calls: int, rate: float) -> float | None:
        if self.expected_calls and rate > 0 and calls < self.expected_calls:
            return (self.expected_calls - calls) / rate
        if self.done and self.done < self.total:
            return elapsed / self.done * (self.total - self.done)
        return None

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            text = self.status()
            with self._lock:
                real = self._saved[0] if self._saved else self.stream
                width = 200
                try:
                    import shutil

                    width = shutil.get_terminal_size((200, 20)).columns - 1
                except (OSError, ValueError):
                    pass
                text = text[:width]
                real.write("\r" + text + " " * max(0, self._status_width - len(text)))
                real.flush()
                self._status_width = len(text)

    def _clear_status(self) -> None:
        if self._status_width:
            real = self._saved[0] if self._saved else self.stream
            real.write("\r" + " " * self._status_width + "\r")
            real.flush()
            self._status_width = 0
