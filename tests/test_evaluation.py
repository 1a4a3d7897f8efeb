"""multidiff.evaluation: the measurements benchmarks and config comments rely on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from multidiff.cli.compose import compose
from multidiff.configuration import safe_instantiate
from multidiff.evaluation.audio import cents, estimate_f0, log_mel_statistics


def test_cents():
    assert cents(880.0, 440.0) == pytest.approx(1200.0) and cents(440.0, 440.0) == 0.0
    assert cents(440.0 * 2 ** (1 / 12), 440.0) == pytest.approx(100.0)


def test_pitch_tracker_finds_the_fundamental_of_a_harmonic_tone():
    sr = 16000
    t = np.arange(sr) / sr
    wave = sum(np.sin(2 * np.pi * k * 330.0 * t) / k for k in range(1, 6))
    assert abs(cents(estimate_f0(wave, sr), 330.0)) < 5
    assert math.isnan(estimate_f0(np.zeros(4000), sr))


def test_the_audio_config_holds_the_log_mel_statistics_of_the_notes(data_root):
    """conf/modality/audio.yaml's mean/std are log_mel_statistics of the embedded notes at its settings."""
    cfg = compose("train", ["modality=audio"])
    mean, std = log_mel_statistics(safe_instantiate(cfg.modality), data_root)
    assert (round(mean, 2), round(std, 2)) == (cfg.modality.mean, cfg.modality.std)
