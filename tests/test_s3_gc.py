"""`gc` and `status` on a cache in a bucket (moto's S3 server on loopback): they look at and
collect the bucket, every worker's shared truth, and a gc on one machine never removes what
a run on another holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support import s3_server

if s3_server.missing():
    pytest.skip(s3_server.missing(), allow_module_level=True)

from support.api_build import plan_json  # noqa: E402
from support.s3_fixtures import manifest_key, prefix_of, s3, url, worker  # noqa: E402,F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
CHEAP = ("constitution", "prompts", "tiny/tokenizer")  # real recipe targets that build in a second
OTHER = "extends: smoke-small.yaml\nname: other\ndata: {prompts: {general_limit: 30}}\n"  # other prompts, same rest


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """cli("gc", ...): charbuild in this process; (exit code, stdout, stderr)."""
    from charbuild.cli import main

    monkeypatch.chdir(tmp_path)

    def call(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return call


@pytest.fixture
def other(specs):
    (specs / "other.yaml").write_text(OTHER)
    return specs / "other.yaml"


def keys_of(spec, cache) -> dict[str, str]:
    return {t["name"]: t["key"] for t in plan_json(str(spec), *CHEAP, "--cache", str(cache))["targets"]}


def states_of(spec, cache) -> dict[str, str]:
    return {t["name"]: t["state"] for t in plan_json(str(spec), *CHEAP, "--cache", str(cache))["targets"]}


def in_bucket(s3, url, key: str) -> list[str]:
    """What the bucket holds of `key`'s object: its files, manifest included."""
    return s3.keys(f"{prefix_of(url)}/objects/{key[:2]}/{key}/")


def lapsed(gone, url, within: float = 20.0) -> None:
    """Wait until gone(store): a dead holder's lease lapsing."""
    from charbuild.store.remote import RemoteStore

    store, t0 = RemoteStore(url), time.monotonic()
    while not gone(store):
        assert time.monotonic() - t0 < within, "a lease that never lapsed"
        time.sleep(0.1)


def built(cli, spec, url) -> None:
    code, out, err = cli("run", spec, *CHEAP, "--cache", url, "--no-progress")
    assert code == 0, err


def test_gc_on_a_bucket_removes_what_the_changed_spec_no_longer_reaches(specs, other, url, s3, worker, cli):
    worker("a")
    built(cli, specs / "smoke-small.yaml", url)
    built(cli, other, url)  # the spec changed: its prompts are new, the rest is shared
    old, new = keys_of(specs / "smoke-small.yaml", url), keys_of(other, url)
    assert [t for t in CHEAP if old[t] != new[t]] == ["prompts"]
    before = sorted(s3.keys(prefix_of(url)))

    code, out, err = cli("gc", other, "--cache", url)
    assert code == 0, err
    assert out.count("would remove") == 1 and f"would remove {old['prompts'][:12]} prompts (smoke-small)" in out
    assert "1 unreachable targets" in out and "(dry run: --yes to remove)" in out
    assert sorted(s3.keys(prefix_of(url))) == before  # a dry run removes nothing

    code, out, err = cli("gc", other, "--cache", url, "--yes")
    assert code == 0, err
    files = len([k for k in before if f"/{old['prompts']}/" in k])
    assert files and "removed 1 unreachable targets" in out and f"; {files} stored files in {url}" in out
    assert in_bucket(s3, url, old["prompts"]) == []  # the object is gone from the bucket, manifest and files
    assert all(manifest_key(url, k) in s3.keys(prefix_of(url)) for k in new.values())
    assert not s3.keys(f"{prefix_of(url)}/locks/")  # the gc lease and the runs' leases went with them

    worker("b")  # another machine: all it has is the bucket
    assert set(states_of(other, url).values()) == {"cached"}
    code, out, err = cli("run", other, *CHEAP, "--cache", url, "--no-progress")
    assert code == 0 and "nothing to build: 3 targets cached" in out, err
    assert states_of(specs / "smoke-small.yaml", url) == {"constitution": "cached", "tiny/tokenizer": "cached", "prompts": "build"}


