"""Issue 18 (part): fine-tuning an imported Stable-Diffusion-layout pipeline with LoRA (peft) through the
CLI: only the adapters train, they are saved alone and small, reload on top of the base, scale (0 is the
base exactly), stack, merge into a plain model, and a stopped run resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights, multidiff_cli
from safetensors.torch import load_file
from tiny_pipelines import save_tiny_stable_diffusion

import multidiff
from multidiff.backbones.lora import (
    LoraError,
    adapter_names,
    add_lora,
    attention_targets,
    load_lora,
    merge_lora,
    save_lora,
    set_scale,
)
from multidiff.backbones.pretrained import PretrainedUNet2D
from multidiff.core.cond import Cond

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

LORA_RUN = ["recipe=image_digits", "lora.rank=4", "trainer.max_steps=6", "data.batch_size=4", "optimizer.lr=1e-2",
            "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false",
            "+trainer.enable_progress_bar=false", "training.ema_decay=0.5", "callbacks.checkpoint.every_n_steps=3"]
GEN = dict(num_samples=2, seed=0, sampler="ddim", steps=5, guidance_scale=3.0, progress=False)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def lora_run(sd_dir, tmp_path_factory, data_root) -> Path:
    run = tmp_path_factory.mktemp("lora") / "run"
    multidiff_cli("train", *LORA_RUN, f"init_from={sd_dir}", f"run_dir={run}", f"data_root={data_root}")
    return run


def _unet(sd_dir: Path) -> PretrainedUNet2D:
    return PretrainedUNet2D(shape=(4, 8, 8), path=sd_dir / "unet").eval()


def _call(backbone, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, tokens = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return backbone(x, torch.tensor([500.0, 20.0]), Cond(tokens=tokens))


def _randomize(backbone, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in backbone.named_parameters():
            if f".lora_B.{name}." in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_adapts_only_the_attention_and_starts_as_the_base(sd_dir):
    unet = _unet(sd_dir)
    base = _call(unet)
    targets = add_lora(unet, rank=2)
    assert targets == attention_targets(unet) and all(t.split(".")[-1] in {"to_q", "to_k", "to_v", "0"} for t in targets)
    trainable = [k for k, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    assert torch.equal(_call(unet), base)  # lora_B starts at zero
    _randomize(unet, "default", 0)
    assert not torch.allclose(_call(unet), base, atol=1e-4)
    set_scale(unet, 0.0)
    assert torch.equal(_call(unet), base)
    with pytest.raises(LoraError, match="lora.rank must be a positive integer"):
        add_lora(_unet(sd_dir), rank=0)
    with pytest.raises(LoraError, match=r"lora.target_modules=\['nothing_here'\] do not fit PretrainedUNet2D"):
        add_lora(_unet(sd_dir), rank=2, target_modules=["nothing_here"])


def test_saved_loras_reload_stack_scale_and_merge(sd_dir, tmp_path):
    unet = _unet(sd_dir)
    base = _call(unet)
    for name, seed in (("a", 1), ("b", 2)):
        trained = _unet(sd_dir)
        targets = add_lora(trained, rank=2, name=name)
        _randomize(trained, name, seed)
        save_lora(tmp_path / name, trained, rank=2, alpha=2, target_modules=targets, base=str(sd_dir), name=name)
        assert (tmp_path / name / "lora.safetensors").stat().st_size < 64_000
    alone = _unet(sd_dir)
    load_lora(alone, tmp_path / "a", name="lora0")
    only_a = _call(alone)
    load_lora(unet, tmp_path / "a", name="lora0")
    load_lora(unet, tmp_path / "b", name="lora1", scale=0.5)
    assert adapter_names(unet) == ["lora0", "lora1"]
    stacked = _call(unet)
    assert not torch.allclose(stacked, only_a, atol=1e-5) and not torch.allclose(stacked, base, atol=1e-5)
    set_scale(unet, 0.0, "lora1")
    torch.testing.assert_close(_call(unet), only_a, atol=1e-6, rtol=0)
    set_scale(unet, 0.5, "lora1")
    merged = merge_lora(unet)
    assert not any(".lora_" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(_unet(sd_dir).state_dict())
    torch.testing.assert_close(_call(merged), stacked, atol=1e-5, rtol=0)
    with pytest.raises(LoraError, match="is not a LoRA adapter"):
        load_lora(_unet(sd_dir), tmp_path, name="x")


def test_cli_lora_fine_tuning_changes_only_the_adapters_and_reloads(lora_run, sd_dir, tmp_path):
    model = lora_run / "model"
    files = {p.name: p.stat().st_size for p in model.iterdir()}
    assert {"lora.safetensors", "lora.json", "multidiff.json"} <= set(files)
    base_bytes = sum(p.stat().st_size for p in (sd_dir / "unet").iterdir())
    assert files["lora.safetensors"] < base_bytes / 4  # the adapters alone, not the model
    ckpt = torch.load(lora_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(sd_dir / "unet", use_safetensors=True).state_dict()
    lora_keys = [k for k in ckpt if k.startswith("denoiser.backbone.") and ".lora_" in k]
    assert lora_keys
    changed = [k for k in lora_keys if ".lora_B." in k and ckpt[k].abs().max() > 0]
    assert changed, "training did not move any LoRA weight"
    for key, value in ckpt.items():  # every base weight is the published one
        if key.startswith("denoiser.backbone.unet.") and ".lora_" not in key:
            name = key[len("denoiser.backbone.unet."):].replace(".base_layer.", ".")
            assert torch.equal(value, ref[name]), key
    prompts = ["a handwritten digit seven"]
    base = multidiff.load(sd_dir, device="cpu").generate(prompts, **GEN)
    tuned = multidiff.load(model, device="cpu").generate(prompts, **GEN)
    assert (tuned - base).abs().max() > 1e-3
    zero = multidiff.load(sd_dir, device="cpu", lora=[str(model)], lora_scale=[0.0]).generate(prompts, **GEN)
    assert torch.equal(zero, base)  # lora_scale=0 reproduces the base exactly
    full = multidiff.load(sd_dir, device="cpu", lora=[str(model)]).generate(prompts, **GEN)
    torch.testing.assert_close(full, tuned, atol=1e-6, rtol=0)
    # through the CLI: model=BASE lora=RUN/model lora_scale=0.5, and a merged plain export
    out = tmp_path / "gen"
    multidiff_cli("generate", f"model={sd_dir}", f"lora={model}", "lora_scale=0.5", "prompt=a handwritten digit seven",
                  "num_samples=1", "steps=3", f"out={out}")
    assert len(list(out.glob("*.png"))) == 1
    merged = tmp_path / "merged"
    multidiff_cli("export", f"model={sd_dir}", f"lora={model}", f"out={merged}")
    assert not (merged / "lora.safetensors").exists() and (merged / "multidiff.json").is_file()
    again = multidiff.load(merged, device="cpu").generate(prompts, **GEN)
    torch.testing.assert_close(again, tuned, atol=1e-4, rtol=0)


def test_lora_without_a_model_to_start_from_is_refused(tmp_path, data_root):
    proc = multidiff_cli("train", "recipe=image_digits", "lora.rank=4", f"run_dir={tmp_path / 'r'}",
                         f"data_root={data_root}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "lora.rank=4 fine-tunes a trained model" in proc.stderr and "init_from=" in proc.stderr


def test_export_to_diffusers_runs_in_diffusers_and_loads_back_with_the_same_samples(lora_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "as-diffusers"
    multidiff_cli("export", f"model={lora_run / 'model'}", "format=diffusers", f"out={out}")
    assert (out / "model_index.json").is_file() and not list(out.rglob("*.bin"))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    kw = dict(noise=noise, sampler="ddim", steps=10, guidance_scale=3.0, progress=False)
    prompt = ["a handwritten digit seven in black ink on white paper"]
    tuned = multidiff.load(lora_run / "model", device="cpu").generate(prompt, **kw)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompt, latents=noise.clone(), num_inference_steps=10, guidance_scale=3.0, output_type="pt").images
    assert (ref - tuned).abs().max().item() < 1e-4  # the LoRA merged into the UNet: float rounding only
    back = multidiff.load(out, device="cpu").generate(prompt, **kw)
    assert (back - tuned).abs().max().item() < 1e-4


def test_models_without_diffusers_counterparts_are_not_exported_as_diffusers(tiny_run, tmp_path):
    proc = multidiff_cli("export", f"model={tiny_run / 'model'}", "format=diffusers", f"out={tmp_path / 'o'}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "not a diffusers AutoencoderKL" in proc.stderr and "not the CLIPTextModel" in proc.stderr
    assert not (tmp_path / "o").exists()
    multidiff_cli("export", f"model={tiny_run / 'model'}", f"out={tmp_path / 'plain'}")  # as multidiff: fine
    a = multidiff.load(tiny_run / "model", device="cpu").generate(["a handwritten digit one"], **GEN)
    b = multidiff.load(tmp_path / "plain", device="cpu").generate(["a handwritten digit one"], **GEN)
    assert torch.equal(a, b)


def test_init_from_an_export_starts_from_its_model_and_weights(tiny_run, data_root):
    from multidiff.cli.compose import compose
    from multidiff.cli.train import apply_init_from
    from multidiff.pipeline import build_from, load_backbone_state, read_model_config

    cfg = compose("train", ["recipe=audio_notes", f"init_from={tiny_run / 'model'}", f"data_root={data_root}"])
    apply_init_from(cfg)
    source = read_model_config(tiny_run / "model")
    assert cfg.modality == source.modality and cfg.backbone == source.backbone  # the image model, not the recipe's
    assert cfg.data.dataset._target_.endswith("notes_dataset")  # ... while the recipe keeps its data
    parts = build_from(cfg, cfg.init_from)
    assert_same_weights(parts.denoiser.backbone.state_dict(), load_backbone_state(tiny_run / "model"), atol=0)


def test_full_fine_tuning_of_an_imported_pipeline_trains_every_weight(sd_dir, tmp_path, data_root):
    run = tmp_path / "full"
    multidiff_cli("train", *[o for o in LORA_RUN if not o.startswith(("lora.", "trainer.max_steps", "optimizer.lr"))],
                  "trainer.max_steps=2", "optimizer.lr=1e-3", f"init_from={sd_dir}", f"run_dir={run}",
                  f"data_root={data_root}")
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(sd_dir / "unet", use_safetensors=True).state_dict()
    tuned = load_file(run / "model" / "backbone" / "diffusion_pytorch_model.safetensors")
    moved = [k for k in ref if not torch.equal(ref[k], tuned[k])]
    assert len(moved) > 0.9 * len(ref)  # (nearly) every weight moved, not only attention
    images = multidiff.load(run / "model", device="cpu").generate(["a handwritten digit one"], **GEN)
    assert images.shape == (2, 3, 16, 16)


def test_export_options_agree_with_conf_export_yaml_and_scales_pair_with_loras(sd_dir):
    from omegaconf import OmegaConf

    from multidiff.cli.compose import config_root
    from multidiff.cli.export import ExportOptions
    from multidiff.pipeline import ModelLoadError, lora_arguments

    conf = OmegaConf.to_container(OmegaConf.load(config_root() / "conf" / "export.yaml"))
    assert conf == {r.key: r.default for r in ExportOptions.describe()}
    assert lora_arguments("a", None) == (["a"], [1.0])
    assert lora_arguments(["a", "b"], 0.5) == (["a", "b"], [0.5, 0.5])
    with pytest.raises(ModelLoadError, match=r"lora_scale=\[1.0\] gives 1 scale\(s\) for 2 LoRA\(s\)"):
        lora_arguments(["a", "b"], [1.0])
    proc = multidiff_cli("export", "--help")
    assert "format" in proc.stdout and "lora_scale" in proc.stdout


def test_shards_prepared_for_an_imported_pipeline_stream_into_its_lora_run(sd_dir, tmp_path, data_root):
    import json

    shards = tmp_path / "shards"
    multidiff_cli("prepare", "recipe=image_digits", f"init_from={sd_dir}", f"out={shards}", f"data_root={data_root}",
                  "chunk_items=512")
    manifest = json.loads((shards / "multidiff_manifest.json").read_text())
    assert manifest["key"] == "z" and list(manifest["item_shape"]) == [4, 8, 8]  # the pipeline's VAE latents
    run = tmp_path / "run"
    steps = [o for o in LORA_RUN if not o.startswith(("trainer.max_steps", "callbacks.checkpoint"))]
    multidiff_cli("train", *steps, "trainer.max_steps=2", f"init_from={sd_dir}", "data=streaming", f"data.path={shards}",
                  "data.num_workers=0", f"run_dir={run}", f"data_root={data_root}")
    assert (run / "model" / "lora.safetensors").is_file()


@pytest.fixture(scope="module")
def text_lora_run(sd_dir, tmp_path_factory, data_root) -> Path:
    run = tmp_path_factory.mktemp("text-lora") / "run"
    multidiff_cli("train", *LORA_RUN, "lora.text_encoder=true", f"init_from={sd_dir}", f"run_dir={run}",
                  f"data_root={data_root}")
    return run


def test_lora_on_the_text_encoder_trains_exports_and_loads_with_the_backbones(text_lora_run, sd_dir, tmp_path):
    from transformers import CLIPTextModel

    model = text_lora_run / "model"
    text_dir = model / "text_encoder"
    assert (text_dir / "lora.safetensors").is_file() and (text_dir / "lora.json").is_file()
    text_lora = load_file(text_dir / "lora.safetensors")
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in text_lora} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert any(v.abs().max() > 0 for k, v in text_lora.items() if ".lora_B." in k), "the text adapters did not train"
    ckpt = torch.load(text_lora_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    text_keys = [k for k in ckpt if k.startswith(("text_encoder.", "text_ema."))]
    assert text_keys and all(".lora_" in k for k in text_keys)  # the frozen encoder is not stored again
    published = CLIPTextModel.from_pretrained(sd_dir / "text_encoder", use_safetensors=True).state_dict()
    pipe = multidiff.load(model, device="cpu")
    for key, value in pipe.conditioner.model.state_dict().items():  # the base encoder unchanged beneath
        if ".lora_" not in key:
            assert torch.equal(value, published[key.replace(".base_layer.", ".")]), key
    prompts = ["a handwritten digit seven"]
    tuned = pipe.generate(prompts, **GEN)
    plain = multidiff.load(sd_dir, device="cpu")
    base = plain.generate(prompts, **GEN)
    assert not torch.equal(pipe.encode_prompts(prompts).tokens, plain.encode_prompts(prompts).tokens)
    zero = multidiff.load(sd_dir, device="cpu", lora=[str(model)], lora_scale=[0.0]).generate(prompts, **GEN)
    assert torch.equal(zero, base)  # scale 0 turns both the backbone's and the encoder's adapters off
    merged = tmp_path / "merged"
    multidiff_cli("export", f"model={model}", f"out={merged}")
    assert (merged / "text_encoder" / "model.safetensors").is_file()
    again = multidiff.load(merged, device="cpu").generate(prompts, **GEN)
    torch.testing.assert_close(again, tuned, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixture,extra,files", [
    ("lora_run", (), ("lora.safetensors",)),
    ("text_lora_run", ("lora.text_encoder=true",), ("lora.safetensors", "text_encoder/lora.safetensors")),
], ids=["backbone", "and-text-encoder"])
def test_a_stopped_lora_run_resumes_exactly(request, fixture, extra, files, sd_dir, tmp_path, data_root):
    straight = request.getfixturevalue(fixture)  # the same run, uninterrupted
    run = tmp_path / "run"
    common = ["train", *LORA_RUN, *extra, f"init_from={sd_dir}", f"run_dir={run}", f"data_root={data_root}"]
    proc = multidiff_cli(*common, "training.inject_signal_at_step=3", "training.inject_signal=SIGTERM")
    assert "stopped by signal" in proc.stdout
    multidiff_cli(*common, "resume=auto")
    assert_same_weights(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"],
                        torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    for name in files:
        assert_same_weights(load_file(run / "model" / name), load_file(straight / "model" / name))


def test_text_encoder_lora_needs_adapters_and_prompts(sd_dir, tmp_path, data_root):
    proc = multidiff_cli("train", "recipe=image_digits", f"init_from={sd_dir}", "lora.text_encoder=true",
                         f"run_dir={tmp_path / 'r'}", f"data_root={data_root}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "lora.text_encoder=true adds adapters of lora.rank" in proc.stderr
    proc = multidiff_cli("train", "recipe=image_digits", f"init_from={sd_dir}", "lora.rank=4", "lora.text_encoder=true",
                         "data=streaming", f"data.path={tmp_path}", f"run_dir={tmp_path / 'r2'}",
                         f"data_root={data_root}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "data=streaming reads prompts already encoded" in proc.stderr
