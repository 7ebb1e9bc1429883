"""Verifying a cached input re-reads it only when its stat says it may have changed.

Every build verifies every input of every target it builds; with multi-GB inputs that was
a full read each time. The digest memo (charbuild/store/digest_memo.py) remembers each
file's digest against its stat, in the cache's index, and must never let a changed file
through.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from charbuild.store import digest_memo
from charbuild.store.hashing import file_digest
from charbuild.store.objects import Cache

ROOT = Path(__file__).resolve().parent.parent
BIG = digest_memo.MIN_SIZE + 12_345  # large enough to go through the memo
HOUR_NS = 3600 * 10**9


@pytest.fixture
def hashes(monkeypatch):
    """Every file the store reads to hash, in order."""
    seen: list[str] = []
    real = digest_memo.hash_file

    def counting(f):
        seen.append(os.path.basename(f.name))
        return real(f)

    monkeypatch.setattr(digest_memo, "hash_file", counting)
    return seen


def put(cache: Cache, key: str, files: dict[str, bytes], age_ns: int = HOUR_NS) -> Path:
    """Commit an object through the store's API; its files dated `age_ns` ago, as an input
    built by an earlier run is."""
    with cache.staging(key) as tmp:
        for rel, data in files.items():
            (tmp / rel).write_bytes(data)
        cache.commit(key, tmp, {"target": key})
    base = cache.path(key)
    if age_ns:
        for rel in files:
            age(base / rel, age_ns)
    return base


def age(path: Path, age_ns: int = HOUR_NS) -> None:
    then = time.time_ns() - age_ns
    os.utime(path, ns=(then, then))


def payload(tag: bytes, size: int = BIG) -> bytes:
    return (tag * (size // len(tag) + 1))[:size]


def test_a_second_verify_of_an_unchanged_object_hashes_nothing(cache_dir, hashes):
    cache = Cache(cache_dir)
    put(cache, "k1", {"weights.bin": payload(b"w"), "rows.jsonl": payload(b"{}\n")})
    assert cache.verify("k1") == []
    assert sorted(hashes) == ["rows.jsonl", "weights.bin"]
    hashes.clear()
    for _ in range(3):
        assert cache.verify("k1") == []
    assert hashes == []


def test_the_memo_is_shared_with_the_next_process(cache_dir):
    cache = Cache(cache_dir)
    put(cache, "k1", {"weights.bin": payload(b"w")})
    assert cache.verify("k1") == []
    cache.close()
    script = ("import sys; from charbuild.store import digest_memo; from charbuild.store.objects import Cache; "
              "n = []; real = digest_memo.hash_file; "
              "digest_memo.hash_file = lambda f: n.append(1) or real(f); "
              "print(Cache(sys.argv[1]).verify('k1'), len(n))")
    out = subprocess.run([sys.executable, "-c", script, str(cache_dir)], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["[]", "0"], out.stderr


def test_a_file_corrupted_after_the_memo_was_warmed_is_detected(cache_dir, hashes):
    cache = Cache(cache_dir)
    base = put(cache, "k1", {"weights.bin": payload(b"w")})
    assert cache.verify("k1") == [] and cache.verify("k1") == []
    # Same size, other bytes: a write in place (same inode, new mtime).
    with open(base / "weights.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    assert cache.verify("k1") == ["weights.bin: content digest mismatch"]


def test_a_rewrite_that_puts_the_old_mtime_back_is_still_detected(cache_dir):
    cache = Cache(cache_dir)
    base = put(cache, "k1", {"weights.bin": payload(b"w")})
    assert cache.verify("k1") == []
    f = base / "weights.bin"
    before = f.stat()
    with open(f, "r+b") as fh:
        fh.write(b"X")
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = f.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    # Only ctime tells: no one can set it back.
    assert cache.verify("k1") == ["weights.bin: content digest mismatch"]


def test_a_file_replaced_by_another_of_the_same_size_and_mtime_is_detected(cache_dir):
    cache = Cache(cache_dir)
    base = put(cache, "k1", {"weights.bin": payload(b"w")})
    assert cache.verify("k1") == []
    f = base / "weights.bin"
    st = f.stat()
    other = f.with_name("other.bin")
    other.write_bytes(payload(b"v"))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, f)  # a new inode: what a copy tool that keeps times leaves behind
    assert cache.verify("k1") == ["weights.bin: content digest mismatch"]


def test_a_file_hashed_within_two_seconds_of_its_last_write_is_hashed_again(cache_dir, hashes):
    cache = Cache(cache_dir)
    base = put(cache, "k1", {"weights.bin": payload(b"w")}, age_ns=0)
    # Written just now: a rewrite within the same timestamp tick would keep its mtime, so
    # what was hashed now is not trusted next time (git's racy-clean rule).
    assert cache.verify("k1") == [] and cache.verify("k1") == []
    assert hashes == ["weights.bin", "weights.bin"]
    hashes.clear()
    age(base / "weights.bin")
    assert cache.verify("k1") == [] and cache.verify("k1") == []
    assert hashes == ["weights.bin"]


def test_rehash_reads_every_file_whatever_the_memo_says(cache_dir, hashes):
    cache = Cache(cache_dir)
    put(cache, "k1", {"weights.bin": payload(b"w")})
    assert cache.verify("k1") == [] and cache.verify("k1") == []
    hashes.clear()
    assert cache.verify("k1", rehash=True) == [] and hashes == ["weights.bin"]


def test_small_files_are_hashed_directly_and_not_remembered(cache_dir, hashes):
    cache = Cache(cache_dir)
    put(cache, "k1", {"config.json": b'{"r": 16}'})
    assert cache.verify("k1") == [] and cache.verify("k1") == []
    assert hashes == ["config.json", "config.json"]
    assert not [k for k in cache.index.iterkeys() if k[0] == "file-digest"]


def test_the_memo_hash_is_the_stores_digest(tmp_path):
    for size in (0, 1, digest_memo.CHUNK - 1, digest_memo.CHUNK, digest_memo.CHUNK + 1, 3 * digest_memo.CHUNK + 5):
        p = tmp_path / f"f{size}"
        p.write_bytes(os.urandom(size))
        with open(p, "rb") as f:
            assert digest_memo.hash_file(f) == file_digest(p), size


def test_a_damaged_index_costs_reads_not_correctness(cache_dir, hashes):
    cache = Cache(cache_dir)
    base = put(cache, "k1", {"weights.bin": payload(b"w")})
    assert cache.verify("k1") == []
    cache.close()
    for f in (cache_dir / "index").glob("cache.db*"):
        f.write_bytes(b"not a database " * 100)
    hashes.clear()
    cache = Cache(cache_dir)
    assert cache.verify("k1") == [] and hashes == ["weights.bin"]
    with open(base / "weights.bin", "r+b") as f:
        f.write(b"X")
    assert cache.verify("k1") == ["weights.bin: content digest mismatch"]


# -- through the engine --------------------------------------------------------------------

def test_a_rebuild_verifies_its_inputs_without_reading_them_and_still_catches_corruption(
        specs, cache_dir, hashes, monkeypatch, tmp_path):
    from test_build_engine import build

    monkeypatch.setattr(digest_memo, "MIN_SIZE", 0)  # the plug-in stages write small files
    monkeypatch.setenv("CB_TEST_LOG", str(tmp_path / "log"))
    plan, _ = build(specs / "smoke-small.yaml", cache_dir)
    for f in (cache_dir / "objects").rglob("*"):
        if f.is_file():
            age(f)
    build(specs / "smoke-small.yaml", cache_dir)  # hashes each file once, and remembers
    hashes.clear()
    _, report = build(specs / "smoke-small.yaml", cache_dir)
    assert report.cached and not report.built and hashes == []

    key = next(r.key for r in plan.rows if r.name == "items/shard-0000")
    f = Cache(cache_dir).path(key) / "items.jsonl"
    f.write_text(f.read_text().replace("remorseful", "REMORSEFUL"))  # same size, other content
    _, report = build(specs / "smoke-small.yaml", cache_dir)
    assert report.rebuilt_corrupt == ["items/shard-0000"]
    assert "remorseful-0" in f.read_text()
