"""The layer rules of docs/architecture.md: dependencies point down, the core stays modality-free."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "multidiff"

# package -> multidiff packages (and third-party roots) it may import
ALLOWED = {
    "core": ({"core"}, {"torch", "math", "collections", "dataclasses", "typing", "__future__"}),
    "conditioning": ({"core", "conditioning"}, None),
    "backbones": ({"core", "backbones"}, None),
    "adapters": ({"core", "adapters"}, None),
    "autoencoders": ({"core", "autoencoders", "atomic"}, None),
    "datasets": ({"core", "adapters", "datasets"}, None),
    "evaluation": ({"core", "adapters", "datasets", "evaluation"}, None),
    # diffusers directories in (JSON into a config of multidiff targets) and out (a model's parts saved by diffusers)
    "pretrained": ({"pretrained", "core", "atomic"}, None),
    "training": ({"core", "conditioning", "backbones", "adapters", "datasets", "pipeline", "configuration", "performance",
                  "options", "training"}, None),
    # the page: presentation over the CLI's request service (cli/ stays free of media types)
    "webapp": ({"cli", "webapp"}, None),
}
MODALITY_WORDS = re.compile(
    r"image|audio|video|clip\b|spectrogram|waveform|pixel|\bmel\b|frames?\b|png|wav|mp4|gif|vocoder|duration|fps|"
    r"sample_rate|sampling_rate|num_frames", re.I)
# The generic layers: tensors, samplers, the training loop, the generation path and the CLI.
GENERIC = [PKG / "core", PKG / "training", PKG / "cli", PKG / "pipeline.py"]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def files(package: str):
    return sorted((PKG / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependencies_point_down(package):
    inner, third_party = ALLOWED[package]
    for path in files(package):
        for name in imports(path):
            parts = name.split(".")
            if parts[0] == "multidiff":
                assert len(parts) > 1 and parts[1] in inner, f"{path.relative_to(PKG)} imports {name}"
            elif third_party is not None:
                assert parts[0] in third_party, f"{path.relative_to(PKG)} imports {name} (core is torch-only)"


def code_tokens(path: Path):
    """Names and key-like string literals (no spaces: config keys, option names) of a file.

    Comments, docstrings and prose strings (messages, which may give an example) are left out.
    """
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(first.lineno)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            yield tok
        elif tok.type == tokenize.STRING and tok.start[0] not in docstrings and " " not in tok.string:
            yield tok


def generic_files():
    for root in GENERIC:
        yield from ([root] if root.is_file() else sorted(root.rglob("*.py")))


@pytest.mark.parametrize("path", list(generic_files()), ids=lambda p: str(p.relative_to(PKG)))
def test_generic_layers_name_no_modality(path):
    """core/, training/, cli/ and pipeline.py name no modality and no modality option in code."""
    assert not any(name.startswith("multidiff.adapters") for name in imports(path)), path
    offending = [(t.start[0], t.string) for t in code_tokens(path) if MODALITY_WORDS.search(t.string)]
    assert not offending, f"{path.relative_to(PKG)} names a modality: {offending}"


def test_modality_word_check_can_fail(tmp_path):
    """The check above sees an option name in code and in a key-like string, not in a message."""
    sample = tmp_path / "sample.py"
    sample.write_text('def f(cfg):\n    """Docstring: duration is fine here."""\n    n = cfg["num_frames"]\n'
                      '    raise ValueError("a message may name a duration")\n    return n\n')
    found = {t.string for t in code_tokens(sample) if MODALITY_WORDS.search(t.string)}
    assert found == {'"num_frames"'}


def test_no_backbone_config_sizes_itself_from_the_modality():
    """The shape flows from the adapter to the backbone: no ${modality.*} in conf/backbone/."""
    from multidiff.cli.compose import config_root

    for path in sorted((config_root() / "conf" / "backbone").glob("*.yaml")):
        assert "${modality." not in path.read_text() and "oc.select:modality" not in path.read_text(), path.name
