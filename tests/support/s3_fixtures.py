"""Fixtures and helpers of the tests that keep a cache in a bucket (moto's server on
loopback): import them into a test module to use them there.

    from support.s3_fixtures import s3, url, worker  # noqa: F401  (fixtures)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support import s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server.S3Server() as server:
        yield server


@pytest.fixture
def url(s3):
    return s3.url()


@pytest.fixture
def worker(tmp_path, monkeypatch):
    """worker("a"): make the next Cache/CallCache on a URL use worker a's local working cache."""
    def use(name: str) -> Path:
        d = tmp_path / "workers" / name
        monkeypatch.setenv("CHARBUILD_LOCAL_CACHE", str(d))
        return d
    return use


def prefix_of(url: str) -> str:
    return url.split("/", 3)[3]


def manifest_key(url: str, key: str) -> str:
    return f"{prefix_of(url)}/objects/{key[:2]}/{key}/MANIFEST.json"
