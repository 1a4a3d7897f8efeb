"""LoRA (Hu et al. 2021) on a backbone's attention, through ``peft``: add, train, save alone, load on
top of a base, scale, stack several, merge into the base.

The adapters are peft ``LoraLayer``s injected into the backbone module itself (any multidiff
backbone: the diffusers UNets, an imported pipeline's UNet, the DiT, the conv UNet), so the
training module, EMA, checkpoints and exact resume see ordinary parameters; only the adapters'
parameters train. A saved adapter is two files: ``lora.safetensors`` (the ``lora_A`` / ``lora_B``
weights, keys without the adapter's name) and ``lora.json`` (rank, alpha, targets, the base it was
trained on).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "lora.safetensors"
CONFIG = "lora.json"
FORMAT = "multidiff-lora"


class LoraError(ValueError):
    """A LoRA adapter that cannot be added, loaded or applied."""


def attention_targets(backbone: nn.Module) -> list[str]:
    """The names of the linear projections of every attention module of ``backbone``: the ``nn.Linear``
    layers inside a module whose class name ends in ``Attention`` (diffusers' ``to_q``, ``to_k``,
    ``to_v``, ``to_out.0``; multidiff's ``q``, ``kv``, ``out``), and every ``qkv`` projection (the
    DiT's joint streams)."""
    from peft.tuners.lora import LoraLayer

    def linear(m: nn.Module) -> bool:  # a linear layer, or one that already carries adapters
        return isinstance(m, nn.Linear | LoraLayer)

    def inner(name: str) -> bool:  # peft's own parts of an adapted layer
        return any(part in ("base_layer",) or part.startswith("lora_") for part in name.split("."))

    names: list[str] = []
    for name, module in backbone.named_modules():
        if inner(name):
            continue
        if type(module).__name__.endswith("Attention"):
            names += [f"{name}.{sub}" for sub, m in module.named_modules() if sub and linear(m) and not inner(sub)]
        elif name.split(".")[-1] == "qkv" and linear(module):
            names.append(name)
    return sorted(set(names))


def add_lora(backbone: nn.Module, *, rank: int, alpha: float | None = None, dropout: float = 0.0,
             target_modules: Sequence[str] | None = None, name: str = "default") -> list[str]:
    """Inject a LoRA adapter ``name`` of ``rank`` into ``target_modules`` (default: :func:`attention_targets`)
    and freeze everything else of the backbone; returns the targeted module names."""
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoraError(f"lora.rank must be a positive integer, got {rank!r}")
    targets = list(target_modules) if target_modules else attention_targets(backbone)
    if not targets:
        raise LoraError(f"{type(backbone).__name__} has no attention projections to adapt; set lora.target_modules "
                        "to the names of its linear layers (print(backbone) lists them)")
    config = LoraConfig(r=rank, lora_alpha=float(alpha or rank), lora_dropout=float(dropout), target_modules=targets)
    # a second adapter is what stacking means: peft warns when it finds the first one's peft_config,
    # so the record is set aside during the injection and joined again after it
    earlier = backbone.__dict__.pop("peft_config", None)
    try:
        inject_adapter_in_model(config, backbone, adapter_name=name)
    except ValueError as e:  # peft: a target that matches nothing, or a module type it cannot adapt
        raise LoraError(f"lora.target_modules={targets} do not fit {type(backbone).__name__}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    finally:
        if earlier is not None:
            backbone.__dict__["peft_config"] = {**earlier, **backbone.__dict__.get("peft_config", {})}
    for pname, param in backbone.named_parameters():
        param.requires_grad_(_is_lora(pname))
    set_active(backbone, adapter_names(backbone))
    return targets


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name


def _layers(backbone: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in backbone.modules() if isinstance(m, LoraLayer)]


def adapter_names(backbone: nn.Module) -> list[str]:
    """The LoRA adapters injected into ``backbone``, in order."""
    names: list[str] = []
    for layer in _layers(backbone):
        names += [n for n in layer.lora_A if n not in names]
    return names


def has_lora(backbone: nn.Module) -> bool:
    return bool(_layers(backbone))


def set_active(backbone: nn.Module, names: Sequence[str]) -> None:
    """Make ``names`` the active adapters (their outputs add up: stacked LoRAs)."""
    for layer in _layers(backbone):
        layer.set_adapter([n for n in names if n in layer.lora_A])


def set_scale(backbone: nn.Module, scale: float, name: str = "default") -> None:
    """Scale adapter ``name``'s contribution: 1 as trained, 0 the base model exactly."""
    for layer in _layers(backbone):
        if name in layer.lora_A:
            layer.set_scale(name, float(scale))


def lora_state_dict(backbone: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s weights, keys without the name (``...to_q.lora_A.weight``), on the CPU."""
    marker = f".{name}."
    return {k.replace(marker, ".", 1): v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()
            if _is_lora(k) and marker in k}


def save_lora(directory: str | Path, backbone: nn.Module, *, rank: int, alpha: float | None, target_modules: Sequence[str],
              dropout: float = 0.0, base: str | None = None, name: str = "default") -> Path:
    """Write ``lora.safetensors`` and ``lora.json`` (plus a ``multidiff.json`` marker) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(backbone, name), directory / WEIGHTS)
    info = {"format": FORMAT, "version": 1, "rank": int(rank), "alpha": float(alpha or rank), "dropout": float(dropout),
            "target_modules": list(target_modules), "backbone": type(backbone).__name__, "base": base}
    (directory / CONFIG).write_text(json.dumps(info, indent=2), encoding="utf-8")
    (directory / "multidiff.json").write_text(json.dumps({"format": FORMAT, "version": 1}), encoding="utf-8")
    return directory


def read_lora(directory: str | Path) -> dict:
    """``lora.json`` of a saved adapter, or a one-paragraph :class:`LoraError`."""
    directory = Path(directory).expanduser()
    file = directory / CONFIG
    if not file.is_file() or not (directory / WEIGHTS).is_file():
        raise LoraError(f"{directory} is not a LoRA adapter: it needs {CONFIG} and {WEIGHTS} (what a training run with "
                        "lora.rank > 0 writes to RUN/model)")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LoraError(f"cannot read {file} ({e})") from None
    if info.get("format") != FORMAT:
        raise LoraError(f"{file} does not describe a multidiff LoRA adapter (format={info.get('format')!r})")
    return info


def load_lora(backbone: nn.Module, directory: str | Path, *, name: str, scale: float = 1.0) -> dict:
    """Add the adapter saved in ``directory`` to ``backbone`` as ``name`` at ``scale``; returns its ``lora.json``."""
    directory = Path(directory).expanduser()
    info = read_lora(directory)
    if info.get("backbone") != type(backbone).__name__:
        raise LoraError(f"the LoRA in {directory} was trained on a {info.get('backbone')}, not on this model's "
                        f"{type(backbone).__name__}; load it on top of the model it was trained from ({info.get('base')})")
    add_lora(backbone, rank=int(info["rank"]), alpha=info["alpha"], target_modules=info["target_modules"], name=name)
    state = load_file(directory / WEIGHTS)
    own = {k.replace(f".{name}.", ".", 1): k for k in backbone.state_dict() if _is_lora(k) and f".{name}." in k}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise LoraError(f"the LoRA in {directory} does not fit this model ({len(missing)} weights missing, e.g. "
                        f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): load it on top of the "
                        f"model it was trained from ({info.get('base')})")
    current = backbone.state_dict()
    for short, full in own.items():
        if state[short].shape != current[full].shape:
            raise LoraError(f"the LoRA in {directory} has {short} of shape {tuple(state[short].shape)}, this model "
                            f"{tuple(current[full].shape)}: it was trained on another model ({info.get('base')})")
    backbone.load_state_dict({own_full: state[short] for short, own_full in own.items()}, strict=False)
    set_scale(backbone, scale, name)
    return info


def lora_info(backbone: nn.Module, name: str = "default") -> dict:
    """Rank, alpha, dropout and targets of adapter ``name`` as injected (what :func:`save_lora` records)."""
    adapted = {id(m) for m in _layers(backbone)}
    layers = [(n, m) for n, m in backbone.named_modules() if id(m) in adapted and name in m.lora_A]
    if not layers:
        raise LoraError(f"the backbone has no LoRA adapter {name!r}")
    _, first = layers[0]
    dropout = first.lora_dropout[name]
    return {"rank": int(first.r[name]), "alpha": float(first.lora_alpha[name]), "name": name,
            "dropout": float(getattr(dropout, "p", 0.0)), "target_modules": [n for n, _ in layers]}


def merge_lora(backbone: nn.Module) -> nn.Module:
    """Fold every active adapter (at its scale) into the base weights and remove the LoRA layers:
    a plain backbone whose state dict has the base model's keys."""
    layers = {id(m) for m in _layers(backbone)}
    for parent in list(backbone.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in layers:
                child.merge(adapter_names=list(child.active_adapters))
                setattr(parent, child_name, child.get_base_layer())
    backbone.requires_grad_(True)
    return backbone
