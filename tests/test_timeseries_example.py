"""The fourth modality built outside the package (examples/timeseries): adapter, data, plugin path,
the real CLI end to end, and (slow) the quality of a fully trained model."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, multidiff_cli
from PIL import Image

EXAMPLE = ROOT / "examples" / "timeseries"
PLUGIN = [f"hydra.searchpath=[file://{EXAMPLE}]"]
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLE), os.environ.get("PYTHONPATH")]))}
# The tiny settings of the CLI runs: a few steps of a narrow UNet on a small materialized set
TINY = [
    "data.dataset.per_class=1", "data.batch_size=8", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
    "backbone.channels=[16,32]", "backbone.layers_per_level=1",
    "callbacks.samples.every_n_steps=2", "callbacks.samples.steps=2", "callbacks.samples.num_per_prompt=1",
    "callbacks.checkpoint.every_n_steps=0", "+trainer.enable_progress_bar=false",
]

if str(EXAMPLE) not in sys.path:  # the in-process tests import the example as its users would
    sys.path.insert(0, str(EXAMPLE))

from mdts.adapter import TimeSeriesAdapter, TimeSeriesReadError  # noqa: E402
from mdts.data import ENVELOPES, FREQUENCIES, caption, materialize_sines, parse_caption, synthesize  # noqa: E402
from mdts.evaluate import dominant_frequency, envelope_of, evaluate, score  # noqa: E402

# --- the adapter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_adapter_save_load_round_trip_writes_a_plot(tmp_path, suffix):
    adapter = TimeSeriesAdapter(channels=3, length=50, sample_rate=25.0, scale=2.0)
    raw = torch.randn(3, 50)
    path = tmp_path / f"s{suffix}"
    adapter.save(raw, path)
    torch.testing.assert_close(adapter.load(path), raw, atol=1e-5, rtol=1e-5)
    with Image.open(path.with_suffix(".png")) as im:
        assert im.mode == "RGB" and im.size == (256, 3 * 48)
        pixels = np.asarray(im)
    assert (pixels != 255).any(axis=2).mean() > 0.02  # lines were drawn, not a blank canvas
    torch.testing.assert_close(adapter.decode(adapter.encode(raw)), raw)
    assert adapter.encode(raw).abs().max() <= raw.abs().max() / 2 + 1e-6  # divided by scale


def test_adapter_encode_fits_the_length_and_refuses_wrong_channels():
    adapter = TimeSeriesAdapter(channels=2, length=16)
    assert adapter.encode(torch.ones(2, 40)).shape == (2, 16)
    padded = adapter.encode(torch.ones(2, 10))
    assert padded.shape == (2, 16) and padded[:, 10:].abs().sum() == 0
    with pytest.raises(TimeSeriesReadError, match=r"expected a \(2, length\) series, got shape \(3, 16\)"):
        adapter.encode(torch.ones(3, 16))
    with pytest.raises(ValueError, match="sample_rate > 0"):
        TimeSeriesAdapter(sample_rate=0)


def test_adapter_preview_shape_and_generation_length():
    adapter = TimeSeriesAdapter(channels=2, length=128, sample_rate=64.0)
    preview = adapter.preview(torch.sin(torch.linspace(0, 20, 128)).expand(2, -1))
    assert preview.shape == (3, 96, 256) and 0 <= preview.min() and preview.max() <= 1 and preview.min() < 0.5
    assert adapter.sample_shape() == (2, 128) and adapter.sample_shape(duration=3) == (2, 192)
    assert adapter.metadata() == {"sample_rate": 64.0, "channels": 2, "length": 128}


def test_load_refuses_other_files_clearly(tmp_path):
    adapter = TimeSeriesAdapter()
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(TimeSeriesReadError, match=r"expected a \(channels, length\) array, got shape \(2, 3, 4\)"):
        adapter.load(tmp_path / "cube.npy")
    with pytest.raises(TimeSeriesReadError, match="unsupported suffix '.wav'"):
        adapter.load(tmp_path / "x.wav")


# --- the data and the evaluation --------------------------------------------------------------------


def test_materialized_set_is_deterministic_and_captioned(tmp_path):
    a = materialize_sines(tmp_path / "a", channels=2, length=128, per_class=2, seed=0)
    b = materialize_sines(tmp_path / "b", channels=2, length=128, per_class=2, seed=0)
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == len(FREQUENCIES) * 2 * len(ENVELOPES) * 2
    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    for name in (rows[0]["file_name"], rows[-1]["file_name"]):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert materialize_sines(tmp_path / "a", channels=2, length=128, per_class=2, seed=0) == a  # reused
    assert {parse_caption(r["text"]) for r in rows} == {
        (float(f), c, e) for f in FREQUENCIES for c in (1, 2) for e in ENVELOPES
    }


def test_evaluation_is_right_on_the_training_data_and_wrong_on_wrong_prompts():
    """The checks the quality test relies on: all pass on true data, fail on mislabelled data."""
    rng = np.random.default_rng(0)
    right = wrong = 0
    cases = [(f, c, e) for f in FREQUENCIES for c in (1, 2) for e in ENVELOPES]
    for f, c, e in cases:
        x = torch.from_numpy(synthesize(f, c, e, channels=2, length=128, sample_rate=64.0, rng=rng))
        right += all(score(x, caption(f, c, e), 64.0).values())
        wrong += score(x, caption(f % 8 + 1, c, e), 64.0)["frequency"]
    assert right == len(cases) and wrong == 0
    assert dominant_frequency(torch.sin(2 * torch.pi * 5 * torch.arange(128) / 64), 64.0) == 5.0
    assert envelope_of(torch.linspace(0, 1, 100) * torch.sin(torch.arange(100.0))) == "rising"


def test_evaluate_reads_a_generate_folder(tmp_path):
    adapter = TimeSeriesAdapter()
    rng = np.random.default_rng(1)
    rows = []
    for k, (f, c, e) in enumerate([(2, 1, "rising"), (7, 2, "falling")]):
        adapter.save(torch.from_numpy(synthesize(f, c, e, channels=2, length=128, sample_rate=64.0, rng=rng)),
                     tmp_path / f"{k:04d}.npy")
        rows.append({"file": f"{k:04d}.npy", "prompt": caption(f if k == 0 else 3, c, e), "sample_rate": 64.0})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate(tmp_path)
    assert result == {"frequency_accuracy": 0.5, "channel_accuracy": 1.0, "envelope_accuracy": 1.0, "samples": 2}


# --- the plugin path --------------------------------------------------------------------------------


def test_recipe_and_groups_are_found_through_the_search_path_only():
    from multidiff.cli.compose import ConfigError, available, compose

    with pytest.raises(ConfigError, match="unknown recipe 'timeseries_sines'"):
        compose("train", ["recipe=timeseries_sines"])
    cfg = compose("train", ["recipe=timeseries_sines", *PLUGIN])
    assert cfg.modality._target_ == "mdts.adapter.TimeSeriesAdapter"
    assert cfg.data.dataset._target_ == "mdts.data.sines_dataset"
    assert cfg.backbone._target_ == "multidiff.backbones.convunet.ConvUNet" and "dims" not in cfg.backbone
    assert list(cfg.trusted_targets) == ["mdts."]
    assert "timeseries_sines" in available("recipes", [EXAMPLE])
    assert "timeseries" in available("modality", [EXAMPLE]) and "timeseries" not in available("modality")
    # groups resolve one by one too, outside the recipe
    cfg = compose("train", ["modality=timeseries", "data=timeseries", "backbone=convunet1d", *PLUGIN])
    assert cfg.modality.channels == 2 and "in_channels" not in cfg.backbone  # the shape comes from the adapter


def test_recipe_builds_with_its_trust_and_is_refused_without(tmp_path):
    from multidiff.cli.compose import compose
    from multidiff.cli.train import build
    from multidiff.configuration import UnsafeConfigError
    from multidiff.pipeline import build_parts

    overrides = ["recipe=timeseries_sines", *PLUGIN, f"data_root={tmp_path}", "data.dataset.per_class=1"]
    refused = r"mdts\.adapter\.TimeSeriesAdapter. is outside.*trusted_targets=\[mdts\.\] on the command line"
    with pytest.raises(UnsafeConfigError, match=refused):
        build_parts(compose("train", [*overrides, "trusted_targets=[]"]))
    parts, module, datamodule, trainer = build(compose("train", overrides), tmp_path / "run")
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["x"].shape == (32, 2, 128) and len(set(batch["text"])) > 10  # 48 series, one per class
    assert trainer.max_steps == 700


# --- end to end through the real CLI ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ts_run(tmp_path_factory):
    """The example recipe trained for 3 steps through ``multidiff train`` with the plugin path."""
    base = tmp_path_factory.mktemp("ts")
    run_dir = base / "run"
    multidiff_cli("train", "recipe=timeseries_sines", *PLUGIN, f"run_dir={run_dir}", f"data_root={base / 'data'}",
                  *TINY, env=ENV)
    return run_dir


def test_train_through_the_cli_writes_an_export_and_plot_previews(tiny_ts_run):
    assert (tiny_ts_run / "model" / "multidiff.json").is_file()
    assert (tiny_ts_run / "model" / "backbone" / "model.safetensors").is_file()
    assert (tiny_ts_run / "checkpoints" / "last.ckpt").is_file()
    grids = sorted(p.name for p in (tiny_ts_run / "samples").glob("step_*.png"))
    assert grids == ["step_000002.png", "step_000003.png"]
    with Image.open(tiny_ts_run / "samples" / grids[-1]) as im:
        assert im.width > 256 and im.height >= 96  # four plots of 2 panels each, tiled


def test_generate_needs_trust_on_the_command_line(tiny_ts_run, tmp_path):
    """The model file lists trusted_targets: [mdts.] (copied from the recipe); it is never honoured."""
    config = (tiny_ts_run / "model" / "config.yaml").read_text()
    assert "mdts." in config
    proc = multidiff_cli("generate", f"model={tiny_ts_run / 'model'}", "prompt=a 3 Hz sine on channel 1 with rising amplitude",
                         "steps=2", f"out={tmp_path / 'out'}", env=ENV, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "mdts.adapter.TimeSeriesAdapter' is outside the allowed namespaces" in proc.stderr
    assert "trusted_targets=[mdts.] on the command line" in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("fmt", "option", "length"), [(None, None, 128), ("csv", "duration=3", 192), (None, "length=80", 80)])
def test_generate_writes_series_plots_and_metadata(tiny_ts_run, tmp_path, fmt, option, length):
    """``length=`` is the example's own generation option: the CLI passes it through without knowing it."""
    out = tmp_path / "out"
    extra = ([f"format={fmt}"] if fmt else []) + ([option] if option else [])
    multidiff_cli("generate", f"model={tiny_ts_run / 'model'}", "trusted_targets=[mdts.]",
                  "prompt=a 3 Hz sine on channel 1 with rising amplitude", "num_samples=2", "steps=3", "seed=4",
                  f"out={out}", *extra, env=ENV)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    suffix = f".{fmt or 'npy'}"
    assert [r["file"] for r in rows] == [f"0000{suffix}", f"0001{suffix}"] and [r["seed"] for r in rows] == [4, 5]
    assert all(r["sample_rate"] == 64.0 and r["channels"] == 2 and r["length"] == length for r in rows)
    adapter = TimeSeriesAdapter()
    for r in rows:
        series = adapter.load(out / r["file"])
        assert series.shape == (2, length) and torch.isfinite(series).all()
        assert (out / r["file"]).with_suffix(".png").is_file()


