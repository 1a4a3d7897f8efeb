"""What a user reads in the terminal during training, through the real CLI: every line once, no
advertisements, nothing that contradicts multidiff's own behaviour, a bar counting steps of steps."""

from __future__ import annotations

import re
from collections import Counter

from helpers import TINY, multidiff_cli

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
