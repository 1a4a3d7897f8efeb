"""The embedded ``notes`` dataset: single synthesized notes from five instrument families across two
octaves (A3-A5), with ADSR envelopes and paraphrased captions, materialized deterministically as
WAVs + ``metadata.jsonl`` (like ``digits``).

Families (each a classic synthesis recipe, so the data is small but real audio):

- ``pluck``: Karplus-Strong plucked string (noise burst in a tuned, damped delay loop);
- ``flute``: nearly sinusoidal tone with weak 2nd/3rd harmonics, breath noise and vibrato;
- ``clarinet``: odd harmonics (square-like), a hollow reed tone;
- ``brass``: all harmonics (sawtooth-like) whose brightness opens during the attack;
- ``bell``: a struck, decaying bell-like tone whose upper partials die away first.

The measurements made on such notes (a YIN pitch tracker, the log-mel normalization statistics)
live in :mod:`multidiff.evaluation.audio`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multidiff.adapters.base import Adapter
from multidiff.datasets.folder import CaptionFolder, DatasetError
from multidiff.datasets.materialize import materialize

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

FAMILIES = ("pluck", "flute", "clarinet", "brass", "bell")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "pluck": (
        "a plucked string playing {n}",
        "{n} on a guitar-like string",
        "a plucked {n}",
        "a string plucked at {n}",
        "the note {n}, plucked on a string",
        "a guitar-like pluck playing {n}",
    ),
    "flute": (
        "a flute-like tone playing {n}",
        "{n} on a flute",
        "a soft breathy flute at {n}",
        "a pure sine-like tone playing {n}",
        "the note {n} on a flute",
        "a flute playing {n}",
    ),
    "clarinet": (
        "a clarinet-like reed playing {n}",
        "{n} on a clarinet",
        "a hollow square-wave tone at {n}",
        "a woody reed tone playing {n}",
        "the note {n} on a clarinet",
        "a clarinet playing {n}",
    ),
    "brass": (
        "a brassy horn playing {n}",
        "{n} on a trumpet-like horn",
        "a bright sawtooth brass tone at {n}",
        "a brass note playing {n}",
        "the note {n} on a trumpet",
        "a trumpet playing {n}",
    ),
    "bell": (
        "a bell ringing {n}",
        "{n} on a bell",
        "a decaying chime at {n}",
        "a bell-like tone playing {n}",
        "the note {n} struck on a bell",
        "a chime playing {n}",
    ),
}

_VERSION = 1


# -- pitch names ---------------------------------------------------------------------------------


def note_name(midi: int) -> str:
    """MIDI number -> scientific pitch name with sharps (69 -> ``"A4"``, 61 -> ``"C#4"``)."""
    return f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def note_midi(name: str) -> int:
    """Scientific pitch name -> MIDI number (``"A4"`` -> 69); sharps only, as the captions use."""
    head = name[:2] if len(name) > 2 and name[1] == "#" else name[:1]
    if head.upper() not in NOTE_NAMES:
        raise ValueError(f"not a note name: {name!r} (use e.g. A4, C#5)")
    return NOTE_NAMES.index(head.upper()) + 12 * (int(name[len(head) :]) + 1)


def note_frequency(midi: int | float) -> float:
    """Equal temperament, A4 = 440 Hz."""
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def note_caption(family: str, midi: int, template: int = 0) -> str:
    """Caption ``template`` (index into ``TEMPLATES[family]``) for a note."""
    options = TEMPLATES[family]
    return options[template % len(options)].format(n=note_name(midi))


# -- synthesis -----------------------------------------------------------------------------------


def adsr(n: int, sample_rate: int, *, attack: float, decay: float, sustain: float, release: float,
         note_off: float) -> np.ndarray:
    """Piecewise-linear attack/decay, held sustain, exponential-looking release; shape ``(n,)``."""
    t = np.arange(n) / sample_rate
    env = np.interp(t, [0.0, attack, attack + decay], [0.0, 1.0, sustain], right=sustain)
    after = np.clip((t - note_off) / max(release, 1e-3), 0.0, None)
    return env * np.where(t < note_off, 1.0, np.exp(-5.0 * after) * np.clip(1.0 - after / 1.5, 0.0, 1.0))


def _harmonic_stack(phase: np.ndarray, amps: np.ndarray, f0: float, sample_rate: int) -> np.ndarray:
    """``sum_k amps[k-1, t] * sin(k * phase)`` for harmonics below 0.95 Nyquist (no aliasing).

    ``amps``: ``(K,)`` or ``(K, n)``.
    """
    k_max = min(len(amps), int(0.95 * sample_rate / 2 / f0))
    out = np.zeros_like(phase)
    for k in range(1, k_max + 1):
        out += amps[k - 1] * np.sin(k * phase)
    return out


def _phase(f0: float, n: int, sample_rate: int, *, vibrato_cents: float = 0.0, vibrato_rate: float = 5.0,
           vibrato_delay: float = 0.25, rng: np.random.Generator | None = None) -> np.ndarray:
    t = np.arange(n) / sample_rate
    ramp = np.clip((t - vibrato_delay) / 0.2, 0.0, 1.0)  # vibrato fades in, as players do
    start = rng.uniform(0, 2 * np.pi) if rng is not None else 0.0
    freq = f0 * 2.0 ** (vibrato_cents * ramp * np.sin(2 * np.pi * vibrato_rate * t + start) / 1200)
    return 2 * np.pi * np.cumsum(freq) / sample_rate


def _one_pole_lowpass(x: np.ndarray, cutoff: float, sample_rate: int) -> np.ndarray:
    from scipy.signal import lfilter

    a = math.exp(-2 * math.pi * cutoff / sample_rate)
    return lfilter([1 - a], [1, -a], x)


def _allpass_coefficient(delay: float, omega: float) -> float:
    """First-order allpass ``(C + z^-1) / (1 + C z^-1)`` with phase delay ``delay`` samples at ``omega``.

    Solved by bisection on the exact phase delay, so a plucked string is in tune at its
    fundamental (the low-frequency approximation ``C = (1 - d) / (1 + d)`` drifts at high notes).
    """
    def phase_delay(c: float) -> float:
        z = np.exp(-1j * omega)
        return -np.angle((c + z) / (1 + c * z)) / omega

    lo, hi = -0.999, 0.999  # phase delay falls as C grows
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if phase_delay(mid) > delay else (lo, mid)
    return (lo + hi) / 2


def karplus_strong(f0: float, n: int, sample_rate: int, *, t60: float, brightness: float,
                   rng: np.random.Generator) -> np.ndarray:
    """A plucked string: a noise burst one period long circulating in a damped delay loop.

    Loop: delay ``N`` samples, the KS averaging filter ``(1 + z^-1) / 2`` (half a sample), and a
    first-order allpass for the fractional rest, so the loop delay is exactly ``sample_rate / f0``
    at the fundamental. ``t60``: seconds for the fundamental to decay by 60 dB.
    """
    from scipy.signal import lfilter

    period = sample_rate / f0
    omega = 2 * math.pi * f0 / sample_rate
    delay = int(math.floor(period - 0.6))
    frac = period - 0.5 - delay  # in [0.1, 1.1): the allpass is well behaved there
    c = _allpass_coefficient(frac, omega)
    # per-period gain so the fundamental loses 60 dB in t60 seconds (the lowpass costs cos(omega / 2))
    g = min(0.9999, 10 ** (-3 / (f0 * t60)) / math.cos(omega / 2))
    burst = rng.uniform(-1, 1, delay + 1)
    burst = _one_pole_lowpass(burst, brightness, sample_rate)  # a softer pluck has fewer high harmonics
    x = np.zeros(n)
    x[: len(burst)] = burst - burst.mean()
    a = np.zeros(delay + 3)
    a[0], a[1] = 1.0, c
    a[delay] -= 0.5 * g * c
    a[delay + 1] -= 0.5 * g * (1 + c)
    a[delay + 2] -= 0.5 * g
    return lfilter([1.0, c], a, x)


@dataclass(frozen=True)
class NoteSpec:
    family: str
    midi: int
    variant: int


def synthesize(spec: NoteSpec, *, sample_rate: int = 16000, duration: float = 1.024, seed: int = 0) -> np.ndarray:
    """One note as float32 ``(samples,)`` in ``[-1, 1]``; deterministic in ``(spec, seed)``."""
    family, midi = spec.family, spec.midi
    if family not in FAMILIES:
        raise ValueError(f"unknown instrument family {family!r}; choose one of {', '.join(FAMILIES)}")
    rng = np.random.default_rng([seed, FAMILIES.index(family), midi, spec.variant])
    n = int(round(duration * sample_rate))
    f0 = note_frequency(midi)
    note_off = rng.uniform(0.68, 0.82) * duration
    if family == "pluck":
        t60 = rng.uniform(0.9, 1.6) * (220 / f0) ** 0.3
        wave = karplus_strong(f0, n, sample_rate, t60=t60, brightness=rng.uniform(2500, 6000), rng=rng)
        wave *= adsr(n, sample_rate, attack=0.002, decay=0.0, sustain=1.0, release=0.08, note_off=note_off)
    elif family == "flute":
        amps = np.array([1.0, rng.uniform(0.1, 0.3), rng.uniform(0.03, 0.12), 0.02, 0.01, 0, 0, 0])
        phase = _phase(f0, n, sample_rate, vibrato_cents=rng.uniform(0, 12), vibrato_rate=rng.uniform(4.5, 5.5), rng=rng)
        tone = _harmonic_stack(phase, amps, f0, sample_rate)
        breath = _one_pole_lowpass(rng.standard_normal(n), 3000, sample_rate) * rng.uniform(0.02, 0.05)
        env = adsr(n, sample_rate, attack=rng.uniform(0.06, 0.12), decay=0.1, sustain=rng.uniform(0.8, 0.9),
                   release=rng.uniform(0.1, 0.2), note_off=note_off)
        wave = (tone + breath) * env
    elif family == "clarinet":
        k = np.arange(1, 41)
        cutoff = rng.uniform(2500, 4500)
        amps = np.where(k % 2 == 1, 1.0 / k, 0.03 / k) * np.exp(-k * f0 / cutoff)
        phase = _phase(f0, n, sample_rate, vibrato_cents=rng.uniform(0, 4), rng=rng)
        env = adsr(n, sample_rate, attack=rng.uniform(0.02, 0.05), decay=0.05, sustain=rng.uniform(0.85, 0.95),
                   release=rng.uniform(0.08, 0.15), note_off=note_off)
        wave = _harmonic_stack(phase, amps, f0, sample_rate) * env
    elif family == "brass":
        k = np.arange(1, 41)[:, None]
        t = np.arange(n)[None] / sample_rate
        attack = rng.uniform(0.04, 0.08)
        # the mouthpiece "opens": the spectral cutoff rises through the attack, then settles
        cutoff = 500 + (rng.uniform(3000, 5000) - 500) * np.clip(t / attack, 0, 1) * (1 - 0.15 * np.clip(t - attack, 0, 1))
        amps = (1.0 / k) * np.exp(-k * f0 / cutoff)
        phase = _phase(f0, n, sample_rate, vibrato_cents=rng.uniform(0, 8), rng=rng)
        env = adsr(n, sample_rate, attack=attack, decay=0.1, sustain=rng.uniform(0.75, 0.9),
                   release=rng.uniform(0.06, 0.12), note_off=note_off)
        wave = _harmonic_stack(phase, amps, f0, sample_rate) * env
    else:  # bell
        ratios = np.array([1, 2, 3, 4, 6, 8])
        amps = np.array([1.0, 0.7, 0.45, 0.4, 0.25, 0.15]) * rng.uniform(0.8, 1.2, len(ratios))
        t = np.arange(n) / sample_rate
        tau = rng.uniform(0.5, 0.9) / ratios**0.7  # upper partials die first
        wave = np.zeros(n)
        for r, a, d in zip(ratios, amps, tau):
            if r * f0 < 0.95 * sample_rate / 2:
                wave += a * np.exp(-t / d) * np.sin(2 * np.pi * r * f0 * t + rng.uniform(0, 2 * np.pi))
        strike = _one_pole_lowpass(rng.standard_normal(n), 4000, sample_rate) * np.exp(-t / 0.004) * 0.3
        wave = (wave + strike) * adsr(n, sample_rate, attack=0.002, decay=0.0, sustain=1.0, release=0.15,
                                      note_off=note_off)
    peak = np.abs(wave).max()
    velocity = rng.uniform(0.35, 0.8)
    return (wave * (velocity / max(peak, 1e-9))).astype(np.float32)


def note_specs(*, low: str = "A3", high: str = "A5", variants: int = 8) -> list[NoteSpec]:
    """Every (family, chromatic pitch from ``low`` to ``high``, variant), family-major."""
    lo, hi = note_midi(low), note_midi(high)
    if hi < lo:
        raise ValueError(f"high={high} is below low={low}")
    return [NoteSpec(f, m, v) for f in FAMILIES for m in range(lo, hi + 1) for v in range(variants)]


# -- materialization -----------------------------------------------------------------------------


def materialize_notes(root: str | Path, *, sample_rate: int = 16000, duration: float = 1.024, low: str = "A3",
                      high: str = "A5", variants: int = 8, seed: int = 0) -> Path:
    """Write the notes (WAVs + ``metadata.jsonl``) under ``root`` once; return their folder.

    Deterministic: the same audio and captions on every machine. One folder per setting
    (:func:`~multidiff.datasets.materialize.materialize`).
    """
    def write(folder: Path) -> None:
        import soundfile as sf

        specs = note_specs(low=low, high=high, variants=variants)
        offsets = np.random.default_rng(seed).integers(0, 6, len(specs))  # which paraphrase each variant starts from
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
            for i, spec in enumerate(specs):
                name = f"{i:04d}.wav"
                sf.write(str(folder / name), synthesize(spec, sample_rate=sample_rate, duration=duration, seed=seed),
                         sample_rate, subtype="PCM_16")
                row = {"file_name": name, "text": note_caption(spec.family, spec.midi, spec.variant + int(offsets[i])),
                       "family": spec.family, "midi": spec.midi, "note": note_name(spec.midi),
                       "frequency": round(note_frequency(spec.midi), 3)}
                f.write(json.dumps(row) + "\n")

    settings = {"version": _VERSION, "sample_rate": sample_rate, "duration": duration, "low": low, "high": high,
                "variants": variants, "seed": seed}
    return materialize(root, "notes", settings, write)


def notes_dataset(root: str | Path = "data", *, adapter: Adapter, duration: float = 1.024, low: str = "A3",
                  high: str = "A5", variants: int = 8, seed: int = 0, **kwargs) -> CaptionFolder:
    """The embedded notes as a :class:`CaptionFolder`, materialized under ``root`` on first use.

    The notes are synthesized at the adapter's ``sample_rate``; ``duration`` is their length in
    seconds (the adapter crops or pads to its own training length). Other keyword arguments go to
    :class:`CaptionFolder` (``cache``, ``on_error``).
    """
    sample_rate = getattr(adapter, "sample_rate", None)
    whole = isinstance(sample_rate, int | float) and not isinstance(sample_rate, bool) and sample_rate > 0 \
        and float(sample_rate).is_integer()
    if not whole:
        raise DatasetError(
            f"the notes dataset is audio: it needs an adapter with a whole positive sample_rate (Hz), but "
            f"{type(adapter).__name__} has sample_rate={sample_rate!r}; use modality=audio with data=notes"
        )
    folder = materialize_notes(root, sample_rate=int(sample_rate), duration=duration, low=low, high=high,
                               variants=variants, seed=seed)
    return CaptionFolder(folder, adapter, **kwargs)
