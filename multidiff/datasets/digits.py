"""The embedded ``digits`` dataset: scikit-learn's 1,797 real handwritten 8x8 digits, upsampled,
with paraphrased captions, materialized deterministically as PNGs + ``metadata.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from multidiff.adapters.base import Adapter
from multidiff.adapters.image import ImageAdapter
from multidiff.datasets.folder import CaptionFolder, DatasetError
from multidiff.datasets.materialize import materialize

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

INKS = ("white", "black", "both")
BLACK_INK = " in black ink on white paper"
"""Appended to a digit's caption when it is drawn in black ink on white (``ink=black`` / ``both``)."""


def digit_caption(digit: int, template: int = 0) -> str:
    """Caption ``template`` (index into :data:`TEMPLATES`) for ``digit``."""
    return TEMPLATES[template % len(TEMPLATES)].format(name=DIGIT_NAMES[digit], d=digit)


def digits_images(size: int | tuple[int, int] = 16) -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digits as ``(N, 1, H, W)`` float in ``[0, 1]`` (ink bright) and their labels.

    ``size``: the side ``H = W``, or ``(H, W)``; the 8x8 originals are resized bicubically.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if hw != (8, 8):
        x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False).clamp(0, 1)
    return x, d.target


def materialize_digits(root: str | Path, *, size: int | tuple[int, int] = 16, seed: int = 0, ink: str = "white") -> Path:
    """Write the digits at ``size`` (PNGs + ``metadata.jsonl``) under ``root`` once; return their folder.

    Deterministic: the same files and captions on every machine. ``seed`` picks each digit's
    caption paraphrase. ``ink``: ``white`` (the originals: bright ink on black), ``black`` (inverted,
    captions ending in :data:`BLACK_INK`: a concept the white digits never show, for fine-tuning) or
    ``both`` (every digit twice, once each way). One folder per setting
    (:func:`~multidiff.datasets.materialize.materialize`).
    """
    if ink not in INKS:
        raise DatasetError(f"data.dataset.ink={ink!r} is not one of {', '.join(INKS)}")
    hw = [size, size] if isinstance(size, int) else [int(s) for s in size]

    def write(folder: Path) -> None:
        images, labels = digits_images(tuple(hw))
        templates = np.random.default_rng(seed).integers(0, len(TEMPLATES), len(labels))
        adapter = ImageAdapter(size=tuple(hw), channels=1)
        inks = {"white": (False,), "black": (True,), "both": (False, True)}[ink]
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
            for inverted in inks:
                for i, (img, label) in enumerate(zip(images, labels)):
                    name = f"{i:04d}{'-black' if inverted else ''}.png"
                    adapter.save(1 - img if inverted else img, folder / name)
                    text = digit_caption(int(label), int(templates[i])) + (BLACK_INK if inverted else "")
                    f.write(json.dumps({"file_name": name, "text": text, "label": int(label)}) + "\n")

    settings = {"version": _VERSION, "size": hw, "seed": seed}
    if ink != "white":  # the original folders keep their key
        settings["ink"] = ink
    return materialize(root, "digits", settings, write)


def digits_dataset(root: str | Path = "data", *, adapter: Adapter, seed: int = 0, ink: str = "white",
                   **kwargs) -> CaptionFolder:
    """The embedded digits as a :class:`CaptionFolder`, materialized under ``root`` on first use.

    The image size is the adapter's (``adapter.shape`` is ``(C, H, W)``); the files are grayscale
    (an RGB adapter repeats the channel). ``seed`` picks the caption paraphrases, ``ink`` white
    (the originals), black (inverted, captioned so) or both (see :func:`materialize_digits`). Other
    keyword arguments go to :class:`CaptionFolder` (``cache``, ``on_error``).
    """
    shape = tuple(adapter.shape)
    if len(shape) != 3:
        raise DatasetError(
            f"the digits dataset is images (C, H, W) but the modality's adapter makes tensors of shape {shape}; "
            "use modality=image with data=digits"
        )
    return CaptionFolder(materialize_digits(root, size=shape[1:], seed=seed, ink=ink), adapter, **kwargs)
