"""What the terminal says about options: --help from the schemas that validate, `multidiff recipes`
checked against the benchmarks, docs/options.md regenerated, and errors before any weights load."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap

import pytest
from helpers import ROOT, multidiff_cli
from omegaconf import OmegaConf

from multidiff.cli.compose import RECIPE_GROUP, available, compose, config_root
from multidiff.cli.generate import GenerateOptions
from multidiff.cli.help import METRIC, recipe_file, recipe_info, reference, render_quality
from multidiff.cli.train import RunOptions, group_key_rows
from multidiff.options import REQUIRED, OptionError, Options, format_value
from multidiff.training.autoencoder import ReconstructionOptions
from multidiff.training.options import TrainingOptions


def _option_line(output: str, key: str) -> str:
    lines = [line for line in output.splitlines() if re.match(rf"^  {re.escape(key)}\s", line)]
    assert len(lines) == 1, f"{key!r} is listed {len(lines)} times in:\n{output}"
    return lines[0]


def _assert_lists(output: str, rows, *, defaults: bool = True) -> None:
    for row in rows:
        line = _option_line(output, row.key)
        if defaults:
            assert re.search(rf"\s{re.escape(format_value(row.default))}\s", line + " "), (row, line)
        assert row.help and row.help in line, (row, line)


def test_train_help_lists_every_option_of_the_schema_with_its_default():
    out = multidiff_cli("train", "--help").stdout
    _assert_lists(out, [*RunOptions.describe(), *TrainingOptions.describe(), *ReconstructionOptions.describe(),
                        *group_key_rows(compose("train", []))])
    assert "modality      audio, image*, video" in out and "recipe" in out and "image_digits" in out


def test_train_help_shows_the_values_of_the_recipe_given():
    out = multidiff_cli("train", "recipe=audio_notes", "training.ema_decay=0.99", "--help").stdout
    assert re.search(r"^  training.ema_decay\s+float\s+0.99\s", out, re.M), out
    assert re.search(r"^  data.batch_size\s+int\s+32\s", out, re.M), out  # the recipe's, not the default 64
    assert "backbone      " in out and "unet2d_audio*" in out and "audio*" in out


def test_generate_help_lists_every_option_of_the_schema_with_its_default():
    out = multidiff_cli("generate", "--help").stdout
    _assert_lists(out, GenerateOptions.describe())
    assert "dpmpp_2m*" in out and "model=DIR --help lists them" in out


def test_a_bad_override_in_help_is_one_paragraph():
    proc = multidiff_cli("train", "backbone=nope", "--help", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "backbone" in proc.stderr


@pytest.mark.parametrize(("modality", "backbone", "expected"), [
    ("audio", "unet2d_tiny", ["duration (float, default from the model)", "format: one of wav, flac, ogg, mp3 (default wav)"]),
    ("video", "unet3d_tiny", ["num_frames (int, default from the model)", "fps (float, default 8.0)",
                              "format: one of mp4, webm, gif (default mp4)"]),
])
def test_generate_model_help_adds_the_modalitys_options(tmp_path, modality, backbone, expected):
    """Random weights: only the model's config is read."""
    adapter, model = _exported(tmp_path, modality, backbone)
    out = multidiff_cli("generate", f"model={model}", "--help").stdout
    _assert_lists(out, GenerateOptions.describe(), defaults=False)  # the command's own options, then the model's
    assert f"generation options of {model} ({type(adapter).__name__}), as name=value:" in out
    for text in expected:
        assert text in out, out
    for option in adapter.generation_options():
        assert f"  {option.describe()}" in out


# -- the schemas: help for every field, defaults as the config files have them -----------------------------

def test_a_field_without_help_fails_describe():
    @dataclasses.dataclass(frozen=True)
    class Undocumented(Options):
        documented: int = 1
        """has a help line."""
        forgotten: int = 2

    with pytest.raises(TypeError, match="Undocumented.forgotten has no help line"):
        Undocumented.describe()


