"""Pre-encoded shards at scale: prepare and stream 10,000 and 100,000 synthetic items.

    python benchmarks/streaming.py                       # 10,000 and 100,000 items
    python benchmarks/streaming.py --sizes 2000 --train-steps 30

The items are scikit-learn digits, each moved by a few pixels and dimmed by a per-item amount drawn
from its index (so no two are alike), as 16x16 images with paraphrased captions ("a handwritten
digit seven", ...), written by :func:`multidiff.datasets.shards.prepare_shards` with the real
text encoder (its caption embeddings go into the shards). For each size:

- prepare: items/s and the size on disk;
- stream: one epoch through the training loader (``ShardDataset``, the chunk-local batch sampler,
  the default workers of ``data=streaming``) in a fresh process: items/s and the process's peak
  memory (its own and its loader workers' peak resident set), which should not grow with the
  number of items;
- train (largest size): the real ``image_digits`` recipe on ``data=streaming`` for a number of
  steps: time per step and the time the loop waits for the next batch (between one step's end and
  the next one's start), as a share of the step.

Prints a table and writes benchmarks/results/streaming.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {}", "the number {}, written by hand", "a handwritten {} in white ink"]


class SyntheticDigits(Dataset):
    """``n`` distinct items made from the 1,797 scikit-learn digits, deterministic in the index."""

    def __init__(self, n: int) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.n = n
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        self.images = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
        self.targets = digits.target.tolist()
        self.on_error = "fail"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        k = i % len(self.targets)
        dy, dx = torch.randint(-2, 3, (2,), generator=g).tolist()
        gain = 0.6 + 0.4 * torch.rand((), generator=g).item()
        x = torch.roll(self.images[k], shifts=(dy, dx), dims=(1, 2)) * gain * 2 - 1
        return {"x": x, "text": TEMPLATES[i % len(TEMPLATES)].format(NAMES[self.targets[k]])}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stream_epoch(path: str, batch_size: int, workers: int) -> dict:
    """One epoch through the training loader, in this (fresh) process: items/s and peak memory."""
    import resource

    from torch.utils.data import DataLoader

    from multidiff.datasets.folder import collate
    from multidiff.datasets.shards import ShardDataset
    from multidiff.training.data import ResumableBatchSampler

    dataset = ShardDataset(path)
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed=0, drop_last=True, chunks=dataset.chunk_sizes)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        prefetch_factor=4 if workers else None)
    t0, items = time.perf_counter(), 0
    for batch in loader:
        items += batch["x"].shape[0]
    seconds = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"streamed": items, "stream_s": round(seconds, 2), "items_per_s": round(items / seconds),
            "peak_rss_mb": round(own), "peak_worker_rss_mb": round(children)}


def train_wait(path: str, steps: int, run_dir: Path) -> dict:
    """The image_digits recipe on the shards: seconds per step and the share spent waiting for data."""
    import lightning as L

    from multidiff.cli.compose import compose
    from multidiff.cli.train import build

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.steps, self.waits, self.last_end = [], [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.start = time.perf_counter()
            if self.last_end is not None:
                self.waits.append(self.start - self.last_end)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.last_end = time.perf_counter()
            self.steps.append(self.last_end - self.start)

    cfg = compose("train", ["recipe=image_digits", "data=streaming", f"data.path={path}", f"trainer.max_steps={steps}",
                            f"run_dir={run_dir}", "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false",
                            "+trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_steps=0"])
    parts, module, datamodule, trainer = build(cfg, run_dir)
    clock = Clock()
    trainer.callbacks.append(clock)
    trainer.fit(module, datamodule=datamodule)
    skip = 3  # the first steps include the loader's start
    step = sum(clock.steps[skip:]) / len(clock.steps[skip:])
    wait = sum(clock.waits[skip:]) / len(clock.waits[skip:])
    return {"train_steps": steps, "batch_size": int(cfg.data.batch_size), "workers": int(cfg.data.num_workers),
            "step_s": round(step, 4), "wait_s": round(wait, 4), "wait_share": round(wait / (wait + step), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--workers", type=int, default=2, help="loader workers (data=streaming's default)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--root", default=None, help="where the shards are written (default: a temporary folder)")
    ap.add_argument("--name", default="streaming")
    ap.add_argument("--_stream", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._stream:  # the child process of one streaming measurement
        print(json.dumps(stream_epoch(args._stream, args.batch_size, args.workers)))
        return

    from multidiff.conditioning.text import TextConditioner
    from multidiff.datasets.shards import prepare_shards

    root = Path(args.root or tempfile.mkdtemp(prefix="multidiff-streaming-"))
    conditioner = TextConditioner()
    rows, largest = [], None
    for n in args.sizes:
        out = root / f"items-{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        manifest = prepare_shards(SyntheticDigits(n), out, conditioner=conditioner, recipe="benchmark", shape=(1, 16, 16),
                                  dataset_config={"synthetic": n}, workers=args.workers, progress=False)
        prep = time.perf_counter() - t0
        child = subprocess.run([sys.executable, __file__, "--_stream", str(out), "--workers", str(args.workers),
                                "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
        stream = json.loads(child.stdout.strip().splitlines()[-1])
        row = {"items": n, "chunks": manifest["chunks"], "disk_mb": round(du(out) / 2**20),
               "prepare_s": round(prep, 1), "prepare_items_per_s": round(n / prep), **stream}
        rows.append(row)
        print(row, flush=True)
        largest = out
    train = train_wait(str(largest), args.train_steps, root / "run")
    print(train, flush=True)
    rows[-1].update(train)
    cols = ["items", "chunks", "disk_mb", "prepare_s", "prepare_items_per_s", "streamed", "stream_s", "items_per_s", "peak_rss_mb",
            "peak_worker_rss_mb", "step_s", "wait_s", "wait_share"]
    path = write_results(args.name, rows, cols, {"workers": args.workers, "batch_size": args.batch_size,
                                                 "train": train, "note": "stream: one epoch through the training loader "
                                                 "in a fresh process; train: recipe=image_digits data=streaming"})
    print()
    print(path.read_text())
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
