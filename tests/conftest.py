"""Shared fixtures: one tiny model trained once through the real CLI, reused by many tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import TINY, multidiff_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_root) -> Path:
    """A run directory trained for 3 steps on digits with a tiny UNet, through ``multidiff train``."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    multidiff_cli("train", "recipe=image_digits", f"run_dir={run_dir}", f"data_root={data_root}", *TINY)
    return run_dir


@pytest.fixture
def single_thread():
    """Tiny tensors: intra-op threads only add overhead on a shared CPU (10-30x on a busy box).
    Modules of tiny-tensor tests use it with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
