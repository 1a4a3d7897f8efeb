"""Vocoders: log-mel spectrograms back to waveforms, behind one small interface.

The interface (what :class:`multidiff.adapters.audio.AudioAdapter` calls) is

    vocoder(log_mel) -> waveform

with ``log_mel`` of shape ``(B, n_mels, frames)`` holding the *natural log of the mel magnitude
spectrogram*, ``ln(max(mel, log_floor))`` with ``mel = MelScale(|STFT|)`` (power 1), which is the
convention of HiFi-GAN, BigVGAN and Vocos, and the waveform of shape ``(B, samples)`` at the
adapter's sample rate, with about ``frames * hop_length`` samples (the adapter pads or trims the
last few). The adapter builds its vocoder from a factory called as ``factory(spec=MelSpec(...))``,
so a config gives the vocoder with ``_partial_: true`` and the adapter hands over its mel settings:

    vocoder:
      _target_: multidiff.adapters.vocoders.GriffinLimVocoder
      _partial_: true
      n_iter: 64

- :class:`GriffinLimVocoder`: torchaudio ``InverseMelScale`` + ``GriffinLim``; offline, no weights.
- :class:`ModuleVocoder`: any ``torch.nn.Module`` (HiFi-GAN, BigVGAN, Vocos, ...) built from your
  own code and weights read from a local file (safetensors, or a tensor-only torch checkpoint read
  with ``weights_only=True``); nothing is unpickled, and your module's ``_target_`` must be listed
  in ``trusted_targets``. See ``docs/audio.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class VocoderError(ValueError):
    """A vocoder does not fit the adapter's mel settings, or its weights cannot be read."""