HOLD = r"""
import sys, time
from charbuild.store.objects import Cache
url, key = sys.argv[1:3]
cache = Cache(url)
cache.hold([key], "charbuild run of smoke-small")
print("held", flush=True)
time.sleep(600)
"""


def test_a_key_a_live_run_holds_is_kept_and_an_expired_lease_keeps_nothing(specs, other, tmp_path, url, s3, worker,
                                                                            cli, monkeypatch):
    ttl = 1.5
    monkeypatch.setenv("CHARBUILD_LEASE_TTL", str(ttl))
    worker("a")
    built(cli, specs / "smoke-small.yaml", url)
    prompts = keys_of(specs / "smoke-small.yaml", url)["prompts"]
    # A run on another machine holds the prompts other no longer reaches: it reads them.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CHARBUILD_LOCAL_CACHE": str(tmp_path / "elsewhere")}
    p = subprocess.Popen([sys.executable, "-c", HOLD, url, prompts], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        time.sleep(ttl * 1.2)  # renewed while its run lives: held past its first expiry
        code, out, err = cli("gc", other, "--cache", url, "--yes")
        assert code == 0, err
        assert f"kept {prompts[:12]} prompts (smoke-small): in use by charbuild run of smoke-small" in out
        assert "0 unreachable targets" in out and "(1 kept: in use by a running build)" in out
        assert manifest_key(url, prompts) in s3.keys(prefix_of(url))

        os.kill(p.pid, signal.SIGKILL)  # the run dies without releasing its lease
        p.wait(10)
        lapsed(lambda store: not any(alive for _, _, alive in store.run_leases()), url)
        code, out, err = cli("gc", other, "--cache", url, "--yes")
        assert code == 0, err
        assert "removed 1 unreachable targets" in out and "cleaned 1 expired run leases" in out
        assert in_bucket(s3, url, prompts) == [] and not s3.keys(f"{prefix_of(url)}/locks/")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_a_run_that_starts_holding_while_a_gc_decides_waits_and_looks_again(specs, url, s3, worker, cli):
    from charbuild.store.objects import Cache
    from charbuild.store.remote import GC_LEASE, RemoteStore

    worker("a")
    built(cli, specs / "smoke-small.yaml", url)
    prompts = keys_of(specs / "smoke-small.yaml", url)["prompts"]
    worker("b")
    run = Cache(url)
    assert run.has(prompts)  # what its plan saw
    gc = RemoteStore(url)
    lease = gc.try_lease(GC_LEASE, "charbuild gc")
    assert lease is not None
    holding = threading.Thread(target=run.hold, args=([prompts], "charbuild run of smoke-small"), daemon=True)
    holding.start()
    holding.join(1.0)
    assert holding.is_alive()  # its key is in its lease, but the gc may not have seen it: it waits
    for k in in_bucket(s3, url, prompts):  # the gc removes the object, manifest first
        s3.delete(k)
    lease.release(done=True)
    holding.join(10)
    assert not holding.is_alive()
    assert not run.has(prompts)  # looked up again, found gone: the run builds it
    run.close()
    gc.close()


def test_a_reader_whose_lease_the_gc_did_not_see_is_told_the_object_was_removed_not_corrupt(specs, url, s3,
                                                                                              worker, cli):
    from charbuild.store.objects import Cache

    worker("a")
    built(cli, specs / "smoke-small.yaml", url)
    prompts = keys_of(specs / "smoke-small.yaml", url)["prompts"]
    worker("b")
    said: list[str] = []
    reader = Cache(url, warn=said.append)
    assert reader.has(prompts)  # and remembers its manifest
    for k in in_bucket(s3, url, prompts):  # a gc that saw no lease of this reader's
        s3.delete(k)
    reader.path(prompts)
    assert said and "was removed from the store while we read it" in said[0] and "verification" not in said[0]
    assert reader.verify(prompts) and not reader.has(prompts)
    reader.close()


def test_status_of_a_bucket_is_what_a_local_status_of_the_same_build_says(specs, cache_dir, url, s3, worker, cli):
    code, _, err = cli("run", specs / "smoke-small.yaml", *CHEAP, "--cache", cache_dir, "--no-progress")
    assert code == 0, err
    worker("a")
    built(cli, specs / "smoke-small.yaml", url)

    def status(cache):
        code, out, err = cli("status", "--cache", cache)
        assert code == 0, err
        head, *rest = out.splitlines()
        row = next(line.split() for line in rest if line.startswith("smoke-small"))
        return head.split(": ", 1)[1], row[:3]  # targets and size; spec, targets, spent usd

    local = status(cache_dir)
    assert local[0].startswith("3 targets, ") and local[1] == ["smoke-small", "3", "0.0000"]
    assert status(url) == local
    worker("b")  # a machine with nothing in its working copy sees the bucket all the same
    assert status(url) == local

    # A target whose file the bucket lost is not built there, whatever its manifest says.
    prompts = keys_of(specs / "smoke-small.yaml", url)["prompts"]
    s3.delete(next(k for k in in_bucket(s3, url, prompts) if not k.endswith("MANIFEST.json")))
    code, out, _ = cli("status", "--cache", url)
    assert out.startswith(f"cache {url}: 2 targets") and "1 folders in objects/ have no valid manifest, or lack" in out


KILLED_GC = r"""
import os, sys
from charbuild.store import remote
delete = remote.RemoteStore.delete
def delete_then_die(self, rels):
    rels = list(rels)
    delete(self, rels)
    if rels and all(r.endswith("MANIFEST.json") for r in rels):
        os._exit(9)  # killed between the manifests and the files
remote.RemoteStore.delete = delete_then_die
from charbuild.cli import main
main(sys.argv[1:])
"""


def test_a_gc_killed_mid_removal_leaves_the_target_absent_and_the_next_gc_removes_the_rest(
        specs, other, tmp_path, url, s3, worker, cli, monkeypatch):
    from charbuild.cli import bucket
    from charbuild.store.remote import GC_LEASE

    monkeypatch.setenv("CHARBUILD_LEASE_TTL", "3")  # long enough to find the killed gc's lease still live
    worker("a")
    built(cli, specs / "smoke-small.yaml", url)
    prompts = keys_of(specs / "smoke-small.yaml", url)["prompts"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CHARBUILD_LOCAL_CACHE": str(tmp_path / "gc-worker")}
    r = subprocess.run([sys.executable, "-c", KILLED_GC, "gc", str(other), "--cache", url, "--yes"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr[-3000:]
    left = in_bucket(s3, url, prompts)
    assert left and manifest_key(url, prompts) not in left  # its files, without the manifest that made it a target
    code, _, err = cli("gc", other, "--cache", url, "--yes")
    assert code == 1 and "another gc of" in err  # the killed gc's lease, until it lapses

    worker("b")
    assert states_of(specs / "smoke-small.yaml", url)["prompts"] == "build"  # absent, not broken
    lapsed(lambda store: store.holder(GC_LEASE) is None, url)
    code, out, err = cli("gc", other, "--cache", url, "--yes")
    assert code == 0 and "kept" in out and "written in the last hour" in out, err  # an upload under way, maybe
    monkeypatch.setattr(bucket, "DEBRIS_AGE_S", 0.0)
    code, out, err = cli("gc", other, "--cache", url, "--yes")
    assert code == 0 and "1 folders without a manifest" in out, err
    assert in_bucket(s3, url, prompts) == []


def test_status_and_gc_on_a_bucket_that_does_not_exist_are_one_line(specs, tmp_path, worker, cli, s3):
    worker("w")
    for argv in (("status",), ("gc", specs / "smoke-small.yaml"), ("gc", specs / "smoke-small.yaml", "--yes")):
        code, _, err = cli(*argv, "--cache", "s3://no-such-bucket-here/x")
        assert code == 1 and err.startswith("charbuild: cannot use the cache at s3://no-such-bucket-here/x"), err
        assert len(err.splitlines()) == 1, err
