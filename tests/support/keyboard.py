"""Ctrl-C for a build the tests start, as a terminal delivers it."""

import signal


def interruptible() -> None:
    """A Popen preexec_fn: the child takes SIGINT as a foreground job does. A shell starts a
    background job (`.ci/run &`, nohup) with SIGINT ignored, every child inherits that, and
    Python then never raises KeyboardInterrupt: the Ctrl-C stories would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
