"""Broken disks and a cache pulled out from under a build: a clear message or a rebuild,
never a traceback, never lost data. Each of these failed (a run stuck on `Directory not
empty`, a traceback, a build's inputs deleted under it) before the store learned to cope.

The index is SQLite (diskcache): the damage here is done to the real file, and the errors
met are SQLite's own ("file is not a database", "database disk image is malformed",
"attempt to write a readonly database", "database or disk is full").
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from charbuild.cli import main
from charbuild.engine.graph import build_graph
from charbuild.engine.planner import make_plan
from charbuild.spec.model import load_spec
from charbuild.store.objects import Cache

from support import engine_stages as es  # noqa: E402
from support.engine_stages import build  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Another spec: the same source, other shards (so `gc` listing it finds them unreachable).
OTHER = "extends: smoke-small.yaml\nname: other\nmodels: {teacher: {sampling: {temperature: 0.9}}}\n"


# -- helpers ----------------------------------------------------------------------------

@pytest.fixture
def log(tmp_path, monkeypatch):
    monkeypatch.setenv("CB_TEST_LOG", str(tmp_path / "events.log"))


@pytest.fixture
def cli(monkeypatch, tmp_path, log):
    """`charbuild` in-process on the engine's plug-in stages, from tmp_path: (rc, out, err)."""
    import charbuild.recipe.registry as registry

    monkeypatch.setattr(registry, "recipe_graph", lambda loaded, stages=None: build_graph(loaded, es.stages()))
    monkeypatch.chdir(tmp_path)

    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in argv])
        return rc, out.getvalue(), err.getvalue()
    return run


def key_of(plan, name):
    return next(r.key for r in plan.rows if r.name == name)


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("charbuild: warning:")]


def damage_index(cache_dir: Path, how: str) -> None:
    """Garbage over the index's database file: all of it (its header gone: "file is not a
    database"), or every page after the first (a torn write: "malformed")."""
    db = cache_dir / "index" / "cache.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the file itself
    con.close()
    for f in db.parent.glob("cache.db-*"):
        f.unlink()
    data = db.read_bytes()
    keep = 0 if how == "garbage" else 4096
    db.write_bytes(data[:keep] + os.urandom(len(data) - keep))


def fill_index(cache_dir: Path) -> None:
    """Make the index full, as a full disk would: diskcache applies every `sqlite_*` setting
    it keeps in the database as a PRAGMA on each connection it opens, so max_page_count at
    the current size makes SQLite refuse to grow the file (SQLITE_FULL)."""
    con = sqlite3.connect(cache_dir / "index" / "cache.db", isolation_level=None)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (pages,), = con.execute("PRAGMA page_count").fetchall()
    con.execute("INSERT OR REPLACE INTO Settings VALUES ('sqlite_max_page_count', ?)", (pages,))
    con.close()


# -- 1. a folder in objects/ without a manifest -----------------------------------------

def test_an_object_folder_without_a_manifest_is_set_aside_and_rebuilt(specs, cache_dir, log, capsys):
    plan, _ = build(specs / "smoke-small.yaml", cache_dir)
    shard = Cache(cache_dir).path(key_of(plan, "items/shard-0000"))
    # An interrupted `rm -r`: the manifest went first, some files are left.
    (shard / "MANIFEST.json").unlink()
    capsys.readouterr()
    shutil.rmtree(Cache(cache_dir).path(key_of(plan, "merged")))  # downstream of it: built too, not skipped

    plan, report = build(specs / "smoke-small.yaml", cache_dir)
    assert [r.name for r in plan.to_build] == ["items/shard-0000", "merged"]
    assert report.failed == {} and report.skipped == []
    assert sorted(report.built) == ["items/shard-0000", "merged"]
    assert Cache(cache_dir).verify(key_of(plan, "items/shard-0000")) == []
    aside = [d.name for d in (cache_dir / "corrupt").iterdir()]
    assert len(aside) == 1 and aside[0].startswith(shard.name)  # kept for inspection, not deleted
    err = capsys.readouterr().err
    assert len(warnings(err)) == 1 and "no valid manifest" in err and "Traceback" not in err


