"""A console people can read: library output goes to each target's log in the cache, a
terminal gets one live status line, a CI log gets plain lines, failures name their log."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.api_build import persona_reply, write_spec
from support.engine_stages import build
from support.openai_server import FakeOpenAIServer

from charbuild.engine.console import Console
from charbuild.ledger import Ledger
from charbuild.store.objects import Cache

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("'loss': 0.69", "Map: 100%", "library warning")


@pytest.fixture
def noisy(monkeypatch):
    monkeypatch.setenv("CB_NOISE", "1")


def _logs(cache_dir) -> dict[str, str]:
    return {p.name: p.read_text() for p in (Path(cache_dir) / "logs").glob("*.log")}


def test_library_output_goes_to_each_targets_log_not_the_console(specs, cache_dir, noisy, capfd):
    lines: list[str] = []
    plan, report = build(specs / "smoke-small.yaml", cache_dir, console=Console(capture=True, log=lines.append))
    out, err = capfd.readouterr()
    for noise in NOISE:
        assert noise not in out + err
    assert "✓ items/shard-0000 (built)" in lines
    logs = _logs(cache_dir)
    shard0 = next(text for name, text in logs.items() if name.startswith("items_shard-0000."))
    # each target's own output, and only its own
    assert all(n in shard0 for n in NOISE) and "items/shard-0000" in shard0 and "items/shard-0001" not in shard0


def test_two_targets_building_at_once_keep_their_logs_apart(specs, cache_dir, noisy, monkeypatch):
    from charbuild.engine.executor import LocalExecutor

    monkeypatch.setenv("CB_SLEEP", "0.2")
    build(specs / "smoke-small.yaml", cache_dir, executor=LocalExecutor(2), console=Console(capture=True, log=lambda s: None))
    logs = _logs(cache_dir)
    for i in (0, 1):
        text = next(t for n, t in logs.items() if n.startswith(f"items_shard-000{i}."))
        assert f"from items/shard-000{i}" in text and f"from items/shard-000{1 - i}" not in text


def test_a_failure_names_the_log_that_holds_its_library_output(specs, cache_dir, noisy, monkeypatch):
    monkeypatch.setenv("CB_CRASH_AT", "items/shard-0001")
    lines: list[str] = []
    _, report = build(specs / "smoke-small.yaml", cache_dir, console=Console(capture=True, log=lines.append))
    assert "items/shard-0001" in report.failed
    failure = next(line for line in lines if line.startswith("✗ items/shard-0001"))
    log = re.search(r"\(log: (.+)\)$", failure).group(1)
    assert Path(log).is_file() and Path(log).parent == Path(cache_dir) / "logs"


def test_the_status_line_shows_progress_rate_tokens_dollars_and_eta():
    ledger = Ledger()
    c = Console(live=False, capture=False, log=lambda s: None)
    c.start(["a", "b", "c", "d"], ledger, expected_calls=100)
    c._t0 -= 10  # ten seconds in
    ledger.charge(0.25, 1000, 500, calls=20, api=True)
    c.finished("a", "built")
    with c.target("b", None):
        status = c.status()
    c.stop()
    assert status.startswith("[1/4] b · 20 calls (2.0/s) · 1.5k tok · $0.25 · ETA 40s"), status


PAPER_LIKE = ["constitution", "tiny/tokenizer", "tiny/student", "tiny/teacher", "teacher-responses/shard-0000",
              "teacher-responses/shard-0001", "gate/dpo-differ", "gate/dpo-garbage", "gate/dpo-length",
              "gate/sft-length", "eval/samples/base", "eval/samples/dpo", "eval/elo", "eval/markers", "report"]


def _terminal_lines(run) -> list[str]:
    import io

    out = io.StringIO()
    c = Console(stream=out, live=True, capture=False, interval_s=60)
    run(c)
    c.stop()
    return [line.rsplit("\r", 1)[-1] for line in out.getvalue().splitlines() if "✓" in line or "✗" in line]


def test_on_a_terminal_siblings_alike_are_one_line_once_the_last_of_them_is_done():
    def run(c):
        c.start(PAPER_LIKE)
        for n in PAPER_LIKE:
            c.finished(n, "cached" if n == "tiny/tokenizer" else "built")

    lines = _terminal_lines(run)
    assert lines == ["✓ constitution (built)", "✓ tiny/* (2 built)", "✓ teacher-responses/shard-* (2 built)",
                     "✓ gate/dpo-* (3 built)", "✓ gate/sft-length (built)", "✓ eval/samples/* (2 built)",
                     "✓ eval/* (2 built)", "✓ report (built)"]


def test_a_group_with_a_failure_says_so_and_one_a_stop_cut_short_says_what_is_not_done():
    def run(c):
        c.start(PAPER_LIKE)
        c.finished("gate/dpo-differ", "built")
        c.failed("gate/dpo-garbage", "GateFailed: 31% garbage", None)
        c.finished("gate/dpo-length", "built")
        c.finished("tiny/student", "built")  # then the build stops: tiny/teacher never ran

    lines = _terminal_lines(run)
    assert lines == ["✗ gate/dpo-garbage: GateFailed: 31% garbage", "✗ gate/dpo-* (2 built, 1 failed)",
                     "✓ tiny/* (1 built; 2 not done)"]


def test_a_pipe_gets_every_target_by_name_never_a_group():
    lines: list[str] = []
    c = Console(live=False, capture=False, log=lines.append)
    c.start(PAPER_LIKE)
    for n in PAPER_LIKE:
        c.finished(n, "built")
    c.stop()
    assert lines == [f"✓ {n} (built)" for n in PAPER_LIKE]


# -- the real command line, on a terminal and in a pipe -----------------------------------------

def _api_spec(tmp_path, srv) -> Path:
    return write_spec(tmp_path, srv.base_url, dpo_pairs=20)


def _run_on_a_terminal(args: list[str], cwd: Path, env: dict, timeout: float = 120) -> str:
    """`charbuild` with a pseudo-terminal as its stdout, as a person runs it."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "charbuild", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_gets_a_live_status_line_and_one_line_per_sharded_target(tmp_path):
    with FakeOpenAIServer(reply=persona_reply, latency_s=0.05) as srv:
        spec = _api_spec(tmp_path, srv)
        env = {**os.environ, "CB_TEST_KEY": "k", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        out = _run_on_a_terminal(["run", str(spec), "dpo-pairs", "--cache", str(tmp_path / "cache")], tmp_path, env)
    assert "plan: " in out and "to build" in out and "TOTAL" not in out  # the plan in two lines
    assert re.search(r"\r\[\d+/\d+\] .* calls \(\d+\.\d/s\) · .* tok · \$\d+\.\d\d", out), out[-2000:]
    assert re.search(r"✓ teacher-responses/shard-\* \(2 built\)", out), out[-2000:]
    assert "✓ teacher-responses/shard-0000" not in out


def test_a_pipe_gets_plain_lines_for_every_target(tmp_path):
    with FakeOpenAIServer(reply=persona_reply) as srv:
        spec = _api_spec(tmp_path, srv)
        env = {**os.environ, "CB_TEST_KEY": "k"}
        r = subprocess.run([sys.executable, "-m", "charbuild", "run", str(spec), "dpo-pairs", "--cache",
                            str(tmp_path / "cache")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout and "TOTAL" in r.stdout
    assert "✓ teacher-responses/shard-0000 (built)" in r.stdout and "✓ teacher-responses/shard-0001 (built)" in r.stdout


def test_verbose_leaves_library_output_on_the_console(specs, cache_dir, noisy, capfd):
    build(specs / "smoke-small.yaml", cache_dir, console=Console(capture=False, log=lambda s: None))
    out, err = capfd.readouterr()
    assert all(n in out + err for n in NOISE)
    assert not (Path(cache_dir) / "logs").exists()