def test_generate_schema_agrees_with_conf_generate_yaml():
    conf = OmegaConf.load(config_root() / "conf" / "generate.yaml")
    documented = {k: v for k, v in OmegaConf.to_container(conf).items() if k != "defaults"}
    defaults = {r.key: r.default for r in GenerateOptions.describe()}
    assert documented == defaults


def test_run_schema_agrees_with_conf_train_yaml():
    conf = OmegaConf.to_container(OmegaConf.load(config_root() / "conf" / "train.yaml"))
    plain = {k: v for k, v in conf.items() if k != "defaults" and not isinstance(v, dict)}
    assert plain == {r.key: r.default for r in RunOptions.describe()}


@pytest.mark.parametrize(("values", "message"), [
    ({"steps": 0}, r"steps=0 is invalid: it must be a positive integer"),
    ({"guidance_scale": "high"}, r"guidance_scale='high' is invalid: it must be a number"),
    ({"overwrite": "yes"}, r"overwrite='yes' is invalid: it must be true or false"),
    ({"trusted_targets": "mine."}, r"trusted_targets='mine.' is invalid: it must be a list"),
    ({"stepz": 3}, r"unknown key stepz: the options here are model, prompt, .* \(multidiff generate --help lists them\)"),
])
def test_generate_options_name_the_key(values, message):
    with pytest.raises(OptionError, match=message):
        GenerateOptions.from_mapping({"model": "m", "out": "o", **values})


def test_required_options_and_numbers_as_text():
    with pytest.raises(OptionError, match=r"missing out=\.\.\.: the output directory"):
        GenerateOptions(model="m")
    assert GenerateOptions.from_mapping({"model": "m", "out": 7, "prompt": 7}).prompt == "7"  # prompt=7 is text
    assert format_value(REQUIRED) == "(required)" and format_value([1, None, True]) == "[1, null, true]"


# -- recipes --------------------------------------------------------------------------------------------------

def _benchmark_row(info: dict) -> tuple[dict, dict]:
    name, *selectors = info["benchmark"].split()
    results = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
    wanted = dict(s.split("=", 1) for s in selectors)
    rows = [r for r in results["rows"] if all(str(r.get(k)) == v for k, v in wanted.items())]
    assert rows, f"no row of {name}.json matches {wanted}"
    return results, rows[0]


@pytest.mark.parametrize("name", available(RECIPE_GROUP))
def test_recipe_headers_agree_with_their_benchmark(name):
    """Each shipped recipe says what it trains, how long it takes and what its benchmark measured;
    the quoted numbers are those of benchmarks/results (rounded as written) and the time is within
    a quarter of the measured training minutes."""
    info = recipe_info(recipe_file(name))
    assert {"summary", "time", "quality", "benchmark"} <= set(info), info
    results, row = _benchmark_row(info)
    metrics = METRIC.findall(info["quality"])
    assert metrics, info["quality"]
    for key, written in metrics:
        decimals = len(written.split(".")[1]) if "." in written else 0
        assert round(float(row[key]), decimals) == pytest.approx(float(written)), (key, written, row[key])
    minutes = float(re.match(r"(\d+(?:\.\d+)?) min", info["time"]).group(1))
    assert results["train_minutes"] == pytest.approx(minutes, rel=0.25), (minutes, results["train_minutes"])


def test_recipes_prints_one_line_per_recipe():
    out = multidiff_cli("recipes").stdout
    for name in available(RECIPE_GROUP):
        info = recipe_info(recipe_file(name))
        line = _option_line(out, name)
        assert info["summary"] in line and info["time"] in line and render_quality(info["quality"]) in line
        assert "{" not in line


def test_recipe_info_reads_continuations_and_stops_at_the_config(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent("""\
        # @package _global_
        # summary: a long
        #   summary
        # time: 3 min
        # a plain comment
        defaults: []
        # quality: not a header any more
        """))
    assert recipe_info(path) == {"summary": "a long summary", "time": "3 min"}


# -- docs/options.md ------------------------------------------------------------------------------------------

def test_options_reference_is_current():
    current = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert current == reference(), "docs/options.md is stale: run python -m multidiff.cli.help > docs/options.md"


