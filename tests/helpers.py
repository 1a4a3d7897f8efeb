"""Helpers shared by the tests: the real CLI in a subprocess and the tiny training overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "backbone=unet2d_tiny",
    "data.batch_size=8",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "callbacks.samples.every_n_steps=2",
    "callbacks.samples.steps=2",
    "callbacks.samples.num_per_prompt=1",
    "callbacks.checkpoint.every_n_steps=2",
    "+trainer.enable_progress_bar=false",
]


def multidiff_cli(*args: str, cwd: Path | None = None, env: dict | None = None, check: bool = True, timeout: int = 600):
    """Run the real ``multidiff`` console entry point in a subprocess; returns CompletedProcess."""
    cmd = [sys.executable, "-m", "multidiff.cli.main", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MULTIDIFF_RUN_DIR", None)
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"multidiff {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
