"""Audio end to end through the real CLI: a tiny audio_notes run, previews as WAVs and spectrograms,
then ``multidiff generate ... duration=SECONDS`` writing WAVs + metadata.jsonl."""

from __future__ import annotations

import json
import math

import pytest
import soundfile as sf
import torch
from helpers import multidiff_cli

import multidiff
from multidiff.pipeline import GenerationError

SR = 16000


def test_train_writes_audio_previews_and_export(audio_run):
    assert (audio_run / "model" / "multidiff.json").is_file()
    samples = audio_run / "samples"
    assert (samples / "step_000002.png").is_file() and (samples / "step_000003.png").is_file()  # spectrograms
    wavs = sorted(p.name for p in samples.glob("step_000003_*.wav"))
    assert wavs == [f"step_000003_{k:02d}.wav" for k in range(4)]  # 4 preview prompts x 1
    info = sf.info(str(samples / wavs[0]))
    assert (info.samplerate, info.frames, info.subtype) == (SR, 16384, "PCM_16")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(audio_run / "logs"), size_guidance={"audio": 0, "images": 0}).Reload()
    assert len(events.Tags()["audio"]) == 4 and "samples" in events.Tags()["images"]


@pytest.mark.parametrize("duration", ["1.0", "0.77"])
def test_generate_writes_wavs_of_the_requested_duration(audio_run, tmp_path, duration):
    out = tmp_path / "out"
    multidiff_cli("generate", f"model={audio_run / 'model'}", "prompt=a plucked string playing A4",
                  f"duration={duration}", "num_samples=2", "seed=3", "steps=2", f"out={out}")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["0000.wav", "0001.wav"]
    samples = round(float(duration) * SR)
    for r in rows:
        assert r["prompt"] == "a plucked string playing A4" and r["seed"] in (3, 4)
        assert (r["sampler"], r["steps"], r["guidance_scale"]) == ("dpmpp_2m", 2, 2.0)  # the generate defaults
        assert r["sample_rate"] == SR and math.isclose(r["duration"], float(duration))
        data, sr = sf.read(str(out / r["file"]), dtype="float32")
        assert sr == SR and data.shape == (samples,) and abs(data).max() <= 1.0
        assert sf.info(str(out / r["file"])).subtype == "PCM_16"


def test_generate_without_duration_uses_training_length(audio_run, tmp_path):
    multidiff_cli("generate", f"model={audio_run / 'model'}", "prompt=a bell ringing C5", "steps=1", f"out={tmp_path}")
    row = json.loads((tmp_path / "metadata.jsonl").read_text())
    assert sf.info(str(tmp_path / "0000.wav")).frames == 16384 and math.isclose(row["duration"], 1.024)


def test_bad_duration_gets_one_paragraph_error(audio_run, tmp_path):
    proc = multidiff_cli("generate", f"model={audio_run / 'model'}", "prompt=x", "duration=-2", f"out={tmp_path}",
                         check=False)
    assert proc.returncode != 0 and "duration=-2 is invalid: it must be a positive number" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def pipe(audio_run):
    return multidiff.load(audio_run / "model", device="cpu")


@pytest.mark.parametrize("duration", [0.01, 0.3, 0.77, 1.3, 2.5])
def test_odd_durations_generate_without_error(pipe, duration):
    out = pipe.generate("a flute-like tone playing E5", num_samples=1, duration=duration, steps=2, progress=False)
    assert out.shape == (1, 1, round(duration * SR)) and torch.isfinite(out).all()


def test_audio_seeds_are_independent_of_batch_size(pipe):
    kw = dict(num_samples=3, seed=21, steps=2, duration=0.5, progress=False)
    a = pipe.generate("a brassy horn playing G4", batch_size=3, **kw)
    b = pipe.generate("a brassy horn playing G4", batch_size=1, **kw)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert not torch.allclose(a[0], a[1])


def test_generate_rejects_bad_duration_in_python(pipe):
    with pytest.raises(GenerationError, match="duration=0 is invalid: it must be a positive number"):
        pipe.generate("x", duration=0, progress=False)
