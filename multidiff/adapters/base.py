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
        what = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                list: "a list"}.get(self.type, self.type.__name__)
        given = value  # messages echo what the user wrote (2, not 2.0)
        if self.type is list:  # the adapter checks the items (regions: spans, boxes, frame indices)
            if not isinstance(value, list | tuple):
                raise ValueError(f"{self.name}={given!r} is invalid: it must be a list, e.g. {self.name}=[0,1]")
            return [list(v) if isinstance(v, list | tuple) else v for v in value]
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
        default = ("none" if self.type is list else "from the model") if self.default is None else repr(self.default)
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
      :meth:`condition_inputs` ``(**options)``: values the model is conditioned on that follow from
      the request (a windowed waveform's ``seconds``); none by default.
    - :attr:`formats`: the suffixes :meth:`save` writes (``generate format=`` picks one).
    - editing (``generate init=FILE mask=... strength=...``, ``docs/editing.md``):
      :meth:`region_options` (the modality's ways to describe a region: a box, a span of seconds,
      frame indices), :meth:`keep_mask` (those, or a mask file read by :meth:`load_mask`, as a
      mask in model-tensor space), :meth:`input_options` (the generation options an input implies,
      e.g. its duration) and :meth:`encode_input` (an input encoded at the requested size); for
      mask-conditioned training, :meth:`random_keep_mask` (the modality's own random regions).
      The defaults treat a mask as a tensor of the model's own shape and draw random boxes.
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

    def log_preview(self, logger: object, grid: Tensor, step: int, *, prefix: str = "") -> None:
        """Send a preview grid ``(3, H, W)`` to a Lightning logger that takes images (TensorBoard); others skip.

        ``prefix`` goes before the tag (a model of several modalities logs each under its name).
        """
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(f"{prefix}samples", grid, step)

    def log_media(self, logger: object, raws: list[Tensor], prompts: list[str], step: int, out_dir: Path, *,
                  prefix: str = "") -> None:
        """Modality-specific media for the logger and ``out_dir`` (e.g. audio clips); none by default.

        ``raws`` are decoded preview samples (one per prompt in ``prompts``), ``step`` the global step,
        ``prefix`` goes before the logger's tags.
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
        declared = {o.name: o for o in (*self.generation_options(), *self.region_options())}
        unknown = sorted(set(options) - set(declared))
        if unknown:
            have = "; ".join(o.describe() for o in declared.values()) or "none"
            raise ValueError(f"unknown generation option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for "
                             f"this model ({type(self).__name__}); its options: {have}")
        return {name: option.check(options.get(name)) for name, option in declared.items()}

    # -- editing -------------------------------------------------------------------------------

    def region_options(self) -> tuple[GenerationOption, ...]:
        """The options that describe a region to edit (``keep_*`` / ``fill_*``), handed to
        :meth:`keep_mask`; none by default (a mask tensor or file still works)."""
        return ()

    def input_options(self, raw: Tensor) -> dict[str, Any]:
        """Generation options that make the sample the size of the input ``raw`` (e.g. an audio
        file's duration), used where the user gives none; none by default (a fixed size)."""
        return {}

    def encode_input(self, raw: Tensor, **options) -> Tensor:
        """The input of an edit as a model tensor of :meth:`sample_shape` ``(**options)``; default
        :meth:`encode`, which must already give that shape."""
        x = self.encode(raw)
        want = tuple(self.sample_shape(**options))
        if tuple(x.shape) != want:
            raise ValueError(f"the input encodes to shape {tuple(x.shape)} but the sample has shape {want}; "
                             "generate at the input's own size")
        return x

    def load_mask(self, path: str | Path) -> Tensor:
        """A mask file (white: regenerate, black: keep) as ``(1, h, w)`` in ``[0, 1]``; default: an image."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im = im.convert("L")
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(1, im.height, im.width)
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read mask {path}: {e}; a mask is an image file (white: regenerate, "
                             "black: keep the input)") from None
        return data.float() / 255

    def keep_mask(self, shape: tuple[int, ...], *, raw: Tensor | None = None, mask: Tensor | None = None,
                  **region) -> Tensor | None:
        """Which part of a sample of model shape ``shape`` ``(C, *dims)`` keeps the input:
        ``(1, *dims)`` float in ``[0, 1]`` (1: keep), or ``None`` when nothing describes a region.

        ``mask`` (white / 1: regenerate) is a tensor the adapter's writer would accept, or what
        :meth:`load_mask` read; ``raw`` is the input (its size, its length); ``region`` holds
        :meth:`region_options` (``None`` where not given). Default: ``mask`` is already in model
        space, ``(1, *dims)`` or ``(*dims)``.
        """
        if mask is None:
            return None
        m = mask.float()
        if m.ndim == len(shape) - 1:
            m = m[None]
        if tuple(m.shape) != (1, *shape[1:]):
            raise ValueError(f"the mask has shape {tuple(mask.shape)} but this model's samples need a mask of "
                             f"shape {(1, *shape[1:])} (white / 1: regenerate)")
        return 1 - (m >= 0.5).float()

    def random_keep_mask(self, dims: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """A random region for mask-conditioned training, ``(1, *dims)`` (1: kept), over model
        (or latent) axes ``dims``: a box to regenerate spanning each axis either whole or a
        quarter to three quarters of it, never the whole item. Adapters draw their own kinds
        (spans of time, frame subsets); ``generator`` makes it reproducible."""
        return random_box_keep(dims, generator)

    def sample_shape(self, **options) -> tuple[int, ...]:
        """Model-tensor shape ``(C, *dims)`` to generate for :meth:`read_options`' result; default :attr:`shape`."""
        return self.shape

    def condition_inputs(self, **options) -> dict[str, list[float]]:
        """Input fields of the :class:`~multidiff.core.cond.Cond` that follow from generation options,
        one item's values (e.g. ``seconds``: where a windowed waveform's audio starts and ends, see
        :class:`~multidiff.adapters.waveform.WaveformAdapter`); none by default."""
        return {}

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


def uniform_int(lo: int, hi: int, generator: torch.Generator) -> int:
    """An integer in ``[lo, hi]`` from ``generator`` (drawn on its device)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator, device=generator.device).item())


def random_box_keep(dims: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """``(1, *dims)`` ones with one random box zeroed: along each axis the box is the whole axis or
    ``[n/4, 3n/4]`` of it (at a random offset), and at least one axis is partial."""
    dims = tuple(int(d) for d in dims)
    whole = [bool(uniform_int(0, 1, generator)) for _ in dims]
    partial = [i for i, d in enumerate(dims) if d > 1]
    if all(whole) and partial:
        whole[partial[uniform_int(0, len(partial) - 1, generator)]] = False
    keep = torch.ones(1, *dims)
    box = []
    for n, w in zip(dims, whole):
        if w or n == 1:
            box.append(slice(None))
            continue
        length = uniform_int(max(1, n // 4), max(1, (3 * n) // 4), generator)
        start = uniform_int(0, n - length, generator)
        box.append(slice(start, start + length))
    keep[(slice(None), *box)] = 0
    return keep


def random_span_keep(dims: tuple[int, ...], generator: torch.Generator, *, axis: int = -1) -> Tensor:
    """``(1, *dims)``: along ``axis`` (time), one of a continuation (the start kept), a lead-in (the
    end kept) or a gap (both ends kept); the generated part is a quarter to three quarters of it."""
    dims = tuple(int(d) for d in dims)
    n = dims[axis]
    keep = torch.ones(1, *dims)
    if n < 2:
        return random_box_keep(dims, generator)
    length = uniform_int(max(1, n // 4), max(1, (3 * n) // 4), generator)
    kind = uniform_int(0, 2, generator)
    start = n - length if kind == 0 else 0 if kind == 1 else uniform_int(1, max(1, n - length - 1), generator)
    index = [slice(None)] * keep.ndim
    index[axis if axis < 0 else axis + 1] = slice(start, start + length)
    keep[tuple(index)] = 0
    return keep


def mask_plane(mask: Tensor, size: tuple[int, int], what: str) -> Tensor:
    """A 2-D mask image (``(h, w)`` or ``(C, h, w)``, channels averaged) as ``(1, h, w)``, checked to be
    ``size`` ``(h, w)``, the size of ``what`` (e.g. "the input image") it is drawn over."""
    m = mask.float()
    m = m.mean(0, keepdim=True) if m.ndim == 3 else m.reshape(1, *m.shape[-2:])
    if tuple(m.shape[-2:]) != tuple(size):
        raise ValueError(f"the mask is {m.shape[-1]}x{m.shape[-2]} pixels but {what} is {size[1]}x{size[0]}; draw "
                         "the mask at that size (white: regenerate, black: keep)")
    return m


def spans_of(name: str, value, *, upper: float, unit: str) -> list[tuple[float, float]]:
    """A region option ``[a, b]`` or ``[[a, b], ...]`` as checked spans ``0 <= a < b <= upper``."""
    spans = [value] if value and not isinstance(value[0], list | tuple) else value
    out = []
    for span in spans:
        ok = isinstance(span, list | tuple) and len(span) == 2 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in span)
        if not ok or not 0 <= span[0] < span[1]:
            raise ValueError(f"{name}={value!r} is invalid: give a span [start, end] in {unit} with 0 <= start < end, "
                             f"or a list of them, e.g. {name}=[[0,0.5],[1,1.5]]")
        if span[1] > upper + 1e-9:
            raise ValueError(f"{name}={value!r} reaches {span[1]:g} {unit}, past the end of the sample ({upper:g} {unit}); "
                             "keep spans within it (or ask for a longer sample)")
        out.append((float(span[0]), float(span[1])))
    if not out:
        raise ValueError(f"{name}=[] is empty: give a span [start, end] in {unit}")
    return out


def preview_grid(images: list[Tensor], nrow: int = 8, padding: int = 2, min_side: int = 64) -> Tensor:
    """Tile ``(3, H, W)`` previews into one grid image; tiles smaller than ``min_side`` are
    enlarged (nearest neighbour) so that tiny samples stay visible."""
    from torchvision.utils import make_grid

    batch = torch.stack(images)
    scale = -(-min_side // min(batch.shape[-2:]))
    if scale > 1:
        batch = torch.nn.functional.interpolate(batch, scale_factor=scale, mode="nearest")
    return make_grid(batch, nrow=nrow, padding=padding, pad_value=1.0)
