import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def specs(tmp_path):
    """A copy of the shipped specs and constitutions, free to edit."""
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    shutil.copytree(ROOT / "constitutions", tmp_path / "constitutions")
    return tmp_path / "specs"


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch):
    # Tests must never pick up a developer's real API keys.
    for k in list(os.environ):
        if k.endswith("_API_KEY"):
            monkeypatch.delenv(k)
