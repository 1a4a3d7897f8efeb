"""Audio adapter: file I/O in every format, resampling, mel <-> Griffin-Lim round trips that keep
pitch, durations, vocoders, logging and the pitch tracker
(the backbone's pad-and-crop: test_backbones.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from multidiff.adapters.audio import AudioAdapter, AudioReadError, fit_samples
from multidiff.adapters.vocoders import GriffinLimVocoder, ModuleVocoder, VocoderError
from multidiff.cli.compose import compose
from multidiff.configuration import UnsafeConfigError, safe_instantiate
from multidiff.datasets.folder import CaptionFolder, DatasetError
from multidiff.datasets.notes import FAMILIES, NoteSpec, synthesize
from multidiff.evaluation.audio import cents, estimate_f0

SR = 16000

# Round-trip bounds, measured with the default conf/modality/audio.yaml (HTK, 64 mels, 64 Griffin-Lim
# + 100 NNLS iterations): worst pitch error of these tones ~10 cents, mean log-mel error ~0.3 nats.
PITCH_BOUND_CENTS = 20.0
MEL_ERROR_BOUND_NATS = 0.6  # mean |ln mel_in - ln mel_out| over bins within 60 dB of the peak (~5 dB)


@pytest.fixture(scope="module")
def adapter() -> AudioAdapter:
    cfg = compose("train", ["modality=audio"])
    return safe_instantiate(cfg.modality)


def tone(f0: float, *, seconds: float = 1.0, sr: int = SR, harmonics: int = 1, amplitude: float = 0.5) -> np.ndarray:
    """A steady tone: a sine (``harmonics=1``) or a band-limited sawtooth-like stack, float32."""
    t = np.arange(int(seconds * sr)) / sr
    ks = [k for k in range(1, harmonics + 1) if k * f0 < 0.45 * sr]
    wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in ks)
    return (amplitude * wave / np.abs(wave).max()).astype(np.float32)


def mel_error(adapter: AudioAdapter, a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute log-mel difference (nats) over bins within 60 dB of ``a``'s peak."""
    la, lb = adapter.log_mel(a.reshape(1, -1)), adapter.log_mel(b.reshape(1, -1))
    n = min(la.shape[-1], lb.shape[-1])
    la, lb = la[..., :n], lb[..., :n]
    active = la > la.max() - 60 / (20 / math.log(10))
    return float((la - lb).abs()[active].mean())


# -- mel <-> Griffin-Lim round trip -----------------------------------------------------------


@pytest.mark.parametrize(("f0", "harmonics"), [(220.0, 30), (440.0, 1), (440.0, 15), (622.25, 9), (880.0, 8)])
def test_griffin_lim_round_trip_keeps_pitch_and_mel(adapter, f0, harmonics):
    wave = torch.from_numpy(tone(f0, harmonics=harmonics))[None]
    x0 = adapter.encode(wave)
    spec = adapter.spec
    assert x0.shape == adapter.shape == (1, spec.n_mels, adapter.frames)
    back = adapter.decode(x0)
    assert back.shape == (1, adapter.frames * spec.hop_length)
    reference = estimate_f0(wave, SR)
    assert abs(cents(reference, f0)) < 5  # the tracker itself is right
    assert abs(cents(estimate_f0(back, SR), f0)) < PITCH_BOUND_CENTS
    assert mel_error(adapter, wave[:, : back.shape[-1]], back) < MEL_ERROR_BOUND_NATS


def test_nnls_refinement_sharpens_inverse_mel(adapter):
    """InverseMelScale's minimum-norm solution alone smears a low sine; the NNLS steps fix it."""
    wave = torch.from_numpy(tone(261.63))[None]
    x0 = adapter.encode(wave)
    plain = GriffinLimVocoder(spec=adapter.spec, nnls_iter=0)(adapter.denormalize(x0))
    refined = adapter.vocoder(adapter.denormalize(x0))
    assert mel_error(adapter, wave, refined) < mel_error(adapter, wave, plain)
    assert abs(cents(estimate_f0(refined, SR), 261.63)) < PITCH_BOUND_CENTS


