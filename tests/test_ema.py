"""The EMA update, its warm-up, and the rule that training code uses public Lightning and torch APIs."""

from __future__ import annotations

import ast
import copy

import pytest
import torch
from helpers import ROOT

from multidiff.training.ema import ema_decay, ema_update


def test_ema_update_is_the_lerp_and_copies_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = copy.deepcopy(model)
    old = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(2.0)
    ema_update(ema, model, 0.9)
    for e, o, m in zip(ema.parameters(), old, model.parameters()):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * m)
    torch.testing.assert_close(ema[1].running_mean, model[1].running_mean)


def test_ema_update_of_a_model_without_parameters():
    ema_update(torch.nn.Identity(), torch.nn.Identity(), 0.9)


@pytest.mark.parametrize(("step", "expected"), [(0, 0.1), (10, 11 / 20), (10_000, 0.999)])
def test_ema_decay_warms_up(step, expected):
    assert ema_decay(step, 0.999) == pytest.approx(expected)
    assert ema_decay(step, 0.999, warmup=False) == 0.999


# Private (underscore) names of Lightning and torch that these files may use, with why.
ALLOWED_PRIVATE = {
    # ContinuingWriter overrides the hook in which Lightning's writer deletes metrics.csv: no public
    # argument keeps the file (see the comment there)
    "_check_log_dir_exists",
}
FILES = ("multidiff/training/loggers.py", "multidiff/training/callbacks.py", "multidiff/training/ema.py")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("file", FILES)
def test_training_hooks_use_public_lightning_and_torch_apis(file):
    """No ``torch._x``, ``trainer._x``, ``self._experiment`` and the like. A leading underscore is
    allowed on attributes the file's own ``__init__`` creates; a private method it defines (which
    may override a base class's) and any other private name must be listed above, with why."""
    tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
    created = {t.attr for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__init__"
               for n in ast.walk(f) if isinstance(n, ast.Assign | ast.AnnAssign)
               for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Attribute)}
    used = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and _private(n.name)}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _private(n.attr)} - created
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            used |= {name for name in [a.name for a in node.names] + (node.module or "").split(".") if _private(name)}
    assert used <= ALLOWED_PRIVATE, sorted(used - ALLOWED_PRIVATE)
