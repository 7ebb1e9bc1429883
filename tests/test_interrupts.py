"""Ctrl-C during `charbuild run`, pressed as a user presses it: `charbuild run` is a real
process, its teacher and student talk to the loopback OpenAI-protocol server with slow
replies (so calls are in flight whenever the interrupt lands), and SIGINT is sent to it.

Whatever --jobs, the run must end within seconds with exit code 130, every call the
server answered stored in the call cache (a rerun asks the server only for the rest),
every finished target kept, and no staging folder left under cache/tmp/.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support.api_build import persona_reply, write_spec
from support.keyboard import interruptible
from support.openai_server import FakeOpenAIServer

from charbuild.backends.base import GenRequest, Interrupted
from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig
from charbuild.store.calls import CallCache

KEY = "sk-interrupts"
PAIRS = 40  # 4 teacher + 4 student shards of 10 calls
CALLS = 2 * PAIRS
IN_FLIGHT = 2 * 8  # two models at concurrency 8: the most calls a second Ctrl-C can drop
LATENCY_S = 0.4  # each reply: long enough that calls are in flight when Ctrl-C lands
EXIT_WITHIN_S = 10
JOBS = [1, 2, 8]


@pytest.fixture
def server():
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY, latency_s=LATENCY_S) as s:
        yield s


def charbuild_run(tmp_path: Path, spec: Path, jobs: int) -> subprocess.Popen:
    env = {**os.environ, "CB_TEST_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "charbuild", "run", str(spec), "dpo-pairs", "--cache", str(tmp_path / "cache"),
           "--no-progress", "--jobs", str(jobs)]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """stdout, stderr once it exits; a run still going after `timeout` fails the test (killed)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"charbuild still running {timeout:g}s after Ctrl-C\n--- stdout\n{out[-2000:]}\n"
                    f"--- stderr\n{err[-3000:]}")


def press_ctrl_c(proc: subprocess.Popen, srv: FakeOpenAIServer, presses: int) -> tuple[str, str]:
    """Wait until the build has had some answers, press Ctrl-C `presses` times 0.2 s apart."""
    deadline = time.monotonic() + 30
    while srv.completed < 12:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never got its first answers"
        time.sleep(0.01)
    for i in range(presses):
        if i:
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
    return finish(proc, EXIT_WITHIN_S)


def built(stdout: str) -> set[str]:
    return set(re.findall(r"^✓ (\S+) \(", stdout, re.M))


def staging_left(cache: Path) -> list[Path]:
    return sorted((cache / "tmp").iterdir()) if (cache / "tmp").is_dir() else []


def rerun_asks_only_the_rest(tmp_path, spec, srv, jobs, kept: set[str]) -> int:
    """Finish the build at full speed; the calls it asked the server."""
    srv.latency_s = 0.0
    before = srv.completed
    out, err = finish(charbuild_run(tmp_path, spec, jobs), 60)
    assert "outputs:" in out, err[-3000:]
    assert not built(out) & kept, "a target finished before Ctrl-C was built again"
    return srv.completed - before


@pytest.mark.parametrize("jobs", JOBS)
def test_ctrl_c_mid_build_exits_promptly_and_keeps_every_answered_call(tmp_path, server, jobs):
    spec = write_spec(tmp_path, server.base_url, dpo_pairs=PAIRS, shard_size=10)
    cache = tmp_path / "cache"
    proc = charbuild_run(tmp_path, spec, jobs)
    out, err = press_ctrl_c(proc, server, presses=1)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    answered = server.completed
    assert answered < CALLS, "the build finished before Ctrl-C: nothing was tested"
    # The calls in flight at Ctrl-C were let finish (a provider bills a call the client hangs
    # up on all the same), and every answer that arrived is stored.
    assert server.requests_total == answered
    assert len(CallCache(cache)) == answered, err[-3000:]
    assert not staging_left(cache)
    kept = built(out)
    assert "prompts" in kept
    assert rerun_asks_only_the_rest(tmp_path, spec, server, jobs, kept) == CALLS - answered
    assert all(n == 1 for n in server.answered.values())  # no call was answered twice


