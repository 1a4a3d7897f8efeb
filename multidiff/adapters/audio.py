"""Audio: WAV/FLAC/OGG/MP3 files <-> mono waveforms ``(1, samples)`` <-> normalized log-mel
spectrograms ``(1, n_mels, frames)``, decoded back through a vocoder.

Files are read and written with soundfile (libsndfile), never ``torchaudio.load``/``save`` (those
need torchcodec); torchaudio provides the transforms (mel analysis, resampling, Griffin-Lim).

The model tensor is ``(ln(max(mel, log_floor)) - mean) / std`` with ``mel`` the mel magnitude
spectrogram (power 1): the log-mel convention of HiFi-GAN/BigVGAN/Vocos, so a neural vocoder
trained on the same analysis settings plugs in (:mod:`multidiff.adapters.vocoders`).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from multidiff.adapters.base import Adapter, GenerationOption, random_span_keep, spans_of
from multidiff.adapters.vocoders import GriffinLimVocoder, MelSpec

SOUNDFILE_SUBTYPES = {".wav": None, ".flac": "PCM_16", ".ogg": "VORBIS", ".mp3": "MPEG_LAYER_III"}
"""Writers by suffix; ``None`` means the adapter's ``subtype`` (16-bit PCM by default)."""


class AudioReadError(ValueError):
    """An audio file cannot be read (missing, corrupt, or a format libsndfile does not decode)."""


def read_audio(path: str | Path) -> tuple[Tensor, int]:
    """A file as ``(channels, samples)`` float32 in ``[-1, 1]`` and its sample rate (soundfile)."""
    import soundfile as sf

    path = Path(path)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports missing, corrupt and unknown formats alike
        raise AudioReadError(
            f"cannot read audio file {path}: {type(e).__name__}: {e}. multidiff reads WAV, FLAC, OGG (Vorbis/Opus) "
            "and MP3 through libsndfile; check that the file exists and plays, or convert it to WAV "
            f"(e.g. ffmpeg -i '{path}' '{path.with_suffix('.wav')}')"
        ) from e
    if data.shape[0] == 0:
        raise AudioReadError(f"audio file {path} holds no samples; remove it or replace it with a non-empty recording")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)


def resample(wave: Tensor, orig_sr: int, new_sr: int) -> Tensor:
    """``(..., samples)`` from ``orig_sr`` to ``new_sr`` (torchaudio's windowed-sinc resampler)."""
    if orig_sr == new_sr:
        return wave
    import torchaudio.functional as AF

    return AF.resample(wave, orig_sr, new_sr)


def seconds_to_samples(duration: float, sample_rate: int) -> int:
    """Samples in ``duration`` seconds at ``sample_rate`` (at least one); a non-positive or
    non-numeric duration is refused naming the value."""
    if isinstance(duration, bool) or not isinstance(duration, int | float) or not math.isfinite(duration) \
            or duration <= 0:
        raise ValueError(f"duration={duration!r} is invalid: it must be a positive number of seconds")
    return max(1, round(duration * sample_rate))


def write_audio(path: str | Path, wave: Tensor, sample_rate: int, *, subtype: str = "PCM_16") -> None:
    """Write ``(channels, samples)`` with soundfile; the suffix picks the format (``subtype`` for
    ``.wav``). Samples are clipped to ``[-1, 1]``: integer PCM would wrap around otherwise."""
    import soundfile as sf

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SOUNDFILE_SUBTYPES:
        raise ValueError(f"cannot write {path}: audio is written as {', '.join(SOUNDFILE_SUBTYPES)}")
    data = wave.detach().float().clamp(-1, 1).cpu().numpy().T
    sf.write(str(path), data, sample_rate, subtype=SOUNDFILE_SUBTYPES[suffix] or subtype)


def fit_samples(wave: Tensor, length: int, *, crop: str = "start") -> Tensor:
    """``(..., n)`` cropped (``"start"`` keeps the beginning, ``"center"`` the middle) or zero-padded
    at the end to ``(..., length)``."""
    n = wave.shape[-1]
    if n > length:
        start = (n - length) // 2 if crop == "center" else 0
        return wave[..., start : start + length]
    if n < length:
        return F.pad(wave, (0, length - n))
    return wave


