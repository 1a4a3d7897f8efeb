"""Entry point of the ``multidiff`` console script."""

from __future__ import annotations

import sys

USAGE = """usage: multidiff COMMAND [key=value ...] [--cfg]

commands:
  train      train a model:     multidiff train recipe=image_digits run_dir=runs/digits trainer.max_steps=500
  generate   sample from one:   multidiff generate model=runs/digits/model prompt="a handwritten digit seven" out=out/
  recipes    list the recipes and config-group options

Every config key can be overridden as key=value (Hydra syntax); --cfg prints the composed config
and exits. Extra config folders join with hydra.searchpath=[file:///path/to/conf].
"""

COMMANDS = ("train", "generate", "recipes")


def _known_errors() -> tuple[type[BaseException], ...]:
    from multidiff.backbones.base import BackboneShapeError
    from multidiff.cli.compose import ConfigError
    from multidiff.cli.train import TrainingStopped
    from multidiff.conditioning.text import ConditioningError
    from multidiff.configuration import UnsafeConfigError
    from multidiff.datasets.folder import DatasetError
    from multidiff.pipeline import GenerationError, ModelLoadError

    return (ConfigError, ConditioningError, UnsafeConfigError, DatasetError, GenerationError, ModelLoadError,
            TrainingStopped, BackboneShapeError)


def _user_error(e: BaseException) -> str | None:
    """One-paragraph message for mistakes in user input that surface inside Hydra or omegaconf."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", None) or str(e)
        return f"missing value for '{key}': set it on the command line as {key}=..."
    if isinstance(e, InterpolationResolutionError):
        return f"config interpolation failed: {str(e).splitlines()[0]}"
    if isinstance(e, InstantiationException):
        cause = e.__cause__
        if cause is not None and isinstance(cause, _known_errors()):
            return str(cause)
        return f"could not build an object from the config: {str(e).splitlines()[0]}"
    return None


def _list_recipes() -> None:
    from multidiff.cli.compose import RECIPE_GROUP, available

    print("recipes:", ", ".join(available(RECIPE_GROUP)))
    for group in ("modality", "backbone", "diffusion", "conditioning", "data", "sampler", "trainer", "logger"):
        print(f"{group}:", ", ".join(available(group)))


def _model_help(args: list[str]) -> int:
    """``multidiff generate model=DIR --help``: the model's own generation options."""
    try:
        from multidiff.cli.compose import compose
        from multidiff.cli.generate import model_help, route_options

        print(model_help(compose("generate", route_options(args))))
        return 0
    except Exception as e:  # noqa: BLE001 - same policy as main()
        message = str(e) if isinstance(e, _known_errors()) else _user_error(e)
        if message is None:
            raise
        print(f"multidiff generate: error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"multidiff: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    if command == "recipes":
        _list_recipes()
        return 0
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        if command == "generate" and any(a.startswith("model=") for a in args):
            return _model_help([a for a in args if a not in ("-h", "--help", "--cfg")])
        return 0
    print_cfg = "--cfg" in args
    overrides = [a for a in args if a != "--cfg"]
    try:
        from multidiff.cli.compose import compose
        from multidiff.cli.terminal import setup

        if command == "generate":
            from multidiff.cli.generate import route_options

            overrides = route_options(overrides)
        cfg = compose(command, overrides)
        setup(verbose=bool(cfg.get("verbose", False)))
        if command == "train":
            recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), None)
            cfg.recipe_name = recipe
        if print_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg))
            return 0
        if command == "train":
            from multidiff.cli.train import run
        else:
            from multidiff.cli.generate import run
        run(cfg)
        return 0
    except KeyboardInterrupt:
        print("multidiff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user mistakes get one paragraph, bugs a traceback
        if isinstance(e, _known_errors()):
            message = str(e)
        else:
            message = _user_error(e)
        if message is None:
            raise
        print(f"multidiff {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
