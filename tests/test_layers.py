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
    "datasets": ({"core", "adapters", "datasets"}, None),
    "training": ({"core", "conditioning", "backbones", "adapters", "datasets", "pipeline", "configuration", "performance",
                  "training"}, None),
}
MODALITY_WORDS = re.compile(r"image|audio|video|spectrogram|waveform|pixel|\bmel\b|frames?\b|png|wav|mp4|gif", re.I)


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
    """Names and string literals of a file, without comments and docstrings."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(first.lineno)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME or (tok.type == tokenize.STRING and tok.start[0] not in docstrings):
            yield tok


@pytest.mark.parametrize("package", ["core", "training"])
def test_core_and_training_name_no_modality(package):
    for path in files(package):
        assert not any(name.startswith("multidiff.adapters") for name in imports(path)), path
        offending = [(t.start[0], t.string) for t in code_tokens(path) if MODALITY_WORDS.search(t.string)]
        assert not offending, f"{path.relative_to(PKG)} names a modality: {offending}"
