"""The embedded ``moving_digits`` dataset: scikit-learn's real handwritten digits moving across a
small black canvas, bouncing off its edges, with captions that name the digit and the direction
("the digit 3 moving to the left"). Materialized deterministically as GIFs + ``metadata.jsonl``
under ``data_root``, then read back through the same :class:`CaptionFolder` as your own videos.

Every clip moves in its captioned direction for at least the first half of its frames
(``ceil((T - 1) / 2)`` steps) before any bounce, so the caption is true of the start of the clip
and evaluation can measure the direction on the first half (:func:`first_half_steps`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from multidiff.adapters.video import VideoAdapter, write_video
from multidiff.datasets.digits import DIGIT_NAMES, digits_images
from multidiff.datasets.folder import CaptionFolder, DatasetError

DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
    "up_left": (-1, -1),
    "up_right": (-1, 1),
    "down_left": (1, -1),
    "down_right": (1, 1),
}
"""Unit velocity ``(dy, dx)`` of each direction (image rows grow downwards)."""

PHRASES: dict[str, str] = {
    "left": "to the left",
    "right": "to the right",
    "up": "up",
    "down": "down",
    "up_left": "up and to the left",
    "up_right": "up and to the right",
    "down_left": "down and to the left",
    "down_right": "down and to the right",
}

TEMPLATES = (
    "the digit {d} moving {where}",
    "a handwritten {name} moving {where}",
    "the number {d} drifting {where}",
    "a video of the digit {name} moving {where}",
    "handwritten digit {d} sliding {where}",
    "the number {name} travelling {where}",
    "a {d} that moves {where}",
    "digit {name} going {where}",
)
"""Caption paraphrases; template 0 gives "the digit 3 moving to the left"."""

_VERSION = 1


def moving_caption(digit: int, direction: str, template: int = 0) -> str:
    """Caption ``template`` (index into :data:`TEMPLATES`) for ``digit`` moving in ``direction``."""
    return TEMPLATES[template % len(TEMPLATES)].format(d=digit, name=DIGIT_NAMES[digit], where=PHRASES[direction])


def first_half_steps(num_frames: int) -> int:
    """Steps every clip moves in its captioned direction before it may bounce: ``ceil((T - 1) / 2)``."""
    return math.ceil((num_frames - 1) / 2)


def bounce_path(start: int, velocity: int, steps: int, travel: int) -> list[int]:
    """Positions ``start, ...`` (``steps + 1`` of them) of a point moving by ``velocity`` per frame
    inside ``[0, travel]``, reflected at both ends."""
    p, v, out = start, velocity, [start]
    for _ in range(steps):
        p += v
        if p < 0:
            p, v = -p, -v
        elif p > travel:
            p, v = 2 * travel - p, -v
        out.append(p)
    return out


def _start(rng: np.random.Generator, velocity: int, free: int, travel: int) -> int:
    """A start position from which ``free`` steps of ``velocity`` stay inside ``[0, travel]``."""
    if velocity == 0:
        return int(rng.integers(0, travel + 1))
    reach = free * abs(velocity)
    lo, hi = (reach, travel) if velocity < 0 else (0, travel - reach)
    return int(rng.integers(lo, hi + 1))


def render_clip(digit: np.ndarray, ys: list[int], xs: list[int], canvas: int) -> np.ndarray:
    """Paste ``digit`` ``(s, s)`` at top-left corners ``(ys[t], xs[t])`` of a black canvas: ``(T, canvas, canvas)``."""
    s = digit.shape[0]
    clip = np.zeros((len(ys), canvas, canvas), dtype=np.float32)
    for t, (y, x) in enumerate(zip(ys, xs)):
        clip[t, y : y + s, x : x + s] = digit
    return clip


def synthesize(
    *,
    canvas: int = 16,
    digit_size: int = 8,
    num_frames: int = 8,
    speed: int = 1,
    directions: tuple[str, ...] = ("left", "right", "up", "down"),
    num_digits: int | None = None,
    seed: int = 0,
):
    """Yield ``(clip (1, T, canvas, canvas) in [0, 1], row)`` for every digit image x direction.

    ``row`` holds the caption and the ground truth: ``label``, ``direction``, per-frame top-left
    corners ``ys``/``xs``. Deterministic in ``seed``; ``num_digits`` keeps the first scikit-learn digits.
    """
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or not directions:
        raise DatasetError(f"unknown moving_digits direction(s) {unknown}; choose from {', '.join(DIRECTIONS)}")
    travel = canvas - digit_size
    free = first_half_steps(num_frames)
    if travel < free * speed:
        raise DatasetError(
            f"a {digit_size}px digit on a {canvas}px canvas can move {travel}px, but {num_frames} frames at "
            f"speed {speed} need {free * speed}px before the first bounce; enlarge data.dataset.canvas or "
            "lower speed or num_frames"
        )
    images, labels = digits_images(digit_size)
    images = images[:, 0].numpy()
    if num_digits is not None:
        images, labels = images[:num_digits], labels[:num_digits]
    rng = np.random.default_rng(seed)
    for i, (img, label) in enumerate(zip(images, labels)):
        for direction in directions:
            dy, dx = DIRECTIONS[direction]
            y0, x0 = _start(rng, dy * speed, free, travel), _start(rng, dx * speed, free, travel)
            ys = bounce_path(y0, dy * speed, num_frames - 1, travel)
            xs = bounce_path(x0, dx * speed, num_frames - 1, travel)
            template = int(rng.integers(0, len(TEMPLATES)))
            clip = render_clip(img, ys, xs, canvas)[None]
            row = {"text": moving_caption(int(label), direction, template), "label": int(label),
                   "direction": direction, "digit_index": i, "ys": ys, "xs": xs}
            yield torch.from_numpy(clip), row


def materialize_moving_digits(
    root: str | Path,
    *,
    canvas: int = 16,
    digit_size: int = 8,
    num_frames: int = 8,
    speed: int = 1,
    directions: tuple[str, ...] = ("left", "right", "up", "down"),
    fps: float = 8.0,
    num_digits: int | None = None,
    seed: int = 0,
) -> Path:
    """Write ``root/moving_digits-.../`` (GIF clips + ``metadata.jsonl``) once; return that folder.

    The folder name holds every setting, so different settings never share files. Written to a
    temporary folder and renamed, so an interrupted run never leaves a half-written dataset.
    GIF is lossless for grayscale, so the clips read back exactly as synthesized.
    """
    directions = tuple(directions)
    name = f"moving_digits-c{canvas}-d{digit_size}-t{num_frames}-s{speed}-{'_'.join(directions)}-fps{fps:g}-seed{seed}"
    if num_digits is not None:
        name += f"-n{num_digits}"
    folder = Path(root) / name
    stamp = folder / ".complete"
    if stamp.is_file() and stamp.read_text() == str(_VERSION):
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    (tmp / "clips").mkdir(parents=True, exist_ok=True)
    with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as f:
        clips = synthesize(canvas=canvas, digit_size=digit_size, num_frames=num_frames, speed=speed,
                           directions=directions, num_digits=num_digits, seed=seed)
        for k, (clip, row) in enumerate(clips):
            file_name = f"clips/{k:05d}.gif"
            write_video(clip, tmp / file_name, fps=fps)
            f.write(json.dumps({"file_name": file_name, **row}) + "\n")
    (tmp / ".complete").write_text(str(_VERSION))
    if stamp.is_file() and stamp.read_text() == str(_VERSION):  # another process won the race
        shutil.rmtree(tmp)
        return folder
    if folder.exists():  # a stale or partial copy: replace it
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def read_rows(folder: str | Path) -> list[dict]:
    """The ``metadata.jsonl`` rows of a materialized folder (captions and ground truth)."""
    with open(Path(folder) / "metadata.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def moving_digits_dataset(
    root: str | Path = "data",
    *,
    canvas: int = 16,
    digit_size: int = 8,
    num_frames: int = 8,
    speed: int = 1,
    directions: tuple[str, ...] = ("left", "right", "up", "down"),
    fps: float = 8.0,
    num_digits: int | None = None,
    seed: int = 0,
    adapter: VideoAdapter | None = None,
    **kwargs,
) -> CaptionFolder:
    """The embedded moving digits as a :class:`CaptionFolder` (materialized under ``root`` on first use).

    ``adapter`` (the run's video adapter) must take no more frames than a clip has; the defaults
    match ``conf/modality/video.yaml``. Other keyword arguments go to :class:`CaptionFolder`.
    """
    adapter = adapter or VideoAdapter(size=canvas, channels=1, num_frames=num_frames, fps=fps)
    span = (adapter.num_frames - 1) * adapter.frame_stride + 1
    if span > num_frames:
        raise DatasetError(
            f"modality.num_frames={adapter.num_frames} with frame_stride={adapter.frame_stride} needs {span} "
            f"frames but moving_digits clips have {num_frames}; set data.dataset.num_frames={span} or lower them"
        )
    folder = materialize_moving_digits(root, canvas=canvas, digit_size=digit_size, num_frames=num_frames,
                                       speed=speed, directions=directions, fps=fps, num_digits=num_digits, seed=seed)
    return CaptionFolder(folder, adapter, **kwargs)
