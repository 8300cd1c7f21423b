"""Checks around every test in tests/."""

from __future__ import annotations

from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parents[1] / "runs" / "cache"


def _cache_listing() -> list[str]:
    return sorted(str(p.relative_to(CACHE)) for p in CACHE.rglob("*")) if CACHE.exists() else []


@pytest.fixture(autouse=True)
def the_repositorys_run_cache_is_left_alone():
    """A test trains into a temporary folder, never into the run cache the notebooks use."""
    before = _cache_listing()
    yield
    assert _cache_listing() == before, "this test wrote into runs/cache: give it a tmp_path"