class AudioAdapter(Adapter):
    """Mono audio as normalized log-mel spectrograms.

    Args:
        sample_rate: every file is resampled to this rate (Hz).
        n_fft, win_length, hop_length: STFT settings (``win_length`` defaults to ``n_fft``).
        n_mels, f_min, f_max, mel_scale, norm: the mel filterbank (torchaudio's meaning;
            ``f_max=None`` means Nyquist).
        log_floor: mel magnitudes are clamped to this before the log (silence).
        mean, std: normalization statistics of the log-mel values (measure them on your data).
        frames: training length in spectrogram frames; waveforms are cropped or zero-padded to
            ``frames * hop_length`` samples (``frames * hop_length / sample_rate`` seconds).
        crop: which part of a longer file trains: ``"start"`` (onsets matter, e.g. notes) or
            ``"center"``.
        size, channels: the model tensor is ``(1, n_mels, frames)`` (:attr:`shape`, which the model
            builder hands to the backbone). Both follow from the other settings; ``size`` is only
            read from models exported before the shape flowed from the adapter and must agree.
        vocoder: factory ``f(spec=MelSpec) -> vocoder`` (see :mod:`multidiff.adapters.vocoders`);
            default Griffin-Lim.
        subtype: soundfile subtype for ``.wav`` output (``"PCM_16"``, ``"PCM_24"``, ``"FLOAT"``).

    The defaults are those of ``conf/modality/audio.yaml`` (see ``docs/audio.md`` for why).
    """

    extensions = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
    suffix = ".wav"
    formats = ("wav", "flac", "ogg", "mp3")

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        n_fft: int = 2048,
        win_length: int | None = None,
        hop_length: int = 1024,
        n_mels: int = 128,
        f_min: float = 0.0,
        f_max: float | None = 6000.0,
        mel_scale: str = "htk",
        norm: str | None = None,
        log_floor: float = 1e-2,
        mean: float = -2.49,
        std: float = 2.67,
        frames: int = 16,
        crop: str = "start",
        size: tuple[int, int] | list[int] | None = None,
        channels: int = 1,
        vocoder=None,
        subtype: str = "PCM_16",
    ) -> None:
        import torchaudio.transforms as T

        f_max = sample_rate / 2 if f_max is None else float(f_max)
        _check_settings(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, f_min=f_min,
                        f_max=f_max, log_floor=log_floor, std=std, frames=frames, crop=crop)
        if size is not None and tuple(size) != (n_mels, frames):
            raise ValueError(
                f"modality.size={list(size)} disagrees with (n_mels, frames)=({n_mels}, {frames}); remove size "
                "(the shape follows from n_mels and frames) and set those instead"
            )
        if channels != 1:
            raise ValueError(f"modality.channels={channels}: audio is mixed down to mono, so channels must be 1")
        self.spec = MelSpec(
            sample_rate=int(sample_rate), n_fft=int(n_fft), win_length=int(win_length or n_fft),
            hop_length=int(hop_length), n_mels=int(n_mels), f_min=float(f_min), f_max=f_max,
            mel_scale=mel_scale, norm=norm, log_floor=float(log_floor),
        )
        self.mean, self.std, self.frames, self.crop, self.subtype = float(mean), float(std), int(frames), crop, subtype
        self.mel = T.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=self.spec.win_length, hop_length=hop_length,
            f_min=f_min, f_max=f_max, n_mels=n_mels, power=1.0, norm=norm, mel_scale=mel_scale, center=True,
        )
        self.vocoder = (vocoder or partial(GriffinLimVocoder))(spec=self.spec)

    # -- sizes --------------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self.spec.sample_rate

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, self.spec.n_mels, self.frames)

    @property
    def duration(self) -> float:
        """Training length in seconds."""
        return self.frames * self.spec.hop_length / self.sample_rate

    def num_samples(self, duration: float | None = None) -> int:
        """Waveform length for ``duration`` seconds (the training length when ``None``)."""
        if duration is None:
            return self.frames * self.spec.hop_length
        return seconds_to_samples(duration, self.sample_rate)

    def frames_for(self, num_samples: int) -> int:
        """Spectrogram frames covering ``num_samples`` (the last one partly)."""
        return max(1, math.ceil(num_samples / self.spec.hop_length))

    def generation_options(self) -> tuple[GenerationOption, ...]:
        return (GenerationOption("duration", float, None, f"seconds of audio (default: the training length, "
                                 f"{self.duration:g} s); any length works", minimum=0),)

    # -- editing ---------------------------------------------------------------------------------

    def region_options(self) -> tuple[GenerationOption, ...]:
        return (
            GenerationOption("keep_seconds", list, None, "[start, end] seconds (or a list of them) to keep from init; "
                             "the rest is generated: keep_seconds=[0,0.5] continues after 0.5 s"),
            GenerationOption("fill_seconds", list, None, "[start, end] seconds (or a list of them) to generate; the "
                             "rest of init is kept: fill_seconds=[0.3,0.6] fills a gap"),
        )

    def input_options(self, raw: Tensor) -> dict:
        """The input's own duration (generation then matches it unless ``duration=`` is given)."""
        return {"duration": raw.shape[-1] / self.sample_rate}

    def encode_input(self, raw: Tensor, *, duration: float | None = None, **_ignored) -> Tensor:
        """``(1, samples)`` -> ``(1, n_mels, frames)`` for ``duration`` seconds: the start of the
        input, zero-padded (silence) past its end."""
        wave = raw.float().reshape(1, -1) if raw.ndim == 1 else raw.float().mean(0, keepdim=True)
        return self.normalize(self.log_mel(fit_samples(wave, self.num_samples(duration))))

    def load_mask(self, path: str | Path) -> Tensor:
        raise ValueError(f"mask={path}: audio regions are spans of seconds, not mask files; use "
                         "keep_seconds=[start,end] or fill_seconds=[start,end]")

    def keep_mask(self, shape: tuple[int, ...], *, raw: Tensor | None = None, mask: Tensor | None = None,
                  keep_seconds: list | None = None, fill_seconds: list | None = None, **_ignored) -> Tensor | None:
        """``(1, n_mels, frames)``: 1 keeps the input. Spectrogram frame ``f`` covers samples
        ``[f * hop, (f + 1) * hop)``: it is kept when it lies wholly inside a kept span and the
        input, and generated when it touches a filled span or lies past the end of the input."""
        keep = super().keep_mask(shape, mask=mask)
        if keep is None and keep_seconds is None and fill_seconds is None:
            return None
        frames, hop, sr = shape[-1], self.spec.hop_length, self.sample_rate
        keep = torch.ones(1, *shape[1:]) if keep is None else keep
        if raw is not None:  # frames the input does not cover wholly were padding: never kept
            keep[..., raw.shape[-1] // hop :] = 0
        length = frames * hop / sr if raw is None else raw.shape[-1] / sr
        if fill_seconds is not None:
            for a, b in spans_of("fill_seconds", fill_seconds, upper=frames * hop / sr, unit="seconds"):
                keep[..., math.floor(a * sr / hop) : math.ceil(b * sr / hop)] = 0
        if keep_seconds is not None:
            inside = torch.zeros(frames)
            for a, b in spans_of("keep_seconds", keep_seconds, upper=length, unit="seconds of init"):
                inside[math.ceil(a * sr / hop - 1e-6) : math.floor(b * sr / hop + 1e-6)] = 1
            keep = keep * inside
        return keep

    def random_keep_mask(self, dims: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Spans of time over every mel band: a continuation (the start kept), a lead-in (the end
        kept) or a gap (both ends kept), each a quarter to three quarters of the clip."""
        return random_span_keep(dims, generator, axis=-1)

    def sample_shape(self, *, duration: float | None = None, **options) -> tuple[int, ...]:
        """``(1, n_mels, frames)`` for ``duration`` seconds; any frame count works (the backbone pads)."""
        return (1, self.spec.n_mels, self.frames_for(self.num_samples(duration)))

    def metadata(self, *, duration: float | None = None, **options) -> dict:
        return {"sample_rate": self.sample_rate, "duration": self.num_samples(duration) / self.sample_rate}

    # -- files ---------------------------------------------------------------------------------

    def load(self, path: str | Path) -> Tensor:
        """A file as a mono ``(1, samples)`` float32 waveform at ``sample_rate`` (full length)."""
        wave, sr = read_audio(path)
        return resample(wave.mean(0, keepdim=True), sr, self.sample_rate)

    def save(self, raw: Tensor, path: str | Path) -> None:
        """Write ``(1, samples)`` (or ``(samples,)``) at ``sample_rate``; the suffix picks the format.

        Samples are clipped to ``[-1, 1]``: integer PCM would wrap around otherwise.
        """
        write_audio(path, raw.detach().float().reshape(1, -1), self.sample_rate, subtype=self.subtype)

    # -- tensors -------------------------------------------------------------------------------

    def log_mel(self, wave: Tensor) -> Tensor:
        """``(..., samples)`` -> ``(..., n_mels, ceil(samples / hop))`` natural-log mel magnitudes."""
        mel = self.mel.to(wave.device)(wave.float())
        frames = self.frames_for(wave.shape[-1])
        # center=True adds one frame beyond the last hop; drop it so frames * hop == samples
        return mel[..., :frames].clamp_min(self.spec.log_floor).log()

    def normalize(self, log_mel: Tensor) -> Tensor:
        return (log_mel - self.mean) / self.std

    def denormalize(self, x: Tensor) -> Tensor:
        # values below the floor mean nothing to a log-mel: clamp them back to silence
        return (x.float() * self.std + self.mean).clamp_min(math.log(self.spec.log_floor))

    def encode(self, raw: Tensor) -> Tensor:
        """``(1, samples)`` waveform -> ``(1, n_mels, frames)`` after cropping/padding to the training length."""
        wave = raw.float().reshape(1, -1) if raw.ndim == 1 else raw.float().mean(0, keepdim=True)
        return self.normalize(self.log_mel(fit_samples(wave, self.num_samples(), crop=self.crop)))

    def decode(self, x0: Tensor) -> Tensor:
        """``(1, n_mels, frames)`` -> ``(1, frames * hop)`` waveform through the vocoder."""
        wave = self.vocoder(self.denormalize(x0))  # the channel axis (1) serves as a batch of one
        return fit_samples(wave.reshape(1, -1), x0.shape[-1] * self.spec.hop_length)

    def fit_length(self, raw: Tensor, *, duration: float | None = None, **options) -> Tensor:
        """``(1, n)`` decoded waveform trimmed (or padded) to exactly ``duration`` seconds."""
        return fit_samples(raw, self.num_samples(duration))

    # -- logging -------------------------------------------------------------------------------

    def preview(self, raw: Tensor) -> Tensor:
        """``(3, n_mels, frames)`` log-mel image in ``[0, 1]``, low frequencies at the bottom.

        Fixed scale (floor to 3 standard deviations above the mean) so previews compare across steps.
        """
        x = self.normalize(self.log_mel(raw.float().reshape(1, -1)))[0]
        lo = (math.log(self.spec.log_floor) - self.mean) / self.std
        hi = 3.0
        img = ((x - lo) / max(hi - lo, 1e-6)).clamp(0, 1).flip(0)
        return img[None].expand(3, -1, -1)

    def log_media(self, logger, raws: list[Tensor], prompts: list[str], step: int, out_dir: str | Path, *,
                  prefix: str = "") -> None:
        """WAVs into ``out_dir`` and audio to the logger: :func:`log_audio_media`."""
        log_audio_media(self, logger, raws, prompts, step, out_dir, prefix=prefix)


def log_audio_media(adapter, logger, raws: list[Tensor], prompts: list[str], step: int, out_dir: str | Path, *,
                    prefix: str = "") -> None:
    """WAVs into ``out_dir/step_NNNNNN_KK.wav`` (+ the prompts, through ``adapter.save``) and audio to the logger.

    TensorBoard (``experiment.add_audio``) gets each clip (mixed to mono); other loggers get the files
    only. Writing is idempotent, so several loggers do not duplicate anything.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (raw, prompt) in enumerate(zip(raws, prompts)):
        name = f"step_{step:06d}_{k:02d}.wav"
        adapter.save(raw, out_dir / name)
        lines.append(f"{name}\t{prompt}\n")
    (out_dir / f"step_{step:06d}_prompts.tsv").write_text("".join(lines), encoding="utf-8")
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_audio"):
        for k, (raw, prompt) in enumerate(zip(raws, prompts)):
            clip = raw.detach().float().reshape(-1, raw.shape[-1]).mean(0, keepdim=True).clamp(-1, 1).cpu()
            experiment.add_audio(f"{prefix}samples/{k:02d} {prompt}", clip, step, sample_rate=adapter.sample_rate)


def _check_settings(*, sample_rate, n_fft, hop_length, n_mels, f_min, f_max, log_floor, std, frames, crop) -> None:
    positive = {"sample_rate": sample_rate, "n_fft": n_fft, "hop_length": hop_length, "n_mels": n_mels,
                "frames": frames, "log_floor": log_floor, "std": std}
    for key, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"modality.{key}={value!r} is invalid: it must be a positive number")
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(
            f"modality.f_min={f_min} / f_max={f_max} are invalid: need 0 <= f_min < f_max <= sample_rate / 2 "
            f"({sample_rate / 2})"
        )
    if crop not in ("start", "center"):
        raise ValueError(f"modality.crop={crop!r} is invalid: choose 'start' or 'center'")
