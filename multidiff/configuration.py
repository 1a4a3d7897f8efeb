"""Safe building of objects from configs that come from files.

A config read from a file (an exported model, a checkpoint, a recipe) may only instantiate
``_target_``s inside the allow-list: ``multidiff.`` plus a few optimizer and Lightning
namespaces, plus prefixes the user trusts explicitly (the config key ``trusted_targets`` or the
``trusted`` argument). Anything else is refused before anything is imported or called.
"""

from __future__ import annotations

from collections.abc import Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

ALLOWED_PREFIXES: tuple[str, ...] = (
    "multidiff.",
    "torch.optim.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
)


class UnsafeConfigError(ValueError):
    """A config names a ``_target_`` outside the allow-list."""


def find_targets(node, path: str = "") -> Iterable[tuple[str, str]]:
    """Yield ``(key path, target)`` for every ``_target_`` in a (nested) config."""
    if isinstance(node, DictConfig | dict):
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for k, v in items:
            where = f"{path}.{k}" if path else str(k)
            if k == "_target_":
                yield path or "<root>", str(v)
            else:
                yield from find_targets(v, where)
    elif isinstance(node, ListConfig | list):
        for i, v in enumerate(node):
            yield from find_targets(v, f"{path}[{i}]")


def check_targets(cfg, *, trusted: Iterable[str] = (), source: str = "config") -> None:
    """Raise :class:`UnsafeConfigError` if any ``_target_`` in ``cfg`` is outside the allow-list."""
    prefixes = ALLOWED_PREFIXES + tuple(trusted)
    for where, target in find_targets(cfg):
        if not any(target.startswith(p) or target == p.rstrip(".") for p in prefixes):
            raise UnsafeConfigError(
                f"{source}: '{where}._target_: {target}' is outside the allowed namespaces "
                f"({', '.join(prefixes)}); nothing was imported or run. If you trust this code, add its "
                f"package to trusted_targets: trusted_targets=[{target.split('.', 1)[0]}.] on the command line "
                "(or in your own train config; a list inside a model file is never trusted)"
            )


def safe_instantiate(cfg, *, trusted: Iterable[str] = (), source: str = "config", **kwargs):
    """``hydra.utils.instantiate`` after :func:`check_targets`."""
    from hydra.utils import instantiate

    check_targets(cfg, trusted=trusted, source=source)
    return instantiate(cfg, **kwargs)


def trusted_prefixes(cfg) -> tuple[str, ...]:
    """The user's explicit opt-in list ``trusted_targets`` of a config (empty if absent)."""
    value = OmegaConf.select(cfg, "trusted_targets", default=None) if isinstance(cfg, DictConfig) else None
    return tuple(str(v) for v in value) if value else ()


def check_config(node, *, trusted: Iterable[str] = (), source: str = "config", **kwargs) -> None:
    """Let a config node's target check its arguments before anything is built.

    A class (or factory function) may define ``check_config(**arguments)``: it receives the node's
    resolved arguments plus ``kwargs`` (what the builder will pass, e.g. ``adapter=``), checks what
    they alone can tell (a folder that must exist, a file to start from) and raises a
    one-paragraph error. Nothing is instantiated, and a target without the method passes.
    """
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    check_targets(node, trusted=trusted, source=source)
    from hydra.utils import get_object

    check = getattr(get_object(str(node._target_)), "check_config", None)
    if check is None:
        return
    arguments = OmegaConf.to_container(node, resolve=True)
    check(**{k: v for k, v in arguments.items() if not k.startswith("_")}, **kwargs)
