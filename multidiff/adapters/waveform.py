"""Raw audio: WAV/FLAC/OGG/MP3 files <-> waveforms ``(channels, samples)`` in ``[-1, 1]``, which are
also the model tensor (no spectrogram, no vocoder).

For latent models whose autoencoder takes waveforms (Stable Audio's ``AutoencoderOobleck``): the
latent stage turns the waveform into a short sequence of latent vectors and back. Files are read
and written with soundfile, resampled to ``sample_rate`` and mixed down (or duplicated) to
``channels``.

``window=true`` is how Stable Audio was trained: every item is a fixed window (shorter recordings
zero-padded) and the model is told where the audio in it starts and ends (``cond.seconds``,
Stable Audio's ``seconds_start`` / ``seconds_total``). Generation then always samples the whole
window, conditioned on the requested ``duration``, and the output is cropped to it, as diffusers'
``StableAudioPipeline`` does. ``window=false`` generates exactly the requested length.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from multidiff.adapters.audio import fit_samples, log_audio_media, read_audio, resample, seconds_to_samples, write_audio
from multidiff.adapters.base import Adapter, GenerationOption


class WaveformAdapter(Adapter):
    """Multichannel audio as its raw waveform ``(channels, samples)``.

    Args:
        sample_rate: every file is resampled to this rate (Hz).
        channels: 1 (mono: files are mixed down) or 2 (stereo: mono files are duplicated).
        duration: the training window in seconds; items are cropped or zero-padded to it.
        window: generate the whole window conditioned on the requested duration, then crop
            (Stable Audio), instead of generating the requested length.
        crop: which part of a longer file trains: ``"start"`` or ``"center"``.
        subtype: soundfile subtype for ``.wav`` output (``"PCM_16"``, ``"PCM_24"``, ``"FLOAT"``).
    """

    extensions = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
    suffix = ".wav"
    formats = ("wav", "flac", "ogg", "mp3")

    def __init__(self, *, sample_rate: int = 44100, channels: int = 2, duration: float = 1.0, window: bool = False,
                 crop: str = "start", subtype: str = "PCM_16") -> None:
        for key, value in (("sample_rate", sample_rate), ("duration", duration)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"modality.{key}={value!r} is invalid: it must be a positive number")
        if channels not in (1, 2):
            raise ValueError(f"modality.channels={channels!r} is invalid: 1 (mono) or 2 (stereo)")
        if crop not in ("start", "center"):
            raise ValueError(f"modality.crop={crop!r} is invalid: choose 'start' or 'center'")
        self.sample_rate, self.channels = int(sample_rate), int(channels)
        self.samples = max(1, round(float(duration) * self.sample_rate))
        self.window, self.crop, self.subtype = bool(window), crop, subtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.samples)

    @property
    def duration(self) -> float:
        """The training window in seconds."""
        return self.samples / self.sample_rate

    def num_samples(self, duration: float | None = None) -> int:
        """Waveform length for ``duration`` seconds (the window when ``None``); longer than the
        window is refused where the model generates its window."""
        if duration is None:
            return self.samples
        n = seconds_to_samples(duration, self.sample_rate)
        if self.window and n > self.samples:
            raise ValueError(f"duration={duration:g} is longer than this model's {self.duration:g} s window, the "
                             f"longest it generates; ask for at most duration={self.duration:g}")
        return n

    # -- generation ----------------------------------------------------------------------------

    def generation_options(self) -> tuple[GenerationOption, ...]:
        what = (f"at most the model's window, {self.duration:g} s, its default" if self.window
                else f"default: the training length, {self.duration:g} s; any length works")
        return (GenerationOption("duration", float, None, f"seconds of audio ({what})", minimum=0),)

    def sample_shape(self, *, duration: float | None = None, **options) -> tuple[int, ...]:
        n = self.num_samples(duration)
        return (self.channels, self.samples if self.window else n)

    def condition_inputs(self, *, duration: float | None = None, **options) -> dict[str, list[float]]:
        """``seconds``: the audio spans ``[0, duration]`` of the window (a windowed model is told so)."""
        if not self.window:
            return {}
        return {"seconds": [0.0, self.num_samples(duration) / self.sample_rate]}

    def fit_length(self, raw: Tensor, *, duration: float | None = None, **options) -> Tensor:
        return fit_samples(raw, self.num_samples(duration))

    def metadata(self, *, duration: float | None = None, **options) -> dict:
        return {"sample_rate": self.sample_rate, "channels": self.channels,
                "duration": self.num_samples(duration) / self.sample_rate}

    def input_options(self, raw: Tensor) -> dict:
        """An input's own duration (within the window of a windowed model)."""
        seconds = raw.shape[-1] / self.sample_rate
        return {"duration": min(seconds, self.duration) if self.window else seconds}

    def encode_input(self, raw: Tensor, *, duration: float | None = None, **_ignored) -> Tensor:
        wave = fit_samples(self._fit_channels(raw.float()), self.num_samples(duration))
        return fit_samples(wave, self.sample_shape(duration=duration)[-1])

    # -- files ---------------------------------------------------------------------------------

    def _fit_channels(self, wave: Tensor) -> Tensor:
        wave = wave.reshape(1, -1) if wave.ndim == 1 else wave
        if wave.shape[0] == self.channels:
            return wave
        if self.channels == 1:
            return wave.mean(0, keepdim=True)
        return wave[:1].expand(self.channels, -1).clone() if wave.shape[0] == 1 else wave[: self.channels]

    def load(self, path: str | Path) -> Tensor:
        """A file as ``(channels, samples)`` float32 at ``sample_rate`` (full length)."""
        wave, sr = read_audio(path)
        return resample(self._fit_channels(wave), sr, self.sample_rate)

    def save(self, raw: Tensor, path: str | Path) -> None:
        """Write ``(channels, samples)`` at ``sample_rate``; samples are clipped to ``[-1, 1]``."""
        write_audio(path, self._fit_channels(raw.detach().float()), self.sample_rate, subtype=self.subtype)

    # -- tensors -------------------------------------------------------------------------------

    def encode(self, raw: Tensor) -> Tensor:
        """A waveform -> ``(channels, samples)`` cropped or zero-padded to the window."""
        return fit_samples(self._fit_channels(raw.float()), self.samples, crop=self.crop)

    def decode(self, x0: Tensor) -> Tensor:
        return x0.float()

    def preview(self, raw: Tensor, height: int = 64, width: int = 256) -> Tensor:
        """``(3, height, width)``: each channel's envelope (min/max per column) drawn white on black,
        stacked top to bottom, on the fixed ``[-1, 1]`` scale."""
        wave = self._fit_channels(raw.detach().float().cpu()).clamp(-1, 1)
        n = wave.shape[-1]
        cols = min(width, n)
        edges = torch.linspace(0, n, cols + 1).long()
        level = torch.arange(height)[:, None]
        rows = []
        for ch in wave:
            lo = torch.stack([ch[a:max(b, a + 1)].min() for a, b in zip(edges[:-1], edges[1:])])
            hi = torch.stack([ch[a:max(b, a + 1)].max() for a, b in zip(edges[:-1], edges[1:])])
            top, bottom = (((1 - v) / 2 * (height - 1)).round().long() for v in (hi, lo))  # at least one pixel
            rows.append(((level >= top[None]) & (level <= bottom[None])).float())
        img = torch.cat(rows, 0)
        return img[None].expand(3, -1, -1)

    def log_media(self, logger, raws: list[Tensor], prompts: list[str], step: int, out_dir: str | Path, *,
                  prefix: str = "") -> None:
        """WAVs into ``out_dir`` and audio to the logger: :func:`~multidiff.adapters.audio.log_audio_media`."""
        log_audio_media(self, logger, raws, prompts, step, out_dir, prefix=prefix)
