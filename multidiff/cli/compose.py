"""Hydra composition for the CLI: config groups in ``conf/``, recipes in ``recipes/``, clear errors.

We use Hydra's compose API rather than ``@hydra.main``: the run directory is chosen by us (and
pinned for distributed workers, which must not re-run Hydra or create their own directories),
and every composition error becomes one paragraph naming the key or value.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RECIPE_GROUP = "recipes"


class ConfigError(ValueError):
    """A command-line override or a config file is wrong; the message says what to change."""


def config_root() -> Path:
    """The directory holding ``conf/`` and ``recipes/``: the source tree, or the installed copy."""
    source = Path(__file__).resolve().parents[2]
    if (source / "conf" / "train.yaml").is_file():
        return source
    return Path(str(resources.files("multidiff") / "_configs"))


def available(group: str, extra_dirs: list[Path] = ()) -> list[str]:
    """Option names of a config group (``recipes`` or a ``conf/`` group) across search dirs."""
    root = config_root()
    base = root / group if group == RECIPE_GROUP else root / "conf" / group
    dirs = [base] + [Path(d) / group for d in _with_conf_dirs(extra_dirs)]
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})


def _with_conf_dirs(dirs: list[Path]) -> list[Path]:
    """Each user folder, followed by its ``conf/`` when it has one.

    A plugin folder laid out like this project (``conf/<group>/*.yaml`` beside ``recipes/``)
    then joins with one ``hydra.searchpath`` entry; a flat folder (``<group>/*.yaml``) works too.
    """
    out = []
    for d in dirs:
        out.append(d)
        if (d / "conf").is_dir():
            out.append(d / "conf")
    return out


def _searchpath_dirs(overrides: list[str]) -> list[Path]:
    dirs = []
    for o in overrides:
        if o.startswith("hydra.searchpath="):
            for item in re.findall(r"(?:file://)?([^,\[\]'\"]+)", o.split("=", 1)[1]):
                dirs.append(Path(item.strip()))
    return dirs


def translate(overrides: list[str]) -> list[str]:
    """``recipe=NAME`` -> the global recipe group; the project root joins the search path."""
    out, user_paths = [], []
    for o in overrides:
        if o.startswith("recipe="):
            out.append(f"+{RECIPE_GROUP}@_global_={o.split('=', 1)[1]}")
        elif o.startswith("hydra.searchpath="):
            user_paths.extend(f"file://{p.resolve()}" for p in _with_conf_dirs(_searchpath_dirs([o])))
        else:
            out.append(o)
    paths = [f"file://{config_root()}"] + user_paths
    return [f"hydra.searchpath=[{','.join(paths)}]"] + out


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides; raise :class:`ConfigError` on mistakes."""
    return compose_with_choices(config_name, overrides)[0]


def compose_with_choices(config_name: str, overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """:func:`compose`, and the option chosen for each config group (``{"sampler": "ddim", ...}``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    extra = _searchpath_dirs(overrides)
    held, overrides = _hold_shadowed_keys(config_name, overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_root() / "conf"), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=translate(overrides), return_hydra_config=True)
    except MissingConfigException as e:
        raise ConfigError(_missing_message(str(e), extra)) from None
    except OverrideParseException as e:
        raise ConfigError(f"cannot parse the command-line override: {e}. Overrides look like key=value.") from None
    except ConfigCompositionException as e:
        raise ConfigError(_composition_message(e, extra)) from None
    choices = {str(k): str(v) for k, v in cfg.hydra.runtime.choices.items() if v is not None and not str(k).startswith("hydra")}
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    for key, value in held.items():
        cfg[key] = value
    return cfg, choices


def _hold_shadowed_keys(config_name: str, overrides: list[str]) -> tuple[dict, list[str]]:
    """Overrides of plain keys of ``conf/<config_name>.yaml`` named like a config group it does not
    use (``generate``'s ``modality=audio`` beside the ``conf/modality/`` group of ``train``): Hydra
    would read them as a group choice, so they are held out and set after composition."""
    import yaml

    conf = config_root() / "conf"
    primary = OmegaConf.load(conf / f"{config_name}.yaml")
    used = {str(next(iter(d))).lstrip("/").split("@")[0] for d in primary.get("defaults", []) if isinstance(d, dict)}
    shadowed = {str(k) for k in primary if k != "defaults" and (conf / str(k)).is_dir() and str(k) not in used}
    held, rest = {}, []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key in shadowed:
            try:
                held[key] = yaml.safe_load(value) if value else None
            except yaml.YAMLError:
                held[key] = value
        else:
            rest.append(o)
    return held, rest


def _missing_message(text: str, extra: list[Path]) -> str:
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if m:
        group, name = m.groups()
        key = "recipe" if group == RECIPE_GROUP else group
        options = ", ".join(available(group, extra)) or "(none)"
        return f"unknown {key} '{name}'; valid choices: {options}. Use {key}=NAME with one of them."
    return text.splitlines()[0]


def _composition_message(e: Exception, extra: list[Path]) -> str:
    text = f"{e} {e.__cause__}" if e.__cause__ else str(e)
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        return (
            f"unknown config key '{key}' on the command line: it is not in the composed config. "
            f"Check the spelling (add --cfg to print every key), or write +{key}=VALUE to add a new key on purpose."
        )
    if re.search(r"Could not find '([^/']+)/([^']+)'", text):
        return _missing_message(text, extra)
    return f"invalid configuration: {text.splitlines()[0]}"


def require(cfg: DictConfig, key: str, what: str):
    """A mandatory value (``???`` or null in the config) with a clear error if it was not given."""
    if OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key, default=None) is None:
        raise ConfigError(f"missing {key}=...: {what}")
    return OmegaConf.select(cfg, key)
