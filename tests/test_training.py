"""Training under faults and at scale, through the real CLI: resume exactness, signals, NaNs,
DDP (two processes, and torchrun with two "nodes" on loopback), bf16, atomic checkpoints."""

from __future__ import annotations

import csv
import os
import pickle
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TINY, assert_same_weights, multidiff_cli

FAST = [o for o in TINY if not o.startswith(("trainer.max_steps", "callbacks.checkpoint"))] + [
    "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false"]


def train(run_dir, data_root, *extra, check=True, env=None):
    return multidiff_cli("train", "recipe=image_digits", f"run_dir={run_dir}", f"data_root={data_root}",
                         *FAST, *extra, check=check, env=env)


def weights(run_dir, prefix="denoiser.", name="last.ckpt"):
    state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
    return state["global_step"], {k: v for k, v in state["state_dict"].items() if k.startswith(prefix)}


def logged_steps(run_dir):
    """The ``step`` column of RUN/logs/metrics.csv, in file order."""
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root):
    """8 uninterrupted steps with a periodic checkpoint every 4 (batch 8: an epoch is 224 steps,
    so every interruption below is mid-epoch)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(run, data_root, "trainer.max_steps=8", "callbacks.checkpoint.every_n_steps=4")
    return run


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_signal_writes_checkpoint_and_resume_is_exact(straight, tmp_path, data_root, signal_name):
    run = tmp_path / "run"
    proc = train(run, data_root, "trainer.max_steps=8", "callbacks.checkpoint.every_n_steps=4",
                 "training.inject_signal_at_step=5", f"training.inject_signal={signal_name}")
    assert "stopped by signal at step 6" in proc.stdout and "resume=auto" in proc.stdout
    step, _ = weights(run)
    assert step == 6
    assert not (run / "model").exists()  # not a finished run: no export yet
    train(run, data_root, "trainer.max_steps=8", "callbacks.checkpoint.every_n_steps=4", "resume=auto")
    step, resumed = weights(run)
    _, reference = weights(straight)
    assert step == 8
    assert_same_weights(resumed, reference)
    assert_same_weights(weights(run, "ema.")[1], weights(straight, "ema.")[1])
    # the resumed run continues the metrics of the first part instead of deleting them
    assert logged_steps(run) == logged_steps(straight) and len(set(logged_steps(run))) == 8


def test_sigkill_after_periodic_checkpoint_then_resume_is_exact(straight, tmp_path, data_root):
    run = tmp_path / "run"
    proc = train(run, data_root, "trainer.max_steps=8", "callbacks.checkpoint.every_n_steps=4",
                 "training.inject_signal_at_step=5", "training.inject_signal=SIGKILL", check=False)
    assert proc.returncode == -9
    assert not list((run / "checkpoints").glob(".*tmp*"))  # no torn temp files left behind
    train(run, data_root, "trainer.max_steps=8", "callbacks.checkpoint.every_n_steps=4", "resume=auto")
    step, resumed = weights(run)
    assert step == 8
    assert_same_weights(resumed, weights(straight)[1])
    assert_same_weights(weights(run, "ema.")[1], weights(straight, "ema.")[1])
    # rows up to the checkpoint (step 4) survived the kill; those after it are logged once, by the resumed run
    assert logged_steps(run) == logged_steps(straight)


def exported(run_dir):
    """The exported backbone's tensors (RUN/model/backbone/*.safetensors)."""
    from safetensors.torch import load_file

    files = sorted((run_dir / "model" / "backbone").glob("*.safetensors"))
    assert files, f"no exported weights in {run_dir / 'model'}"
    return {k: v for f in files for k, v in load_file(f).items()}


