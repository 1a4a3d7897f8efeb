"""The adapter contract: the only place that knows what a tensor means."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class GenerationOption:
    """One option that ``generate`` takes for a modality (``duration``, ``num_frames``, ``length``...).

    ``default`` ``None`` means "follow the model" (e.g. the training length); ``minimum`` is an
    exclusive lower bound for numbers (``0``: positive); ``choices`` restricts strings.
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    minimum: float | None = None
    choices: tuple = ()

    def check(self, value: Any) -> Any:
        """``value`` converted to :attr:`type` (an int is a valid float), or ``ValueError`` saying why not."""
        if value is None:
            return None
        what = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(self.type, self.type.__name__)
        given = value  # messages echo what the user wrote (2, not 2.0)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise ValueError(f"{self.name}={given!r} is invalid: it must be {what}")
        if self.type in (int, float):
            if self.minimum == 0:
                what = what.replace("an integer", "a positive integer").replace("a number", "a positive number")
            elif self.minimum is not None:
                what = f"{what} > {self.minimum}"
            if not math.isfinite(value) or (self.minimum is not None and value <= self.minimum):
                raise ValueError(f"{self.name}={given!r} is invalid: it must be {what}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name}={value!r} is invalid: choose one of {', '.join(map(str, self.choices))}")
        return value

    def describe(self) -> str:
        """``name (type, default D): help`` -- one line of ``--help``."""
        default = "from the model" if self.default is None else repr(self.default)
        return f"{self.name} ({self.type.__name__}, default {default}): {self.help}"