def test_decode_is_deterministic(adapter):
    x0 = adapter.encode(torch.from_numpy(tone(330.0, harmonics=5))[None])
    torch.testing.assert_close(adapter.decode(x0), adapter.decode(x0))


def test_normalized_notes_have_unit_scale(adapter):
    """The mean/std in the config are the statistics of the notes' log-mels (roughly)."""
    waves = [synthesize(NoteSpec(f, m, 0)) for f in FAMILIES for m in (57, 69, 81)]
    x = torch.stack([adapter.encode(torch.from_numpy(w)[None]) for w in waves])
    assert abs(float(x.mean())) < 0.25 and 0.75 < float(x.std()) < 1.25


# -- files --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "fmt", "subtype"), [
    (".wav", "WAV", "PCM_16"), (".flac", "FLAC", "PCM_16"), (".ogg", "OGG", "VORBIS"), (".mp3", "MP3", "MPEG_LAYER_III"),
])
def test_every_format_reads_mixed_to_mono_and_resampled(adapter, tmp_path, suffix, fmt, subtype):
    sr = 44100
    left = tone(440.0, seconds=0.6, sr=sr, harmonics=4, amplitude=0.6)
    stereo = np.stack([left, np.zeros_like(left)], 1)  # mono mixdown halves it
    path = tmp_path / f"tone{suffix}"
    sf.write(str(path), stereo, sr, format=fmt, subtype=subtype)
    wave = adapter.load(path)
    assert wave.dtype == torch.float32 and wave.ndim == 2 and wave.shape[0] == 1
    # lossy codecs add priming samples (MP3 ~1100 at 44.1 kHz); the rest is exact
    expected = round(len(left) * SR / sr)
    assert expected <= wave.shape[1] <= expected + (2000 if fmt in ("MP3", "OGG") else 0)
    assert abs(cents(estimate_f0(wave, SR), 440.0)) < 5
    rms = float(wave.pow(2).mean().sqrt())
    assert 0.4 < rms / (np.sqrt((left**2).mean()) / 2) < 1.25


def test_resampling_keeps_length_and_pitch(adapter, tmp_path):
    for sr in (8000, 22050, 48000):
        path = tmp_path / f"r{sr}.wav"
        sf.write(str(path), tone(523.25, seconds=0.5, sr=sr, harmonics=3), sr)
        wave = adapter.load(path)
        assert wave.shape == (1, round(0.5 * sr * SR / sr))
        assert abs(cents(estimate_f0(wave, SR), 523.25)) < 5


def test_save_writes_16_bit_pcm_wav_and_clips(adapter, tmp_path):
    raw = torch.linspace(-2, 2, 16000)[None]  # beyond full scale on purpose
    adapter.save(raw, tmp_path / "a.wav")
    info = sf.info(str(tmp_path / "a.wav"))
    assert (info.samplerate, info.frames, info.channels, info.subtype) == (SR, 16000, 1, "PCM_16")
    back, _ = sf.read(str(tmp_path / "a.wav"), dtype="float32")
    assert back.min() >= -1 and back.max() <= 1 and back[0] == -1 and back[-1] > 0.999
    adapter.save(raw * 0.1, tmp_path / "a.flac")
    assert sf.info(str(tmp_path / "a.flac")).format == "FLAC"
    with pytest.raises(ValueError, match="cannot write .*a.xyz"):
        adapter.save(raw, tmp_path / "a.xyz")


def test_unreadable_file_names_the_file_and_the_fix(adapter, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(AudioReadError, match=r"broken\.wav.*convert it to WAV"):
        adapter.load(bad)
    with pytest.raises(AudioReadError, match="missing.flac"):
        adapter.load(tmp_path / "missing.flac")
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), SR)
    with pytest.raises(AudioReadError, match="holds no samples"):
        adapter.load(empty)


