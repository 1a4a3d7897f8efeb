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
from pathlib import Path

import numpy as np
import torch

from multidiff.adapters.base import Adapter
from multidiff.adapters.video import write_video
from multidiff.datasets.digits import DIGIT_NAMES, digits_images
from multidiff.datasets.folder import CaptionFolder, DatasetError
from multidiff.datasets.materialize import materialize

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


def render_clip(digit: np.ndarray, ys: list[int], xs: list[int], canvas: int | tuple[int, int]) -> np.ndarray:
    """Paste ``digit`` ``(s, s)`` at top-left corners ``(ys[t], xs[t])`` of a black canvas ``H x W``
    (``canvas``: the side, or ``(H, W)``): ``(T, H, W)``."""
    h, w = _hw(canvas)
    s = digit.shape[0]
    clip = np.zeros((len(ys), h, w), dtype=np.float32)
    for t, (y, x) in enumerate(zip(ys, xs)):
        clip[t, y : y + s, x : x + s] = digit
    return clip


def _hw(canvas: int | tuple[int, int]) -> tuple[int, int]:
    return (canvas, canvas) if isinstance(canvas, int) else (int(canvas[0]), int(canvas[1]))


def check_room(*, canvas: int | tuple[int, int], digit_size: int, num_frames: int, speed: int,
               directions: tuple[str, ...]) -> None:
    """Refuse settings under which a clip could not move its captioned way for its first half."""
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or not directions:
        raise DatasetError(f"unknown moving_digits direction(s) {unknown}; choose from {', '.join(DIRECTIONS)}")
    h, w = _hw(canvas)
    need = first_half_steps(num_frames) * speed
    for axis, side in ((0, h), (1, w)):
        moves = any(DIRECTIONS[d][axis] != 0 for d in directions)
        if side - digit_size < (need if moves else 0):
            raise DatasetError(
                f"a {digit_size}px digit on a {h}x{w}px frame can move {side - digit_size}px "
                f"{'down' if axis == 0 else 'across'}, but {num_frames} frames at speed {speed} need {need}px before "
                "the first bounce; enlarge the frames (modality.size), or lower data.dataset.digit_size, "
                "data.dataset.speed or modality.num_frames"
            )


def synthesize(
    *,
    canvas: int | tuple[int, int] = 16,
    digit_size: int = 8,
    num_frames: int = 8,
    speed: int = 1,
    directions: tuple[str, ...] = ("left", "right", "up", "down"),
    num_digits: int | None = None,
    seed: int = 0,
):
    """Yield ``(clip (1, T, H, W) in [0, 1], row)`` for every digit image x direction.

    ``canvas`` is the frame side or ``(H, W)``. ``row`` holds the caption and the ground truth:
    ``label``, ``direction``, per-frame top-left corners ``ys``/``xs``. Deterministic in ``seed``;
    ``num_digits`` keeps the first scikit-learn digits.
    """
    check_room(canvas=canvas, digit_size=digit_size, num_frames=num_frames, speed=speed, directions=directions)
    h, w = _hw(canvas)
    travel_y, travel_x = h - digit_size, w - digit_size
    free = first_half_steps(num_frames)
    images, labels = digits_images(digit_size)
    images = images[:, 0].numpy()
    if num_digits is not None:
        images, labels = images[:num_digits], labels[:num_digits]
    rng = np.random.default_rng(seed)
    for i, (img, label) in enumerate(zip(images, labels)):
        for direction in directions:
            dy, dx = DIRECTIONS[direction]
            y0, x0 = _start(rng, dy * speed, free, travel_y), _start(rng, dx * speed, free, travel_x)
            ys = bounce_path(y0, dy * speed, num_frames - 1, travel_y)
            xs = bounce_path(x0, dx * speed, num_frames - 1, travel_x)
            template = int(rng.integers(0, len(TEMPLATES)))
            clip = render_clip(img, ys, xs, (h, w))[None]
            row = {"text": moving_caption(int(label), direction, template), "label": int(label),
                   "direction": direction, "digit_index": i, "ys": ys, "xs": xs}
            yield torch.from_numpy(clip), row


def materialize_moving_digits(
    root: str | Path,
    *,
    canvas: int | tuple[int, int] = 16,
    digit_size: int = 8,
    num_frames: int = 8,
    speed: int = 1,
    directions: tuple[str, ...] = ("left", "right", "up", "down"),
    fps: float = 8.0,
    num_digits: int | None = None,
    seed: int = 0,
) -> Path:
    """Write the clips (GIFs + ``metadata.jsonl``) under ``root`` once; return their folder.

    One folder per setting (:func:`~multidiff.datasets.materialize.materialize`). GIF is lossless
    for grayscale, so the clips read back exactly as synthesized; ``fps`` is their playback rate.
    """
    directions = tuple(directions)
    options = dict(canvas=_hw(canvas), digit_size=digit_size, num_frames=num_frames, speed=speed,
                   directions=directions, num_digits=num_digits, seed=seed)
    check_room(canvas=canvas, digit_size=digit_size, num_frames=num_frames, speed=speed, directions=directions)

    def write(folder: Path) -> None:
        (folder / "clips").mkdir()
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
            for k, (clip, row) in enumerate(synthesize(**options)):
                file_name = f"clips/{k:05d}.gif"
                write_video(clip, folder / file_name, fps=fps)
                f.write(json.dumps({"file_name": file_name, **row}) + "\n")

    settings = {"version": _VERSION, **options, "canvas": list(options["canvas"]), "directions": list(directions),
                "fps": float(fps)}
    return materialize(root, "moving_digits", settings, write)


def read_rows(folder: str | Path) -> list[dict]:
    """The ``metadata.jsonl`` rows of a materialized folder (captions and ground truth)."""
    with open(Path(folder) / "metadata.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def moving_digits_dataset(
    root: str | Path = "data",
    *,
    adapter: Adapter,
    digit_size: int = 8,
    speed: int = 1,
    directions: tuple[str, ...] = ("left", "right", "up", "down"),
    num_digits: int | None = None,
    seed: int = 0,
    **kwargs,
) -> CaptionFolder:
    """The embedded moving digits as a :class:`CaptionFolder`, materialized under ``root`` on first use.

    The clips take their frame size, length and playback rate from the adapter: ``adapter.shape``
    is ``(C, T, H, W)``, the clips are ``H x W`` and hold the ``(T - 1) * frame_stride + 1``
    frames the adapter reads (every frame when ``frame_stride`` is 1), at ``adapter.fps``.
    ``digit_size`` (px), ``speed`` (px per frame), ``directions``, ``num_digits`` and ``seed``
    choose the motion; other keyword arguments go to :class:`CaptionFolder`.
    """
    shape = tuple(adapter.shape)
    if len(shape) != 4:
        raise DatasetError(
            f"the moving_digits dataset is clips (C, T, H, W) but the modality's adapter makes tensors of shape "
            f"{shape}; use modality=video with data=moving_digits"
        )
    num_frames = (shape[1] - 1) * int(getattr(adapter, "frame_stride", 1)) + 1
    fps = float(getattr(adapter, "fps", 8.0))
    folder = materialize_moving_digits(root, canvas=shape[2:], digit_size=digit_size, num_frames=num_frames,
                                       speed=speed, directions=directions, fps=fps, num_digits=num_digits, seed=seed)
    return CaptionFolder(folder, adapter, **kwargs)