# -- errors before heavy work ---------------------------------------------------------------------------------

# Runs the CLI with every way a weight file is read recorded: Python-level opens (audit hook) and the
# safetensors and torch loaders (their files are opened in Rust or C, which the audit hook does not see),
# patched before multidiff, diffusers or transformers import them; and every Lightning Trainer built.
WATCH = """
import sys
opened, trainers = [], []
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].endswith((".safetensors", ".bin", ".ckpt", ".pt")):
        opened.append(args[0])
sys.addaudithook(hook)
import safetensors, safetensors.torch, torch
def recorded(real):
    def load(path, *a, **k):
        opened.append(str(path))
        return real(path, *a, **k)
    return load
safetensors.safe_open = safetensors.torch.safe_open = recorded(safetensors.safe_open)
safetensors.torch.load_file = recorded(safetensors.torch.load_file)
torch.load = recorded(torch.load)
import lightning.pytorch as pl
init = pl.Trainer.__init__
def counted(self, *a, **k):
    trainers.append(1)
    init(self, *a, **k)
pl.Trainer.__init__ = counted
from multidiff.cli.main import main
code = main(sys.argv[1:])
print("WEIGHTS OPENED:", sorted(set(opened)), "TRAINERS:", len(trainers))
sys.exit(code)
"""


@pytest.mark.parametrize(("overrides", "message"), [
    (["data=folder", "data.dataset.root=/no/such/folder"], "dataset folder /no/such/folder does not exist"),
    (["recipe=video_moving_digits", "backbone.init_from=/no/such/model"],
     "backbone.init_from=/no/such/model holds no image model weights"),
    (["training.ema_decay=2"], "training.ema_decay=2 is invalid"),
    (["seed=-1"], "seed=-1 is invalid: it must be an integer >= 0"),
])
def test_config_mistakes_are_reported_before_any_weights_load(tmp_path, overrides, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", WATCH, "train", f"run_dir={tmp_path / 'run'}",
                           f"data_root={tmp_path / 'data'}", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "WEIGHTS OPENED: [] TRAINERS: 0" in proc.stdout, proc.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()  # nothing materialized or written


def test_a_folder_whose_metadata_names_missing_files_is_refused_early(tmp_path):
    from multidiff.adapters.image import ImageAdapter
    from multidiff.datasets.folder import CaptionFolder, DatasetError

    (tmp_path / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "a digit"}\n')
    with pytest.raises(DatasetError, match=r"1 file\(s\) named in .*metadata.jsonl do not exist \(e.g. .*gone.png\)"):
        CaptionFolder.check_config(root=tmp_path, adapter=ImageAdapter(size=8))
    CaptionFolder.check_config(root=tmp_path, adapter=ImageAdapter(size=8), on_error="skip")  # left out later


def _exported(tmp_path, modality: str, backbone: str):
    """A model directory exported from a composed config (random weights)."""
    from multidiff.configuration import safe_instantiate
    from multidiff.pipeline import export_model

    cfg = compose("train", [f"modality={modality}", f"backbone={backbone}", "conditioning=labels"])
    adapter = safe_instantiate(cfg.modality)
    return adapter, export_model(tmp_path / "model", cfg, safe_instantiate(cfg.backbone, shape=tuple(adapter.shape)))


@pytest.mark.parametrize(("option", "message"), [
    ("duration=-1", "duration=-1"),
    ("lenght=3", "unknown generation option lenght for this model (AudioAdapter)"),
    ("format=gif", "format='gif' is invalid for this model (AudioAdapter): choose one of wav"),
])
def test_generate_checks_the_models_options_before_loading_it(tmp_path, option, message):
    import subprocess
    import sys

    _, model = _exported(tmp_path, "audio", "unet2d_tiny")
    proc = subprocess.run([sys.executable, "-c", WATCH, "generate", f"model={model}", "prompt=a note", option,
                           f"out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "WEIGHTS OPENED: [] TRAINERS: 0" in proc.stdout, proc.stdout
    assert not (tmp_path / "out").exists()