def test_caption_folder_reads_audio_with_txt_captions_and_skips_bad_files(adapter, tmp_path):
    for i, (f0, suffix) in enumerate([(220.0, ".wav"), (330.0, ".flac"), (440.0, ".ogg")]):
        sf.write(str(tmp_path / f"n{i}{suffix}"), tone(f0, seconds=0.3), SR)
        (tmp_path / f"n{i}.txt").write_text(f"a tone at {f0:g} Hz\n")
    (tmp_path / "readme.md").write_text("not audio")  # ignored: not an audio suffix
    ds = CaptionFolder(tmp_path, adapter)
    assert len(ds) == 3 and ds[1]["text"] == "a tone at 330 Hz"
    assert ds[0]["x"].shape == adapter.shape  # 0.3 s was padded to the training length
    (tmp_path / "n3.mp3").write_bytes(b"garbage")
    (tmp_path / "n3.txt").write_text("broken")
    with pytest.raises(DatasetError, match="n3.mp3"):
        CaptionFolder(tmp_path, adapter)
    assert len(CaptionFolder(tmp_path, adapter, on_error="skip")) == 3


# -- lengths ------------------------------------------------------------------------------------


def test_training_length_crops_and_pads(adapter):
    n = adapter.num_samples()
    assert n == adapter.frames * adapter.spec.hop_length and math.isclose(adapter.duration, 1.024)
    long = torch.from_numpy(tone(440.0, seconds=3.0))[None]
    short = long[:, :4000]
    assert adapter.encode(long).shape == adapter.encode(short).shape == adapter.shape
    padded = adapter.encode(short)
    tail = padded[..., math.ceil(4000 / adapter.spec.hop_length) + 2 :]
    assert tail.max() <= padded.min() + 1e-6  # zeros after the end: silence (the floor)
    assert torch.equal(fit_samples(long, 10, crop="center"), long[:, (long.shape[1] - 10) // 2 :][:, :10])


@pytest.mark.parametrize("duration", [0.01, 0.33, 0.77, 1.0, 1.3])
def test_sample_shape_and_metadata_follow_duration(adapter, duration):
    shape = adapter.sample_shape(duration=duration)
    samples = round(duration * SR)
    assert shape == (1, adapter.spec.n_mels, math.ceil(samples / adapter.spec.hop_length))
    assert adapter.metadata(duration=duration) == {"sample_rate": SR, "duration": samples / SR}
    decoded = adapter.decode(torch.zeros(shape))
    assert adapter.fit_length(decoded, duration=duration).shape == (1, samples)


def test_default_shape_is_training_shape_and_bad_durations_fail(adapter):
    assert adapter.sample_shape() == adapter.shape
    for bad in (0, -1.0, float("nan"), "long", True):
        with pytest.raises(ValueError, match="duration=.* is invalid"):
            adapter.sample_shape(duration=bad)


def test_inconsistent_settings_fail_clearly():
    with pytest.raises(ValueError, match="disagrees with"):
        AudioAdapter(n_mels=32, frames=64, size=[64, 64])
    with pytest.raises(ValueError, match="channels must be 1"):
        AudioAdapter(channels=2)
    with pytest.raises(ValueError, match="f_max"):
        AudioAdapter(sample_rate=16000, f_max=12000)


# -- vocoders -----------------------------------------------------------------------------------


def _conv_vocoder_config(adapter, weights, **extra) -> dict:
    spec = adapter.spec
    return {
        "_target_": "multidiff.adapters.vocoders.ModuleVocoder", "_partial_": True,
        "module": {"_target_": "torch.nn.ConvTranspose1d", "in_channels": spec.n_mels, "out_channels": 1,
                   "kernel_size": spec.hop_length, "stride": spec.hop_length},
        "weights": str(weights), "sample_rate": spec.sample_rate, "hop_length": spec.hop_length,
        "n_mels": spec.n_mels, **extra,
    }


def test_module_vocoder_plugs_in_through_config(adapter, tmp_path):
    """A network from "your" code (here torch's ConvTranspose1d: frames -> hop samples each) and
    weights in a local file, wired through the modality config like a HiFi-GAN would be."""
    from safetensors.torch import save_file

    spec = adapter.spec
    net = torch.nn.ConvTranspose1d(spec.n_mels, 1, spec.hop_length, stride=spec.hop_length)
    save_file(net.state_dict(), str(tmp_path / "voc.safetensors"))
    torch.save({"generator": net.state_dict()}, tmp_path / "voc.pt")
    cfg = compose("train", ["modality=audio"])
    cfg.modality.vocoder = _conv_vocoder_config(adapter, tmp_path / "voc.safetensors")
    with pytest.raises(UnsafeConfigError, match="torch.nn.ConvTranspose1d"):
        safe_instantiate(cfg.modality)  # foreign code needs the user's explicit trust
    neural = safe_instantiate(cfg.modality, trusted=["torch.nn."])
    assert isinstance(neural.vocoder, ModuleVocoder)
    x0 = adapter.encode(torch.from_numpy(tone(440.0, harmonics=3))[None])
    expected = net(adapter.denormalize(x0))[:, 0]
    torch.testing.assert_close(neural.decode(x0), expected.detach().reshape(1, -1))
    cfg.modality.vocoder = _conv_vocoder_config(adapter, tmp_path / "voc.pt", weights_key="generator")
    torch.testing.assert_close(safe_instantiate(cfg.modality, trusted=["torch.nn."]).decode(x0), neural.decode(x0))


def test_module_vocoder_errors(adapter, tmp_path):
    hop = adapter.spec.hop_length
    net = torch.nn.ConvTranspose1d(adapter.spec.n_mels, 1, hop, stride=hop)
    with pytest.raises(VocoderError, match=f"hop_length: vocoder 300 vs modality {hop}"):
        ModuleVocoder(spec=adapter.spec, module=net, sample_rate=SR, hop_length=300, n_mels=adapter.spec.n_mels)
    with pytest.raises(VocoderError, match="do not exist"):
        ModuleVocoder(spec=adapter.spec, module=net, weights=tmp_path / "nope.pt", sample_rate=SR, hop_length=hop,
                      n_mels=adapter.spec.n_mels)
    torch.save({"g": net.state_dict()}, tmp_path / "w.pt")
    with pytest.raises(VocoderError, match="no entry 'generator'"):
        ModuleVocoder(spec=adapter.spec, module=net, weights=tmp_path / "w.pt", weights_key="generator",
                      sample_rate=SR, hop_length=hop, n_mels=adapter.spec.n_mels)
    with pytest.raises(VocoderError, match="input_scale"):
        ModuleVocoder(spec=adapter.spec, module=net, sample_rate=SR, hop_length=hop, n_mels=adapter.spec.n_mels, input_scale="dB")


# -- logging ------------------------------------------------------------------------------------


def test_preview_and_log_media_to_tensorboard_and_files(adapter, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raws = [torch.from_numpy(tone(f, harmonics=4))[None] for f in (220.0, 440.0)]
    img = adapter.preview(raws[0])
    assert img.shape == (3, *adapter.shape[1:]) and 0 <= img.min() and img.max() <= 1
    assert img[0, -10:].mean() > img[0, :10].mean()  # energy at the bottom (low frequencies)
    logger = TensorBoardLogger(str(tmp_path), name="logs", version="")
    adapter.log_media(logger, raws, ["low", "high"], 7, tmp_path / "samples")
    logger.experiment.flush()
    for k in range(2):
        info = sf.info(str(tmp_path / "samples" / f"step_000007_{k:02d}.wav"))
        assert info.samplerate == SR and info.frames == raws[k].shape[1]
    assert "low" in (tmp_path / "samples" / "step_000007_prompts.tsv").read_text()
    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"audio": 0}).Reload()
    assert len(events.Tags()["audio"]) == 2


# -- pitch tracker (multidiff.evaluation.audio; the notes are tested in test_datasets.py) ----------


def test_pitch_tracker_on_silence_and_octaves():
    assert math.isnan(estimate_f0(np.zeros(8000), SR))
    for f0 in (110.0, 1000.0, 1500.0):
        assert abs(cents(estimate_f0(tone(f0, harmonics=6), SR), f0)) < 10
