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


class GriffinLimVocoder(nn.Module):
    """Mel magnitude -> linear magnitude (minimum-norm least squares, refined by non-negative least
    squares) -> phase by fast Griffin-Lim.

    The least-squares solution (what torchaudio's ``InverseMelScale`` computes) spreads a partial
    over the whole width of its mel filters: a pure 262 Hz tone comes back ~55 cents sharp at 64
    slaney mels. ``nnls_iter`` multiplicative updates (Lee & Seung 2001) of
    ``min ||fb^T S - mel||^2, S >= 0`` from that start concentrate the energy again (librosa's
    ``mel_to_stft`` also solves an NNLS problem), which brings the worst case under 20 cents.

    On the CPU the decode runs in NumPy and SciPy (sparse filterbank products), which use no
    threads: Griffin-Lim on one clip is hundreds of small FFTs, and torch's intra-op threads add a
    synchronization to each, which on a CPU shared with other jobs costs a scheduler slice per op
    (a 1 s clip on 2 cores kept busy by other jobs: 290 ms median and up to 8 s with torch's 2
    threads, 95 ms here). Lowering torch's thread count instead would change it for the whole
    process. Other devices run the same algorithm in torch.

    Args:
        spec: the adapter's mel settings.
        n_iter: Griffin-Lim iterations (quality grows slowly beyond ~64).
        nnls_iter: NNLS refinement steps after the least-squares start; 0 keeps the plain solution.
        momentum: fast Griffin-Lim momentum (Perraudin et al. 2013); 0.99 is torchaudio's default.
        seed: the random initial phase is drawn from this seed (with a generator of its own, so the
            global RNG is neither read nor changed): decoding is deterministic, the same on every
            device up to rounding, and generation stays reproducible per sample seed.
    """

    def __init__(self, *, spec: MelSpec, n_iter: int = 64, nnls_iter: int = 100, momentum: float = 0.99,
                 seed: int = 0) -> None:
        super().__init__()
        from torchaudio.functional import melscale_fbanks

        if not 0 <= momentum < 1:
            raise VocoderError(f"Griffin-Lim momentum must be in [0, 1), got {momentum} (modality.vocoder.momentum)")
        self.spec, self.n_iter, self.nnls_iter, self.momentum, self.seed = spec, n_iter, nnls_iter, momentum, seed
        fb = melscale_fbanks(spec.n_stft, spec.f_min, spec.f_max, spec.n_mels, spec.sample_rate, spec.norm,
                             spec.mel_scale)  # (n_stft, n_mels): mel = fb^T @ linear
        self.register_buffer("fb", fb, persistent=False)
        # InverseMelScale solves lstsq(fb^T, mel) at every call; its minimum-norm solution is one
        # linear map of the mel input, computed once here
        self.register_buffer("fb_pinv", torch.linalg.pinv(fb.double().T).float(), persistent=False)
        left = (spec.n_fft - spec.win_length) // 2  # torch.stft centres a shorter window the same way
        window = F.pad(torch.hann_window(spec.win_length), (left, spec.n_fft - spec.win_length - left))
        self.register_buffer("window", window, persistent=False)
        self._numpy_ops: _NumpyOps | None = None

    @torch.no_grad()
    def forward(self, log_mel: Tensor) -> Tensor:
        """``(B, n_mels, frames)`` natural-log mel magnitudes -> ``(B, frames * hop)`` waveforms (or more)."""
        # A centred inverse STFT of F frames spans (F - 1) hops: one silent frame more covers the
        # last hop, and very short inputs get enough frames for the overlap-add to be defined.
        extra = max(1, self.spec.n_fft // self.spec.hop_length + 1 - log_mel.shape[-1])
        log_mel = F.pad(log_mel, (0, extra), value=math.log(self.spec.log_floor))
        # the floor stands for silence: subtracting it keeps a quiet bed from turning into noise
        mel = (log_mel.float().exp() - self.spec.log_floor).clamp_min(0)
        batch, _, frames = mel.shape
        generator = torch.Generator().manual_seed(self.seed)
        phase = torch.rand((batch, self.spec.n_stft, frames), dtype=torch.complex64, generator=generator)
        length = self.spec.hop_length * (frames - 1)
        if mel.device.type == "cpu":
            if self._numpy_ops is None:
                self._numpy_ops = _NumpyOps(self.fb, self.fb_pinv, self.window, self.spec)
            frame_major = mel.double().numpy().swapaxes(1, 2), phase.numpy().swapaxes(1, 2)
            wave = self.decode(*frame_major, self._numpy_ops, length)
            return torch.from_numpy(wave).float()
        ops = _TorchOps(self.fb.to(mel.device), self.fb_pinv.to(mel.device), self.window.to(mel.device), self.spec)
        return self.decode(mel, phase.to(mel.device), ops, length)

    def decode(self, mel, phase, ops: _TorchOps | _NumpyOps, length: int):
        """``(B, n_mels, F)`` mel magnitudes and ``(B, n_stft, F)`` initial phase -> ``(B, length)``
        waveform, as torch tensors or NumPy arrays (``ops`` matches them)."""
        linear = ops.min_norm(mel).clip(min=0)
        if self.nnls_iter > 0:
            linear = nnls_refine(linear, mel, ops, self.nnls_iter)
        return griffin_lim(linear, phase, ops, n_iter=self.n_iter, momentum=self.momentum, length=length)


def nnls_refine(linear, mel, ops: _TorchOps | _NumpyOps, n_iter: int):
    """``(B, n_stft, F)`` start, ``(B, n_mels, F)`` target -> refined non-negative ``(B, n_stft, F)``
    by Lee & Seung's multiplicative updates (tensors or arrays alike)."""
    # multiplicative updates cannot revive exact zeros: start every bin slightly above zero
    s = linear.clip(min=1e-6 * max(float(linear.max()), 1e-12))
    numerator = ops.to_linear(mel)
    for _ in range(n_iter):
        s = s * numerator / ops.to_linear(ops.to_mel(s)).clip(min=1e-12)
    return s


def griffin_lim(magnitude, phase, ops: _TorchOps | _NumpyOps, *, n_iter: int, momentum: float, length: int):
    """Fast Griffin-Lim (Perraudin et al. 2013; torchaudio's ``griffinlim`` loop): ``(B, n_stft, F)``
    magnitude and initial phase -> ``(B, length)`` waveform (tensors or arrays alike)."""
    beta = momentum / (1 + momentum)
    angles, previous = phase, 0.0
    for _ in range(n_iter):
        rebuilt = ops.stft(ops.istft(magnitude * angles, length))
        angles = rebuilt - beta * previous
        angles /= abs(angles) + 1e-16
        previous = rebuilt
    return ops.istft(magnitude * angles, length)


class _TorchOps:
    """The filterbank products and STFTs of :class:`GriffinLimVocoder` in torch (any device)."""

    def __init__(self, fb: Tensor, fb_pinv: Tensor, window: Tensor, spec: MelSpec) -> None:
        self.fb, self.fb_pinv, self.window, self.spec = fb, fb_pinv, window, spec

    def to_mel(self, linear: Tensor) -> Tensor:  # (B, n_stft, F) -> (B, n_mels, F)
        return self.fb.T @ linear

    def to_linear(self, mel: Tensor) -> Tensor:  # (B, n_mels, F) -> (B, n_stft, F), the adjoint
        return self.fb @ mel

    def min_norm(self, mel: Tensor) -> Tensor:
        return self.fb_pinv @ mel

    def stft(self, wave: Tensor) -> Tensor:  # (B, T) -> (B, n_stft, F), complex
        return torch.stft(wave, self.spec.n_fft, self.spec.hop_length, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)

    def istft(self, spec: Tensor, length: int) -> Tensor:  # (B, n_stft, F) -> (B, length)
        return torch.istft(spec, self.spec.n_fft, self.spec.hop_length, window=self.window, center=True,
                           length=length)


class _NumpyOps:
    """The same in NumPy (float64) with a sparse filterbank: no threads, hence no thread setting.

    Its spectra are frame-major, ``(B, F, bins)`` (the transpose of :class:`_TorchOps`'s), so that
    every FFT runs over contiguous memory; :meth:`GriffinLimVocoder.forward` hands them over so.
    """

    def __init__(self, fb: Tensor, fb_pinv: Tensor, window: Tensor, spec: MelSpec) -> None:
        import numpy as np
        from scipy.sparse import csr_array

        fb64 = fb.double().numpy()
        self.fb, self.fb_t = csr_array(fb64), csr_array(fb64.T)  # each STFT bin meets at most 2 filters
        self.fb_pinv_t, self.window, self.spec = fb_pinv.double().numpy().T, window.double().numpy(), spec
        n_fft, hop = spec.n_fft, spec.hop_length
        self.parts = -(-n_fft // hop)  # hop-long pieces per frame, for the overlap-add
        self.window_sq = np.pad(self.window**2, (0, self.parts * hop - n_fft)).reshape(self.parts, hop)

    @staticmethod
    def _apply(x, matrix):
        """Each ``x[b] (F, n)`` times ``matrix (n, m)`` -> ``(B, F, m)``."""
        batch, frames, n = x.shape
        return (x.reshape(batch * frames, n) @ matrix).reshape(batch, frames, -1)

    def to_mel(self, linear):
        return self._apply(linear, self.fb)

    def to_linear(self, mel):
        return self._apply(mel, self.fb_t)

    def min_norm(self, mel):
        return self._apply(mel, self.fb_pinv_t)

    def stft(self, wave):
        """``(B, T)`` -> ``(B, F, n_stft)``: ``torch.stft(center=True, pad_mode="reflect")``, transposed."""
        import numpy as np

        n_fft, hop = self.spec.n_fft, self.spec.hop_length
        padded = np.pad(wave, [(0, 0), (n_fft // 2, n_fft // 2)], mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=-1)[:, ::hop]
        return np.fft.rfft(frames * self.window, axis=-1)

    def istft(self, spec, length: int):
        """``(B, F, n_stft)`` -> ``(B, length)`` as ``torch.istft(center=True, length=length)``."""
        import numpy as np

        n_fft, hop, parts = self.spec.n_fft, self.spec.hop_length, self.parts
        frames = np.fft.irfft(spec, n=n_fft, axis=-1)  # (B, F, n_fft)
        frames *= self.window
        batch, count, _ = frames.shape
        if parts * hop != n_fft:
            frames = np.pad(frames, [(0, 0), (0, 0), (0, parts * hop - n_fft)])
        pieces = frames.reshape(batch, count, parts, hop)
        wave = np.zeros((batch, count + parts - 1, hop))
        envelope = np.zeros((count + parts - 1, hop))  # torch.istft's normalization: sum of squared windows
        for k in range(parts):  # overlap-add: piece k of frame f lands at hop f + k
            wave[:, k : k + count] += pieces[:, :, k]
            envelope[k : k + count] += self.window_sq[k]
        keep = slice(n_fft // 2, n_fft // 2 + length)
        envelope = envelope.reshape(-1)[keep]
        return wave.reshape(batch, -1)[:, keep] / np.where(envelope > 1e-11, envelope, 1.0)


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
