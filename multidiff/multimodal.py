"""One model for several modalities: the ``modalities`` mapping of a run's config.

A multimodal config names its modalities in order (the order is each one's index in
``cond.modality``)::

    modalities:
      image: {modality: {...}, data: {...}, weight: 1.0, shift: 1.0, patch_size: 2, preview_prompts: [...]}
      audio: {modality: {...}, data: {...}, weight: 1.0, shift: 3.0, patch_size: [32, 1]}

Each entry holds its adapter (``modality``, a ``conf/modality`` config), its dataset and per-device
batch (``data``, a ``conf/data`` config), its share of the training batches (``weight``), its
noise shift (``shift``: replaces every ``shift`` of the ``diffusion`` config for this modality,
i.e. the flow schedule's and the training density's; ``null`` keeps them), the backbone's patch
size for it (``patch_size``; ``null``: the backbone's) and its preview prompts. Everything else
(backbone, objective, text encoder, optimizer, trainer) is shared. :func:`entry_config` turns an
entry into the config of a one-modality run, so every single-modality code path (adapters, data,
schedules, previews, generation) serves a multimodal model unchanged.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

ENTRY_KEYS = {"modality", "data", "weight", "shift", "patch_size", "preview_prompts"}
MODEL_ENTRY_KEYS = ("modality", "shift", "patch_size")
"""What an exported model keeps of each entry (the data, weights and previews are the run's)."""


class ModalityError(ValueError):
    """A multimodal config or request names a modality wrongly (one paragraph, listing the known ones)."""


def modality_names(cfg: DictConfig) -> list[str]:
    """The modalities of a multimodal config, in index order; ``[]`` for a one-modality config."""
    node = cfg.get("modalities") if isinstance(cfg, DictConfig) else None
    return [str(k) for k in node] if node else []


def check_modalities(cfg: DictConfig) -> list[str]:
    """The names, after checking every entry's keys (one paragraph naming the key and the fix)."""
    names = modality_names(cfg)
    for name in names:
        entry = cfg.modalities[name]
        if not isinstance(entry, DictConfig) or "modality" not in entry:
            raise ModalityError(f"modalities.{name} must be a mapping with at least modality: (an adapter config, "
                                f"e.g. /modality@modalities.{name}.modality: image in the defaults list)")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise ModalityError(f"modalities.{name} has unknown key(s) {', '.join(unknown)}; an entry takes "
                                f"{', '.join(sorted(ENTRY_KEYS))}")
        if not str(name).isidentifier():
            raise ModalityError(f"modalities.{name}: a modality name must be a plain name (letters, digits, _)")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            raise ModalityError(f"modalities.{name}.weight={weight!r} is invalid: a number >= 0 (its share of the "
                                "training batches, relative to the others')")
        shift = entry.get("shift")
        if shift is not None and (isinstance(shift, bool) or not isinstance(shift, int | float) or not shift > 0):
            raise ModalityError(f"modalities.{name}.shift={shift!r} is invalid: a number > 0, or null for the "
                                "diffusion config's own")
    if names and not any(cfg.modalities[n].get("weight", 1.0) > 0 for n in names):
        raise ModalityError("every modalities.*.weight is 0: give at least one modality a positive weight")
    return names


def select(cfg: DictConfig, name: str | None, source: str = "this model") -> str | None:
    """The entry ``name`` of a multimodal config; ``None`` for a one-modality config asked for none.
    A missing or unknown name (or any name for a one-modality config) is refused, naming the choices."""
    names = modality_names(cfg)
    if not names:
        if name is not None:
            raise ModalityError(f"modality={name}: {source} is a model of one modality; leave modality= out")
        return None
    if name is None:
        raise ModalityError(f"this model generates {', '.join(names)}: choose one with modality=NAME "
                            f"(e.g. modality={names[0]})")
    if name not in names:
        raise ModalityError(f"modality={name} is not one of this model's modalities; it generates {', '.join(names)}")
    return name


def _with_shift(node, shift: float):
    """``node`` (a plain container) with every key ``shift`` set to ``shift``."""
    if isinstance(node, dict):
        return {k: (shift if k == "shift" else _with_shift(v, shift)) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_shift(v, shift) for v in node]
    return node


def entry_config(cfg: DictConfig, name: str) -> DictConfig:
    """The one-modality config of entry ``name``: ``cfg`` without ``modalities``, with the entry's
    adapter as ``modality``, its dataset as ``data`` (over the shared loader settings), its preview
    prompts and its ``shift`` in the diffusion config."""
    whole = OmegaConf.to_container(cfg, resolve=True)
    entry = whole.pop("modalities")[name]
    whole["modality"] = entry["modality"]
    if entry.get("data") is not None:
        whole["data"] = {**(whole.get("data") or {}), **entry["data"]}
    if "preview_prompts" in entry:
        whole["preview_prompts"] = list(entry["preview_prompts"] or [])
    if entry.get("shift") is not None and whole.get("diffusion") is not None:
        whole["diffusion"] = _with_shift(whole["diffusion"], float(entry["shift"]))
    return OmegaConf.create(whole)


def model_entries(cfg: DictConfig) -> dict:
    """The ``modalities`` of an exported model config: each entry's :data:`MODEL_ENTRY_KEYS`."""
    return {name: {k: cfg.modalities[name][k] for k in MODEL_ENTRY_KEYS if k in cfg.modalities[name]}
            for name in modality_names(cfg)}


def weights(cfg: DictConfig) -> list[float]:
    """Each modality's share of the training batches (normalized)."""
    raw = [float(cfg.modalities[n].get("weight", 1.0)) for n in modality_names(cfg)]
    return [w / sum(raw) for w in raw]
