"""Shared setup for the core tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _tiny_tensors(single_thread):
    """Every core test uses tiny tensors: one intra-op thread (tests/conftest.py)."""
    yield