def test_generate_help_lists_the_models_own_options_and_unknown_ones_are_refused(tiny_ts_run, tmp_path):
    model = f"model={tiny_ts_run / 'model'}"
    proc = multidiff_cli("generate", model, "trusted_targets=[mdts.]", "--help", env=ENV)
    assert "generation options of" in proc.stdout and "(TimeSeriesAdapter), as name=value:" in proc.stdout
    assert "length (int, default 128): samples per generated series" in proc.stdout
    assert "duration (float, default from the model)" in proc.stdout and "format: one of npy, csv" in proc.stdout
    proc = multidiff_cli("generate", model, "trusted_targets=[mdts.]", "prompt=a 3 Hz sine", "steps=2", "lenght=80",
                         f"out={tmp_path / 'o'}", env=ENV, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
    assert "unknown generation option lenght for this model (TimeSeriesAdapter); its options: length (int" in proc.stderr
    assert "generate's own keys: model, prompt" in proc.stderr
    for bad, why in (("length=0", "length=0 is invalid: it must be a positive integer"),
                     ("length=2.5", "length=2.5 is invalid: it must be an integer"),
                     ("format=wav", "format='wav' is invalid for this model (TimeSeriesAdapter): choose one of npy, csv")):
        proc = multidiff_cli("generate", model, "trusted_targets=[mdts.]", "prompt=a 3 Hz sine", "steps=2", bad,
                             f"out={tmp_path / 'o'}", env=ENV, check=False)
        assert proc.returncode == 2 and why in proc.stderr, (bad, proc.stderr)


# --- quality of the example's default recipe --------------------------------------------------------


@pytest.mark.slow
def test_default_recipe_generates_the_prompted_frequency(tmp_path):
    """Train ``recipe=timeseries_sines`` as shipped, then prompt every (frequency, channel, envelope):
    the dominant FFT frequency of the prompted channel must match in >= 80% of the samples."""
    run_dir = tmp_path / "run"
    start = time.monotonic()
    multidiff_cli("train", "recipe=timeseries_sines", *PLUGIN, f"run_dir={run_dir}", f"data_root={tmp_path / 'data'}",
                  "+trainer.enable_progress_bar=false", env=ENV, timeout=1200)
    train_s = time.monotonic() - start
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(caption(f, c, e) + "\n" for f in FREQUENCIES for c in (1, 2) for e in ENVELOPES))
    out = tmp_path / "out"
    multidiff_cli("generate", f"model={run_dir / 'model'}", "trusted_targets=[mdts.]", f"prompts_file={prompts}",
                  "num_samples=2", "steps=25", "seed=100", "batch_size=48", f"out={out}", env=ENV)
    result = evaluate(out)
    print(f"\ntimeseries_sines: trained in {train_s:.0f} s; {json.dumps(result)}")
    assert result["samples"] == len(FREQUENCIES) * 2 * len(ENVELOPES) * 2
    assert result["frequency_accuracy"] >= 0.8, result
    assert result["channel_accuracy"] >= 0.8, result


