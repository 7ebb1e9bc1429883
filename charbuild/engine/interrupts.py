"""Ctrl-C as a build takes it: the command line's presses, and a Ray worker's cancels (which
Ray delivers as SIGINT). Kept apart from the executor so `plan` imports nothing heavy."""

from __future__ import annotations

import signal
import threading


class SigintHandler:
    """A SIGINT handler (`__call__`) for the span of a `with` block, the one before it put
    back after. Set from the main thread only: signal handlers can be set nowhere else.
    `only_over_default`: only where Ctrl-C would raise KeyboardInterrupt as usual, not under
    `nohup` (ignored) or a caller's own handler."""

    only_over_default = False
    previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and (
                not self.only_over_default or signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.previous = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
