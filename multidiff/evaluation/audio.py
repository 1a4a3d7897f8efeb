"""Audio measurements: a YIN pitch tracker on the waveform (independent of the mel analysis and the
vocoder, so it can judge both) and the log-mel normalization statistics a modality config holds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from multidiff.adapters.audio import AudioAdapter, fit_samples
from multidiff.datasets.notes import materialize_notes


def cents(frequency: float, reference: float) -> float:
    """Signed distance in cents (a semitone is 100)."""
    return 1200.0 * math.log2(frequency / reference)


def estimate_f0(wave, sample_rate: int, *, fmin: float = 60.0, fmax: float = 2000.0, frame: int = 1024,
                hop: int = 256, threshold: float = 0.15, level_db: float = -25.0) -> float:
    """Fundamental frequency (Hz) of a mostly monophonic waveform by YIN (de Cheveigné & Kawahara 2002).

    Per frame: the difference function, its cumulative-mean normalization (eq. 8), the first dip
    below ``threshold`` (absolute threshold, step 4) refined by parabolic interpolation (step 5).
    Returns the median over frames within ``level_db`` of the loudest; ``nan`` if none is voiced.

    Args:
        wave: ``(samples,)`` array or tensor (any leading singleton dims).
    """
    x = np.asarray(wave.detach().cpu() if hasattr(wave, "detach") else wave, dtype=np.float64).reshape(-1)
    tau_min, tau_max = max(2, int(sample_rate / fmax)), int(math.ceil(sample_rate / fmin))
    span = frame + tau_max + 1
    if len(x) < span:
        x = np.pad(x, (0, span - len(x)))
    starts = np.arange(0, len(x) - span + 1, hop)
    segs = np.stack([x[s : s + span] for s in starts])  # (F, span)
    energy = (segs[:, :frame] ** 2).sum(1)
    keep = energy >= energy.max() * 10 ** (level_db / 10) if energy.max() > 0 else np.zeros(len(starts), bool)
    size = 1 << int(math.ceil(math.log2(span + frame)))
    head = np.fft.rfft(segs[:, :frame], size)
    corr = np.fft.irfft(np.conj(head) * np.fft.rfft(segs, size), size)[:, : tau_max + 1]
    csum = np.concatenate([np.zeros((len(segs), 1)), np.cumsum(segs**2, 1)], 1)
    taus = np.arange(tau_max + 1)
    shifted = csum[:, taus + frame] - csum[:, taus]  # energy of the window shifted by tau
    d = energy[:, None] + shifted - 2 * corr
    d[:, 0] = 0
    cmndf = np.ones_like(d)
    cmndf[:, 1:] = d[:, 1:] * taus[1:] / np.maximum(np.cumsum(d[:, 1:], 1), 1e-12)
    f0s = []
    for row, raw, voiced in zip(cmndf, d, keep):
        if not voiced:
            continue
        below = np.nonzero(row[tau_min:] < threshold)[0]
        if len(below) == 0:
            continue
        tau = tau_min + below[0]
        while tau + 1 <= tau_max and row[tau + 1] < row[tau]:
            tau += 1
        if 0 < tau < tau_max:  # parabolic interpolation of the raw difference (the normalized one is biased)
            a, b, c = raw[tau - 1], raw[tau], raw[tau + 1]
            denom = a - 2 * b + c
            tau = tau + (0.5 * (a - c) / denom if denom > 0 else 0.0)
        f0s.append(sample_rate / tau)
    return float(np.median(f0s)) if f0s else float("nan")


def log_mel_statistics(adapter: AudioAdapter, root: str | Path = "data", **notes_options) -> tuple[float, float]:
    """Mean and standard deviation of ``ln(mel)`` over the notes at ``adapter``'s analysis settings:
    the ``mean``/``std`` a modality config should hold. ``conf/modality/audio.yaml`` holds
    ``log_mel_statistics(AudioAdapter())`` (the adapter's defaults are that file's settings).
    """
    folder = materialize_notes(root, sample_rate=adapter.sample_rate, **notes_options)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    total = total_sq = count = 0.0
    for row in rows:
        wave = fit_samples(adapter.load(folder / row["file_name"]), adapter.num_samples(), crop=adapter.crop)
        x = adapter.log_mel(wave).double()
        total, total_sq, count = total + float(x.sum()), total_sq + float((x**2).sum()), count + x.numel()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean**2, 0.0))
