"""Every config key that multidiff's messages tell a user to set exists in a composed config.

An error that says "set data.root=..." when the key is ``data.dataset.root`` sends the user to a
key Hydra then refuses. This test reads every string in the package (error messages, hints,
docstrings), picks out dotted keys under the top-level config sections, and checks each against the
union of the keys of every composable configuration: each recipe, and each option of each group.
"""

from __future__ import annotations

import ast
import re

import pytest
from helpers import ROOT
from omegaconf import OmegaConf

from multidiff.cli.compose import RECIPE_GROUP, available, compose

# Top-level sections of conf/train.yaml and conf/generate.yaml whose sub-keys messages name.
SECTIONS = ("modality", "backbone", "diffusion", "sampler", "conditioning", "data", "trainer", "callbacks", "logger",
            "training", "optimizer", "lr_scheduler")
KEY = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})(?:\.[a-z_][a-z0-9_]*)+)(?![\w/(])")


def _keys(node, prefix: str = "") -> set[str]:
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out |= {path} | _keys(v, path)
    return out


def _all_keys() -> set[str]:
    configs = [compose("train", []), compose("generate", ["model=x", "out=y"])]
    configs += [compose("train", [f"recipe={r}"]) for r in available(RECIPE_GROUP)]
    for group in ("modality", "backbone", "diffusion", "conditioning", "data", "sampler", "trainer", "callbacks",
                  "logger"):
        configs += [compose("train", [f"{group}={name}"]) for name in available(group)]
    keys = set()
    for cfg in configs:
        keys |= _keys(OmegaConf.to_container(cfg, resolve=False))
    return keys


# Keys that exist once a user picks an option no shipped config file selects.
CONTEXTUAL = {
    "modality.vocoder.weights": "a ModuleVocoder's weights file: the user configures one (docs/audio.md)",
    "conditioning.encoder.encoder_class": "set by the import of a diffusers pipeline (Wan's UMT5EncoderModel)",
    "backbone.path": "the folder of an imported pipeline's network (PretrainedUNet2D, PretrainedWanTransformer)",
    "backbone.projection_path": "Stable Audio's projection model folder (PretrainedStableAudioDiT)",
    "conditioning.encoder.null": "set by the import of a Stable Audio pipeline (zeros); the default elsewhere",
    "diffusion.parameterization.c_noise": "an EDMPrecond option, set by the import of a diffusers EDM scheduler",
    "modality.window": "a WaveformAdapter option (Stable Audio's imported modality)",
}


def _package_strings() -> list[tuple[str, int, str]]:
    """(file, line, text) of every string constant in multidiff/ outside docstrings (messages and
    hints, f-string parts included; docstrings name methods such as ``trainer.fit``)."""
    out = []
    for path in sorted((ROOT / "multidiff").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                out.append((str(path.relative_to(ROOT)), node.lineno, node.value))
    return out


def referenced_keys() -> dict[str, str]:
    """Dotted config keys named in the package's strings -> where the first one is."""
    found = {}
    for file, line, text in _package_strings():
        for key in KEY.findall(text):
            found.setdefault(key.rstrip("."), f"{file}:{line}")
    return found


def test_the_scan_finds_the_keys_messages_name():
    # the scan itself must see keys, or the test below would pass on nothing
    found = referenced_keys()
    assert {"training.slice_items", "backbone.init_from", "data.dataset.root"} <= found.keys(), sorted(found)


def test_every_key_a_message_names_exists_in_a_composed_config():
    keys = _all_keys()
    wrong = {k: where for k, where in referenced_keys().items() if k not in keys and k not in CONTEXTUAL}
    assert not wrong, "messages name config keys that no composed config has (key: first place): " + ", ".join(
        f"{k} ({w})" for k, w in sorted(wrong.items()))


@pytest.mark.parametrize("text,key", [("set data.root to a folder", "data.root"),
                                      ("use data.dataset.root=/x", "data.dataset.root")])
def test_the_pattern_reads_keys_out_of_prose(text, key):
    assert KEY.findall(text) == [key]


def test_composed_keys_include_nested_group_keys():
    assert {"data.dataset.root", "callbacks.samples.steps", "conditioning.encoder.sha256"} <= _all_keys()
    assert "data.root" not in _all_keys()