def test_spectral_reconstruction_term_is_zero_for_a_perfect_copy_and_grows_with_blur():
    adapter = TimeSeriesAdapter(channels=2, length=128)
    t = torch.arange(128) / 64.0
    x = torch.stack([torch.sin(2 * torch.pi * 5 * t), torch.sin(2 * torch.pi * 11 * t)])[None].repeat(3, 1, 1)
    blurred = torch.nn.functional.avg_pool1d(x, 5, stride=1, padding=2)
    same, blur = adapter.reconstruction_terms(x, x)["spectral"], adapter.reconstruction_terms(blurred, x)["spectral"]
    assert same.shape == (3,) and same.abs().max() < 1e-5
    assert (blur > 0.1).all()  # a 5-tap blur leaves the samples close but damps 11 Hz: the spectra tell


def test_an_autoencoder_of_series_trains_with_the_adapters_spectral_loss(tmp_path):
    """A new modality's autoencoder: rank 1 from its shape, and its adapter's own loss term logged."""
    import csv

    run = tmp_path / "ae"
    multidiff_cli("train", "recipe=timeseries_sines", *PLUGIN, "task=autoencoder", "autoencoder=conv",
                  "autoencoder.channels=[8,16]", "autoencoder.norm_groups=4", f"run_dir={run}",
                  f"data_root={tmp_path / 'data'}", "data.dataset.per_class=1", "data.batch_size=8",
                  "trainer.max_steps=3", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_steps=0",
                  "reconstruction.eval_items=8", "+trainer.enable_progress_bar=false", env=ENV)
    with open(run / "logs" / "metrics.csv", newline="") as f:
        spectral = [float(r["train/spectral"]) for r in csv.DictReader(f) if r.get("train/spectral")]
    assert len(spectral) == 3 and all(v > 0 for v in spectral)
    info = json.loads((run / "model" / "multidiff.json").read_text())
    assert info["shape"] == [2, 128] and info["latent_shape"] == [4, 64]


