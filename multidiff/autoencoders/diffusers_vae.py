"""A pretrained diffusers autoencoder, loaded from a local directory, as the latent stage.

``autoencoder.path`` is a directory written by diffusers' ``save_pretrained`` (``config.json`` with
``_class_name`` + safetensors weights). The class name picks one entry of :data:`FAMILIES`, which
says what data the network takes and reads its downsampling factors, latent channels and data
channels from the config (nothing is downloaded, no pickle is read):

* ``AutoencoderKL``: images ``(C, H, W)``, or clips ``(C, T, H, W)`` one frame at a time
  (``per_frame=true``); ``2 ** (len(block_out_channels) - 1)`` per spatial axis.
* ``AutoencoderOobleck``: 1-D signals ``(C, L)`` (Stable Audio waveforms); ``prod(downsampling_ratios)``.
* ``AutoencoderKLWan``: clips ``(C, T, H, W)``; causal in time, so ``T`` frames become
  ``1 + (T - 1) / f`` latent frames (the first frame is encoded alone) and clips are padded to
  ``T = 1 + k * f``.

``scale_mode=pretrained`` normalizes as diffusers' pipelines do: ``(z - shift_factor) * scaling_factor``,
or ``(z - latents_mean) * scaling_factor / latents_std`` where the config has per-channel statistics.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from multidiff.autoencoders.base import WEIGHTS, AutoencoderError, LatentStage, from_frames, to_frames

BUFFERS = ("latent_shift", "latent_scale", "scale_fitted")
DIFFUSERS_DIR = "diffusers"


@dataclass(frozen=True)
class _Family:
    """How multidiff drives one diffusers autoencoder class (all read from its full config)."""

    rank: int  # data rank the network takes: 1 (C, L), 2 (C, H, W) or 3 (C, T, H, W)
    channels: Callable[[dict[str, Any]], tuple[int, int]]  # data channels (in, out)
    latent_channels: Callable[[dict[str, Any]], int]
    factors: Callable[[dict[str, Any]], tuple[int, ...]]  # per axis of the network's input
    per_frame: bool = False  # a clip may be encoded frame by frame with this 2-D network
    causal_time: bool = False  # axis 0 is time, compressed as 1 + (T - 1) / f


def _kl_factors(cfg: dict[str, Any]) -> tuple[int, ...]:
    # every down block but the last halves H and W
    return (2 ** (len(cfg["block_out_channels"]) - 1),) * 2


def _wan_patch(cfg: dict[str, Any]) -> int:
    return int(cfg.get("patch_size") or 1)


def _wan_factors(cfg: dict[str, Any]) -> tuple[int, ...]:
    # The encoder's levels 0 .. len(dim_mult)-2 halve H, W and, where temperal_downsample says so, T;
    # the decoder reads the same list reversed. The config's scale_factor_* are metadata and may disagree.
    levels = len(cfg["dim_mult"]) - 1
    down = list(cfg["temperal_downsample"])
    time_enc, time_dec = 2 ** sum(map(bool, down[:levels])), 2 ** sum(map(bool, down[::-1][:levels]))
    if time_enc != time_dec or 4 % time_enc:
        raise AutoencoderError(
            f"this AutoencoderKLWan compresses time by {time_enc} on encode but {time_dec} on decode "
            f"(temperal_downsample={down}, dim_mult={list(cfg['dim_mult'])}), or by more than the 4-frame chunks "
            "diffusers encodes; its latents cannot be cropped back to the clip: "
            "set autoencoder.path to a consistent Wan VAE"
        )
    return (time_enc, *(2**levels * _wan_patch(cfg),) * 2)


FAMILIES: dict[str, _Family] = {
    "AutoencoderKL": _Family(
        rank=2, per_frame=True, factors=_kl_factors,
        channels=lambda c: (int(c["in_channels"]), int(c["out_channels"])),
        latent_channels=lambda c: int(c["latent_channels"]),
    ),
    "AutoencoderOobleck": _Family(
        rank=1, factors=lambda c: (math.prod(int(r) for r in c["downsampling_ratios"]),),
        channels=lambda c: (int(c["audio_channels"]),) * 2,
        latent_channels=lambda c: int(c["decoder_input_channels"]),
    ),
    "AutoencoderKLWan": _Family(
        rank=3, causal_time=True, factors=_wan_factors,
        # patchify folds patch_size**2 pixels into the channels before the first convolution
        channels=lambda c: (int(c["in_channels"]) // _wan_patch(c) ** 2, int(c["out_channels"]) // _wan_patch(c) ** 2),
        latent_channels=lambda c: int(c["z_dim"]),
    ),
}
RANK_NAMES = {1: "signals (C, L)", 2: "images (C, H, W)", 3: "clips (C, T, H, W)"}


def _diffusers_class(name: str) -> type:
    import diffusers  # slow to import: only when a diffusers stage is built

    return getattr(diffusers, name)


def read_config(path: Path) -> tuple[type, _Family, dict[str, Any]]:
    """The diffusers class, its :data:`FAMILIES` entry and its full config (``__init__`` defaults
    under ``config.json``) of the saved model at ``path``; raises :class:`AutoencoderError`."""
    fix = "set autoencoder.path to a local directory written by diffusers' save_pretrained (config.json + safetensors)"
    if not path.is_dir():
        raise AutoencoderError(f"autoencoder.path={path} is not a directory: {fix}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise AutoencoderError(f"autoencoder.path={path} holds no config.json (not a saved diffusers model): {fix}")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AutoencoderError(f"autoencoder.path={path}: config.json cannot be read ({err}): {fix}") from err
    name = str(raw.get("_class_name"))
    if name not in FAMILIES:
        raise AutoencoderError(
            f"autoencoder.path={path} holds a diffusers {name!r}, which multidiff cannot use as a latent stage; "
            f"supported classes: {', '.join(FAMILIES)}. Set autoencoder.path to one of those "
            "(or train an autoencoder: task=autoencoder)"
        )
    cls = _diffusers_class(name)
    params = inspect.signature(cls.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return cls, FAMILIES[name], {**defaults, **raw}


def pretrained_scale(cfg: dict[str, Any], latent_channels: int) -> tuple[Tensor, Tensor]:
    """``(shift, scale)`` per latent channel so that ``(z - shift) * scale`` is what diffusers' pipelines
    feed their denoiser: ``latents_mean`` / ``latents_std`` where given (SDXL-style, Wan), else
    ``shift_factor`` (SD3, Flux); ``scaling_factor`` on top (absent, as in Wan and Oobleck: 1)."""
    factor = float(cfg.get("scaling_factor") or 1.0)
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is not None and std is not None:
        shift, scale = torch.tensor(mean, dtype=torch.float32), factor / torch.tensor(std, dtype=torch.float32)
    else:
        shift, scale = torch.tensor(float(cfg.get("shift_factor") or 0.0)), torch.tensor(factor)
    if shift.numel() not in (1, latent_channels) or scale.numel() not in (1, latent_channels):
        raise AutoencoderError(f"the model's latents_mean/latents_std have {shift.numel()}/{scale.numel()} values for "
                               f"{latent_channels} latent channels: use autoencoder.scale_mode=channel instead")
    return shift.expand(latent_channels), scale.expand(latent_channels)


class DiffusersAutoencoder(LatentStage):
    """A frozen diffusers autoencoder (``self.model``) as the latent stage.

    Args:
        shape: ``(C, *dims)`` of one data item (from the adapter).
        path: local directory saved by diffusers (``config.json`` + safetensors weights).
        per_frame: encode each frame of clips ``(C, T, H, W)`` with an image autoencoder (AutoencoderKL).
        scale_mode: ``pretrained`` (the config's scaling, as diffusers' pipelines) or ``none`` /
            ``global`` / ``channel`` (fitted on the training data, see :class:`LatentStage`).

    Encoding uses the posterior's mode (its mean): the stage is deterministic, so cached latents are reproducible.
    """

    def __init__(self, *, shape: Sequence[int], path: str | Path, per_frame: bool = False,
                 scale_mode: str = "pretrained") -> None:
        shape, path = tuple(int(s) for s in shape), Path(path)
        cls, family, cfg = read_config(path)
        _check_data(path, cls.__name__, family, cfg, shape, per_frame)
        latent_channels = family.latent_channels(cfg)
        factors = family.factors(cfg)
        super().__init__(shape=shape, latent_channels=latent_channels, scale_mode=scale_mode,
                         factors=(1, *factors) if per_frame else factors)
        self.family, self.per_frame, self.path = family, bool(per_frame), path
        self._options = {"per_frame": bool(per_frame), "scale_mode": scale_mode}
        try:
            from diffusers.utils import is_accelerate_available

            # low_cpu_mem_usage needs accelerate; asking for it without accelerate only prints advice
            model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                        low_cpu_mem_usage=is_accelerate_available())
        except (OSError, ValueError) as err:  # no safetensors weights, or weights that do not fit the config
            raise AutoencoderError(
                f"autoencoder.path={path}: the {cls.__name__} weights cannot be loaded ({err}); "
                "save the model with diffusers' save_pretrained(..., safe_serialization=True)"
            ) from err
        self.model = model.eval().requires_grad_(False)
        if scale_mode == "pretrained":
            self.set_scale(*pretrained_scale(cfg, latent_channels))

    @staticmethod
    def check_config(*, path: str | Path, shape: Sequence[int] | None = None, per_frame: bool = False,
                     **_: Any) -> None:
        """Before anything is built (see :func:`multidiff.configuration.check_config`): the directory,
        its config and, given ``shape``, the data's rank and channels; no weights are read."""
        cls, family, cfg = read_config(Path(path))
        if shape is not None:
            _check_data(Path(path), cls.__name__, family, cfg, tuple(int(s) for s in shape), per_frame)
            family.factors(cfg)

    # -- shapes: Wan's causal time axis keeps its first frame, so T -> 1 + ceil((T - 1) / f) --------
    def _latent_size(self, axis: int, size: int) -> int:
        f = self.factors[axis]
        if axis == 0 and self.family.causal_time:
            return 1 + math.ceil((size - 1) / f)
        return math.ceil(size / f)

    def _padded_size(self, axis: int, size: int) -> int:
        """The size along data ``axis`` that encode needs (and decode gives back)."""
        f, n = self.factors[axis], self._latent_size(axis, size)
        return 1 + (n - 1) * f if axis == 0 and self.family.causal_time else n * f

    def latent_shape(self, shape: Sequence[int] | None = None) -> tuple[int, ...]:
        """``(C', *dims')`` of the latent of one item of data shape ``shape`` (default :attr:`shape`)."""
        dims = tuple(self.shape if shape is None else shape)[1:]
        return (self.latent_channels, *(self._latent_size(i, d) for i, d in enumerate(dims)))

    def pad(self, x: Tensor) -> Tensor:
        """``x`` ``(B, C, *dims)`` padded (replicate, at the end of each axis) to the sizes the network takes."""
        extra = [self._padded_size(i, d) - d for i, d in enumerate(x.shape[2:])]
        if not any(extra):
            return x
        return F.pad(x, [p for e in reversed(extra) for p in (0, e)], mode="replicate")

    # -- the network ---------------------------------------------------------------------------
    def encode_raw(self, x: Tensor) -> Tensor:
        """Padded data ``(B, C, *dims)`` -> posterior mode ``(B, C', *dims')`` (in ``x``'s dtype)."""
        h = to_frames(x) if self.per_frame else x
        z = self.model.encode(h.to(self.model.dtype)).latent_dist.mode().to(x.dtype)
        return from_frames(z, x.shape[0]) if self.per_frame else z

    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latents ``(B, C', *dims')`` -> data ``(B, C, *padded dims)`` (in ``z``'s dtype)."""
        h = to_frames(z) if self.per_frame else z
        x = self.model.decode(h.to(self.model.dtype)).sample.to(z.dtype)
        return from_frames(x, z.shape[0]) if self.per_frame else x

    # -- persistence: diffusers' own layout for the network, safetensors for the normalization ---
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``stage.json``, the network under ``diffusers/`` and the three normalization buffers."""
        directory = self.write_stage_info(directory)
        self.model.save_pretrained(directory / DIFFUSERS_DIR, safe_serialization=True)
        save_file({k: getattr(self, k).detach().contiguous().cpu() for k in BUFFERS}, directory / WEIGHTS)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, shape: Sequence[int],
                        options: dict[str, Any]) -> DiffusersAutoencoder:
        """Rebuild a stage that :meth:`save_pretrained` wrote to ``directory``."""
        directory = Path(directory)
        stage = cls(shape=shape, path=directory / DIFFUSERS_DIR, **options)
        buffers = load_file(directory / WEIGHTS)
        missing = [k for k in BUFFERS if k not in buffers]
        if missing:
            raise AutoencoderError(f"{directory / WEIGHTS} lacks {', '.join(missing)}: not a saved diffusers stage")
        with torch.no_grad():
            for key in BUFFERS:
                getattr(stage, key).copy_(buffers[key])
        return stage


def _check_data(path: Path, name: str, family: _Family, cfg: dict[str, Any], shape: tuple[int, ...],
                per_frame: bool) -> None:
    """Raise :class:`AutoencoderError` unless the model takes items of ``shape`` (rank and channels)."""
    rank = len(shape) - 1
    if per_frame and not (family.per_frame and rank == 3):
        raise AutoencoderError(
            f"autoencoder.per_frame=true encodes the frames of clips (C, T, H, W) with an image autoencoder, but "
            f"autoencoder.path={path} holds a {name} and the modality gives items of shape {shape}: "
            "set autoencoder.per_frame=false"
        )
    if (rank - 1 if per_frame else rank) != family.rank:
        clips = family.per_frame and rank == 3
        fix = "set autoencoder.per_frame=true" if clips else f"set autoencoder.path to a model for rank-{rank} data"
        raise AutoencoderError(
            f"autoencoder.path={path} holds a {name}, which takes {RANK_NAMES[family.rank]}"
            f"{' (or clips, per frame)' if family.per_frame else ''}, but the modality gives items of shape {shape} "
            f"(rank {rank}): {fix}"
        )
    channels = family.channels(cfg)
    if any(c != shape[0] for c in channels):
        raise AutoencoderError(
            f"autoencoder.path={path} holds a {name} for {channels[0]}-channel data "
            f"(in {channels[0]}, out {channels[1]}), "
            f"but the modality gives {shape[0]} channels (item shape {shape}): set autoencoder.path to a model for "
            f"{shape[0]} channels or change the modality's channels"
        )

