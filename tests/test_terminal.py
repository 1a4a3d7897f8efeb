"""What a user reads in the terminal during training, through the real CLI: every line once, no
advertisements, nothing that contradicts multidiff's own behaviour, a bar counting steps of steps."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys
import warnings
from collections import Counter

import pytest
from helpers import ROOT, TINY, multidiff_cli

from multidiff.cli import terminal

# TINY without its switch-off of the progress bar: the bar is part of what is checked here
OPTS = [o for o in TINY if "enable_progress_bar" not in o and not o.startswith("trainer.max_steps")]
BAR = re.compile(r"^\s*[Tt]raining:")
LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR)( [\w.]+)?: ")


def _train(run_dir, data_root, *extra):
    proc = multidiff_cli("train", "recipe=image_digits", f"run_dir={run_dir}", f"data_root={data_root}", *OPTS, *extra)
    return proc.stdout + proc.stderr


def _lines(output: str) -> list[str]:
    """Lines as a terminal ends up showing them, progress-bar redraws (carriage returns) split apart."""
    return [line.rstrip() for line in re.split(r"[\r\n]", output) if line.strip()]


def test_training_output_is_clean_and_the_bar_counts_steps(tmp_path, data_root):
    out = _train(tmp_path / "run", data_root, "trainer.max_steps=4")
    # one message through two handlers differs only in its prefix ("INFO: X", "INFO lightning...: X")
    lines = [LEVEL.sub("", line) for line in _lines(out) if not BAR.match(line)]
    repeated = [line for line, n in Counter(lines).items() if n > 1]
    assert not repeated, f"lines printed more than once: {repeated}\n{out[-3000:]}"
    for text in ("litlogger", "weights_only` was not set", "LeafSpec", "Epoch"):
        assert text not in out, f"{text!r} in the output:\n{out[-3000:]}"
    assert not re.search(r"\d+/-\d+", out), out[-3000:]  # no negative totals
    assert re.search(r"training: +100%.* 4/4 ", out), out[-3000:]
    # extended by resume=auto: the bar continues from the checkpoint's step towards the new total
    out = _train(tmp_path / "run", data_root, "trainer.max_steps=6", "resume=auto")
    assert re.search(r"training: .* 4/6 ", out) and re.search(r"training: +100%.* 6/6 ", out), out[-3000:]


def test_verbose_shows_what_is_filtered(tmp_path, data_root):
    out = _train(tmp_path / "run", data_root, "trainer.max_steps=1", "verbose=true")
    assert "litlogger" in out and "LeafSpec" in out


# -- terminal.setup() in-process: the only place warning filters are installed, and no leaks ------------

LEAFSPEC = ("`isinstance(treespec, LeafSpec)` is deprecated", "lightning.pytorch.utilities._pytree")


@pytest.fixture
def restored_terminal():
    """Whatever setup() changes (warning filters, the multidiff logger, Lightning's rank-zero
    logger, transformers' progress bar) is put back after the test."""
    from transformers.utils import logging as hf_logging

    log, rank_zero = logging.getLogger("multidiff"), logging.getLogger("lightning.pytorch.utilities.rank_zero")
    saved = (list(log.handlers), log.level, log.propagate, list(rank_zero.filters), hf_logging.is_progress_bar_enabled())
    with warnings.catch_warnings():
        yield
    log.handlers[:], log.level, log.propagate, rank_zero.filters[:] = saved[0], saved[1], saved[2], saved[3]
    (hf_logging.enable_progress_bar if saved[4] else hf_logging.disable_progress_bar)()
    terminal._hf_bar_switched_off = False


def _shown(message: str, module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:  # the filters as they are, output recorded
        warnings.warn_explicit(message, UserWarning, "dependency.py", 1, module=module, registry={})
    return bool(caught)


def test_setup_twice_stacks_nothing_and_verbose_undoes_it(restored_terminal):
    from transformers.utils import logging as hf_logging

    warnings.simplefilter("always")  # a baseline that shows everything
    assert _shown(*LEAFSPEC)
    terminal.setup()
    state = lambda: (len(warnings.filters), len(logging.getLogger("multidiff").handlers),  # noqa: E731
                     len(logging.getLogger("lightning.pytorch.utilities.rank_zero").filters))
    once = state()
    terminal.setup()
    assert state() == once and not _shown(*LEAFSPEC) and not hf_logging.is_progress_bar_enabled()
    terminal.setup(verbose=True)  # e.g. a second command in the same process
    assert _shown(*LEAFSPEC) and hf_logging.is_progress_bar_enabled()
    assert len(logging.getLogger("lightning.pytorch.utilities.rank_zero").filters) == once[2] - 1
    terminal.setup()
    assert not _shown(*LEAFSPEC) and state() == (once[0] + len(terminal.DEPENDENCY_WARNINGS), *once[1:])
    terminal.setup(verbose=True)
    terminal.setup(verbose=True)
    assert _shown(*LEAFSPEC) and len(warnings.filters) == once[0] + len(terminal.DEPENDENCY_WARNINGS)


FILTER_CALLS = {"filterwarnings", "simplefilter", "resetwarnings"}


def test_only_terminal_setup_installs_warning_filters():
    """No module changes the warning filters on import or anywhere else; cli/terminal.py does,
    inside the functions setup() runs for a command."""
    found = []
    for path in sorted((ROOT / "multidiff").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in FILTER_CALLS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert all(f.startswith("multidiff/cli/terminal.py:") for f in found), found


def test_importing_every_module_leaves_filters_and_handlers_alone():
    """Filters and handlers before and after importing every module of multidiff, with the
    third-party libraries it uses imported first (they install filters of their own)."""
    code = """
import importlib, logging, pkgutil, warnings
import diffusers, hydra, lightning.pytorch, omegaconf, torch, torchaudio, torchvision, transformers  # noqa
import multidiff
names = sorted(m.name for m in pkgutil.walk_packages(multidiff.__path__, "multidiff."))
filters, root = list(warnings.filters), list(logging.getLogger().handlers)
for name in names:
    importlib.import_module(name)
assert len(names) > 40, names
assert not [f for f in warnings.filters if f not in filters], [f for f in warnings.filters if f not in filters]
assert logging.getLogger().handlers == root and not logging.getLogger("multidiff").handlers
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