@dataclass(frozen=True)
class MelSpec:
    """The mel analysis an adapter uses; a vocoder must invert exactly this one."""

    sample_rate: int
    n_fft: int
    win_length: int
    hop_length: int
    n_mels: int
    f_min: float
    f_max: float
    mel_scale: str
    norm: str | None
    log_floor: float

    @property
    def n_stft(self) -> int:
        return self.n_fft // 2 + 1


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """Run a block of many tiny CPU ops (one clip's STFTs) on one intra-op thread.

    Griffin-Lim on one clip is hundreds of small FFTs; extra threads only add a synchronization
    per op, which on a CPU shared with other jobs costs a scheduler slice each time (measured on
    2 busy cores: 11 s per clip with 2 threads, 0.15 s with 1). No effect on other devices.
    """
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class GriffinLimVocoder(nn.Module):
    """Mel magnitude -> linear magnitude (``InverseMelScale``, refined by non-negative least
    squares) -> phase by Griffin-Lim.

    ``InverseMelScale`` returns the minimum-norm least-squares solution, which spreads a partial
    over the whole width of its mel filters: a pure 262 Hz tone comes back ~55 cents sharp at 64
    slaney mels. ``nnls_iter`` multiplicative updates (Lee & Seung 2001) of
    ``min ||fb^T S - mel||^2, S >= 0`` from that start concentrate the energy again (librosa's
    ``mel_to_stft`` also solves an NNLS problem), which brings the worst case under 20 cents.

    Args:
        spec: the adapter's mel settings.
        n_iter: Griffin-Lim iterations (quality grows slowly beyond ~64).
        nnls_iter: NNLS refinement steps after ``InverseMelScale``; 0 keeps its plain solution.
        momentum: fast Griffin-Lim momentum (Perraudin et al. 2013); 0.99 is torchaudio's default.
        seed: the random initial phase is drawn from this seed, so decoding is deterministic and
            generation stays reproducible per sample seed.
    """

    def __init__(self, *, spec: MelSpec, n_iter: int = 64, nnls_iter: int = 100, momentum: float = 0.99,
                 seed: int = 0) -> None:
        super().__init__()
        import torchaudio.transforms as T

        self.spec, self.seed, self.nnls_iter = spec, seed, nnls_iter
        self.inverse_mel = T.InverseMelScale(
            n_stft=spec.n_stft, n_mels=spec.n_mels, sample_rate=spec.sample_rate, f_min=spec.f_min,
            f_max=spec.f_max, norm=spec.norm, mel_scale=spec.mel_scale,
        )
        self.griffin_lim = T.GriffinLim(
            n_fft=spec.n_fft, n_iter=n_iter, win_length=spec.win_length, hop_length=spec.hop_length,
            power=1.0, momentum=momentum, rand_init=True,
        )

    @torch.no_grad()
    def forward(self, log_mel: Tensor) -> Tensor:
        """``(B, n_mels, frames)`` natural-log mel magnitudes -> ``(B, frames * hop)`` waveforms (or more)."""
        self.to(log_mel.device)
        # A centred inverse STFT of F frames spans (F - 1) hops: one silent frame more covers the
        # last hop, and very short inputs get enough frames for the overlap-add to be defined.
        extra = max(1, self.spec.n_fft // self.spec.hop_length + 1 - log_mel.shape[-1])
        log_mel = F.pad(log_mel, (0, extra), value=math.log(self.spec.log_floor))
        # the floor stands for silence: subtracting it keeps a quiet bed from turning into noise
        mel = (log_mel.float().exp() - self.spec.log_floor).clamp_min(0)
        devices = [log_mel.device] if log_mel.device.type == "cuda" else []
        with single_threaded(log_mel.device), torch.random.fork_rng(devices=devices):
            linear = self.refine(self.inverse_mel(mel), mel)
            torch.manual_seed(self.seed)
            return self.griffin_lim(linear)


    def refine(self, linear: Tensor, mel: Tensor) -> Tensor:
        """``(B, n_stft, F)`` start, ``(B, n_mels, F)`` target -> refined non-negative ``(B, n_stft, F)``."""
        if self.nnls_iter <= 0:
            return linear
        fb = self.inverse_mel.fb.to(mel)  # (n_stft, n_mels): mel = fb^T @ linear
        # multiplicative updates cannot revive exact zeros: start every bin slightly above zero
        s = linear.clamp_min(1e-6 * float(linear.max().clamp_min(1e-12)))
        numerator = fb @ mel
        for _ in range(self.nnls_iter):
            s = s * numerator / (fb @ (fb.T @ s)).clamp_min(1e-12)
        return s


class ModuleVocoder(nn.Module):
    """A neural vocoder: your ``nn.Module`` plus weights from a local file.

    The module maps ``(B, n_mels, frames)`` to ``(B, samples)`` or ``(B, 1, samples)``. It is built
    by Hydra from your config (its ``_target_`` prefix listed in ``trusted_targets``); weights are
    read without unpickling code.

    Args:
        spec: the adapter's mel settings (must match what the vocoder was trained on).
        module: the network, already constructed.
        weights: path to ``.safetensors`` or a tensor-only ``.pt``/``.ckpt``; ``None`` keeps the
            module's own weights (e.g. a module that loads itself).
        weights_key: sub-dictionary of the checkpoint holding the state dict (HiFi-GAN stores
            ``{"generator": ...}``); ``None`` for a flat state dict.
        strip_prefix: removed from the start of every weight name (e.g. ``"module."``).
        sample_rate, hop_length, n_mels: what the vocoder was trained with; checked against
            ``spec`` so a mismatch fails at construction, not as noise in the output.
        input_scale: ``"ln"`` (natural log, HiFi-GAN/BigVGAN/Vocos), ``"log10"`` (e.g.
            ParallelWaveGAN) or ``"linear"`` (mel magnitudes).
    """

    INPUT_SCALES = ("ln", "log10", "linear")

    def __init__(
        self,
        *,
        spec: MelSpec,
        module: nn.Module,
        weights: str | Path | None = None,
        weights_key: str | None = None,
        strip_prefix: str = "",
        sample_rate: int,
        hop_length: int,
        n_mels: int,
        input_scale: str = "ln",
    ) -> None:
        super().__init__()
        wanted = {"sample_rate": sample_rate, "hop_length": hop_length, "n_mels": n_mels}
        have = {k: getattr(spec, k) for k in wanted}
        if wanted != have:
            diff = ", ".join(f"{k}: vocoder {wanted[k]} vs modality {have[k]}" for k in wanted if wanted[k] != have[k])
            raise VocoderError(
                f"the vocoder was trained on other mel settings than the modality uses ({diff}); set the "
                "modality's sample_rate/hop_length/n_mels (and n_fft, f_min, f_max, mel_scale, norm) to the "
                "vocoder's, or use a vocoder trained on these features"
            )
        if input_scale not in self.INPUT_SCALES:
            raise VocoderError(f"input_scale must be one of {', '.join(self.INPUT_SCALES)}, got {input_scale!r}")
        self.spec, self.module, self.input_scale = spec, module, input_scale
        if weights is not None:
            self.module.load_state_dict(read_state_dict(weights, key=weights_key, strip_prefix=strip_prefix))
        self.module.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, log_mel: Tensor) -> Tensor:
        """``(B, n_mels, frames)`` natural-log mel magnitudes -> ``(B, samples)``."""
        param = next(self.module.parameters(), None)
        x = log_mel.float()
        if self.input_scale == "log10":
            x = x / torch.log(torch.tensor(10.0))
        elif self.input_scale == "linear":
            x = x.exp()
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        wave = self.module(x)
        if wave.ndim == 3:
            wave = wave[:, 0]
        return wave.float().to(log_mel.device)


def read_state_dict(path: str | Path, *, key: str | None = None, strip_prefix: str = "") -> dict[str, Tensor]:
    """Tensors of a safetensors file or of a tensor-only torch checkpoint (never unpickles code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise VocoderError(f"vocoder weights {path} do not exist; set modality.vocoder.weights to a local file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VocoderError(
            f"cannot read vocoder weights {path} ({type(e).__name__}: {str(e)[:200]}); give a .safetensors file "
            "or a checkpoint of plain tensors (loaded with weights_only=True, never pickled code)"
        ) from e
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise VocoderError(f"vocoder weights {path} have no entry {key!r} (found {found}); fix weights_key")
        state = state[key]
    if not isinstance(state, dict):
        raise VocoderError(f"vocoder weights {path} hold a {type(state).__name__}, not a state dict")
    return {k.removeprefix(strip_prefix): v for k, v in state.items()}
