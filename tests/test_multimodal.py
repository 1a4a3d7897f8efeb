"""One model for several modalities: the DiT's per-modality patches and modality embedding, the
mixed batch sampler, and recipe=multimodal_dit through the real CLI (train, previews, export,
generate modality=..., refusals, exact resume)."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
import torch
from helpers import multidiff_cli

from multidiff.backbones.base import BackboneShapeError
from multidiff.backbones.dit import DiT
from multidiff.core.cond import Cond
from multidiff.training.data import MixtureBatchSampler

SPECS = {"image": {"shape": [1, 16, 16]}, "audio": {"shape": [1, 128, 16], "patch_size": [32, 1]},
         "video": {"shape": [1, 8, 16, 16], "patch_size": [1, 4, 4]}}


def multimodal_dit() -> DiT:
    torch.manual_seed(0)
    net = DiT(shape=(1, 16, 16), patch_size=2, hidden_size=32, depth=1, num_heads=2, modalities=SPECS)
    with torch.no_grad():  # off the zero init, so outputs depend on every input
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def modality(index: int, batch: int = 2) -> Cond:
    return Cond(modality=torch.full((batch,), index, dtype=torch.long))


def test_each_modality_has_its_own_patches_and_shares_the_blocks():
    net = multimodal_dit()
    assert set(net.embed) == set(net.final) == set(SPECS)
    assert net.embed["audio"].in_features == 32 and net.embed["video"].in_features == 16
    sigma = torch.full((2,), 0.5)
    outs = {}
    for i, (name, spec) in enumerate(SPECS.items()):
        x = torch.randn(2, *spec["shape"])
        outs[name] = net(x, sigma, modality(i))
        assert outs[name].shape == x.shape
    # the modality embedding reaches the output: the same tensor read as another modality differs
    x = torch.randn(2, 1, 16, 16)
    net.modality_embedding.weight.data[1] += 1.0
    wider = DiT(shape=(1, 16, 16), patch_size=2, hidden_size=32, depth=1, num_heads=2,
                modalities={"a": {"shape": [1, 16, 16]}, "b": {"shape": [1, 16, 16]}})
    with torch.no_grad():
        for p in wider.parameters():
            p.add_(0.05 * torch.randn_like(p))
        wider.embed["b"].load_state_dict(wider.embed["a"].state_dict())
        wider.final["b"].load_state_dict(wider.final["a"].state_dict())
    assert not torch.allclose(wider(x, sigma, modality(0)), wider(x, sigma, modality(1)))
    # blocks are shared: one set of transformer weights, per-modality layers only at the ends
    names = {k.split(".")[0] for k, _ in net.named_parameters()}
    assert "blocks" in names and not any(k.startswith("blocks.") and "image" in k for k, _ in net.named_parameters())


def test_a_batch_must_say_its_modality_and_it_must_fit():
    net = multimodal_dit()
    sigma = torch.full((2,), 0.5)
    with pytest.raises(BackboneShapeError, match="generates image, audio, video: a batch must say which"):
        net(torch.randn(2, 1, 16, 16), sigma, None)
    with pytest.raises(BackboneShapeError, match=r"cond.modality=\[3, 3\] is invalid"):
        net(torch.randn(2, 1, 16, 16), sigma, modality(3))
    with pytest.raises(BackboneShapeError, match="one index .* for the whole batch"):
        net(torch.randn(2, 1, 16, 16), sigma, Cond(modality=torch.tensor([0, 1])))
    with pytest.raises(BackboneShapeError, match=r"modality 2 takes batches \(B, 1, n, n, n\)"):
        net(torch.randn(2, 1, 16, 16), sigma, modality(2))
    with pytest.raises(BackboneShapeError, match="must be the first modality's"):
        DiT(shape=(1, 8, 8), hidden_size=32, num_heads=2, modalities=SPECS)


def test_the_mixture_sampler_is_reproducible_resumable_weighted_and_shards_ranks():
    sizes, batches = [300, 200, 100], [8, 4, 2]
    kw = {"seed": 3}
    a = list(MixtureBatchSampler(sizes, batches, [1, 1, 2], **kw))
    assert a == list(MixtureBatchSampler(sizes, batches, [1, 1, 2], **kw))
    assert a != list(MixtureBatchSampler(sizes, batches, [1, 1, 2], seed=4))
    # every batch holds one source's items, as many as its batch size
    offsets = [0, 300, 500, 600]
    for batch in a:
        src = next(i for i in range(3) if offsets[i] <= batch[0] < offsets[i + 1])
        assert all(offsets[src] <= j < offsets[src + 1] for j in batch) and len(batch) == batches[src]
    # resuming after k batches of an epoch gives the rest exactly
    resumed = list(MixtureBatchSampler(sizes, batches, [1, 1, 2], position=lambda: (0, 17), **kw))
    assert resumed == a[17:]
    assert list(MixtureBatchSampler(sizes, batches, [1, 1, 2], position=lambda: (1, 0), **kw)) != a
    # two ranks at half the batch split each global batch of one process
    one = list(MixtureBatchSampler(sizes, [8, 4, 2], [1, 1, 2], **kw))
    r0 = list(MixtureBatchSampler(sizes, [4, 2, 1], [1, 1, 2], rank=0, world_size=2, **kw))
    r1 = list(MixtureBatchSampler(sizes, [4, 2, 1], [1, 1, 2], rank=1, world_size=2, **kw))
    assert [sorted(x + y) for x, y in zip(r0, r1)] == [sorted(b) for b in one]
    # the weights hold within sampling error over many epochs (1 : 1 : 2 -> 1/4, 1/4, 1/2)
    s = MixtureBatchSampler(sizes, batches, [1, 1, 2], **kw)
    drawn = torch.tensor([src for e in range(40) for src in s.sources(e)])
    n = len(drawn)
    for src, p in enumerate([0.25, 0.25, 0.5]):
        share = (drawn == src).float().mean().item()
        assert abs(share - p) < 4 * (p * (1 - p) / n) ** 0.5, (src, share, n)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        MixtureBatchSampler([3, 100], [4, 4], [1, 1], seed=0)


TINY_MM = [
    "recipe=multimodal_dit", "backbone=dit_tiny", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
    "modalities.image.data.batch_size=4", "modalities.audio.data.batch_size=4", "modalities.video.data.batch_size=2",
    "modalities.video.data.dataset.num_digits=10", "callbacks.samples.every_n_steps=0", "callbacks.samples.steps=2",
    "callbacks.samples.num_per_prompt=1", "callbacks.checkpoint.every_n_steps=2", "+trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def mm_run(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("multimodal") / "run"
    multidiff_cli("train", *TINY_MM, f"run_dir={run}", f"data_root={data_root}")
    return run


def test_train_writes_previews_of_each_modality_and_one_export_holding_every_adapter(mm_run):
    previews = sorted(p.name for p in (mm_run / "samples").iterdir())
    assert any(n.startswith("step_000004_image") and n.endswith(".png") for n in previews), previews
    assert any(n.startswith("step_000004_audio") for n in previews), previews
    assert any(n.startswith("step_000004_video") for n in previews), previews
    # each modality's media in its own folder (two of them would otherwise share step_NNNNNN_prompts.tsv)
    audio = mm_run / "samples" / "audio"
    wavs = sorted(p.name for p in audio.glob("step_000004_*.wav"))
    assert len(wavs) == 2 and (audio / "step_000004_prompts.tsv").read_text().count("\n") == 2, wavs
    clips = (mm_run / "samples" / "video" / "step_000004" / "metadata.jsonl").read_text().splitlines()
    assert len(clips) == 2 and "moving" in clips[0]
    assert not list((mm_run / "samples").glob("*.wav")) and not (mm_run / "samples" / "step_000004").exists()
    import multidiff
    from multidiff.pipeline import modalities, read_model_config

    model = mm_run / "model"
    assert modalities(model) == ["image", "audio", "video"]
    cfg = read_model_config(model)
    assert "modality" not in cfg and set(cfg.modalities.audio) == {"modality", "shift", "patch_size"}
    assert cfg.modalities.audio.shift == 3.0 and list(cfg.modalities.audio.patch_size) == [32, 1]
    shapes = {}
    for name in ("image", "audio", "video"):
        pipe = multidiff.load(model, modality=name)
        assert pipe.modality_name == name
        out = pipe.generate("a plucked string playing A4", steps=2, progress=False)
        shapes[name] = tuple(out.shape[1:])
    assert shapes["image"] == (1, 16, 16) and len(shapes["video"]) == 4 and shapes["audio"][-1] == 16384
    with pytest.raises(Exception, match="generates image, audio, video: choose one with modality=NAME"):
        multidiff.load(model)


def test_generate_picks_the_modality_and_refuses_an_unknown_one_with_the_list(mm_run, tmp_path):
    model = f"model={mm_run / 'model'}"
    out = tmp_path / "notes"
    multidiff_cli("generate", model, "modality=audio", "prompt=a plucked string playing A4", "duration=1.0", "steps=2",
                  "num_samples=2", f"out={out}")
    audio, rate = sf.read(out / "0000.wav")
    assert rate == 16000 and abs(len(audio) / rate - 1.0) < 0.07
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["modality"] for r in rows] == ["audio", "audio"]
    for args, message in (((), "generates image, audio, video: choose one with modality=NAME"),
                          (("modality=smell",), "modality=smell is not one of this model's modalities; it generates "
                                                "image, audio, video")):
        proc = multidiff_cli("generate", model, *args, "prompt=x", f"out={tmp_path / 'bad'}", check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "bad").exists()
    proc = multidiff_cli("generate", model, "--help")
    assert "generates image, audio, video: choose one with modality=NAME" in proc.stdout
    assert "modality=audio (AudioAdapter)" in proc.stdout and "modality=video (VideoAdapter)" in proc.stdout


def test_serve_offers_each_modality_of_the_model_as_its_own_entry(mm_run, tmp_path):
    """The web app's service lists a model of several modalities once per modality and generates with
    that modality's adapter; a request for the bare path is refused with the list."""
    from multidiff.cli.compose import ConfigError
    from multidiff.cli.service import GenerationService

    model = str(mm_run / "model")
    service = GenerationService([model], tmp_path)
    assert service.models == [f"{model} [image]", f"{model} [audio]", f"{model} [video]"]
    assert type(service.adapters[f"{model} [audio]"]).__name__ == "AudioAdapter"
    result = service.generate(f"{model} [audio]", {"prompt": "a plucked string playing A4", "steps": 2,
                                                         "options": {"duration": 0.5}})
    assert [p.suffix for p in result.paths] == [".wav"] and abs(len(sf.read(result.paths[0])[0]) - 8000) < 1200
    assert result.rows[0]["modality"] == "audio" and result.rows[0]["model"] == model
    with pytest.raises(ConfigError, match=r"unknown model .*this server serves: .* \[image\]"):
        service.check(model, {"prompt": "x"})


