"""SamplePreviews refuses to run unbound (it used to train silently without previews), and its code
defaults are the config defaults."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from multidiff.training.callbacks import PreviewsNotBound, SamplePreviews


def _trainer(callback) -> L.Trainer:
    return L.Trainer(max_steps=2, callbacks=[callback], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")


def test_unbound_previews_stop_fit_before_the_first_step():
    trainer = _trainer(SamplePreviews(["a prompt"], every_n_steps=1))
    with pytest.raises(PreviewsNotBound, match=r"adapter, schedule, sampler, run_dir.*\.bind\(adapter="):
        trainer.fit(BoringModel())
    assert trainer.global_step == 0


def test_bind_refuses_a_missing_part(tmp_path):
    with pytest.raises(PreviewsNotBound, match="no sampler"):
        SamplePreviews(["a prompt"]).bind(adapter=object(), schedule=object(), sampler=None, run_dir=tmp_path)


def test_bound_previews_let_fit_run(tmp_path):
    callback = SamplePreviews(["a prompt"], every_n_steps=0, at_end=False)  # bound, but never sampling
    assert callback.bind(adapter=object(), schedule=object(), sampler=object(), run_dir=tmp_path) is callback
    trainer = _trainer(callback)
    trainer.fit(BoringModel())
    assert trainer.global_step == 2


def test_write_refuses_when_unbound():
    class Trainer:
        global_step, is_global_zero = 0, True

    with pytest.raises(PreviewsNotBound):
        SamplePreviews(["a prompt"]).write(Trainer(), None)


def test_code_defaults_agree_with_the_config_defaults():
    """A preview built in Python samples like one built from ``conf/callbacks/default.yaml`` (the
    guidance default used to be 4.0 in code and 2.0 in the config)."""
    import inspect
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).parents[1] / "conf" / "callbacks" / "default.yaml").samples
    params = inspect.signature(SamplePreviews.__init__).parameters
    shared = [key for key in conf if key in params and key != "prompts"]
    assert {"every_n_steps", "num_per_prompt", "steps", "guidance_scale", "at_end"} <= set(shared)
    for key in shared:
        assert params[key].default == conf[key], key