def test_the_dit_recipe_builds_from_the_examples_own_backbone_config_and_samples_any_length(tmp_path):
    """recipe=timeseries_sines_dit: multidiff's DiT through the example's conf/backbone/dit_series.yaml
    (found through the search path only); the built model takes the training length and twice it."""
    from multidiff.cli.compose import compose
    from multidiff.cli.train import build

    cfg = compose("train", ["recipe=timeseries_sines_dit", *PLUGIN, f"data_root={tmp_path}", "data.dataset.per_class=1"])
    assert cfg.backbone._target_ == "multidiff.backbones.dit.DiT" and cfg.backbone.patch_size == 4
    parts, module, datamodule, trainer = build(cfg, tmp_path / "run")
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    x0 = batch["x"]
    loss = parts.denoiser.loss(x0, module.noise.sample(len(x0)), torch.randn_like(x0), parts.conditioner.encode(batch["text"]))
    assert loss.shape == (32,) and torch.isfinite(loss).all()
    for length in (128, 256, 90):  # 90: not a multiple of the patch, padded and cropped
        shape = parts.adapter.sample_shape(length=length)
        out = parts.denoiser(torch.randn(2, *shape), torch.full((2,), 1.0), parts.conditioner.encode(["a 3 Hz sine"] * 2))
        assert out.shape == (2, *shape) == (2, 2, length)
