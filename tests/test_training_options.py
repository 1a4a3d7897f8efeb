"""The typed training options: one definition, agreeing with conf/train.yaml, one-paragraph errors."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from multidiff.cli.compose import config_root
from multidiff.training.options import OptionError, TrainingOptions


def test_defaults_agree_with_conf_train_yaml():
    """conf/train.yaml documents every option with the same default; neither has a key the other lacks."""
    documented = OmegaConf.to_container(OmegaConf.load(config_root() / "conf" / "train.yaml").training)
    defaults = {f.name: getattr(TrainingOptions(), f.name) for f in dataclasses.fields(TrainingOptions)}
    assert documented == defaults


def test_every_option_has_a_type_default_and_help():
    rows = TrainingOptions.describe()
    assert [r[0] for r in rows] == [f"training.{f.name}" for f in dataclasses.fields(TrainingOptions)]
    assert all(kind and help for _, kind, _, help in rows), rows
    assert ("training.nonfinite", "stop|skip", "stop") == rows[3][:3]
    assert ("training.inject_nan_at_step", "int|null", None) == rows[4][:3]


@pytest.mark.parametrize(("values", "message"), [
    ({"ema_decay": 1.0}, r"training.ema_decay=1.0 is invalid: it must be a number in \[0, 1\)"),
    ({"ema_decay": "high"}, r"training.ema_decay='high' is invalid: it must be a number"),
    ({"nonfinite": "ignore"}, r"training.nonfinite='ignore' is invalid: choose one of stop, skip"),
    ({"slice_items": -1}, r"training.slice_items=-1 is invalid: it must be a whole number >= 0"),
    ({"slice_items": 1.5}, r"training.slice_items=1.5 is invalid: it must be an integer"),
    ({"slice_dim": 0}, r"training.slice_dim=0 is invalid: it must be an item axis >= 1"),
    ({"channels_last": 1}, r"training.channels_last=1 is invalid: it must be true or false"),
    ({"compile_options": [1]}, r"training.compile_options=\[1\] is invalid: it must be a mapping"),
    ({"lr_scaling": "cubic"}, r"training.lr_scaling='cubic' is invalid: choose one of none, linear, sqrt"),
    ({"base_batch_size": 0}, r"training.base_batch_size=0 is invalid: it must be a positive integer or null"),
    ({"emma_decay": 0.9}, r"unknown key training.emma_decay: the options here are training.ema_decay, training.lr_scaling"),
])
def test_invalid_options_name_the_key(values, message):
    with pytest.raises(OptionError, match=message):
        TrainingOptions.from_config(values)


def test_valid_values_are_typed():
    options = TrainingOptions.from_config({"ema_decay": 0, "slice_sigma_scale": 2, "base_batch_size": None})
    assert options.ema_decay == 0.0 and isinstance(options.ema_decay, float)
    assert isinstance(options.slice_sigma_scale, float) and options.base_batch_size is None


def test_batch_and_shape_rules():
    options = TrainingOptions(slice_items=2, slice_dim=1)
    options.check_batch(4, (1, 8, 16, 16))
    with pytest.raises(OptionError, match=r"training.slice_items=2 is invalid: .* data.batch_size - 1 \(1\)"):
        options.check_batch(2, (1, 8, 16, 16))
    with pytest.raises(OptionError, match=r"training.slice_dim=3 does not name an axis of this model's items \(2, 64\)"):
        TrainingOptions(slice_items=1, slice_dim=3).check_shape((2, 64))
    TrainingOptions(slice_dim=3).check_shape((2, 64))  # no slicing: the axis is not read
