"""Pre-encoded shards (``multidiff prepare``) streamed back for training (``data=streaming``): the items
reproduce the in-memory dataset, an interrupted prepare resumes to the same files, shards of another
encoder or autoencoder are refused, a stopped streaming run resumes exactly, two DDP processes and
two torchrun "nodes" see every item once per epoch, mixing weights hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_same_weights, free_port, multidiff_cli
from PIL import Image

from multidiff.datasets.folder import CaptionFolder, DatasetError
from multidiff.datasets.shards import MANIFEST, ShardDataset, prepare_shards, ready_for_training
from multidiff.training.data import MixtureBatchSampler, ResumableBatchSampler, epoch_order

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
GOOD = 96          # readable images in the folder (plus one unreadable file)
CHUNK = 16
FAST = ["backbone=unet2d_tiny", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
        "callbacks.samples.at_end=false", "+trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """96 scikit-learn digits as PNG files with captions, and one file that is not an image."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digit_files")
    digits = load_digits()
    rows = []
    for i in range(GOOD):
        name = f"{i:03d}.png"
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16)).save(root / name)
        rows.append({"file_name": name, "text": f"a handwritten digit {NAMES[digits.target[i]]}"})
        if i == 40:
            (root / "broken.png").write_bytes(b"not a png at all")
            rows.append({"file_name": "broken.png", "text": "a broken file"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def source(folder) -> list[str]:
    return ["recipe=image_digits", "data=folder", f"data.dataset.root={folder}", "data.dataset.on_error=skip"]


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "digits"
    proc = multidiff_cli("prepare", *source(folder), f"out={out}", f"chunk_items={CHUNK}", "workers=2", "encode_batch=8")
    assert f"{GOOD} items in 7 chunks" in proc.stdout and "1 skipped" in proc.stdout
    assert f"data=streaming data.path={out}" in proc.stdout
    return out


def adapter():
    from multidiff.adapters.image import ImageAdapter

    return ImageAdapter(size=16, channels=1)


def encoder():
    from multidiff.conditioning.text import TextConditioner

    return TextConditioner()


def test_prepare_reproduces_the_in_memory_items_and_their_caption_embeddings(folder, shards):
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["items"] == GOOD and sum(manifest["chunk_sizes"]) == GOOD and len(manifest["chunk_sizes"]) == 7
    assert manifest["skipped"]["count"] == 1 and "broken.png" in manifest["skipped"]["errors"][0]
    assert manifest["data_shape"] == [1, 16, 16] and manifest["key"] == "x" and manifest["autoencoder"] is None
    reference = CaptionFolder(folder, adapter(), on_error="skip")
    stream = ShardDataset(shards)
    assert len(stream) == len(reference) == GOOD
    text = encoder()
    for i in range(GOOD):
        a, b = reference[i], stream[i]
        assert torch.equal(a["x"], b["x"]) and a["text"] == b["text"] and b["index"] == i
    items = [stream[i] for i in (0, 41, GOOD - 1)]
    cond = text.encode([it["text"] for it in items])
    assert torch.equal(torch.stack([it["tokens"] for it in items]), cond.tokens)
    assert torch.equal(torch.stack([it["mask"] for it in items]), cond.mask)
    assert torch.equal(torch.stack([it["pooled"] for it in items]), cond.pooled)
    assert manifest["text_encoder"] == text.fingerprint()


class _Interrupted(torch.utils.data.Dataset):
    """The folder's items, but reading item ``stop`` raises: a prepare that dies part-way."""

    def __init__(self, dataset, stop: int) -> None:
        self.dataset, self.stop, self.on_error = dataset, stop, dataset.on_error

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if i == self.stop:
            raise RuntimeError("killed")
        return self.dataset[i]


def test_an_interrupted_prepare_resumes_and_writes_the_same_files(folder, tmp_path):
    dataset = CaptionFolder(folder, adapter(), on_error="skip", cache=False)
    text = encoder()
    kw = dict(conditioner=text, recipe="test", dataset_config={"root": "x"}, shape=(1, 16, 16), chunk_items=CHUNK,
              workers=0, batch_size=8, progress=False)
    whole = prepare_shards(dataset, tmp_path / "whole", **kw)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_shards(_Interrupted(dataset, 60), tmp_path / "resumed", **kw)
    written = sorted(p.name for p in (tmp_path / "resumed").glob("chunk-*.bin"))
    assert written == [f"chunk-0-{k}.bin" for k in range(3)]  # chunks 0-2 done; chunk 3 (items 48-63) was being written
    assert not (tmp_path / "resumed" / MANIFEST).exists()
    before = {p.name: p.stat().st_ino for p in (tmp_path / "resumed").glob("chunk-*.bin")}
    resumed = prepare_shards(dataset, tmp_path / "resumed", **kw)
    # the chunks marked done were kept, not written again
    assert {n: (tmp_path / "resumed" / n).stat().st_ino for n in before} == before
    assert resumed["sha256"] == whole["sha256"]
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resumed").iterdir())  # no staging or state left
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    # another prepare into a finished folder of other settings is refused; the same settings are a no-op
    with pytest.raises(DatasetError, match="other settings"):
        prepare_shards(dataset, tmp_path / "whole", **{**kw, "chunk_items": 8})
    assert prepare_shards(dataset, tmp_path / "whole", **kw)["sha256"] == whole["sha256"]


def test_shards_of_another_autoencoder_are_refused(folder, tmp_path):
    from multidiff.autoencoders.conv import ConvAutoencoder

    def stage(seed):
        torch.manual_seed(seed)
        return ConvAutoencoder(shape=(1, 16, 16), latent_channels=2, channels=[8, 8], norm_groups=4).eval()

    dataset = CaptionFolder(folder, adapter(), on_error="skip")
    prepared = stage(0)
    manifest = prepare_shards(dataset, tmp_path / "latents", stage=prepared, conditioner=None, chunk_items=32,
                              workers=0, progress=False, shape=(1, 16, 16))
    assert manifest["key"] == "z" and manifest["item_shape"] == [2, 8, 8]
    stream = ShardDataset(tmp_path / "latents")
    with torch.no_grad():
        # encoded in a batch of 32 there, alone here: the same up to float rounding
        assert torch.allclose(stream[5]["z"], prepared.encode_raw(prepared.pad(dataset[5]["x"][None]))[0], atol=1e-5)
    with pytest.raises(DatasetError, match="another autoencoder"):
        ready_for_training(stream, stage=stage(1))
    with pytest.raises(DatasetError, match="no autoencoder"):
        ready_for_training(ShardDataset(tmp_path / "latents", manifest={**stream.manifest, "autoencoder": None}),
                           stage=prepared)
    fresh = stage(0)
    assert fresh.needs_fit
    ready_for_training(stream, stage=fresh)  # the same weights: accepted, and the latent scale is fitted from the shards
    assert not fresh.needs_fit


def train(run, shards, *extra, check=True):
    return multidiff_cli("train", "recipe=image_digits", "data=streaming", f"data.path={shards}", "data.num_workers=1",
                         "data.log_items=true", f"run_dir={run}", *FAST, *extra, check=check)


def test_streaming_training_refuses_another_text_encoder_or_shape_in_one_paragraph(shards, tmp_path):
    proc = train(tmp_path / "run", shards, "conditioning.encoder.max_length=16", "trainer.max_steps=1", check=False)
    assert proc.returncode == 2
    message = proc.stderr.strip().splitlines()[-1]
    assert "text encoder" in message and "Prepare the shards again" in message and "Traceback" not in proc.stderr
    proc = train(tmp_path / "run2", shards, "modality.size=32", "trainer.max_steps=1", check=False)
    assert proc.returncode == 2 and "[1, 16, 16]" in proc.stderr and "[1, 32, 32]" in proc.stderr
    proc = train(tmp_path / "run3", tmp_path / "nothing", "trainer.max_steps=1", check=False)
    assert proc.returncode == 2 and "multidiff prepare" in proc.stderr and "Traceback" not in proc.stderr


def item_log(run) -> list[tuple[int, int, list[int]]]:
    rows = []
    for path in sorted((run / "logs").glob("items-rank*.txt")):
        for line in path.read_text().splitlines():
            epoch, step, *items = map(int, line.split())
            rows.append((epoch, step, items))
    return rows


def weights(run, prefix="denoiser."):
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return state["global_step"], {k: v for k, v in state["state_dict"].items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """8 uninterrupted streaming steps at batch 8 (an epoch is 12 steps: every stop is mid-epoch)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(run, shards, "data.batch_size=8", "trainer.max_steps=8", "callbacks.checkpoint.every_n_steps=4")
    return run


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_stopped_streaming_run_resumes_with_the_same_batches_and_weights(shards, straight, tmp_path, signal_name):
    run = tmp_path / "run"
    args = ("data.batch_size=8", "trainer.max_steps=8", "callbacks.checkpoint.every_n_steps=4")
    proc = train(run, shards, *args, "training.inject_signal_at_step=5", f"training.inject_signal={signal_name}",
                 check=False)
    assert proc.returncode == (-9 if signal_name == "SIGKILL" else 0), proc.stderr[-2000:]
    train(run, shards, *args, "resume=auto")
    step, resumed = weights(run)
    assert step == 8
    assert_same_weights(resumed, weights(straight)[1])
    assert_same_weights(weights(run, "ema.")[1], weights(straight, "ema.")[1])
    # the batches after the restart are the uninterrupted run's, in its order
    done = dict(((e, s), items) for e, s, items in item_log(run))
    assert done == dict(((e, s), items) for e, s, items in item_log(straight))
    assert len(done) == 8


def _epoch_items(run, steps_per_epoch: int) -> list[int]:
    return [i for epoch, _, items in item_log(run) if epoch == 0 for i in items][: steps_per_epoch * 8]


def test_two_ddp_processes_see_every_item_once_per_epoch_and_match_one_process(shards, tmp_path):
    # 96 items, global batch 8: an epoch is 12 steps; 13 steps start the next epoch
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, shards, "data.batch_size=8", "trainer.max_steps=13", "callbacks.checkpoint.every_n_steps=0")
    train(two, shards, "data.batch_size=4", "trainer.max_steps=13", "callbacks.checkpoint.every_n_steps=0",
          "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    per_rank = {}
    for path in sorted((two / "logs").glob("items-rank*.txt")):
        per_rank[path.name] = [i for line in path.read_text().splitlines() if line.split()[0] == "0"
                               for i in map(int, line.split()[2:])]
    assert len(per_rank) == 2
    a, b = per_rank.values()
    assert len(a) == len(b) == GOOD // 2 and not set(a) & set(b) and sorted(a + b) == list(range(GOOD))
    assert sorted(_epoch_items(one, 12)) == list(range(GOOD))
    assert [e for e, _, _ in item_log(one)].count(1) == 1  # the 13th step is epoch 1's first batch
    assert_same_weights(weights(one)[1], weights(two)[1], atol=1e-5)


def test_torchrun_two_nodes_on_loopback_see_every_item_once_per_epoch(shards, tmp_path):
    run = tmp_path / "run"
    port = free_port()
    args = ["-m", "multidiff.cli.main", "train", "recipe=image_digits", "data=streaming", f"data.path={shards}",
            "data.num_workers=1", "data.log_items=true", f"run_dir={run}", *FAST, "trainer=ddp", "trainer.devices=1",
            "trainer.num_nodes=2", "trainer.accelerator=cpu", "trainer.max_steps=12", "data.batch_size=4",
            "callbacks.checkpoint.every_n_steps=0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MULTIDIFF_RUN_DIR", None)
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}", *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
    ranks = sorted((run / "logs").glob("items-rank*.txt"))
    assert [p.name for p in ranks] == ["items-rank0.txt", "items-rank1.txt"]
    seen = [[i for line in p.read_text().splitlines() for i in map(int, line.split()[2:])] for p in ranks]
    assert len(seen[0]) == len(seen[1]) == GOOD // 2
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(GOOD))


def _segments(order, chunks):
    """``order`` cut where every item of the chunks seen so far has come: the chunk sets of the pieces."""
    chunk_of = np.repeat(np.arange(len(chunks)), chunks)
    left, pieces, current = list(chunks), [], set()
    for i in order:
        c = int(chunk_of[i])
        current.add(c)
        left[c] -= 1
        if all(left[k] == 0 for k in current):
            pieces.append(current)
            current = set()
    return pieces


def test_chunk_local_order_draws_every_item_once_and_holds_few_chunks_at_a_time():
    chunks = [16, 16, 9, 16, 16, 16, 7]
    n = sum(chunks)
    order = epoch_order(n, torch.Generator().manual_seed(3), chunks, window=2)
    assert sorted(order) == list(range(n))
    pieces = _segments(order, chunks)
    assert max(len(p) for p in pieces) <= 2 and len(pieces) >= 4  # read two chunks at a time
    assert max(len(p) for p in _segments(torch.randperm(n).tolist(), chunks)) > 2  # a global shuffle would not
    assert order == epoch_order(n, torch.Generator().manual_seed(3), chunks, window=2)
    assert order != epoch_order(n, torch.Generator().manual_seed(4), chunks, window=2)
    # ranks split every global batch: together they see each item once per epoch, no item twice
    seen = []
    for rank in range(3):
        sampler = ResumableBatchSampler(n, 5, seed=0, drop_last=False, rank=rank, world_size=3, chunks=chunks, window=2)
        seen += [i for batch in sampler for i in batch]
    assert sorted(seen) == list(range(n))
    with pytest.raises(ValueError, match="sum to"):
        epoch_order(n + 1, torch.Generator(), chunks)


def test_mixing_weights_hold_within_sampling_error_with_chunked_sources():
    sizes, batch, weights_ = [400, 300, 640], [4, 4, 8], [0.5, 0.2, 0.3]
    chunks = [[100] * 4, [64] * 4 + [44], [128] * 5]
    counts = Counter()
    for epoch in range(6):
        sampler = MixtureBatchSampler(sizes, batch, weights_, seed=1, chunks=chunks, window=2,
                                      position=lambda e=epoch: (e, 0))
        counts.update(sampler.sources(epoch))
    total = sum(counts.values())
    for s, w in enumerate(weights_):
        sd = (w * (1 - w) / total) ** 0.5
        assert abs(counts[s] / total - w) < 4 * sd, (s, counts[s] / total, w)


def test_a_model_of_several_modalities_streams_each_from_its_own_shards(tmp_path, data_root):
    out, run = tmp_path / "mm", tmp_path / "run"
    mm = ["recipe=multimodal_dit", "modalities.video.data.dataset.num_digits=10", f"data_root={data_root}"]
    proc = multidiff_cli("prepare", *mm, f"out={out}", "chunk_items=128")
    assert "train with: multidiff train recipe=multimodal_dit data=streaming" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["audio", "image", "modalities.json", "video"]
    shapes = {n: json.loads((out / n / MANIFEST).read_text())["item_shape"] for n in ("image", "audio", "video")}
    assert shapes == {"image": [1, 16, 16], "audio": [1, 128, 16], "video": [1, 8, 16, 16]}
    args = [*mm, "backbone=dit_tiny", "trainer.max_steps=6", "modalities.image.data.batch_size=4",
            "modalities.audio.data.batch_size=4", "modalities.video.data.batch_size=2", "data=streaming",
            f"data.path={out}", "data.log_items=true", f"run_dir={run}", "callbacks.samples.every_n_steps=0",
            "callbacks.samples.at_end=false", "+trainer.enable_progress_bar=false"]
    multidiff_cli("train", *args)
    assert (run / "model" / "multidiff.json").is_file()
    sizes = {0: 4, 1: 4, 2: 2}  # image, audio, video batches
    for line in (run / "logs" / "items-rank0.txt").read_text().splitlines():
        _, _, source, *items = line.split()
        assert len(items) == sizes[int(source.split(":")[1])]
    (out / "video" / MANIFEST).unlink()  # one modality's shards incomplete: refused, naming the folder
    proc = multidiff_cli("train", *args[:-4], f"run_dir={tmp_path / 'again'}", check=False)
    assert proc.returncode == 2 and str(out / "video") in proc.stderr and "multidiff prepare" in proc.stderr


def test_prepare_explains_itself_and_refuses_a_missing_out_or_a_streaming_source(tmp_path):
    out = multidiff_cli("prepare", "--help").stdout
    for option in ("out=DIR", "workers=", "chunk_items=", "encode_batch=", "device="):
        assert option in out
    proc = multidiff_cli("prepare", "recipe=image_digits", check=False)
    assert proc.returncode == 2 and "needs out=DIR" in proc.stderr and "Traceback" not in proc.stderr
    proc = multidiff_cli("prepare", "recipe=image_digits", "out=x", "workers=-1", check=False)
    assert proc.returncode == 2 and "workers='-1' is invalid" in proc.stderr
    proc = multidiff_cli("prepare", "recipe=image_digits", "data=streaming", f"data.path={tmp_path}", f"out={tmp_path / 'o'}",
                         check=False)
    assert proc.returncode == 2 and "already prepared" in proc.stderr
