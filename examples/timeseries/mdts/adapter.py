"""The time-series adapter: ``.npy`` / ``.csv`` files <-> ``(channels, length)`` tensors.

This is the whole modality as multidiff sees it. It implements the five required members of
:class:`multidiff.adapters.base.Adapter` (``shape``, ``load``, ``encode``, ``decode``, ``save``)
and overrides a few optional ones: ``preview`` (a line plot, so training previews are readable),
``generation_options`` (its own ``length=`` and ``duration=``, which ``multidiff generate`` passes
through without knowing them) with ``sample_shape`` / ``metadata`` that read them, and
``reconstruction_terms`` (a multi-resolution spectral loss for training an autoencoder of series).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mdts.plot import image_to_tensor, plot_series
from multidiff.adapters.base import Adapter, GenerationOption


class TimeSeriesReadError(ValueError):
    """A file is not a ``(channels, length)`` series this adapter can read."""


class TimeSeriesAdapter(Adapter):
    """Multichannel series sampled at ``sample_rate`` Hz.

    Raw tensors are ``(channels, length)`` float32 in signal units; model tensors are the same
    divided by ``scale`` (pick it so typical values are about unit size). ``save`` writes the
    series (``.npy`` or ``.csv`` by the path's suffix) and a plot ``.png`` beside it.

    Args:
        channels: number of channels ``C``.
        length: samples per training series ``L`` (longer files are cropped, shorter ones padded
            with zeros at the end).
        sample_rate: samples per second; with ``length`` it fixes the duration.
        scale: divisor from signal units to model units.
    """

    extensions = (".npy", ".csv")
    suffix = ".npy"
    formats = ("npy", "csv")

    def __init__(self, *, channels: int = 2, length: int = 128, sample_rate: float = 64.0, scale: float = 1.0) -> None:
        if channels < 1 or length < 1 or sample_rate <= 0 or scale <= 0:
            raise ValueError(
                f"TimeSeriesAdapter needs channels >= 1, length >= 1, sample_rate > 0 and scale > 0; got "
                f"channels={channels}, length={length}, sample_rate={sample_rate}, scale={scale}"
            )
        self.channels, self.length, self.sample_rate, self.scale = channels, length, float(sample_rate), float(scale)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.length)

    # --- files ------------------------------------------------------------------------------------

    def load(self, path: str | Path) -> Tensor:
        """``.npy`` holding a ``(C, L)`` array, or ``.csv`` with a header and one row per time step
        (an optional first ``time`` column is ignored) -> ``(C, L)`` float32."""
        path = Path(path)
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)  # never unpickle data files
        elif path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
            header, body = rows[0], rows[1:]
            skip = 1 if header and header[0].strip().lower() in ("t", "time", "seconds") else 0
            array = np.asarray([[float(v) for v in row[skip:]] for row in body], dtype=np.float32).T
        else:
            raise TimeSeriesReadError(f"{path}: unsupported suffix {path.suffix!r}; use .npy or .csv")
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise TimeSeriesReadError(f"{path}: expected a (channels, length) array, got shape {array.shape}")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def save(self, raw: Tensor, path: str | Path) -> None:
        """Write ``raw`` ``(C, L)`` to ``path`` (``.npy`` or ``.csv``) and its plot to ``path`` + ``.png``."""
        path = Path(path)
        array = raw.detach().float().cpu().numpy()
        if path.suffix.lower() == ".npy":
            np.save(path, array)
        elif path.suffix.lower() == ".csv":
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["time"] + [f"channel_{c + 1}" for c in range(array.shape[0])])
                for i, column in enumerate(array.T):
                    writer.writerow([f"{i / self.sample_rate:.6g}"] + [f"{v:.6g}" for v in column])
        else:
            raise TimeSeriesReadError(f"{path}: cannot write suffix {path.suffix!r}; use .npy or .csv (format=npy|csv)")
        plot_series(raw, sample_rate=self.sample_rate, y_range=1.2 * self.scale).save(path.with_suffix(".png"))

    # --- tensors ----------------------------------------------------------------------------------

    def encode(self, raw: Tensor) -> Tensor:
        """``(C, n)`` signal -> ``(C, length)`` model tensor: crop or zero-pad in time, divide by ``scale``."""
        if raw.ndim != 2 or raw.shape[0] != self.channels:
            raise TimeSeriesReadError(f"expected a ({self.channels}, length) series, got shape {tuple(raw.shape)}")
        x = raw.float()[:, : self.length]
        return F.pad(x, (0, self.length - x.shape[1])) / self.scale

    def decode(self, x0: Tensor) -> Tensor:
        """``(C, n)`` model tensor -> signal units (any ``n``: generation may use another duration)."""
        return x0.float() * self.scale

    def preview(self, raw: Tensor) -> Tensor:
        """The plot as ``(3, H, W)`` in ``[0, 1]``: the training callback tiles these into a grid."""
        return image_to_tensor(plot_series(raw, sample_rate=self.sample_rate, y_range=1.2 * self.scale))

    # --- generation options -----------------------------------------------------------------------

    def reconstruction_terms(self, x_hat: Tensor, x: Tensor) -> dict[str, Tensor]:
        """A multi-resolution spectral loss for ``task=autoencoder`` (spectral convergence plus the L1 of
        log STFT magnitudes at three window sizes, as waveform autoencoders are trained): an L1 on the
        samples alone lets a series' frequencies blur. ``(B, C, L)`` twice -> ``{"spectral": (B,)}``."""
        b, c, n = x.shape
        sizes = [s for s in (16, 32, 64) if s <= n] or [n]
        total = x.new_zeros(b)
        for size in sizes:
            window = torch.hann_window(size, device=x.device, dtype=x.dtype)

            def magnitude(t: Tensor, size=size, window=window) -> Tensor:
                return torch.stft(t.reshape(b * c, n), size, hop_length=max(1, size // 4), window=window,
                                  return_complex=True).abs()

            fake, real = magnitude(x_hat), magnitude(x)
            convergence = (fake - real).flatten(1).norm(dim=1) / real.flatten(1).norm(dim=1).clamp_min(1e-7)
            log_l1 = (fake.clamp_min(1e-5).log() - real.clamp_min(1e-5).log()).abs().flatten(1).mean(1)
            total = total + (convergence + log_l1).reshape(b, c).mean(1)
        return {"spectral": total / len(sizes)}

    def generation_options(self) -> tuple[GenerationOption, ...]:
        """``length`` (samples) or ``duration`` (seconds) of a generated series; the training length by default."""
        return (
            GenerationOption("length", int, self.length, "samples per generated series", minimum=0),
            GenerationOption("duration", float, None, f"seconds per series at {self.sample_rate:g} Hz "
                             "(instead of length)", minimum=0),
        )

    def sample_shape(self, *, length: int | None = None, duration: float | None = None, **options) -> tuple[int, ...]:
        """``(C, L)``: ``L = length``, or ``duration * sample_rate``, or the training length."""
        if length is not None and duration is not None:
            raise ValueError(f"length={length} and duration={duration} both set the length of a series: give one")
        if duration is not None:
            length = round(duration * self.sample_rate)
            if length < 1:
                raise ValueError(f"duration={duration} s gives no samples at {self.sample_rate} Hz")
        return (self.channels, length or self.length)

    def metadata(self, **options) -> dict:
        """Per-sample fields for ``metadata.jsonl``: the sample rate, channel count and length."""
        return {"sample_rate": self.sample_rate, "channels": self.channels, "length": self.sample_shape(**options)[1]}
