"""The speed options (``channels_last``, ``compile``) run and change nothing but round-off:
in generation (``multidiff.load(..., channels_last=, compile=)`` / ``multidiff generate``) and in
training (``training.channels_last`` / ``training.compile`` of ``conf/train.yaml``)."""

from __future__ import annotations

import pytest
import torch

from multidiff.cli.compose import compose
from multidiff.cli.train import build
from multidiff.performance import apply_performance_options
from multidiff.pipeline import Pipeline, build_parts, export_model

TINY_TRAIN = ["recipe=image_digits", "backbone=unet2d_tiny", "data.batch_size=8", "trainer.max_steps=2",
              "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false", "+trainer.enable_progress_bar=false",
              "trainer.log_every_n_steps=1"]
# torch.compile with aot_eager traces and runs the real graph (fwd + bwd) without generating C++,
# which keeps this test fast; the inductor backend is measured in benchmarks/.
COMPILE = {"backend": "aot_eager"}
PROMPTS = ["a handwritten digit one", "the digit seven"]


def conv_weight(backbone):
    """A 2-D convolution weight whose two layouts differ (more than one input channel and pixel)."""
    return next(p for p in backbone.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)


@pytest.fixture(scope="module")
def cfg():
    return compose("train", ["recipe=image_digits", "backbone=unet2d_tiny"])


@pytest.fixture(scope="module")
def conditioner(cfg):
    return build_parts(cfg).conditioner


def pipeline(cfg, conditioner, **options) -> Pipeline:
    torch.manual_seed(0)  # the same random weights for every pipeline
    return Pipeline(build_parts(cfg, conditioner=conditioner), config=cfg, device="cpu", **options)


def generate(pipe):
    return pipe.generate(PROMPTS, num_samples=2, seed=3, steps=3, guidance_scale=2.0, progress=False)


def test_channels_last_generation_matches_default(cfg, conditioner):
    ref = generate(pipeline(cfg, conditioner))
    pipe = pipeline(cfg, conditioner, channels_last=True)
    conv = conv_weight(pipe.denoiser.backbone)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(generate(pipe), ref, atol=1e-5, rtol=0)
    # the option keeps the state_dict: keys and values as in the default layout
    default = pipeline(cfg, conditioner).denoiser.backbone.state_dict()
    state = pipe.denoiser.backbone.state_dict()
    assert state.keys() == default.keys() and all(torch.equal(state[k], default[k]) for k in state)


def test_compile_generation_matches_default(cfg, conditioner):
    ref = generate(pipeline(cfg, conditioner))
    pipe = pipeline(cfg, conditioner, compile=True, compile_options=COMPILE)
    assert pipe.denoiser.backbone._compiled_call_impl is not None
    torch.testing.assert_close(generate(pipe), ref, atol=1e-5, rtol=0)


def test_options_leave_other_ranks_and_repeats_alone():
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.Linear(4, 4))
    apply_performance_options(net, channels_last=True)
    apply_performance_options(net, channels_last=True)  # idempotent: one input hook
    assert all(p.is_contiguous() for p in net.parameters())
    assert len(net._forward_pre_hooks) == 1
    assert net(torch.randn(1, 2, 6)).shape == (1, 3, 4)


def fit(tmp_path, data_root, *extra):
    run = tmp_path / "run"
    cfg = compose("train", TINY_TRAIN + [f"run_dir={run}", f"data_root={data_root}", *extra])
    torch.manual_seed(0)
    parts, module, datamodule, trainer = build(cfg, run)
    trainer.fit(module, datamodule=datamodule)
    return cfg, module


@pytest.mark.parametrize("option", ["channels_last", "compile"])
def test_training_option_matches_default(tmp_path, data_root, option):
    extra = ["training.channels_last=true"] if option == "channels_last" else [
        "training.compile=true", f"+training.compile_options.backend={COMPILE['backend']}"]
    _, ref = fit(tmp_path / "ref", data_root)
    cfg, module = fit(tmp_path / "opt", data_root, *extra)
    backbone = module.denoiser.backbone
    if option == "channels_last":
        assert conv_weight(backbone).is_contiguous(memory_format=torch.channels_last)
        assert conv_weight(module.ema.backbone).is_contiguous()  # the EMA (exported) copy keeps its layout
    else:
        assert backbone._compiled_call_impl is not None and module.ema.backbone._compiled_call_impl is None
    assert module.global_step == ref.global_step == 2
    a, b = ref.state_dict(), module.state_dict()
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-5, f"max weight difference {worst}"
    export_model(tmp_path / "model", cfg, module.ema.backbone)  # the export still works
    assert (tmp_path / "model" / "backbone").is_dir()
