"""The Python API: multidiff.load(...).generate/save, seeds, and safe loading."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

import multidiff
from multidiff.configuration import UnsafeConfigError
from multidiff.core.samplers import SAMPLERS
from multidiff.pipeline import GenerationError, ModelLoadError


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return multidiff.load(tiny_run / "model", device="cpu")


def test_generate_returns_decoded_tensors(pipe):
    out = pipe.generate(["a handwritten digit one", "the digit two"], num_samples=2, seed=0, steps=3, progress=False)
    assert out.shape == (4, 1, 16, 16)
    assert out.min() >= 0 and out.max() <= 1


def test_seeds_are_independent_of_batch_size(pipe):
    kw = dict(num_samples=4, seed=11, sampler="dpmpp_2m_sde", steps=3, progress=False)
    a = pipe.generate("a handwritten digit three", batch_size=4, **kw)
    b = pipe.generate("a handwritten digit three", batch_size=1, **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    c = pipe.generate("a handwritten digit three", num_samples=1, seed=13, sampler="dpmpp_2m_sde", steps=3, progress=False)
    torch.testing.assert_close(a[2:3], c, atol=1e-5, rtol=0)
    assert not torch.allclose(a[0], a[1])


def test_checkpoint_and_export_generate_the_same(tiny_run, pipe):
    from_ckpt = multidiff.load(tiny_run / "checkpoints" / "last.ckpt", device="cpu")
    a = pipe.generate("the digit four", num_samples=2, seed=3, steps=2, progress=False)
    b = from_ckpt.generate("the digit four", num_samples=2, seed=3, steps=2, progress=False)
    torch.testing.assert_close(a, b)


def test_save_writes_files_and_metadata(pipe, tmp_path):
    samples = pipe.generate("the digit five", num_samples=2, seed=7, steps=2, guidance_scale=2.0, progress=False)
    paths = pipe.save(samples, tmp_path / "o")
    rows = [json.loads(x) for x in (tmp_path / "o" / "metadata.jsonl").read_text().splitlines()]
    assert [p.name for p in paths] == ["0000.png", "0001.png"]
    assert [(r["seed"], r["prompt"], r["steps"], r["guidance_scale"]) for r in rows] == [
        (7, "the digit five", 2, 2.0), (8, "the digit five", 2, 2.0)]
    with pytest.raises(GenerationError, match="already holds results"):
        pipe.save(samples, tmp_path / "o")


def test_the_generation_record_travels_with_the_samples_not_the_pipeline(tiny_run, pipe, tmp_path):
    """save() reads what made the samples from the samples themselves: another generate in between,
    or another Pipeline object, changes nothing; a new tensor (a slice) has no record."""
    first = pipe.generate("the digit six", num_samples=2, seed=21, steps=2, progress=False)
    pipe.generate("the digit nine", num_samples=1, seed=99, steps=3, progress=False)  # a later call
    other = multidiff.load(tiny_run / "model", device="cpu")
    other.save(first, tmp_path / "a")
    rows = [json.loads(x) for x in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"], r["steps"]) for r in rows] == [("the digit six", 21, 2), ("the digit six", 22, 2)]
    pipe.save(first[:1].clone(), tmp_path / "b", prompts=["given"], seeds=[5])
    row = json.loads((tmp_path / "b" / "metadata.jsonl").read_text())
    assert (row["prompt"], row["seed"], row["steps"]) == ("given", 5, None)


def test_modality_options_are_checked_by_the_adapter(pipe, tmp_path):
    """The image model declares no size options, only its regions to edit: others are refused with that list."""
    with pytest.raises(GenerationError, match=r"unknown generation option duration for this model \(ImageAdapter\); "
                                              r"its options: keep_box \(list, default none\): .*; fill_box \(list"):
        pipe.generate("x", steps=2, progress=False, duration=1.0)
    samples = pipe.generate("x", steps=2, progress=False)
    with pytest.raises(GenerationError, match=r"format='gif' is invalid for this model \(ImageAdapter\): choose one of png"):
        pipe.save(samples, tmp_path / "o", format="gif")
    assert [p.name for p in pipe.save(samples, tmp_path / "o", format="jpg")] == ["0000.jpg"]


def test_bad_generate_options(pipe):
    for kw, msg in [({"steps": 0}, "steps must be"), ({"num_samples": 0}, "num_samples must be"),
                    ({"steps": 100_000}, "use steps <= 1000"), ({"steps": 1001}, "use steps <= 1000"),
                    ({"sigmas": torch.tensor([3.0, 1.0, 1.0, 0.0])}, "strictly decreasing"),
                    ({"guidance_scale": -1.0}, "guidance_scale must be"), ({"sampler": "nope"}, "unknown sampler")]:
        with pytest.raises(GenerationError, match=msg):
            pipe.generate("x", progress=False, **kw)


def test_exported_config_with_foreign_target_is_refused(tiny_run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_run / "model", model)
    marker = tmp_path / "pwned"
    text = (model / "config.yaml").read_text()
    text = text.replace("_target_: multidiff.adapters.image.ImageAdapter",
                        f"_target_: os.system\n  command: touch {marker}\n  _args_: []", 1)
    (model / "config.yaml").write_text(text.replace("trusted_targets: []", "trusted_targets:\n- os."))
    assert "- os." in (model / "config.yaml").read_text()  # the file tries to trust itself
    with pytest.raises(UnsafeConfigError, match="os.system"):
        multidiff.load(model)
    assert not marker.exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": _Payload(marker), "multidiff_config": {}}, f)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        multidiff.load(bad)
    assert not marker.exists()


EDGES = [  # generation options at their edges (steps 1 and the schedule's maximum are separate below)
    dict(steps=1),
    dict(num_samples=1, batch_size=64),  # a batch larger than the number of samples
    dict(num_samples=40, batch_size=16),  # several batches, a short last one
    dict(guidance_scale=0.0),
    dict(guidance_scale=1.0),
    dict(guidance_scale=50.0),
]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_generation_options_at_their_edges(pipe, sampler):
    for edge in EDGES:
        kw = {"steps": 2, "num_samples": 2, **edge}
        out = pipe.generate("a handwritten digit five", sampler=sampler, seed=1, progress=False, **kw)
        assert out.shape == (kw["num_samples"], 1, 16, 16) and torch.isfinite(out).all(), (sampler, edge)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_the_most_steps_the_schedule_allows(pipe, sampler):
    """The model's own grid at its most steps (every one of the 1000 levels of its discrete table)
    through every sampler. The exact denoiser of a Gaussian data set stands in for the network, so
    what is tested is the grid and the sampler (the CLI test runs the network at this count once)."""
    from multidiff.core.noise import PerSampleGenerator, append_dims

    steps = pipe.schedule.max_steps
    assert steps == 1000  # the tiny model's discrete 1000-step table
    sigmas = pipe.schedule.sigmas(steps)

    def exact(x, sigma, cond=None):  # E[x0 | x] for x0 ~ N(0.5, 0.3^2)
        return 0.5 + 0.09 / (0.09 + append_dims(sigma, x.ndim) ** 2) * (x - 0.5)

    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    out = SAMPLERS[sampler](exact, x, sigmas, generator=PerSampleGenerator(range(64)))
    assert torch.isfinite(out).all() and abs(out.mean().item() - 0.5) < 0.05 and 0.2 < out.std().item() < 0.4
