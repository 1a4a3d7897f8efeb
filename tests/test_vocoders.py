"""The Griffin-Lim vocoder's two backends and the process-wide state decoding must leave alone:
torch's intra-op thread count and the global random generator."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from multidiff.adapters.vocoders import GriffinLimVocoder, MelSpec, VocoderError, _NumpyOps, _TorchOps

SPEC = MelSpec(sample_rate=16000, n_fft=512, win_length=512, hop_length=128, n_mels=40, f_min=0.0, f_max=8000.0,
               mel_scale="htk", norm=None, log_floor=1e-2)
# a shorter window than n_fft and a hop that does not divide it: the overlap-add's general case
ODD = MelSpec(sample_rate=16000, n_fft=512, win_length=400, hop_length=160, n_mels=40, f_min=0.0, f_max=8000.0,
              mel_scale="slaney", norm="slaney", log_floor=1e-2)


def log_mel_of_tone(spec: MelSpec, seconds: float = 0.25, f0: float = 440.0) -> torch.Tensor:
    """``(1, n_mels, frames)`` natural-log mel magnitudes of a sawtooth-like tone."""
    import torchaudio

    t = torch.arange(int(seconds * spec.sample_rate)) / spec.sample_rate
    wave = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 6))[None]
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=spec.sample_rate, n_fft=spec.n_fft, win_length=spec.win_length, hop_length=spec.hop_length,
        f_min=spec.f_min, f_max=spec.f_max, n_mels=spec.n_mels, mel_scale=spec.mel_scale, norm=spec.norm, power=1.0,
    )(wave)
    return mel.clamp_min(spec.log_floor).log()


@pytest.fixture
def two_threads():
    """Run the test with torch at 2 intra-op threads (so code that lowers the count would have to
    change it), restoring the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_decoding_leaves_torch_thread_count_alone(two_threads, monkeypatch):
    def refuse(n):
        raise AssertionError(f"the vocoder called torch.set_num_threads({n}): a process-wide setting")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    wave = GriffinLimVocoder(spec=SPEC, n_iter=4, nnls_iter=4)(log_mel_of_tone(SPEC))
    assert torch.get_num_threads() == 2 and wave.shape[-1] > 0


def test_decoding_leaves_the_global_rng_alone():
    vocoder, log_mel = GriffinLimVocoder(spec=SPEC, n_iter=4, nnls_iter=4), log_mel_of_tone(SPEC)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = vocoder(log_mel)
    assert torch.equal(torch.get_rng_state(), state)  # neither drawn from nor reseeded
    torch.manual_seed(456)
    torch.testing.assert_close(vocoder(log_mel), first)  # and the result does not depend on it


@pytest.mark.parametrize("spec", [SPEC, ODD], ids=["default-like", "short-window-odd-hop"])
def test_numpy_stft_and_istft_match_torch(spec):
    vocoder = GriffinLimVocoder(spec=spec)
    ops_np = _NumpyOps(vocoder.fb, vocoder.fb_pinv, vocoder.window, spec)
    ops_pt = _TorchOps(vocoder.fb.double(), vocoder.fb_pinv.double(), vocoder.window.double(), spec)
    wave = torch.randn(2, 4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spectrum = ops_pt.stft(wave)  # (B, n_stft, F); the NumPy ops are frame-major
    np.testing.assert_allclose(ops_np.stft(wave.numpy()), spectrum.transpose(1, 2).numpy(), atol=1e-9)
    length = spec.hop_length * (spectrum.shape[-1] - 1)
    np.testing.assert_allclose(ops_np.istft(spectrum.transpose(1, 2).numpy(), length),
                               ops_pt.istft(spectrum, length).numpy(), atol=1e-9)


def test_cpu_decode_matches_the_torch_backend():
    """The CPU path (NumPy, float64) and the torch path used on accelerators agree, from the same
    initial phase (the torch path run here on the CPU)."""
    vocoder, log_mel = GriffinLimVocoder(spec=SPEC, n_iter=16, nnls_iter=20), log_mel_of_tone(SPEC)
    numpy_wave = vocoder(log_mel)
    padded = torch.nn.functional.pad(log_mel, (0, 1), value=math.log(SPEC.log_floor))
    mel = (padded.exp() - SPEC.log_floor).clamp_min(0)
    phase = torch.rand((1, SPEC.n_stft, mel.shape[-1]), dtype=torch.complex64,
                       generator=torch.Generator().manual_seed(vocoder.seed))
    ops = _TorchOps(vocoder.fb, vocoder.fb_pinv, vocoder.window, SPEC)
    torch_wave = vocoder.decode(mel, phase, ops, SPEC.hop_length * (mel.shape[-1] - 1))
    assert numpy_wave.shape == torch_wave.shape and numpy_wave.dtype == torch.float32
    torch.testing.assert_close(numpy_wave, torch_wave, atol=1e-4 * float(torch_wave.abs().max()), rtol=0)


def test_concurrent_decodes_give_the_sequential_results():
    vocoder = GriffinLimVocoder(spec=SPEC, n_iter=8, nnls_iter=8)
    inputs = [log_mel_of_tone(SPEC, f0=f) for f in (220.0, 330.0, 440.0, 550.0)]
    expected = [vocoder(x) for x in inputs]
    results: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, vocoder(inputs[i]))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        torch.testing.assert_close(results[i], want, atol=0, rtol=0)


def test_momentum_out_of_range_is_refused():
    with pytest.raises(VocoderError, match=r"modality\.vocoder\.momentum"):
        GriffinLimVocoder(spec=SPEC, momentum=1.0)
