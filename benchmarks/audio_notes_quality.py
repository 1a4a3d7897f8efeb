"""Quality of the audio_notes recipe: pitch accuracy and instrument-family accuracy of generated notes.

    python benchmarks/audio_notes_quality.py --train          # train the recipe (timed), then evaluate
    python benchmarks/audio_notes_quality.py --model runs/audio_notes/model

For prompts over the whole pitch range (every note A3..A5 for each of the five families), the
fundamental of each generated WAV is estimated by a YIN pitch tracker on the waveform
(:func:`multidiff.evaluation.audio.estimate_f0`; independent of the mel analysis and the vocoder)
and compared with the prompted note: a sample is in tune within 50 cents. The family is judged by
two classifiers trained only on real synthesized notes (logistic regression, same 70/30 split):
``family_acc`` on tracked-harmonic features (harmonic profile early and late in the note, loudness
envelope, noisiness) and ``family_acc_spectrum`` on band spectra (log power in 72 log-spaced bands
early and late, loudness envelope; no pitch tracking, not the model's mel analysis). The first
depends on every partial sitting within 3% of a multiple of the tracked fundamental, so it is the
stricter (and the more brittle) of the two. Reference rows give the same numbers for real
notes (held out from the classifier) and for real notes after the mel -> Griffin-Lim round trip
(the ceiling the decoder allows). Prints a table and writes benchmarks/results/audio_notes_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from multidiff.datasets.notes import (  # noqa: E402
    FAMILIES,
    NoteSpec,
    note_caption,
    note_frequency,
    note_specs,
    synthesize,
)
from multidiff.evaluation.audio import cents, estimate_f0  # noqa: E402

SR = 16000
TOLERANCE_CENTS = 50.0


def features(wave: np.ndarray, sample_rate: int = SR, harmonics: int = 10) -> np.ndarray:
    """A timbre vector of one note, from the waveform alone (its own pitch estimate, no labels).

    Harmonic amplitudes (dB re. the strongest) early (0-0.3 s) and late (0.4-0.7 s) in the note,
    the loudness envelope (dB re. its peak, 32 ms frames) and the share of energy between harmonics.
    """
    x = np.asarray(wave, np.float64).reshape(-1)[: int(1.024 * sample_rate)]
    x = np.pad(x, (0, int(1.024 * sample_rate) - len(x)))
    f0 = estimate_f0(x, sample_rate)
    n_fft, hop = 4096, 512
    win = np.hanning(n_fft)
    frames = np.stack([x[s : s + n_fft] * win for s in range(0, len(x) - n_fft + 1, hop)])
    mag = np.abs(np.fft.rfft(frames, axis=1))  # (T, n_fft / 2 + 1)
    freqs = np.fft.rfftfreq(n_fft, 1 / sample_rate)
    if not np.isfinite(f0):
        f0 = float(freqs[1:][mag.sum(0)[1:].argmax()])
    times = np.arange(len(frames)) * hop / sample_rate + n_fft / 2 / sample_rate
    amps = np.full((len(frames), harmonics), 1e-8)
    in_harmonic = np.zeros_like(freqs, bool)
    for k in range(1, harmonics + 1):
        band = np.abs(freqs - k * f0) <= 0.03 * k * f0
        if k * f0 < sample_rate / 2 and band.any():
            amps[:, k - 1] = mag[:, band].max(1) + 1e-8
            in_harmonic |= band
    def profile(t0: float, t1: float) -> np.ndarray:
        sel = (times >= t0) & (times <= t1)
        db = 20 * np.log10(amps[sel].mean(0))
        return np.clip(db - db.max(), -60, 0)
    rms = np.sqrt(np.convolve(x**2, np.ones(512) / 512, mode="same")[::512] + 1e-12)
    env = np.clip(20 * np.log10(rms / rms.max()), -60, 0)
    power = (mag**2).sum(0)
    noise = float(power[~in_harmonic].sum() / max(power.sum(), 1e-12))
    return np.concatenate([profile(0.0, 0.3), profile(0.4, 0.7), env, [10 * np.log10(noise + 1e-6)]])


def spectrum_features(wave: np.ndarray, sample_rate: int = SR, bands: int = 72) -> np.ndarray:
    """A second, pitch-tracker-free timbre vector: the log power in ``bands`` log-spaced bands
    (100 Hz - 7.5 kHz, from a 4096-point STFT; not the model's mel analysis) early (0-0.4 s) and
    late (0.4-1.0 s) in the note, in dB re. the loudest band, plus the loudness envelope."""
    x = np.asarray(wave, np.float64).reshape(-1)[: int(1.024 * sample_rate)]
    x = np.pad(x, (0, int(1.024 * sample_rate) - len(x)))
    n_fft, hop = 4096, 512
    frames = np.stack([x[s : s + n_fft] * np.hanning(n_fft) for s in range(0, len(x) - n_fft + 1, hop)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1 / sample_rate)
    edges = np.geomspace(100.0, 7500.0, bands + 1)
    which = np.digitize(freqs, edges) - 1
    band_power = np.stack([power[:, which == b].sum(1) for b in range(bands)], 1) + 1e-10  # (T, bands)
    times = np.arange(len(frames)) * hop / sample_rate + n_fft / 2 / sample_rate
    def window(t0: float, t1: float) -> np.ndarray:
        db = 10 * np.log10(band_power[(times >= t0) & (times < t1)].mean(0))
        return np.clip(db - db.max(), -80, 0)
    rms = np.sqrt(np.convolve(x**2, np.ones(512) / 512, mode="same")[::512] + 1e-12)
    env = np.clip(20 * np.log10(rms / rms.max()), -60, 0)
    return np.concatenate([window(0.0, 0.4), window(0.4, 1.1), env])


class Judge:
    """Pitch tracker + a family classifier fitted on real synthesized notes only."""

    def __init__(self, *, seed: int = 0, variants: int = 8) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        specs = note_specs(variants=variants)
        self.real = {s: synthesize(s, seed=seed) for s in specs}
        x = np.stack([features(w) for w in self.real.values()])
        y = np.array([FAMILIES.index(s.family) for s in specs])
        xtr, xte, ytr, yte, _, self.test_specs = train_test_split(x, y, specs, test_size=0.3, random_state=seed,
                                                                   stratify=y)
        self.clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000)).fit(xtr, ytr)
        self.real_accuracy = float((self.clf.predict(xte) == yte).mean())
        # the second judge: the same split, band spectra instead of tracked harmonics
        train_ids = {id(s) for s in specs} - {id(s) for s in self.test_specs}
        train_specs = [s for s in specs if id(s) in train_ids]
        s_tr = np.stack([spectrum_features(self.real[s]) for s in train_specs])
        s_te = np.stack([spectrum_features(self.real[s]) for s in self.test_specs])
        y_of = lambda ss: np.array([FAMILIES.index(s.family) for s in ss])  # noqa: E731
        self.clf_spectrum = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(
            s_tr, y_of(train_specs))
        self.real_accuracy_spectrum = float((self.clf_spectrum.predict(s_te) == y_of(self.test_specs)).mean())

    def family(self, waves: list[np.ndarray]) -> np.ndarray:
        return self.clf.predict(np.stack([features(w) for w in waves]))

    def family_spectrum(self, waves: list[np.ndarray]) -> np.ndarray:
        return self.clf_spectrum.predict(np.stack([spectrum_features(w) for w in waves]))

    def score(self, waves: list[np.ndarray], specs: list[NoteSpec]) -> dict:
        errors = np.array([cents(f, note_frequency(s.midi)) if np.isfinite(f := estimate_f0(w, SR)) else np.inf
                           for w, s in zip(waves, specs)])
        families = self.family(waves)
        labels = np.array([FAMILIES.index(s.family) for s in specs])
        finite = np.abs(errors[np.isfinite(errors)])
        return {
            "samples": len(waves),
            "pitch_acc": float((np.abs(errors) <= TOLERANCE_CENTS).mean()),
            "median_cents": float(np.median(finite)) if len(finite) else float("nan"),
            "octave_errors": float((np.abs(np.abs(errors) - 1200) <= TOLERANCE_CENTS).mean()),
            "unvoiced": float((~np.isfinite(errors)).mean()),
            "family_acc": float((families == labels).mean()),
            "family_acc_spectrum": float((self.family_spectrum(waves) == labels).mean()),
        }


def rows_by_family(judge: Judge, waves: list[np.ndarray], specs: list[NoteSpec], source: str) -> list[dict]:
    rows = [{"source": source, "family": "all", **judge.score(waves, specs)}]
    for fam in FAMILIES:
        idx = [i for i, s in enumerate(specs) if s.family == fam]
        rows.append({"source": source, "family": fam, **judge.score([waves[i] for i in idx], [specs[i] for i in idx])})
    return rows


def round_trip(pipe, waves: list[np.ndarray]) -> list[np.ndarray]:
    """Real notes through the model's own adapter: waveform -> log-mel -> vocoder -> waveform."""
    adapter = pipe.adapter
    return [adapter.decode(adapter.encode(torch.from_numpy(w)[None]))[0].numpy() for w in waves]


def generate(pipe, specs: list[NoteSpec], *, template: int, steps: int, guidance: float, seed: int,
             sampler: str) -> list[np.ndarray]:
    prompts = [note_caption(s.family, s.midi, template) for s in specs]
    out = pipe.generate(prompts, num_samples=1, seed=seed, steps=steps, guidance_scale=guidance, batch_size=50,
                        sampler=sampler, duration=1.0, progress=False)
    return [x[0].numpy() for x in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/audio_notes/model")
    ap.add_argument("--train", action="store_true", help="train --recipe into the model's run dir first")
    ap.add_argument("--recipe", default="audio_notes", help="the recipe --train trains (e.g. audio_notes_dit)")
    ap.add_argument("--train-args", default="", help="extra overrides for the training run (space separated)")
    ap.add_argument("--per-prompt", type=int, default=2, help="samples per (family, note) prompt")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--templates", default="0,1", help="caption templates to prompt with (0: 'a plucked string "
                    "playing A4', 1: 'A4 on a guitar-like string', ...)")
    ap.add_argument("--skip-reference", action="store_true", help="leave out the real and round-trip rows")
    ap.add_argument("--name", default="audio_notes_quality", help="results file name under benchmarks/results")
    args = ap.parse_args()

    extra: dict = {}
    model = Path(args.model)
    if args.train:
        run_dir = model.parent
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "multidiff.cli.main", "train", f"recipe={args.recipe}", f"run_dir={run_dir}",
                        "+trainer.enable_progress_bar=false", *args.train_args.split()], check=True)
        seconds = time.time() - t0
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        steps = int(cfg["trainer"]["max_steps"])
        extra.update({"train_minutes": round(seconds / 60, 2), "train_steps": steps,
                      "batch_size": cfg["data"]["batch_size"], "steps_per_second_incl_setup": round(steps / seconds, 3)})
        print(f"trained {steps} steps in {seconds / 60:.1f} min", flush=True)

    import multidiff

    torch.manual_seed(0)
    pipe = multidiff.load(model, device="cpu")
    t0 = time.time()
    judge = Judge()
    print(f"judge: family classifier held-out accuracy on real notes {judge.real_accuracy:.3f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    extra.update({"model": str(model), "guidance_scale": args.guidance, "sampler": args.sampler, "steps": args.steps,
                  "tolerance_cents": TOLERANCE_CENTS, "real_heldout_family_accuracy": judge.real_accuracy,
                  "real_heldout_family_accuracy_spectrum": judge.real_accuracy_spectrum})

    rows = []
    if not args.skip_reference:
        held_out = list(judge.test_specs)
        real = [judge.real[s] for s in held_out]
        rows += rows_by_family(judge, real, held_out, "real (held out)")
        rows += rows_by_family(judge, round_trip(pipe, real), held_out, "real -> mel -> vocoder")

    grid = [NoteSpec(f, m, 0) for f in FAMILIES for m in range(57, 82)] * args.per_prompt
    for template in (int(t) for t in args.templates.split(",")):
        label = "generated" if template == 0 else f"generated (caption template {template})"
        t0 = time.time()
        waves = generate(pipe, grid, template=template, steps=args.steps, guidance=args.guidance, seed=args.seed,
                         sampler=args.sampler)
        seconds = time.time() - t0
        got = rows_by_family(judge, waves, grid, label)
        for r in got:
            r["seconds"] = round(seconds, 1)
        rows += got
        print(f"{label}: pitch within {TOLERANCE_CENTS:.0f} cents {got[0]['pitch_acc']:.3f}, family "
              f"{got[0]['family_acc']:.3f} (harmonic features) / {got[0]['family_acc_spectrum']:.3f} (band spectra) "
              f"({seconds:.0f} s)", flush=True)
    examples = [note_caption(f, 69, t) for f in FAMILIES[:2] for t in (0, 1)]
    extra["prompt_examples"] = "; ".join(examples)
    cols = ["source", "family", "samples", "pitch_acc", "median_cents", "octave_errors", "unvoiced", "family_acc",
            "family_acc_spectrum",
            "seconds"]
    path = write_results(args.name, rows, cols, extra)
    print()
    print(path.read_text())


if __name__ == "__main__":
    main()
