"""ResumableCSVLogger: a resumed run continues metrics.csv (rows past the restored step dropped),
writes its last rows at the end, and says nothing about deleting logs it keeps."""

from __future__ import annotations

import csv
import warnings

from multidiff.training.loggers import ResumableCSVLogger


def _steps(logger: ResumableCSVLogger) -> list[int]:
    with open(logger.experiment.metrics_file_path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _run(save_dir, steps, *, resume_at=None) -> ResumableCSVLogger:
    logger = ResumableCSVLogger(str(save_dir), name="logs", version="")
    if resume_at is not None:
        logger.resume_at(resume_at)
    for step in steps:
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    logger.finalize("success")
    return logger


def test_resume_continues_the_file_and_drops_repeated_steps(tmp_path):
    first = _run(tmp_path, range(10))
    assert _steps(first) == list(range(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's "logs ... will be deleted" warning included
        resumed = _run(tmp_path, range(6, 9), resume_at=6)  # the checkpoint was at step 6
    assert _steps(resumed) == list(range(9))


def test_its_own_writer_slot_is_not_one_of_lightnings(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    assert not hasattr(CSVLogger(str(tmp_path)), "_writer")


def test_finalize_writes_rows_not_yet_flushed(tmp_path):
    logger = ResumableCSVLogger(str(tmp_path), name="logs", version="", flush_logs_every_n_steps=1000)
    logger.log_metrics({"x": 1.0}, step=0)
    logger.finalize("success")
    assert _steps(logger) == [0]


def test_finalize_without_logging_creates_nothing(tmp_path):
    ResumableCSVLogger(str(tmp_path), name="logs", version="").finalize("success")
    assert not (tmp_path / "logs" / "metrics.csv").exists()


def test_a_new_key_after_resume_rewrites_the_header(tmp_path):
    _run(tmp_path, range(3))
    logger = ResumableCSVLogger(str(tmp_path), name="logs", version="")
    logger.resume_at(3)
    logger.log_metrics({"train/loss": 0.1, "val/loss": 0.2}, step=3)
    logger.finalize("success")
    with open(logger.experiment.metrics_file_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3] and rows[-1]["val/loss"] == "0.2"
