"""The embedded ``digits`` dataset: scikit-learn's 1,797 real handwritten 8x8 digits, upsampled,
with paraphrased captions, materialized deterministically as PNGs + ``metadata.jsonl``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from multidiff.adapters.image import ImageAdapter
from multidiff.datasets.folder import CaptionFolder

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TEMPLATES = (
    "a handwritten digit {name}",
    "the number {d}, written by hand",
    "a handwritten {d}",
    "the digit {name}",
    "a picture of the number {name}",
    "handwritten number {d}",
    "{name}, a handwritten digit",
    "an image of a handwritten {name}",
)

_VERSION = 1


def digit_caption(digit: int, template: int = 0) -> str:
    """Caption ``template`` (index into :data:`TEMPLATES`) for ``digit``."""
    return TEMPLATES[template % len(TEMPLATES)].format(name=DIGIT_NAMES[digit], d=digit)


def digits_images(size: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digits as ``(N, 1, size, size)`` float in ``[0, 1]`` (ink bright) and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return x, d.target


def materialize_digits(root: str | Path, size: int = 16, seed: int = 0) -> Path:
    """Write ``root/digits-{size}/`` (PNGs + metadata.jsonl) once; return that folder.

    Deterministic: the same files and captions on every machine. Written to a temporary folder
    and renamed, so an interrupted run never leaves a half-written dataset.
    """
    folder = Path(root) / f"digits-{size}"
    stamp = folder / ".complete"
    if stamp.is_file() and stamp.read_text() == str(_VERSION):
        return folder
    images, labels = digits_images(size)
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, len(TEMPLATES), len(labels))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    adapter = ImageAdapter(size=size, channels=1)
    with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, (img, label) in enumerate(zip(images, labels)):
            name = f"{i:04d}.png"
            adapter.save(img, tmp / name)
            row = {"file_name": name, "text": digit_caption(int(label), int(templates[i])), "label": int(label)}
            f.write(json.dumps(row) + "\n")
    (tmp / ".complete").write_text(str(_VERSION))
    if stamp.is_file() and stamp.read_text() == str(_VERSION):  # another process won the race
        shutil.rmtree(tmp)
        return folder
    if folder.exists():  # a stale or partial copy: replace it
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def digits_dataset(root: str | Path = "data", size: int = 16, adapter: ImageAdapter | None = None, **kwargs) -> CaptionFolder:
    """The embedded digits as a :class:`CaptionFolder` (materialized under ``root`` on first use)."""
    adapter = adapter or ImageAdapter(size=size, channels=1)
    return CaptionFolder(materialize_digits(root, size), adapter, **kwargs)
