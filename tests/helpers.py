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

TINY_VIDEO = [
    "recipe=video_moving_digits",
    "backbone=unet3d_tiny",
    "data.batch_size=4",
    "data.dataset.num_digits=30",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "callbacks.samples.every_n_steps=2",
    "callbacks.samples.steps=2",
    "callbacks.samples.num_per_prompt=1",
    "callbacks.checkpoint.every_n_steps=2",
    "+trainer.enable_progress_bar=false",
    "logger=tensorboard",
    "training.slice_items=1",  # joint image-video training: one of the 4 clips trained as a single frame
    # noise partly shared across frames, in training and sampling (through the CLI's override grammar)
    "diffusion.noise_prior={_target_:multidiff.core.noise.SharedNoise,correlation:0.5,axes:[1]}",
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``multidiff serve ARGS port=<free>`` in a subprocess, started by :meth:`start`; ``url`` once
    :meth:`wait` saw the page answer; :meth:`stop` ends it (Ctrl+C) and returns what it printed."""

    def __init__(self, *args: str) -> None:
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "multidiff.cli.main", "serve", *args, f"port={self.port}"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout: float = 180) -> str:
        import time
        import urllib.request

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"multidiff serve exited ({self.proc.returncode}):\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5):
                    return self.url
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"multidiff serve did not answer at {self.url} in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> str:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.output()


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    """Two state dicts with the same keys whose tensors differ by at most ``atol`` anywhere."""
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"max weight difference {worst}"
