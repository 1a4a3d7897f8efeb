"""``multidiff prepare recipe=NAME out=DIR [overrides]``: a recipe's dataset encoded once into shards.

The recipe (and any train override) is composed exactly as ``multidiff train`` composes it, so the
adapter, the autoencoder and the text encoder are the ones the run will train with; then every item
is decoded (``workers`` processes), encoded and written by
:func:`multidiff.datasets.shards.prepare_shards`. A model of several modalities writes
``DIR/<modality>`` for each. Train from the result with ``data=streaming data.path=DIR``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

OPTIONS_HELP = """  out=DIR            the folder the shards are written to (required); run again to resume an interrupted prepare
  workers=2          processes decoding the dataset's items (0: in this process)
  chunk_items=256    source items per chunk: the unit of resuming, shuffling and download
  encode_batch=64    items encoded together by the autoencoder and the text encoder
  device=cpu         where the autoencoder and the text encoder run (e.g. cuda)"""


@dataclass
class PrepareOptions:
    out: str | None = None
    workers: int = 2
    chunk_items: int = 256
    encode_batch: int = 64
    device: str = "cpu"


def split_options(overrides: list[str]) -> tuple[PrepareOptions, list[str]]:
    """``out=``, ``workers=``, ``chunk_items=``, ``encode_batch=``, ``device=`` apart from the train overrides."""
    from multidiff.cli.compose import ConfigError

    options, rest = PrepareOptions(), []
    names = set(PrepareOptions.__dataclass_fields__)
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in names:
            if key in ("workers", "chunk_items", "encode_batch"):
                try:
                    number = int(value)
                except ValueError:
                    number = -1
                if number < (0 if key == "workers" else 1):
                    raise ConfigError(f"{key}={value!r} is invalid: it must be a whole number "
                                      f"{'>= 0' if key == 'workers' else '>= 1'}")
                setattr(options, key, number)
            else:
                setattr(options, key, value)
        else:
            rest.append(item)
    return options, rest


def run(cfg: DictConfig, options: PrepareOptions) -> Path:
    """Write the shards of the composed recipe ``cfg`` to ``options.out``; returns the folder."""
    from multidiff.cli.compose import ConfigError
    from multidiff.cli.train import apply_init_from, read_options
    from multidiff.configuration import check_config, safe_instantiate, trusted_prefixes
    from multidiff.datasets.shards import prepare_shards
    from multidiff.multimodal import entry_config, modality_names
    from multidiff.pipeline import build_from, build_modality_parts, build_parts

    if not options.out:
        raise ConfigError("multidiff prepare needs out=DIR: the folder the shards are written to "
                          "(then train with data=streaming data.path=DIR)")
    if cfg.get("task", "diffusion") != "diffusion":
        raise ConfigError("multidiff prepare encodes the data of a diffusion recipe (task=diffusion); an autoencoder "
                          "trains on the data itself")
    apply_init_from(cfg)  # the model the shards are for: init_from's encoder and autoencoder, as training uses
    read_options(cfg)
    if cfg.get("data") is not None and cfg.data.get("streaming"):
        raise ConfigError("data=streaming reads shards that are already prepared; prepare from the recipe's own data")
    trusted = trusted_prefixes(cfg)
    make = partial(safe_instantiate, trusted=trusted, source="train config")
    out = Path(options.out)
    recipe = cfg.get("recipe_name")
    names = modality_names(cfg)
    if names:
        parts = build_modality_parts(cfg, source="train config")
        conditioner = next(iter(parts.values())).conditioner
        jobs = [(name, entry_config(cfg, name), parts[name], out / name) for name in names]
    else:
        parts = build_from(cfg, cfg.init_from) if cfg.get("init_from") else build_parts(cfg, source="train config")
        conditioner = parts.conditioner
        jobs = [(None, cfg, parts, out)]
    manifests = {}
    for name, entry, part, folder in jobs:
        check_config(entry.data.dataset, trusted=trusted, source="train config", adapter=part.adapter)
        dataset_cfg = entry.data.dataset
        extra = {"cache": False} if "cache" in dataset_cfg else {}  # decode in the workers, not all up front
        dataset = make(dataset_cfg, adapter=part.adapter, **extra)
        if name is not None:
            log.info("modality %s: %d items -> %s", name, len(dataset), folder)
        manifest = prepare_shards(
            dataset, folder, stage=part.stage, conditioner=conditioner, recipe=recipe,
            dataset_config={"modality": OmegaConf.to_container(entry.modality, resolve=True),
                            "dataset": OmegaConf.to_container(dataset_cfg, resolve=True)},
            shape=tuple(part.adapter.shape), chunk_items=options.chunk_items, workers=options.workers,
            batch_size=options.encode_batch, device=options.device,
        )
        manifests[name] = manifest
        print(_summary(folder, manifest))
    if names:
        (out / "modalities.json").write_text(json.dumps({"recipe": recipe, "modalities": names}, indent=2), encoding="utf-8")
    print(f"train with: multidiff train recipe={recipe or 'NAME'} data=streaming data.path={out}")
    return out


def _summary(folder: Path, manifest: dict) -> str:
    skipped = manifest["skipped"]["count"]
    return (f"{folder}: {manifest['items']} items in {manifest['chunks']} chunks, {manifest['key']} "
            f"{tuple(manifest['item_shape'])}" + (f", {skipped} skipped (listed in its manifest)" if skipped else ""))
