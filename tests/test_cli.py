"""End to end through the real CLI: train, export, generate; and its error messages."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import multidiff_cli
from PIL import Image


def test_train_writes_checkpoint_export_and_samples(tiny_run):
    assert (tiny_run / "checkpoints" / "last.ckpt").is_file()
    assert (tiny_run / "model" / "multidiff.json").is_file()
    assert (tiny_run / "model" / "config.yaml").is_file()
    assert (tiny_run / "model" / "backbone" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_run / "model" / "backbone" / "config.json").is_file()
    grids = sorted((tiny_run / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_000002.png", "step_000003.png"]
    assert (tiny_run / "logs" / "metrics.csv").is_file()
    assert (tiny_run / "config.yaml").is_file()


def test_export_holds_ema_weights_in_diffusers_format(tiny_run):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(tiny_run / "model" / "backbone")
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    exported = load_file(tiny_run / "model" / "backbone" / "diffusion_pytorch_model.safetensors")
    key = next(iter(exported))
    assert torch.equal(exported[key], ckpt["state_dict"][f"ema.backbone.unet.{key}"])
    assert not torch.equal(exported[key], ckpt["state_dict"][f"denoiser.backbone.unet.{key}"])
    assert sum(p.numel() for p in unet.parameters()) > 0


@pytest.mark.parametrize("source", ["model", "ckpt"])
def test_generate_writes_images_and_metadata(tiny_run, tmp_path, source):
    model = tiny_run / "model" if source == "model" else tiny_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    proc = multidiff_cli(
        "generate", f"model={model}", "prompt=a handwritten digit seven", "num_samples=3", "seed=5",
        "sampler=dpmpp_2m", "steps=3", "guidance_scale=4.0", f"out={out}",
    )
    assert "sampling" in proc.stderr  # the progress bar
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["0000.png", "0001.png", "0002.png"]
    assert [r["seed"] for r in rows] == [5, 6, 7]
    for r in rows:
        assert r["prompt"] == "a handwritten digit seven"
        assert (r["sampler"], r["steps"], r["guidance_scale"], r["model"]) == ("dpmpp_2m", 3, 4.0, str(model))
        with Image.open(out / r["file"]) as im:
            assert im.size == (16, 16) and im.mode == "L"


def test_generate_prompts_file_negative_prompt_and_batch_size(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit one\n\nthe number 2, written by hand\n", encoding="utf-8")
    out = tmp_path / "out"
    multidiff_cli(
        "generate", f"model={tiny_run / 'model'}", f"prompts_file={prompts}", "num_samples=2", "batch_size=3",
        "negative_prompt=blurry", "sampler=euler", "steps=2", f"out={out}",
    )
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a handwritten digit one"] * 2 + ["the number 2, written by hand"] * 2
    assert all(r["negative_prompt"] == "blurry" and r["sampler"] == "euler" for r in rows)


def test_generate_refuses_existing_results_unless_overwrite(tiny_run, tmp_path):
    args = ["generate", f"model={tiny_run / 'model'}", "prompt=a handwritten digit one", "steps=1", f"out={tmp_path}"]
    multidiff_cli(*args)
    before = (tmp_path / "0000.png").read_bytes()
    proc = multidiff_cli(*args, check=False)
    assert proc.returncode != 0 and "already holds results" in proc.stderr and "overwrite=true" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "0000.png").read_bytes() == before
    multidiff_cli(*args, "overwrite=true")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "recipe=no_such_recipe"], "unknown recipe 'no_such_recipe'; valid choices: "),
        (["train", "sampler=nope"], "unknown sampler 'nope'; valid choices: ddim, ddpm"),
        (["train", "modality=nope"], "unknown modality 'nope'; valid choices: "),
        (["train", "trainer.max_stepz=5"], "unknown config key 'trainer.max_stepz'"),
        (["train", "trainer.max_steps=0"], "trainer.max_steps=0 is invalid"),
        (["train", "trainer.precision=banana"], "invalid trainer settings"),
        (["train", "data=folder", "data.dataset.root=/no/such/folder"],
         "dataset folder /no/such/folder does not exist; set data.dataset.root to a folder"),
        (["train", "callbacks.samples.steps=5000"], "callbacks.samples.steps=5000 is invalid"),
        (["generate", "model=/no/such/model", "prompt=x", "out=/tmp/x"], "model path /no/such/model does not exist"),
        (["generate", "model=/tmp", "prompt=x", "out=/tmp/x"], "is not a multidiff model"),
        (["generate", "model=/tmp", "prompt=x", "out=/tmp/x", "steps=0"], "steps=0 is invalid"),
        (["generate", "model=/tmp", "prompt=x", "out=/tmp/x", "num_samples=-1"], "num_samples=-1 is invalid"),
        (["generate", "model=/tmp", "prompt=x", "out=/tmp/x", "guidance_scale=-2"], "guidance_scale=-2"),
        (["generate", "prompt=x", "out=/tmp/x"], "missing model="),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_bad_input_gets_one_paragraph_error(args, expected):
    proc = multidiff_cli(*args, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    if "valid choices" in expected:  # the list names real options
        group = {"recipe": "recipes"}.get(expected.split()[1], expected.split()[1])
        from multidiff.cli.compose import available

        assert ", ".join(available(group)) in proc.stderr


@pytest.mark.parametrize("steps", [100_000, 1001])
def test_generate_refuses_more_steps_than_the_schedule_has_noise_levels(tiny_run, tmp_path, steps):
    # 100,000 steps used to end in ZeroDivisionError after the first step; 1,001 ran with a repeated level
    proc = multidiff_cli("generate", f"model={tiny_run / 'model'}", "prompt=a digit", f"out={tmp_path / 'o'}",
                         f"steps={steps}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"steps={steps}" in proc.stderr and "use steps <= 1000" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_generate_at_the_largest_step_count_through_the_cli(tiny_run, tmp_path):
    multidiff_cli("generate", f"model={tiny_run / 'model'}", "prompt=a digit", f"out={tmp_path / 'o'}", "steps=1000",
                  "sampler=euler")
    assert (tmp_path / "o" / "0000.png").is_file()


def test_prompts_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 digit".encode("latin-1"))
    for path, expected in ((empty, "holds no prompts"), (latin, "is not UTF-8")):
        proc = multidiff_cli("generate", "model=/tmp", f"prompts_file={path}", "out=/tmp/x", check=False)
        assert proc.returncode != 0 and expected in proc.stderr, proc.stderr


def test_cfg_flag_prints_composed_config():
    proc = multidiff_cli("train", "recipe=image_digits", "trainer.max_steps=7", "--cfg")
    assert "max_steps: 7" in proc.stdout and "UNet2DCond" in proc.stdout
