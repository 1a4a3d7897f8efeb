"""Autoencoders trained with ``multidiff train task=autoencoder``: their export and loading as a stage.

An autoencoder run exports ``RUN/model/`` with ``multidiff.json`` (format ``multidiff-autoencoder``),
``config.yaml`` (the modality and autoencoder configs it was trained with) and ``autoencoder/``
(the stage: ``stage.json`` + ``model.safetensors``). A diffusion run uses it with
``autoencoder=trained autoencoder.path=RUN/model``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from multidiff.atomic import replace_directory
from multidiff.autoencoders.base import AutoencoderError, LatentStage, load_stage

FORMAT = "multidiff-autoencoder"
FORMAT_VERSION = 1


def export_autoencoder(directory: str | Path, stage: LatentStage, config_yaml: str, *, metrics: dict | None = None) -> Path:
    """Write an autoencoder export (atomically): marker, the run's config text and the stage."""

    def fill(tmp: Path) -> None:
        stage.save_pretrained(tmp / "autoencoder")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        marker = {"format": FORMAT, "version": FORMAT_VERSION, "shape": list(stage.shape),
                  "latent_shape": list(stage.latent_shape()), **({"metrics": metrics} if metrics else {})}
        (tmp / "multidiff.json").write_text(json.dumps(marker, indent=2), encoding="utf-8")

    return replace_directory(directory, fill)


def trained(path: str | Path, *, shape: Sequence[int], scale_mode: str | None = None) -> LatentStage:
    """The autoencoder a ``task=autoencoder`` run exported to ``path`` (its ``RUN/model``), as a stage for
    data of ``shape`` (the modality's; its channels and rank must be those it was trained on).
    ``scale_mode`` replaces the one it was trained with (how latents are normalized for diffusion)."""
    path = Path(str(path)).expanduser()
    check_config(path=path, shape=shape)
    overrides = {} if scale_mode is None else {"scale_mode": scale_mode}
    return load_stage(path / "autoencoder", shape=shape, **overrides)


def check_config(*, path: str | Path, shape: Sequence[int] | None = None, **_) -> None:
    """One paragraph, before anything loads, when ``autoencoder.path`` is not an autoencoder export for
    data like the modality's."""
    fix = "point autoencoder.path at the model/ folder of a multidiff train task=autoencoder run (e.g. AE/model)"
    if str(path) == "???":
        raise AutoencoderError(f"missing autoencoder.path=...: {fix}, trained first (docs/latent.md)")
    path = Path(str(path)).expanduser()
    if not path.is_dir():
        raise AutoencoderError(f"autoencoder.path={path} does not exist; {fix}")
    marker = path / "multidiff.json"
    if not marker.is_file() and (path / "model" / "multidiff.json").is_file():
        raise AutoencoderError(f"autoencoder.path={path} is a run directory; use its model/ subfolder ({path / 'model'})")
    info = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
    if info.get("format") != FORMAT:
        what = "a diffusion model" if info.get("format") == "multidiff-model" else "not an autoencoder export"
        raise AutoencoderError(f"autoencoder.path={path} is {what} (multidiff.json format={info.get('format')!r}); {fix}")
    trained_shape = tuple(info.get("shape") or ())
    if shape is not None and trained_shape and (trained_shape[0] != shape[0] or len(trained_shape) != len(shape)):
        raise AutoencoderError(
            f"autoencoder.path={path} was trained on items of shape {trained_shape}, but this modality gives {tuple(shape)}: "
            "the channel count and the number of axes must agree (sizes may differ); train an autoencoder on this "
            "modality first (recipes autoencoder_*)"
        )


trained.check_config = check_config  # what multidiff.configuration.check_config runs before anything loads
