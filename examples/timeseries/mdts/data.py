"""A synthetic captioned data set: one sine per series on one channel, the others near silent.

Each series is ``channels x length`` samples at ``sample_rate`` Hz. One channel carries a sine
of an integer frequency (1..8 Hz by default: with 2 s of signal each lies exactly on an FFT bin,
well apart from its neighbours), a random phase and an amplitude envelope (rising, falling or
constant); every channel gets a little Gaussian noise. The caption says all three, e.g.
``"a 3 Hz sine on channel 1 with rising amplitude"``.

The set is materialized deterministically under ``root`` as ``.npy`` files plus
``metadata.jsonl`` and read back with multidiff's own :class:`~multidiff.datasets.folder.CaptionFolder`,
so the same folder convention serves users' real recordings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mdts.adapter import TimeSeriesAdapter
from multidiff.datasets.folder import CaptionFolder
from multidiff.datasets.materialize import materialize

FREQUENCIES: tuple[int, ...] = tuple(range(1, 9))
ENVELOPES: tuple[str, ...] = ("rising", "falling", "constant")
_VERSION = 1

CAPTION = re.compile(r"(?P<freq>\d+(?:\.\d+)?) Hz sine on channel (?P<channel>\d+) with (?P<envelope>\w+) amplitude")


def caption(freq: float, channel: int, envelope: str) -> str:
    """The caption of a series; ``channel`` counts from 1."""
    return f"a {freq:g} Hz sine on channel {channel} with {envelope} amplitude"


def parse_caption(text: str) -> tuple[float, int, str]:
    """``(frequency in Hz, channel from 1, envelope)`` of a caption (or a prompt written like one)."""
    m = CAPTION.search(text)
    if m is None:
        raise ValueError(f"not a sine caption: {text!r} (expected e.g. {caption(3, 1, 'rising')!r})")
    return float(m["freq"]), int(m["channel"]), m["envelope"]


def envelope(kind: str, length: int) -> np.ndarray:
    """Amplitude over time ``(length,)``: rising 0.2 -> 1, falling 1 -> 0.2, constant 0.6."""
    ramp = np.linspace(0.2, 1.0, length, dtype=np.float32)
    shapes = {"rising": ramp, "falling": ramp[::-1].copy(), "constant": np.full(length, 0.6, dtype=np.float32)}
    if kind not in shapes:
        raise ValueError(f"unknown envelope {kind!r}; choose one of {', '.join(shapes)}")
    return shapes[kind]


def synthesize(freq: float, channel: int, kind: str, *, channels: int, length: int, sample_rate: float,
               rng: np.random.Generator, noise: float = 0.02) -> np.ndarray:
    """One series ``(channels, length)`` float32: the sine on ``channel`` (from 1) plus noise everywhere."""
    t = np.arange(length, dtype=np.float32) / sample_rate
    x = rng.normal(0.0, noise, size=(channels, length)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    x[channel - 1] += envelope(kind, length) * np.sin(2 * np.pi * freq * t + phase).astype(np.float32)
    return x


def materialize_sines(root: str | Path, *, channels: int = 2, length: int = 128, sample_rate: float = 64.0,
                      per_class: int = 16, seed: int = 0) -> Path:
    """Write the set once under ``root`` (``.npy`` files + ``metadata.jsonl``); return its folder.

    multidiff's :func:`~multidiff.datasets.materialize.materialize` keeps one folder per setting,
    so changing ``channels`` or ``length`` never reuses stale files, and writes it atomically, so
    an interrupted run leaves nothing half-made.
    There are ``len(FREQUENCIES) * channels * len(ENVELOPES) * per_class`` series.
    """
    def write(folder: Path) -> None:
        rng = np.random.default_rng(seed)
        rows = []
        for freq in FREQUENCIES:
            for channel in range(1, channels + 1):
                for kind in ENVELOPES:
                    for _ in range(per_class):
                        name = f"{len(rows):05d}.npy"
                        x = synthesize(freq, channel, kind, channels=channels, length=length, sample_rate=sample_rate,
                                       rng=rng)
                        np.save(folder / name, x)
                        rows.append({"file_name": name, "text": caption(freq, channel, kind),
                                     "frequency": freq, "channel": channel, "envelope": kind})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    settings = {"version": _VERSION, "channels": channels, "length": length, "sample_rate": float(sample_rate),
                "per_class": per_class, "seed": seed}
    return materialize(root, "sines", settings, write)


def sines_dataset(root: str | Path, adapter: TimeSeriesAdapter, *, per_class: int = 16, seed: int = 0,
                  **kwargs) -> CaptionFolder:
    """The synthetic set as a :class:`CaptionFolder` of ``{"x": (C, L), "text": caption}``.

    ``channels``, ``length`` and ``sample_rate`` come from the adapter, so the data always match
    the modality config; ``kwargs`` go to :class:`CaptionFolder` (``cache``, ``on_error``).
    """
    folder = materialize_sines(root, channels=adapter.channels, length=adapter.length,
                               sample_rate=adapter.sample_rate, per_class=per_class, seed=seed)
    return CaptionFolder(folder, adapter, **kwargs)