def test_resume_after_a_signal_on_two_processes_is_exact(mm_run, tmp_path, data_root):
    """Stopped by SIGTERM at step 2, then resumed as two DDP processes at half the per-device batches:
    the same modality at every step, each rank its rows of the same global batches, so the end state
    is that of the uninterrupted one-process run (resume and DDP exactness in one)."""
    run = tmp_path / "run"
    proc = multidiff_cli("train", *TINY_MM, f"run_dir={run}", f"data_root={data_root}",
                         "training.inject_signal_at_step=1", "training.inject_signal=SIGTERM")
    assert "stopped by signal at step 2" in proc.stdout
    halved = [o.replace("batch_size=4", "batch_size=2").replace("video.data.batch_size=2", "video.data.batch_size=1")
              for o in TINY_MM]
    assert sum(a != b for a, b in zip(halved, TINY_MM)) == 3
    multidiff_cli("train", *halved, f"run_dir={run}", f"data_root={data_root}", "resume=auto", "trainer=ddp",
                  "trainer.devices=2", "trainer.accelerator=cpu")
    a = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(mm_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    worst = max((a["state_dict"][k].float() - v.float()).abs().max().item() for k, v in b["state_dict"].items())
    assert worst <= 1e-5, worst


def test_a_one_modality_model_refuses_a_modality_with_one_paragraph(tiny_run, tmp_path):
    import multidiff
    from multidiff.pipeline import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"modality=audio: .*model is a model of one modality; leave modality= out"):
        multidiff.load(tiny_run / "model", modality="audio")
    proc = multidiff_cli("generate", f"model={tiny_run / 'model'}", "modality=audio", "prompt=x",
                         f"out={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2 and "is a model of one modality; leave modality= out" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