@pytest.mark.parametrize("jobs", JOBS)
def test_ctrl_c_pressed_twice_still_leaves_no_debris_and_loses_only_calls_in_flight(tmp_path, server, jobs):
    spec = write_spec(tmp_path, server.base_url, dpo_pairs=PAIRS, shard_size=10)
    cache = tmp_path / "cache"
    proc = charbuild_run(tmp_path, spec, jobs)
    out, err = press_ctrl_c(proc, server, presses=2)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    assert not staging_left(cache)
    assert "Traceback" not in err, err[-3000:]
    stored = len(CallCache(cache))
    assert server.completed - stored <= IN_FLIGHT  # the second press drops only calls still in flight
    kept = built(out)
    assert "prompts" in kept
    assert rerun_asks_only_the_rest(tmp_path, spec, server, jobs, kept) == CALLS - stored


def test_ctrl_c_while_the_run_cleans_up_never_cuts_the_cleanup_short(tmp_path, server, monkeypatch, capfd):
    # A press that lands once the build has ended, while the executor lets go of its workers
    # (Ray's shutdown takes a moment), is the run's own handler's to take: raised there as a
    # KeyboardInterrupt, it skipped closing the cache and ended a Ray run by the signal
    # (rc -2) instead of 130. Here the press comes from inside the shutdown itself.
    from charbuild.cli import main
    from charbuild.engine.executor import LocalExecutor
    from charbuild.store.objects import Cache

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default here: the run installs no handler of its own")
    server.latency_s = 0.0
    monkeypatch.setenv("CB_TEST_KEY", KEY)
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, server.base_url, dpo_pairs=20, shard_size=10)
    shutdown, close, closed = LocalExecutor.shutdown, Cache.close, []

    def pressed_while_shutting_down(self):
        signal.raise_signal(signal.SIGINT)
        shutdown(self)

    monkeypatch.setattr(LocalExecutor, "shutdown", pressed_while_shutting_down)
    monkeypatch.setattr(Cache, "close", lambda self: (closed.append(True), close(self))[1])
    rc = main(["run", str(spec), "dpo-pairs", "--cache", str(tmp_path / "cache"), "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 0 and closed, err[-2000:]  # the build had finished; the cache was closed all the same
    assert "dropping the calls in flight" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handler is back


def test_staging_left_by_a_killed_run_is_swept_by_the_next_run(tmp_path, server):
    spec = write_spec(tmp_path, server.base_url, dpo_pairs=PAIRS, shard_size=10)
    cache = tmp_path / "cache"
    proc = charbuild_run(tmp_path, spec, 8)
    deadline = time.monotonic() + 30
    while server.completed < 12:
        assert proc.poll() is None and time.monotonic() < deadline, "the build never got its first answers"
        time.sleep(0.01)
    proc.kill()  # no chance to clean up (as a third Ctrl-C, which exits at once)
    proc.communicate()
    assert staging_left(cache)
    out, err = finish(charbuild_run(tmp_path, spec, 8), 60)
    assert "outputs:" in out, err[-3000:]
    assert not staging_left(cache)


def test_a_caller_still_waiting_on_the_api_is_released_when_the_build_closes_the_backend():
    """A worker thread still waiting on a batch when the build closes the backend ends at
    once with Interrupted, rather than waiting on a stopped event loop (the reported hang)
    or failing on the closed session."""
    with FakeOpenAIServer(latency_s=30) as srv:
        backend = OpenAIBackend(OpenAIConfig(model="m", base_url=srv.base_url, api_key_env=None, concurrency=4))
        ended: list[BaseException] = []

        def worker():
            try:
                backend.generate([GenRequest([{"role": "user", "content": f"q{i}"}], seed=i) for i in range(8)])
            except BaseException as e:  # Interrupted is a KeyboardInterrupt
                ended.append(e)

        t = threading.Thread(target=worker, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while srv.in_flight < 4:
            assert time.monotonic() < deadline, "the calls never reached the server"
            time.sleep(0.01)
        t0 = time.monotonic()
        backend.close()
        t.join(10)
        assert not t.is_alive(), "the caller still waits on a closed backend"
        assert time.monotonic() - t0 < 5
        assert isinstance(ended[0], Interrupted), ended