def test_gc_lists_and_removes_object_folders_without_a_valid_manifest(specs, cache_dir, cli):
    spec = specs / "smoke-small.yaml"
    plan, _ = build(spec, cache_dir)
    cache = Cache(cache_dir)
    no_manifest, truncated = cache.path(key_of(plan, "items/shard-0000")), cache.path(key_of(plan, "merged"))
    (no_manifest / "MANIFEST.json").unlink()
    text = (truncated / "MANIFEST.json").read_text()
    (truncated / "MANIFEST.json").write_text(text[: len(text) // 2])
    cache.close()

    rc, out, _ = cli("status", "--cache", cache_dir)
    assert rc == 0 and "2 folders in objects/ have no valid manifest" in out

    rc, out, err = cli("gc", spec, "--cache", cache_dir)  # the spec reaches both: debris all the same
    assert rc == 0, err
    assert f"would remove {no_manifest}" in out and f"would remove {truncated}" in out
    assert "2 folders without a manifest" in out and no_manifest.exists() and truncated.exists()

    rc, out, err = cli("gc", spec, "--cache", cache_dir, "--yes")
    assert rc == 0, err
    assert "removed 0 unreachable targets (0.0 MB), 0 stale aliases, 2 folders without a manifest" in out
    assert not no_manifest.exists() and not truncated.exists()
    assert sorted(Cache(cache_dir).keys()) == sorted(key_of(plan, n) for n in ("source", "items/shard-0001"))
    _, report = build(spec, cache_dir)
    assert sorted(report.built) == ["items/shard-0000", "merged"]


# -- 2. the index: damaged, read-only, full -----------------------------------------------

@pytest.mark.parametrize("how", ["garbage", "torn pages"])
def test_a_corrupt_index_is_rebuilt_not_fatal(specs, cache_dir, log, capsys, how):
    plan, _ = build(specs / "smoke-small.yaml", cache_dir)
    Cache(cache_dir).close()
    damage_index(cache_dir, how)
    shutil.rmtree(Cache(cache_dir).path(key_of(plan, "merged")))  # a build that needs the index
    capsys.readouterr()

    _, report = build(specs / "smoke-small.yaml", cache_dir)
    assert report.built == ["merged"] and report.failed == {}
    err = capsys.readouterr().err
    assert len(warnings(err)) == 1 and "the cache index was damaged" in err, err
    assert [d.name[:6] for d in (cache_dir / "corrupt").iterdir()] == ["index-"]  # set aside, not deleted
    cache = Cache(cache_dir)
    assert cache.last_build("smoke-small", "merged")  # the fresh index records again
    _, report = build(specs / "smoke-small.yaml", cache_dir)
    assert report.built == [] and warnings(capsys.readouterr().err) == []


def test_a_corrupt_index_through_the_cli_is_one_warning_not_a_traceback(specs, cache_dir, cli):
    spec, other = specs / "smoke-small.yaml", specs / "other.yaml"
    other.write_text(OTHER)
    rc, _, err = cli("run", spec, "--cache", cache_dir, "--no-progress")
    assert rc == 0, err
    merged = Cache(cache_dir).path(key_of(make_plan(load_spec(spec), build_graph(load_spec(spec), es.stages()),
                                                    Cache(cache_dir)), "merged"))
    for argv in (("status",), ("plan", spec), ("explain", spec, "merged"), ("run", spec, "--no-progress"),
                 ("gc", other, "--yes")):
        damage_index(cache_dir, "garbage")
        shutil.rmtree(cache_dir / "plans", ignore_errors=True)  # no fast null plan
        shutil.rmtree(merged, ignore_errors=True)  # a stale target: what the index explains
        rc, out, err = cli(*argv, "--cache", cache_dir)
        assert rc == 0, (argv, err)
        assert len(warnings(err)) == 1 and len(err.strip().splitlines()) == 1, (argv, err)
        assert "the cache index was damaged (file is not a database)" in err


def _no_override_of_file_modes():
    """For a child run as root: without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped
    from its bounding set before exec) root meets file modes as their owner does, so
    `chmod -R a-w` stops its writes as it stops a user's."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import charbuild.recipe.registry as registry
from charbuild.cli import main
from charbuild.engine.graph import build_graph
from support import engine_stages as es
registry.recipe_graph = lambda loaded, stages=None: build_graph(loaded, es.stages())
sys.exit(main(sys.argv[1:]))
"""


def test_a_read_only_cache_plans_and_run_says_it_cannot_write(specs, cache_dir, cli, tmp_path):
    spec = specs / "smoke-small.yaml"
    rc, _, err = cli("run", spec, "--cache", cache_dir, "--no-progress")
    assert rc == 0, err
    shutil.rmtree(cache_dir / "plans")
    for d, _, files in os.walk(cache_dir):
        for p in [d, *(os.path.join(d, f) for f in files)]:
            os.chmod(p, os.stat(p).st_mode & ~0o222)  # chmod -R a-w
    before = sorted(str(p) for p in cache_dir.rglob("*"))
    as_user = _no_override_of_file_modes if os.geteuid() == 0 else None

    def charbuild(*argv):
        return subprocess.run([sys.executable, "-c", DRIVER.format(tests=str(ROOT / "tests")), *map(str, argv)],
                              capture_output=True, text=True, timeout=120, preexec_fn=as_user, cwd=tmp_path)
    try:
        try:
            probe = subprocess.run(["touch", str(cache_dir / "probe")], capture_output=True, preexec_fn=as_user)
        except subprocess.SubprocessError as exc:
            pytest.skip(f"cannot run a child without root's override of file modes here: {exc}")
        if probe.returncode == 0:
            pytest.skip("file modes do not stop writes here")

        r = charbuild("plan", spec, "--cache", cache_dir)
        assert r.returncode == 0 and "4 cached" in r.stdout, r.stderr
        r = charbuild("plan", spec, "--set", "data.dpo_pairs=12", "--cache", cache_dir)
        assert r.returncode == 0 and "2 to build" in r.stdout, r.stderr
        assert "Traceback" not in r.stderr and len(warnings(r.stderr)) == 1  # the index is read as empty
        r = charbuild("status", "--cache", cache_dir)
        assert r.returncode == 0 and "4 targets" in r.stdout, r.stderr

        r = charbuild("run", spec, "--set", "data.dpo_pairs=12", "--cache", cache_dir, "--no-progress")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1] == f"charbuild: cannot write the cache at {cache_dir}: Permission denied"
        assert sorted(str(p) for p in cache_dir.rglob("*")) == before  # nothing half-written
    finally:
        for d, _, files in os.walk(cache_dir):
            for p in [d, *(os.path.join(d, f) for f in files)]:
                os.chmod(p, os.stat(p).st_mode | 0o200)


def test_a_full_index_stops_run_with_one_line_and_plan_carries_on(specs, cache_dir, cli):
    spec = specs / "smoke-small.yaml"
    rc, _, err = cli("run", spec, "--cache", cache_dir, "--no-progress")
    assert rc == 0, err
    fill_index(cache_dir)
    rc, out, err = cli("plan", spec, "--set", "data.dpo_pairs=16", "--cache", cache_dir)
    assert rc == 0 and "3 to build" in out and "Traceback" not in err, err

    rc, out, err = cli("run", spec, "--set", "data.dpo_pairs=16", "--cache", cache_dir, "--no-progress")
    assert rc == 1
    assert err.strip().splitlines() == [f"charbuild: cannot write the cache at {cache_dir / 'index'}: "
                                        "database or disk is full"]
    # What was built before the index refused is kept: the next run goes on from there.
    rc, out, _ = cli("plan", spec, "--set", "data.dpo_pairs=16", "--cache", cache_dir)
    assert rc == 0 and "2 to build" in out


@pytest.fixture
def full_disk(tmp_path):
    """A cache folder on a 4 MiB tmpfs, filled by `fill()` to the last block."""
    d = tmp_path / "small-disk"
    d.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True, text=True)
    except OSError as exc:
        pytest.skip(f"no mount here: {exc}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root?): {r.stderr.strip()}")

    def fill():
        with open(d / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    try:
        yield d, fill
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_full_disk_plans_without_memoising_and_run_says_so(specs, cli, full_disk):
    spec = specs / "smoke-small.yaml"
    cache_dir, fill = full_disk
    rc, _, err = cli("run", spec, "--cache", cache_dir, "--no-progress")
    assert rc == 0, err
    shutil.rmtree(cache_dir / "plans")
    fill()
    for argv in (("plan", spec), ("plan", spec, "--set", "data.dpo_pairs=12"), ("status",)):
        rc, out, err = cli(*argv, "--cache", cache_dir)
        assert rc == 0 and "Traceback" not in err, (argv, err)
    assert not list(cache_dir.glob("plans/*"))  # no memo (nor half of one): there is no room

    rc, out, err = cli("run", spec, "--set", "data.dpo_pairs=12", "--cache", cache_dir, "--no-progress")
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"charbuild: cannot write the cache at {cache_dir}: No space left on device"


# -- 3. gc and a running build ---------------------------------------------------------

class _Pause:
    """Holds a build inside one target's run until the test lets it go."""

    def __init__(self, target: str):
        self.target, self.reached, self.go = target, threading.Event(), threading.Event()

    def __call__(self, ctx) -> None:
        if ctx.target.name == self.target:
            self.reached.set()
            assert self.go.wait(60)


def _build_in_background(spec, cache_dir, pause: _Pause, monkeypatch):
    """The plug-in stages' build in a thread, held at `pause`; returns (thread, result)."""
    items_run, merge_run = es.Items.run, es.Merge.run

    def items(self, ctx):
        out = items_run(self, ctx)  # its input read, its output staged
        pause(ctx)
        return out

    def merge(self, ctx):
        pause(ctx)  # its inputs verified, not yet read
        return merge_run(self, ctx)

    monkeypatch.setattr(es.Items, "run", items)
    monkeypatch.setattr(es.Merge, "run", merge)
    result = {}

    def target():
        try:
            result["report"] = build(spec, cache_dir)[1]
        except BaseException as exc:  # the test reads it
            result["error"] = exc
    t = threading.Thread(target=target, daemon=True)
    t.start()
    assert pause.reached.wait(60), result
    return t, result


def test_gc_skips_objects_a_running_build_reads(specs, cache_dir, cli, monkeypatch):
    spec, other = specs / "smoke-small.yaml", specs / "other.yaml"
    other.write_text(OTHER)
    old_plan, _ = build(spec, cache_dir, ["data.dpo_pairs=12"])  # an old build: its third shard is nobody's
    gone = key_of(old_plan, "items/shard-0002")
    pause = _Pause("merged")
    t, result = _build_in_background(spec, cache_dir, pause, monkeypatch)

    # `gc` listing another spec while the build is about to read its shards.
    rc, out, err = cli("gc", other, "--cache", cache_dir, "--yes")
    pause.go.set()
    t.join(60)
    assert rc == 0, err
    assert "kept" in out and "in use by charbuild run of smoke-small" in out
    assert result.get("error") is None and result["report"].failed == {}, result
    plan = make_plan(load_spec(spec), build_graph(load_spec(spec), es.stages()), Cache(cache_dir))
    assert plan.to_build == []  # all the build read is still there
    assert not Cache(cache_dir).has(gone)  # and what no one reads went


def test_an_input_gc_removed_under_a_build_says_removed_by_gc_not_corrupt(specs, cache_dir, cli, monkeypatch):
    """A build whose lease gc cannot see (a worker on another machine, where its locks do
    not reach): gc removes an input it already built; the build says what happened."""
    spec, other = specs / "smoke-small.yaml", specs / "other.yaml"
    other.write_text(OTHER)
    pause = _Pause("items/shard-0001")
    t, result = _build_in_background(spec, cache_dir, pause, monkeypatch)
    for lease in (cache_dir / "locks").rglob("*.lease"):
        lease.unlink()

    rc, out, err = cli("gc", other, "--cache", cache_dir, "--yes")
    pause.go.set()
    t.join(60)
    assert rc == 0 and "items/shard-0000" in out, err
    failure = result["report"].failed["merged"]
    assert "input items/shard-0000 was removed by gc at" in failure and "corrupt" not in failure, failure
    _, report = build(spec, cache_dir)  # and running again rebuilds it
    assert sorted(report.built) == ["items/shard-0000", "merged"]
