"""The waveform adapter (raw multichannel audio as the model tensor, Stable Audio's modality): files in
and out through soundfile, channels fitted, the window and the duration it conditions on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from multidiff.adapters.waveform import WaveformAdapter


def _tone(rate: int, seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (0.5 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def test_stereo_files_round_trip_and_mono_files_are_duplicated(tmp_path):
    adapter = WaveformAdapter(sample_rate=8000, channels=2, duration=0.25)
    left, right = _tone(8000, 0.2, 220), _tone(8000, 0.2, 330)
    sf.write(str(tmp_path / "stereo.wav"), np.stack([left, right], 1), 8000, subtype="FLOAT")
    wave = adapter.load(tmp_path / "stereo.wav")
    assert wave.shape == (2, 1600) and torch.allclose(wave[1], torch.from_numpy(right))
    x0 = adapter.encode(wave)
    assert x0.shape == adapter.shape == (2, 2000) and x0[:, 1600:].abs().sum() == 0  # zero-padded to the window
    adapter.save(adapter.decode(x0), tmp_path / "out.wav")
    data, rate = sf.read(str(tmp_path / "out.wav"), always_2d=True)
    assert rate == 8000 and data.shape == (2000, 2)
    assert np.abs(data[:1600, 0] - left).max() < 1e-4  # 16-bit PCM
    sf.write(str(tmp_path / "mono.wav"), left, 16000)  # another rate: resampled
    mono = adapter.load(tmp_path / "mono.wav")
    assert mono.shape == (2, 800) and torch.equal(mono[0], mono[1])
    assert WaveformAdapter(sample_rate=8000, channels=1).load(tmp_path / "stereo.wav").shape == (1, 1600)


def test_a_windowed_model_generates_its_window_and_conditions_on_the_duration():
    windowed = WaveformAdapter(sample_rate=1000, channels=2, duration=2.0, window=True)
    assert windowed.sample_shape(duration=0.5) == (2, 2000)  # the whole window, always
    assert windowed.condition_inputs(duration=0.5) == {"seconds": [0.0, 0.5]}
    assert windowed.condition_inputs() == {"seconds": [0.0, 2.0]}
    assert windowed.fit_length(torch.ones(2, 2000), duration=0.5).shape == (2, 500)
    with pytest.raises(ValueError, match=r"duration=3 is longer than this model's 2 s window"):
        windowed.sample_shape(duration=3.0)
    plain = WaveformAdapter(sample_rate=1000, channels=1, duration=2.0)
    assert plain.sample_shape(duration=3.0) == (1, 3000) and plain.condition_inputs(duration=3.0) == {}


@pytest.mark.parametrize("kwargs,expected", [
    (dict(channels=3), r"modality.channels=3 is invalid: 1 \(mono\) or 2 \(stereo\)"),
    (dict(sample_rate=0), r"modality.sample_rate=0 is invalid"),
    (dict(crop="end"), r"modality.crop='end' is invalid"),
])
def test_bad_settings_are_refused_naming_the_key(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        WaveformAdapter(**kwargs)


def test_preview_draws_each_channels_envelope_even_when_quiet():
    adapter = WaveformAdapter(sample_rate=1000, channels=2, duration=0.128)
    t = torch.arange(128) / 1000
    img = adapter.preview(torch.stack([0.5 * torch.sin(2 * math.pi * 50 * t), torch.full((128,), 1e-3)]))
    assert img.shape == (3, 128, 128)
    assert bool((img[0, 64:].sum(0) >= 1).all())  # the near-silent channel: one pixel per column at the middle
    assert int(img[0, :64].sum(1).nonzero().numel()) > 8  # the sine spans many rows
