"""The latent stage contract: what sits between the adapter's tensors and the diffusion core.

The adapter turns files into data tensors ``x`` of shape ``(C, *dims)``; the stage turns a batch
``(B, C, *dims)`` into latents ``(B, C', *dims')`` that the backbone sees, and back. The core and
the training module only call the contract below, so they never learn whether they diffuse pixels
or latents. :class:`Identity` (the default) is exact and free.

Latents are normalized as EDM2 and Stable Diffusion do (``scaling_factor``, ``shift_factor``):
``z = (E(x) - shift) * scale``, with ``shift`` and ``scale`` estimated from the training data by
:meth:`LatentStage.fit_scale` and stored with the model (buffers, so checkpoints and exports carry
them). Inputs whose axes are not a multiple of the stage's downsampling factors are padded
(replicate) on encode; :meth:`LatentStage.decode` crops back to the shape it is given.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

STAGE_FILE = "stage.json"
WEIGHTS = "model.safetensors"
SCALE_MODES = ("none", "global", "channel", "pretrained")


class AutoencoderError(ValueError):
    """An autoencoder stage cannot be built or loaded; the message names the setting to change."""


class LatentStage(nn.Module):
    """Base of every latent stage.

    **Constructor** (keyword-only): ``shape`` ``(C, *dims)`` of one data item, passed by the model
    builder from the adapter (as for backbones), ``latent_channels``, ``factors`` (the
    downsampling factor of each data axis) and ``scale_mode``: ``none`` (latents as encoded),
    ``global`` (one shift and scale over all channels), ``channel`` (per channel, as EDM2) or
    ``pretrained`` (the values a published autoencoder ships, set by the subclass with
    :meth:`set_scale`).

    **Subclasses implement** ``encode_raw(x) -> z`` and ``decode_raw(z) -> x`` on batches whose
    axes are multiples of :attr:`factors`, and may override :meth:`save_pretrained` /
    :meth:`from_pretrained` (default: constructor options in ``stage.json`` + the state dict as
    safetensors).

    **Callers use** :meth:`latent_shape`, :meth:`encode`, :meth:`decode`, :meth:`latent_mask`, :meth:`normalize`
    (raw latents -> model latents, for latents cached on disk), :meth:`fit_scale`,
    :attr:`is_identity` and :meth:`fingerprint`.
    """

    ranks: ClassVar[tuple[int, ...]] = ()
    """Data ranks ``len(dims)`` the stage takes (empty: any)."""

    def __init__(self, *, shape: Sequence[int], latent_channels: int, factors: Sequence[int] | None = None,
                 scale_mode: str = "global") -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        rank = len(shape) - 1
        if rank < 1:
            raise AutoencoderError(f"{type(self).__name__} needs shape=(C, *dims) with at least one data axis, got {shape}")
        if self.ranks and rank not in self.ranks:
            raise AutoencoderError(
                f"{type(self).__name__} takes data of rank {' or '.join(map(str, self.ranks))}, but the modality gives "
                f"items of shape {shape} (rank {rank}); choose an autoencoder for rank-{rank} data (docs/latent.md)"
            )
        if scale_mode not in SCALE_MODES:
            raise AutoencoderError(f"autoencoder.scale_mode={scale_mode!r} is invalid: choose one of {', '.join(SCALE_MODES)}")
        self.shape, self.latent_channels, self.scale_mode = shape, int(latent_channels), scale_mode
        self.factors = tuple(int(f) for f in factors) if factors is not None else (1,) * rank
        if len(self.factors) != rank:
            raise AutoencoderError(f"{type(self).__name__}: {len(self.factors)} factors for {rank} data axes")
        self.register_buffer("latent_shift", torch.zeros(self.latent_channels))
        self.register_buffer("latent_scale", torch.ones(self.latent_channels))
        self.register_buffer("scale_fitted", torch.tensor(scale_mode == "none"))
        self._options: dict[str, Any] = {}

    # -- the contract -------------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        """True when encode and decode are the identity (nothing to cache or fit)."""
        return False

    def latent_shape(self, shape: Sequence[int] | None = None) -> tuple[int, ...]:
        """``(C', *dims')`` of the latent of one item of data shape ``shape`` (default :attr:`shape`)."""
        shape = tuple(self.shape if shape is None else shape)
        return (self.latent_channels, *(math.ceil(d / f) for d, f in zip(shape[1:], self.factors, strict=True)))

    def encode(self, x: Tensor) -> Tensor:
        """Data ``(B, C, *dims)`` -> normalized latents ``(B, C', *dims')``."""
        return self.normalize(self.encode_raw(self.pad(x)))

    def decode(self, z: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        """Normalized latents -> data ``(B, C, *dims)``; ``shape`` (one item's ``(C, *dims)``) crops the
        padding :meth:`encode` added."""
        x = self.decode_raw(self.denormalize(z))
        if shape is not None:
            x = x[(slice(None), slice(None), *(slice(0, d) for d in tuple(shape)[1:]))]
        return x

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latents (as :meth:`encode_raw` gives them) -> the model's latents."""
        shift, scale = (_per_channel(b, z) for b in (self.latent_shift, self.latent_scale))
        return (z - shift) * scale

    def denormalize(self, z: Tensor) -> Tensor:
        shift, scale = (_per_channel(b, z) for b in (self.latent_shift, self.latent_scale))
        return z / scale + shift

    def pad(self, x: Tensor) -> Tensor:
        """``x`` padded (replicate, at the end of each axis) to multiples of :attr:`factors`."""
        extra = [(-d) % f for d, f in zip(x.shape[2:], self.factors, strict=True)]
        if not any(extra):
            return x
        pads = [p for e in reversed(extra) for p in (0, e)]
        return F.pad(x, pads, mode="replicate") if x.ndim <= 5 else F.pad(x, pads)

    def latent_mask(self, keep: Tensor) -> Tensor:
        """An editing mask in data space ``(B, 1, *dims)`` (1: keep the input) -> latent space
        ``(B, 1, *dims')``: a latent cell is kept only where every data cell it encodes is kept
        (a min-pool over each block of :attr:`factors`, after the padding :meth:`encode` adds),
        so no generated content is pinned to the input and fractional masks keep their minimum."""
        if not any(f > 1 for f in self.factors):
            return keep
        x = self.pad(keep.float())
        b, c, *dims = x.shape
        # min-pool with any rank: fold each axis into (size / f, f) and take the minimum over the f's
        blocks = x.reshape(b, c, *[n for d, f in zip(dims, self.factors, strict=True) for n in (d // f, f)])
        return blocks.amin(dim=tuple(range(3, blocks.ndim, 2)))

    @torch.no_grad()
    def fit_scale(self, raw_latents: Tensor) -> None:
        """Estimate shift and scale from raw latents ``(N, C', *dims')`` of the training data, so the
        model's latents have mean 0 and standard deviation 1 (per channel or over all of them)."""
        if self.scale_mode in ("none", "pretrained"):
            return
        z = raw_latents.detach().float().transpose(0, 1).reshape(self.latent_channels, -1)
        if self.scale_mode == "global":
            mean, std = z.mean().expand(self.latent_channels), z.std().expand(self.latent_channels)
        else:
            mean, std = z.mean(1), z.std(1)
        self.latent_shift.copy_(mean)
        self.latent_scale.copy_(1.0 / std.clamp_min(1e-6))
        self.scale_fitted.fill_(True)

    @torch.no_grad()
    def set_scale(self, shift: Tensor | float, scale: Tensor | float) -> None:
        """Set the normalization ``z = (E(x) - shift) * scale`` (per channel or one value) and mark it fitted."""
        self.latent_shift.copy_(torch.as_tensor(shift, dtype=torch.float32).expand(self.latent_channels))
        self.latent_scale.copy_(torch.as_tensor(scale, dtype=torch.float32).expand(self.latent_channels))
        self.scale_fitted.fill_(True)

    @property
    def needs_fit(self) -> bool:
        return not bool(self.scale_fitted)

    def encode_raw(self, x: Tensor) -> Tensor:  # pragma: no cover - the subclass's job
        raise NotImplementedError(f"{type(self).__name__} must implement encode_raw(x) -> z")

    def decode_raw(self, z: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement decode_raw(z) -> x")

    # -- persistence --------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """Constructor options (without ``shape``) that rebuild this stage; JSON-serializable."""
        return dict(self._options)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``stage.json`` (class and options) and the state dict (weights, shift, scale)."""
        directory = self.write_stage_info(directory)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, directory / WEIGHTS)

    def write_stage_info(self, directory: str | Path) -> Path:
        """Write ``directory/stage.json``: the class, the shape and :meth:`options`, what :func:`load_stage` reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        info = {"target": f"{type(self).__module__}.{type(self).__qualname__}", "shape": list(self.shape),
                "options": self.options()}
        (directory / STAGE_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, shape: Sequence[int], options: dict[str, Any]) -> LatentStage:
        stage = cls(shape=shape, **options)
        stage.load_state_dict(load_file(Path(directory) / WEIGHTS))
        return stage

    def fingerprint(self) -> str:
        """SHA-256 over the class, options and every tensor of the state dict: what a latent cache is
        keyed by (a retrained or rescaled autoencoder gets a new one)."""
        h = hashlib.sha256(json.dumps([type(self).__qualname__, self.options()], sort_keys=True, default=str).encode())
        for key, value in sorted(self.state_dict().items()):
            if key in ("latent_shift", "latent_scale", "scale_fitted"):
                continue  # raw latents do not depend on the normalization
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()


def to_frames(x: Tensor) -> Tensor:
    """Clips ``(B, C, T, *dims)`` -> frames ``(B*T, C, *dims)`` (a per-frame network's batch)."""
    return x.transpose(1, 2).flatten(0, 1)


def from_frames(y: Tensor, batch: int) -> Tensor:
    """Frames ``(B*T, C, *dims)`` -> clips ``(B, C, T, *dims)``; the inverse of :func:`to_frames`."""
    return y.unflatten(0, (batch, -1)).transpose(1, 2)


def _per_channel(values: Tensor, z: Tensor) -> Tensor:
    return values.to(z.dtype).reshape(1, -1, *([1] * (z.ndim - 2)))


class Identity(LatentStage):
    """No latent stage: the backbone diffuses the adapter's tensors (exact, nothing stored)."""

    def __init__(self, *, shape: Sequence[int]) -> None:
        super().__init__(shape=shape, latent_channels=int(shape[0]), scale_mode="none")

    @property
    def is_identity(self) -> bool:
        return True

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        return z

    def normalize(self, z: Tensor) -> Tensor:
        return z

    def encode_raw(self, x: Tensor) -> Tensor:
        return x

    def decode_raw(self, z: Tensor) -> Tensor:
        return z


def load_stage(directory: str | Path, *, shape: Sequence[int] | None = None, **overrides) -> LatentStage:
    """Rebuild a stage that :meth:`LatentStage.save_pretrained` wrote, for data of ``shape`` (default:
    the shape it was saved with); ``overrides`` replace saved options. Only classes under
    ``multidiff.autoencoders.`` are built (nothing named by the file outside it is imported)."""
    directory = Path(directory)
    info_path = directory / STAGE_FILE
    if not info_path.is_file():
        raise AutoencoderError(f"{directory} holds no {STAGE_FILE}: it is not a saved multidiff autoencoder stage")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    target = str(info.get("target", ""))
    if not target.startswith("multidiff.autoencoders."):
        raise AutoencoderError(f"{info_path} names {target!r}, outside multidiff.autoencoders.; nothing was built")
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    options = {**info.get("options", {}), **overrides}
    return cls.from_pretrained(directory, shape=tuple(shape or info["shape"]), options=options)
