"""Issue 18 (part): an imported WanPipeline fine-tuned with LoRA through the CLI on the embedded moving
digits (the clip geometry set on the command line), reloaded on the base, and exported back to a
diffusers WanPipeline that diffusers runs with the same samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import multidiff_cli
from tiny_pipelines import save_tiny_wan

import multidiff

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CLIP = dict(num_frames=5, height=16, width=16)
GEN = dict(num_samples=1, seed=0, sampler="unipc", steps=4, guidance_scale=3.0, progress=False, **CLIP)
PROMPT = ["the digit 3 moving to the left"]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


@pytest.fixture(scope="module")
def wan_lora_run(wan_dir, tmp_path_factory, data_root) -> Path:
    run = tmp_path_factory.mktemp("wan-lora") / "run"
    multidiff_cli("train", "recipe=video_moving_digits", f"init_from={wan_dir}", "lora.rank=4", "modality.size=[16,16]",
                  "modality.num_frames=5", "training.slice_items=0", "data.batch_size=4", "trainer.max_steps=8",
                  "optimizer.lr=5e-2", "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false",
                  "+trainer.enable_progress_bar=false", f"run_dir={run}", f"data_root={data_root}")
    return run


def test_wan_lora_fine_tuning_trains_only_adapters_on_the_clips_asked_for(wan_lora_run, wan_dir):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(wan_lora_run / "config.yaml")
    # init_from brought Wan's modality (3 channels, 16 fps); the command line's clip geometry applies to it
    assert (list(cfg.modality.size), cfg.modality.num_frames, cfg.modality.channels) == ([16, 16], 5, 3)
    assert cfg.modality.fps == 16.0 and "init_from_overrides" not in cfg
    model = wan_lora_run / "model"
    base_bytes = (wan_dir / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (model / "lora.safetensors").stat().st_size < base_bytes / 4
    ckpt = torch.load(wan_lora_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel.from_pretrained(wan_dir / "transformer", use_safetensors=True).state_dict()
    prefix = "denoiser.backbone.transformer."
    lora_b = [k for k in ckpt if k.startswith(prefix) and ".lora_B." in k]
    assert lora_b and any(ckpt[k].abs().max() > 0 for k in lora_b), "training did not move any LoRA weight"
    assert {k.split(".lora_B.")[0].rsplit(".", 1)[-1] for k in lora_b} >= {"to_q", "to_k", "to_v"}
    for key, value in ckpt.items():  # every base weight is the published one
        if key.startswith(prefix) and ".lora_" not in key:
            assert torch.equal(value, ref[key[len(prefix):].replace(".base_layer.", ".")]), key
    base = multidiff.load(wan_dir, device="cpu").generate(PROMPT, **GEN)
    tuned = multidiff.load(model, device="cpu").generate(PROMPT, **GEN)
    assert tuned.shape == (1, 3, 5, 16, 16) and not torch.equal(tuned, base)
    zero = multidiff.load(wan_dir, device="cpu", lora=[str(model)], lora_scale=[0.0]).generate(PROMPT, **GEN)
    assert torch.equal(zero, base)  # lora_scale=0 reproduces the base exactly


def test_a_fine_tuned_wan_exports_to_a_diffusers_wan_pipeline_with_the_same_samples(wan_lora_run, tmp_path):
    from diffusers import WanPipeline

    out = tmp_path / "as-diffusers"
    multidiff_cli("export", f"model={wan_lora_run / 'model'}", "format=diffusers", f"out={out}")
    assert (out / "model_index.json").is_file() and not list(out.rglob("*.bin"))
    noise = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(7))
    kw = {k: v for k, v in GEN.items() if k not in ("num_samples", "seed")}
    tuned = multidiff.load(wan_lora_run / "model", device="cpu").generate(PROMPT, noise=noise, **kw)
    pipe = WanPipeline.from_pretrained(str(out), local_files_only=True, use_safetensors=True)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and pipe.scheduler.config.flow_shift == 3.0
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(PROMPT, latents=noise.clone(), num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                   **CLIP).frames.permute(0, 2, 1, 3, 4)
    assert (ref - tuned).abs().max().item() < 1e-5  # the LoRA merged into the transformer: float rounding only
    back = multidiff.load(out, device="cpu").generate(PROMPT, noise=noise, **kw)
    assert (back - tuned).abs().max().item() < 1e-5


def test_a_plain_export_of_an_imported_pipeline_stands_alone(wan_dir, tmp_path):
    """The export holds its own transformer, VAE and text encoder: the pipeline directory may go, the
    export may move, and it samples as the pipeline did."""
    import shutil

    from omegaconf import OmegaConf

    base = Path(shutil.copytree(wan_dir, tmp_path / "base"))
    expected = multidiff.load(base, device="cpu").generate(PROMPT, **GEN)
    multidiff_cli("export", f"model={base}", f"out={tmp_path / 'plain'}")
    shutil.rmtree(base)
    moved = (tmp_path / "plain").rename(tmp_path / "moved")
    cfg = OmegaConf.load(moved / "config.yaml")
    assert (cfg.backbone.path, cfg.autoencoder.path, cfg.conditioning.encoder.encoder) == (
        "backbone", "autoencoder/diffusers", "text_encoder")
    assert (moved / "text_encoder" / "model.safetensors").is_file() and not list(moved.rglob("*.bin"))
    again = multidiff.load(moved, device="cpu").generate(PROMPT, **GEN)
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=0)
