"""Entry point of the ``multidiff`` console script."""

from __future__ import annotations

import os
import sys

USAGE = """usage: multidiff COMMAND [key=value ...] [--cfg] [--help]

commands:
  train      train a model:     multidiff train recipe=image_digits run_dir=runs/digits trainer.max_steps=500
  generate   sample from one:   multidiff generate model=runs/digits/model prompt="a handwritten digit seven" out=out/
  serve      a web page for one: multidiff serve model=runs/digits/model   (then open http://127.0.0.1:7860)
  prepare    encode a recipe's data once into shards: multidiff prepare recipe=image_digits out=shards/digits
             (then: multidiff train recipe=image_digits data=streaming data.path=shards/digits)
  export     a model again as a plain export, LoRA merged: multidiff export model=BASE lora=RUN/model out=merged/
  recipes    one line per recipe (what it trains, its time on a 2-core CPU, its measured quality)

multidiff COMMAND --help lists every option of the command with its type, default and meaning
(generate model=DIR --help adds the model's own). Every config key can be overridden as key=value
(Hydra syntax); --cfg prints the composed config and exits. Extra config folders join with
hydra.searchpath=[file:///path/to/conf].
"""

COMMANDS = ("train", "generate", "serve", "recipes", "prepare", "export")


def _known_errors() -> tuple[type[BaseException], ...]:
    from multidiff.autoencoders.base import AutoencoderError
    from multidiff.backbones.base import BackboneShapeError
    from multidiff.backbones.lora import LoraError
    from multidiff.backbones.unet3d import InflationError
    from multidiff.cli.compose import ConfigError
    from multidiff.cli.train import TrainingStopped
    from multidiff.conditioning.text import ConditioningError
    from multidiff.configuration import UnsafeConfigError
    from multidiff.datasets.folder import DatasetError
    from multidiff.pipeline import GenerationError, ModelLoadError

    return (ConfigError, ConditioningError, UnsafeConfigError, DatasetError, GenerationError, ModelLoadError,
            TrainingStopped, BackboneShapeError, InflationError, AutoencoderError, LoraError)


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
        reason = f" ({type(cause).__name__}: {' '.join(str(cause).split())[:300]})" if cause is not None else ""
        return f"could not build an object from the config: {str(e).splitlines()[0].rstrip(':')}{reason}"
    return None


def _help(command: str, args: list[str]) -> int:
    """``multidiff COMMAND [overrides] --help``: options from the schemas, values from the composition."""
    from multidiff.cli.compose import _searchpath_dirs, compose_with_choices
    from multidiff.cli.help import generate_help, recipes_listing, train_help

    overrides = [a for a in args if a not in ("-h", "--help", "--cfg")]
    extra = _searchpath_dirs(overrides)
    if command == "prepare":
        from multidiff.cli.prepare import OPTIONS_HELP

        print("usage: multidiff prepare recipe=NAME out=DIR [option=value ...] [train overrides ...]\n\n"
              "Encodes the recipe's dataset once (decoding, the autoencoder if any, the caption embeddings) into "
              "litdata shards in DIR, for training with data=streaming data.path=DIR (docs/data.md).\n\n"
              f"options:\n{OPTIONS_HELP}\n\nEvery other key=value is a train override (multidiff train --help lists them).")
        return 0
    if command == "recipes":
        print(recipes_listing(extra))
        return 0
    if command == "export":
        from multidiff.cli.export import ExportOptions
        from multidiff.cli.help import option_table

        print("usage: multidiff export model=DIR out=DIR [lora=PATH|[A,B]] [lora_scale=S|[S1,S2]]\n\n"
              "Writes the model again as a plain multidiff export, any LoRA adapters merged into its weights at "
              "their scales (docs/pretrained.md).\n\noptions (key=value; type, default, meaning):\n"
              + "\n".join(option_table(ExportOptions.describe())))
        return 0
    try:
        if command == "generate":
            from multidiff.cli.generate import route_options

            cfg, choices = compose_with_choices("generate", route_options(overrides))
            print(generate_help(cfg, choices, extra))
        elif command == "serve":
            from multidiff.cli.help import serve_help

            cfg, choices = compose_with_choices("serve", overrides)
            print(serve_help(cfg, choices, extra))
        else:
            cfg, choices = compose_with_choices("train", overrides)
            print(train_help(cfg, choices, extra))
        return 0
    except Exception as e:  # noqa: BLE001 - same policy as main()
        message = str(e) if isinstance(e, _known_errors()) else _user_error(e)
        if message is None:
            raise
        print(f"multidiff {command}: error: {message}", file=sys.stderr)
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
    if command == "recipes" or any(a in ("-h", "--help") for a in args):
        try:
            return _help(command, args)
        except BrokenPipeError:  # `multidiff train --help | head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    print_cfg = "--cfg" in args
    overrides = [a for a in args if a != "--cfg"]
    try:
        from multidiff.cli.compose import compose
        from multidiff.cli.terminal import setup

        prepare_options = None
        if command == "generate":
            from multidiff.cli.generate import route_options

            overrides = route_options(overrides)
        elif command == "prepare":
            from multidiff.cli.prepare import split_options

            prepare_options, overrides = split_options(overrides)
        cfg = compose("train" if command == "prepare" else command, overrides)
        setup(verbose=bool(cfg.get("verbose", False)))
        if command in ("train", "prepare"):
            recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), None)
            cfg.recipe_name = recipe
            if cfg.get("init_from"):  # init_from replaces the modality; the user's modality.* keys then apply to it
                cfg.init_from_overrides = [o for o in overrides if o.lstrip("+").startswith("modality.")]
        if print_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg))
            return 0
        if command == "prepare":
            from multidiff.cli.prepare import run as prepare

            prepare(cfg, prepare_options)
            return 0
        if command == "train":
            from multidiff.cli.train import run
        elif command == "serve":
            from multidiff.cli.serve import run
        elif command == "export":
            from multidiff.cli.export import run
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
