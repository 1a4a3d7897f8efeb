"""SamplePreviews refuses to run unbound (it used to train silently without previews)."""

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