def test_extending_a_finished_run_twice_is_exact(straight, tmp_path, data_root):
    """A run that finished (mid-epoch) and is extended with a higher max_steps and resume=auto, twice
    (4, then 6, then 8 steps), ends with the weights, EMA and export of the uninterrupted run (its
    final checkpoint used to be written after Lightning had closed the epoch, so the extension
    restarted on other data)."""
    run = tmp_path / "run"
    for i, steps in enumerate([4, 6, 8]):
        train(run, data_root, f"trainer.max_steps={steps}", "callbacks.checkpoint.every_n_steps=4",
              *(["resume=auto"] if i else []))
        if steps == 4:  # the periodic checkpoint of step 4 holds that step's EMA update, as a final one does
            assert_same_weights(weights(run, "ema.")[1], weights(straight, "ema.", "step_0000004.ckpt")[1], atol=0)
    step, resumed = weights(run)
    assert step == 8
    assert_same_weights(resumed, weights(straight)[1])
    assert_same_weights(weights(run, "ema.")[1], weights(straight, "ema.")[1])
    assert_same_weights(exported(run), exported(straight))


def test_extending_a_run_that_finished_at_an_epoch_boundary_is_exact(tmp_path, data_root):
    """64 of the digits in a folder of your own (data=folder), batch 16: an epoch is 4 steps;
    4 + 4 == 8 straight, with the recipe's end-of-run previews on."""
    import json

    from multidiff.datasets.digits import materialize_digits

    source = materialize_digits(data_root, size=16)
    folder = tmp_path / "digits64"
    folder.mkdir()
    rows = (source / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[:64]
    for row in rows:
        shutil.copy(source / json.loads(row)["file_name"], folder)
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    opts = ("data=folder", f"data.dataset.root={folder}", "data.batch_size=16", "callbacks.samples.at_end=true",
            "callbacks.checkpoint.every_n_steps=0")
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(straight, data_root, "trainer.max_steps=8", *opts)
    train(run, data_root, "trainer.max_steps=4", *opts)
    assert weights(run)[0] == 4
    train(run, data_root, "trainer.max_steps=8", "resume=auto", *opts)
    assert weights(run)[0] == weights(straight)[0] == 8
    assert_same_weights(weights(run)[1], weights(straight)[1])
    assert_same_weights(weights(run, "ema.")[1], weights(straight, "ema.")[1])
    assert_same_weights(exported(run), exported(straight))


def _error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("multidiff train: error:")]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_resume_refuses_files_it_cannot_continue_with_one_paragraph(straight, tmp_path, data_root):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    files = {"pickle.ckpt": pickle.dumps(Payload()), "empty.ckpt": b""}
    good = (straight / "checkpoints" / "last.ckpt").read_bytes()
    files["truncated.ckpt"] = good[: len(good) // 2]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.ckpt")
    expected = {"pickle.ckpt": "never unpickles", "empty.ckpt": "the file is empty",
                "truncated.ckpt": "not a checkpoint written by torch.save",
                "foreign.ckpt": "not a multidiff training checkpoint"}
    for name, phrase in expected.items():
        line = _error_line(train(tmp_path / "run", data_root, f"resume={tmp_path / name}", check=False))
        assert phrase in line and str(tmp_path / name) in line and "resume=auto" in line, line
    assert not marker.exists()  # nothing in the pickle ran
    # a checkpoint of another model shape names the first key that differs
    line = _error_line(train(tmp_path / "run", data_root, f"resume={straight / 'checkpoints' / 'last.ckpt'}",
                             "backbone=unet2d_small", check=False))
    assert "was written for another model" in line and "denoiser.backbone." in line and "shape" in line, line
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written


def test_resume_from_explicit_path(straight, tmp_path, data_root):
    run = tmp_path / "run"
    shutil.copytree(straight / "checkpoints", tmp_path / "given")
    ckpt = tmp_path / "given" / "step_0000004.ckpt"
    assert ckpt.is_file()
    train(run, data_root, "trainer.max_steps=8", f"resume={ckpt}")
    assert_same_weights(weights(run)[1], weights(straight)[1])
    proc = train(run, data_root, "resume=/no/such.ckpt", check=False)
    assert proc.returncode != 0 and "no such checkpoint file" in proc.stderr


def test_periodic_checkpoints_keep_last_k(tmp_path, data_root):
    run = tmp_path / "run"
    train(run, data_root, "trainer.max_steps=6", "callbacks.checkpoint.every_n_steps=2",
          "callbacks.checkpoint.keep_last=2")
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step_0000004.ckpt", "step_0000006.ckpt"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_planted_nan(tmp_path, data_root, policy):
    run = tmp_path / "run"
    proc = train(run, data_root, "trainer.max_steps=5", "callbacks.checkpoint.every_n_steps=2",
                 "training.inject_nan_at_step=3", f"training.nonfinite={policy}", check=False)
    if policy == "stop":
        assert proc.returncode != 0
        assert "non-finite loss" in proc.stderr and "training.nonfinite=skip" in proc.stderr
        assert "Traceback" not in proc.stderr
        step, w = weights(run)
        assert step == 2 and all(torch.isfinite(v).all() for v in w.values())  # last good checkpoint
    else:
        assert proc.returncode == 0, proc.stderr
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert state["multidiff_skipped_steps"] == 1
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
        assert "skipped_steps" in (run / "logs" / "metrics.csv").read_text()


def test_bf16_mixed_trains_with_finite_loss(tmp_path, data_root):
    run = tmp_path / "run"
    train(run, data_root, "trainer.max_steps=3", "trainer.precision=bf16-mixed")
    losses = [float(line.split(",")[-1]) for line in (run / "logs" / "metrics.csv").read_text().splitlines()[1:]
              if line.split(",")[-1]]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def _losses(run):
    rows = (run / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col, step_col = header.index("train/loss"), header.index("step")
    return {int(r.split(",")[step_col]): float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]}


def test_ddp_two_processes_matches_single_process(tmp_path, data_root):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train(single, data_root, "trainer.max_steps=4", "data.batch_size=8")
    proc = train(ddp, data_root, "trainer.max_steps=4", "trainer=ddp", "trainer.devices=2",
                 "trainer.accelerator=cpu", "data.batch_size=4")
    assert proc.stdout.count("run directory:") == 1  # one process reports, one run directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    assert (ddp / "model" / "multidiff.json").is_file()
    a, b = _losses(single), _losses(ddp)
    assert a.keys() == b.keys() and len(a) >= 3
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert_same_weights(weights(single)[1], weights(ddp)[1], atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_on_loopback(tmp_path, data_root):
    run = tmp_path / "run"
    port = _free_port()
    args = ["-m", "multidiff.cli.main", "train", "recipe=image_digits", f"run_dir={run}", f"data_root={data_root}",
            *FAST, "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", "trainer.accelerator=cpu",
            "trainer.max_steps=3", "data.batch_size=4"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MULTIDIFF_RUN_DIR", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
             f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    assert sum(out.count("run directory:") for out, _ in outs) == 1
    assert weights(run)[0] == 3 and (run / "model" / "multidiff.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_second_run_in_the_same_process_chooses_its_own_run_dir(tmp_path, data_root, monkeypatch):
    """The run directory is pinned (MULTIDIFF_RUN_DIR) for the run's own workers only, not for the
    next run of the same process (a notebook, a sweep)."""
    from multidiff.cli.main import main

    monkeypatch.delenv("MULTIDIFF_RUN_DIR", raising=False)
    for name in ("first", "second"):
        args = ["train", "recipe=image_digits", f"run_dir={tmp_path / name}", f"data_root={data_root}", *TINY,
                "trainer.max_steps=1", "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false"]
        assert main(args) == 0
        assert (tmp_path / name / "model" / "multidiff.json").is_file()
        assert "MULTIDIFF_RUN_DIR" not in os.environ


def test_global_batch_and_lr_scaling_are_explicit():
    from multidiff.cli.compose import compose
    from multidiff.cli.train import batch_plan

    cfg = compose("train", ["trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2", "data.batch_size=16",
                            "trainer.accumulate_grad_batches=2", "training.lr_scaling=linear",
                            "training.base_batch_size=64", "optimizer.lr=1e-4"])
    plan = batch_plan(cfg, dict(cfg.trainer))
    assert plan == {"world_size": 4, "global_batch": 128, "lr": pytest.approx(2e-4)}


def test_atomic_checkpoint_io_never_leaves_a_torn_file(tmp_path):
    from multidiff.training.faults import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "c.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"a": torch.zeros(3), "b": Boom()}, path)
    assert torch.equal(io.load_checkpoint(path)["a"], torch.ones(3))
