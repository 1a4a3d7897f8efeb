"""Shared fixtures: one tiny model trained once through the real CLI, reused by many tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import TINY, TINY_VIDEO, multidiff_cli

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


@pytest.fixture(scope="session")
def audio_run(tmp_path_factory, data_root):
    """recipe=audio_notes for 3 steps with a tiny UNet, logging to TensorBoard."""
    run_dir = tmp_path_factory.mktemp("audio") / "run"
    multidiff_cli("train", "recipe=audio_notes", f"run_dir={run_dir}", f"data_root={data_root}", "logger=tensorboard",
                  *TINY)
    return run_dir


@pytest.fixture(scope="session")
def video_run(tmp_path_factory, tiny_run, data_root):
    """Three steps of the video recipe, its UNet3D inflated from a copy of the tiny image model that
    is deleted afterwards (a trained video model must not need the model it started from)."""
    base = tmp_path_factory.mktemp("video")
    image_model = base / "image_model"
    shutil.copytree(tiny_run / "model", image_model)
    run_dir = base / "run"
    proc = multidiff_cli("train", *TINY_VIDEO, f"run_dir={run_dir}", f"data_root={data_root}",
                         f"backbone.init_from={image_model}")
    shutil.rmtree(image_model)
    return run_dir, proc


@pytest.fixture
def single_thread():
    """Tiny tensors: intra-op threads only add overhead on a shared CPU (10-30x on a busy box).
    Modules of tiny-tensor tests use it with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