class Adapter:
    """Base class of modality adapters: the public contract a new modality implements.

    An adapter is the only code that knows what a tensor means. It turns one file into a *raw*
    tensor (modality units: pixels in ``[0, 1]``, a waveform, a multichannel series), a raw
    tensor into a *model* tensor ``x0`` of shape :attr:`shape` ``(C, *dims)`` (any rank; the
    core, the training module and the samplers only ever see ``(B, C, *dims)``), and back.

    **Required** (the smallest set a new modality implements; the defaults raise
    ``NotImplementedError``):

    - :attr:`shape` -> ``(C, *dims)``: the model tensor of one training sample;
    - :meth:`load` ``(path) -> raw``: read one data file (suffixes in :attr:`extensions`);
    - :meth:`encode` ``(raw) -> x0``: raw -> model tensor of shape :attr:`shape`, roughly unit scale;
    - :meth:`decode` ``(x0) -> raw``: the inverse, one sample ``(C, *dims)`` -> raw (no batch dim);
    - :meth:`save` ``(raw, path)``: write one generated sample (the suffix of ``path`` picks the format).

    **Optional**, with defaults here:

    - :attr:`extensions` (``()``: set it so :class:`~multidiff.datasets.folder.CaptionFolder`
      finds your files) and :attr:`suffix` (``.bin``: the file type ``generate`` writes);
    - :meth:`preview` ``(raw) -> (3, H, W)`` in ``[0, 1]`` (default: the first 2-D slice, min-max
      scaled), :meth:`write_previews` (tiles previews into ``samples/step_N.png``),
      :meth:`log_preview` (sends the grid to image-taking loggers), :meth:`log_media` (extra media,
      e.g. audio clips; none by default);
    - :meth:`generation_options` -> the options ``generate`` takes for this modality
      (:class:`GenerationOption`: name, type, default, one line of help; e.g. a duration, a frame
      count), checked by :meth:`read_options`; ``multidiff generate model=DIR --help`` lists them,
      and ``multidiff generate ... name=value`` passes them here without the CLI naming any;
    - :meth:`sample_shape` ``(**options)``, :meth:`metadata` ``(**options)``,
      :meth:`fit_length` ``(raw, **options)`` and :meth:`save_options` ``(**options)``: the
      model-tensor shape to generate, extra ``metadata.jsonl`` fields, a decoded sample fitted to
      the request (e.g. audio trimmed to the exact duration) and keyword arguments for :meth:`save`
      (e.g. a clip's playback rate); defaults: :attr:`shape`, ``{}``, unchanged, ``{}``.
    - :attr:`formats`: the suffixes :meth:`save` writes (``generate format=`` picks one).
    - :meth:`reconstruction_terms` ``(x_hat, x)``: the modality's own losses for training an
      autoencoder on its tensors (e.g. a multi-resolution spectral loss of a waveform); none by default.

    Adapters are built from the ``modality`` config with ``_target_`` and keyword arguments, so
    give ``__init__`` plain typed keyword options. See ``docs/new_modality.md`` for a worked example.
    """

    extensions: tuple[str, ...] = ()
    """File suffixes ``load`` reads (lower case, with the dot)."""
    suffix: str = ".bin"
    """Default file suffix ``save`` writes for generated samples."""
    formats: tuple[str, ...] = ()
    """Suffixes ``save`` can write (without the dot; empty: only :attr:`suffix`)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C, *dims)`` of one encoded training sample (the backbone config reads its channels)."""
        raise NotImplementedError(f"{type(self).__name__} must define the property 'shape' -> (C, *dims)")

    def load(self, path: str | Path) -> Tensor:
        """Read one data file to a raw tensor (its own size; ``encode`` fits it to :attr:`shape`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement load(path) -> raw tensor")

    def encode(self, raw: Tensor) -> Tensor:
        """Raw tensor of one sample -> model tensor ``x0`` of shape :attr:`shape`, float32, roughly unit scale."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode(raw) -> x0 of shape self.shape")

    def decode(self, x0: Tensor) -> Tensor:
        """Model tensor of one sample ``(C, *dims)`` (dims may differ from training, see
        :meth:`sample_shape`) -> raw tensor, ready for :meth:`save` and :meth:`preview`."""
        raise NotImplementedError(f"{type(self).__name__} must implement decode(x0) -> raw tensor")

    def save(self, raw: Tensor, path: str | Path) -> None:
        """Write one raw sample to ``path``; its suffix (:attr:`suffix` or ``generate format=``) picks the format."""
        raise NotImplementedError(f"{type(self).__name__} must implement save(raw, path)")

    def preview(self, raw: Tensor) -> Tensor:
        """A ``(3, H, W)`` image in ``[0, 1]`` showing one raw sample; default: the first 2-D slice."""
        x = raw.float()
        while x.ndim > 3:
            x = x[:, 0]
        if x.ndim == 2:
            x = x[None]
        if x.ndim == 1:
            x = x[None, None]
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
        return x[:1].expand(3, *x.shape[1:]) if x.shape[0] != 3 else x

    def write_previews(self, raws: list[Tensor], stem: str | Path, *, nrow: int = 8) -> tuple[Path, Tensor]:
        """Tile ``preview(raw)`` of each sample into one grid, write it to ``stem`` + ``.png``.

        Returns the file and the grid ``(3, H, W)`` (for loggers that take images).
        """
        from torchvision.utils import save_image

        grid = preview_grid([self.preview(r) for r in raws], nrow=nrow)
        path = Path(stem).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        return path, grid

    def log_preview(self, logger: object, grid: Tensor, step: int) -> None:
        """Send a preview grid ``(3, H, W)`` to a Lightning logger that takes images (TensorBoard); others skip."""
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples", grid, step)

    def log_media(self, logger: object, raws: list[Tensor], prompts: list[str], step: int, out_dir: Path) -> None:
        """Modality-specific media for the logger and ``out_dir`` (e.g. audio clips); none by default.

        ``raws`` are decoded preview samples (one per prompt in ``prompts``), ``step`` the global step.
        """

    def generation_options(self) -> tuple[GenerationOption, ...]:
        """The options ``generate`` takes for this modality, with this model's defaults; none by default."""
        return ()

    def read_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``generate``'s modality options against :meth:`generation_options`.

        Returns every declared option, ``None`` where not given (the adapter's methods then use the
        model's default, which :attr:`GenerationOption.default` shows); ``ValueError`` names an unknown
        option and lists the declared ones, or says why a value is invalid.
        """
        declared = {o.name: o for o in self.generation_options()}
        unknown = sorted(set(options) - set(declared))
        if unknown:
            have = "; ".join(o.describe() for o in declared.values()) or "none"
            raise ValueError(f"unknown generation option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for "
                             f"this model ({type(self).__name__}); its options: {have}")
        return {name: option.check(options.get(name)) for name, option in declared.items()}

    def sample_shape(self, **options) -> tuple[int, ...]:
        """Model-tensor shape ``(C, *dims)`` to generate for :meth:`read_options`' result; default :attr:`shape`."""
        return self.shape

    def metadata(self, **options) -> dict:
        """Extra per-sample fields for ``metadata.jsonl`` (e.g. ``sample_rate``), JSON-serializable."""
        return {}

    def fit_length(self, raw: Tensor, **options) -> Tensor:
        """A decoded sample fitted to the request when raw units are finer than model units (audio
        samples vs. spectrogram frames); unchanged by default."""
        return raw

    def save_options(self, **options) -> dict:
        """Keyword arguments for :meth:`save` that follow from generation options (e.g. a clip's fps)."""
        return {}

    def reconstruction_terms(self, x_hat: Tensor, x: Tensor) -> dict[str, Tensor]:
        """Modality-specific reconstruction losses of model tensors ``x_hat`` against ``x`` (both
        ``(B, C, *dims)``), each ``(B,)``; ``task=autoencoder`` adds them weighted by
        ``reconstruction.spectral_weight``. None by default (the L1/L2 term serves every modality)."""
        return {}

    def check_format(self, suffix: str) -> str:
        """``suffix`` (``".gif"`` or ``"gif"``) as a file suffix ``save`` writes, or ``ValueError``."""
        suffix = "." + suffix.lstrip(".").lower()
        allowed = self.formats or (self.suffix.lstrip("."),)
        if suffix[1:] not in allowed:
            raise ValueError(f"format={suffix[1:]!r} is invalid for this model ({type(self).__name__}): "
                             f"choose one of {', '.join(allowed)}")
        return suffix


def preview_grid(images: list[Tensor], nrow: int = 8, padding: int = 2, min_side: int = 64) -> Tensor:
    """Tile ``(3, H, W)`` previews into one grid image; tiles smaller than ``min_side`` are
    enlarged (nearest neighbour) so that tiny samples stay visible."""
    from torchvision.utils import make_grid

    batch = torch.stack(images)
    scale = -(-min_side // min(batch.shape[-2:]))
    if scale > 1:
        batch = torch.nn.functional.interpolate(batch, scale_factor=scale, mode="nearest")
    return make_grid(batch, nrow=nrow, padding=padding, pad_value=1.0)
