"""One contract test over every adapter: the three of the package and the time-series example.

Each adapter is built from its own modality config, as training builds it, and must: write every
format it declares and read the file back; encode to exactly :attr:`shape`; survive an encode /
decode round trip; declare generation options that are checked (unknown names and bad values
refused with the name in the message), change the generated shape or the writer, and give
:attr:`shape` when none is given.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import ROOT
from omegaconf import OmegaConf

from multidiff.adapters.base import Adapter, GenerationOption
from multidiff.cli.compose import config_root
from multidiff.configuration import safe_instantiate

EXAMPLE = ROOT / "examples" / "timeseries"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

CONFIGS = {
    "image": config_root() / "conf" / "modality" / "image.yaml",
    "audio": config_root() / "conf" / "modality" / "audio.yaml",
    "video": config_root() / "conf" / "modality" / "video.yaml",
    "timeseries": EXAMPLE / "conf" / "modality" / "timeseries.yaml",
}
# a non-default value of each declared option, and what it must change in the shape to generate
OPTION_VALUES = {"duration": 0.5, "num_frames": 5, "fps": 4.0, "length": 64, "height": 24, "width": 20}


def build(name: str) -> Adapter:
    return safe_instantiate(OmegaConf.load(CONFIGS[name]), trusted=["mdts."])


def smooth(shape: tuple[int, ...]) -> torch.Tensor:
    """A smooth model tensor in about [-0.8, 0.8]: content every adapter can write and read back."""
    grids = torch.meshgrid(*[torch.linspace(0, 3, n) for n in shape[1:]], indexing="ij")
    x = sum(torch.sin(g * (k + 1)) for k, g in enumerate(grids)) / len(grids)
    return (0.8 * x).expand(shape).clone()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def adapter(request) -> Adapter:
    return build(request.param)


def test_shape_is_channels_first_and_generation_defaults_give_it(adapter):
    shape = tuple(adapter.shape)
    assert len(shape) >= 2 and all(isinstance(n, int) and n > 0 for n in shape)
    defaults = adapter.read_options({})
    assert set(defaults) == {o.name for o in (*adapter.generation_options(), *adapter.region_options())}
    assert all(v is None for v in defaults.values())
    assert tuple(adapter.sample_shape(**defaults)) == shape


def test_an_input_to_edit_encodes_at_the_size_it_implies_and_regions_are_masks(adapter):
    """Editing (docs/editing.md): an input encodes at the sample size its own options imply, no
    region means no mask, and a mask or the training regions are (1, *dims) in [0, 1]."""
    raw = adapter.decode(smooth(tuple(adapter.shape)))
    options = {o.name: None for o in adapter.generation_options()} | adapter.input_options(raw)
    shape = tuple(adapter.sample_shape(**options))
    x = adapter.encode_input(raw, **options)
    assert tuple(x.shape) == shape
    torch.testing.assert_close(x, adapter.encode(raw), atol=1e-5, rtol=0)  # an input of the training size
    assert adapter.keep_mask(shape, raw=raw) is None
    keep = adapter.random_keep_mask(shape[1:], torch.Generator().manual_seed(0))
    assert keep.shape == (1, *shape[1:]) and 0 < keep.mean() < 1
    if type(adapter).keep_mask is Adapter.keep_mask:  # the default: a mask tensor in model space (white: regenerate)
        mask = torch.zeros(1, *shape[1:])
        mask[..., :1] = 1
        keep = adapter.keep_mask(shape, raw=raw, mask=mask)
        assert keep.shape == (1, *shape[1:]) and keep[..., :1].eq(0).all() and keep[..., 1:].eq(1).all()


def test_every_format_writes_and_reads_back(adapter, tmp_path):
    raw = adapter.decode(smooth(tuple(adapter.shape)))
    for fmt in adapter.formats or (adapter.suffix.lstrip("."),):
        suffix = adapter.check_format(fmt)
        path = tmp_path / f"sample{suffix}"
        adapter.save(raw, path, **adapter.save_options(**adapter.read_options({})))
        assert path.stat().st_size > 0, fmt
        if suffix in adapter.extensions:  # the formats it also reads (lossy ones too): same shape back
            back = adapter.load(path)
            assert tuple(back.shape) == tuple(raw.shape), fmt
            assert tuple(adapter.encode(back).shape) == tuple(adapter.shape), fmt
    with pytest.raises(ValueError, match="format='xyz'"):
        adapter.check_format("xyz")


def test_encode_decode_round_trip(adapter):
    x0 = smooth(tuple(adapter.shape))
    again = adapter.encode(adapter.decode(x0))
    assert tuple(again.shape) == tuple(x0.shape) and again.dtype == torch.float32
    correlation = torch.corrcoef(torch.stack([x0.flatten(), again.flatten()]))[0, 1]
    assert correlation > 0.95, correlation  # audio goes through a vocoder: close, not exact


def test_generation_options_are_checked_and_take_effect(adapter, tmp_path):
    with pytest.raises(ValueError, match="unknown generation option bogus"):
        adapter.read_options({"bogus": 1})
    base = adapter.read_options({})
    for option in adapter.generation_options():
        assert isinstance(option, GenerationOption) and option.help and option.name in option.describe()
        for bad in ("x", -1, 0):
            with pytest.raises(ValueError, match=option.name):
                adapter.read_options({option.name: bad})
        value = OPTION_VALUES[option.name]
        given = adapter.read_options({option.name: value})
        effect = (adapter.sample_shape(**given), adapter.metadata(**given), adapter.save_options(**given))
        assert effect != (adapter.sample_shape(**base), adapter.metadata(**base), adapter.save_options(**base)), option
        shape = tuple(adapter.sample_shape(**given))
        raw = adapter.fit_length(adapter.decode(smooth(shape)), **given)
        path = tmp_path / f"{option.name}{adapter.suffix}"
        adapter.save(raw, path, **adapter.save_options(**given))
        assert tuple(adapter.load(path).shape) == tuple(raw.shape)


def test_generation_option_values_are_typed():
    option = GenerationOption("steps_like", int, None, "help", minimum=0)
    assert option.check(3) == 3 and option.check(None) is None
    for bad, why in ((True, "an integer"), (2.5, "an integer"), (0, "a positive integer"), ("3", "an integer")):
        with pytest.raises(ValueError, match=f"steps_like={bad!r} is invalid: it must be {why}"):
            option.check(bad)
    real = GenerationOption("seconds", float, None, "help", minimum=0)
    assert real.check(2) == 2.0 and isinstance(real.check(2), float)
    with pytest.raises(ValueError, match="positive number"):
        real.check(float("inf"))
    choice = GenerationOption("mode", str, "a", "help", choices=("a", "b"))
    with pytest.raises(ValueError, match="choose one of a, b"):
        choice.check("c")
