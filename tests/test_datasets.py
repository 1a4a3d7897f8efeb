"""The embedded datasets: one atomic, content-keyed materialization; shapes read from the adapter;
the default recipes' data unchanged; the digits, notes and moving digits themselves."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import ROOT
from PIL import Image

import multidiff.datasets.materialize as materialize_module
from multidiff.adapters.audio import AudioAdapter
from multidiff.adapters.image import ImageAdapter
from multidiff.adapters.video import VideoAdapter, read_video
from multidiff.cli.compose import compose
from multidiff.configuration import safe_instantiate
from multidiff.datasets.digits import TEMPLATES as DIGIT_TEMPLATES
from multidiff.datasets.digits import digits_dataset, materialize_digits
from multidiff.datasets.folder import DatasetError
from multidiff.datasets.materialize import MANIFEST, dataset_folder, materialize
from multidiff.datasets.moving_digits import (
    DIRECTIONS,
    bounce_path,
    first_half_steps,
    materialize_moving_digits,
    moving_caption,
    moving_digits_dataset,
    read_rows,
)
from multidiff.datasets.moving_digits import TEMPLATES as MOVING_TEMPLATES
from multidiff.datasets.notes import (
    FAMILIES,
    TEMPLATES,
    NoteSpec,
    materialize_notes,
    note_frequency,
    note_midi,
    note_name,
    notes_dataset,
    synthesize,
)
from multidiff.evaluation.audio import cents, estimate_f0

SR = 16000


def _write_numbers(count: int):
    """A writer that makes ``count`` small files and a metadata.jsonl."""
    def write(folder: Path) -> None:
        rows = []
        for i in range(count):
            (folder / f"{i}.txt").write_text(str(i))
            rows.append({"file_name": f"{i}.txt", "text": f"number {i}"})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name or ".stale-" in p.name)


# -- the materialization helper -----------------------------------------------------------------


def test_every_setting_and_the_name_key_the_folder(tmp_path):
    base = {"version": 1, "size": [16, 16], "seed": 0}
    variants = [base, {**base, "seed": 1}, {**base, "size": [16, 12]}, {**base, "version": 2}, {**base, "extra": None}]
    folders = {dataset_folder(tmp_path, "digits", s) for s in variants} | {dataset_folder(tmp_path, "notes", base)}
    assert len(folders) == len(variants) + 1
    assert dataset_folder(tmp_path, "digits", dict(reversed(base.items()))) == dataset_folder(tmp_path, "digits", base)
    folder = materialize(tmp_path, "digits", base, _write_numbers(2))
    assert folder == dataset_folder(tmp_path, "digits", base) and folder.name.startswith("digits-")
    assert json.loads((folder / MANIFEST).read_text()) == {"name": "digits", "settings": base}


def test_same_settings_reuse_the_folder_without_writing(tmp_path):
    settings = {"version": 1, "seed": 0}
    folder = materialize(tmp_path, "numbers", settings, _write_numbers(3))
    stamps = {p.name: p.stat().st_mtime_ns for p in [folder, *folder.iterdir()]}

    def must_not_run(_: Path) -> None:
        raise AssertionError("an existing dataset was written again")

    assert materialize(tmp_path, "numbers", settings, must_not_run) == folder
    assert {p.name: p.stat().st_mtime_ns for p in [folder, *folder.iterdir()]} == stamps
    assert _leftovers(tmp_path) == []


def test_an_interrupted_write_leaves_no_usable_folder_and_the_next_call_succeeds(tmp_path):
    settings = {"version": 1}

    def crash(folder: Path) -> None:
        _write_numbers(3)(folder)
        raise KeyboardInterrupt  # any interruption, not only an Exception

    with pytest.raises(KeyboardInterrupt):
        materialize(tmp_path, "numbers", settings, crash)
    assert not dataset_folder(tmp_path, "numbers", settings).exists() and _leftovers(tmp_path) == []
    folder = materialize(tmp_path, "numbers", settings, _write_numbers(3))
    assert len((folder / "metadata.jsonl").read_text().splitlines()) == 3


def test_leftovers_of_a_killed_process_are_never_used(tmp_path):
    """A process killed mid-write leaves a hidden temporary folder (never read) or, from older code or
    by hand, a folder under the final name without a matching manifest (replaced)."""
    settings = {"version": 1}
    target = dataset_folder(tmp_path, "numbers", settings)
    (tmp_path / f".{target.name}.tmp-123-abcd").mkdir(parents=True)
    target.mkdir()
    (target / "metadata.jsonl").write_text('{"file_name": "0.txt", "text": "half"}\n')
    folder = materialize(tmp_path, "numbers", settings, _write_numbers(2))
    assert folder == target and len((folder / "metadata.jsonl").read_text().splitlines()) == 2
    (folder / MANIFEST).write_text(json.dumps({"name": "numbers", "settings": {"version": 0}}))
    assert len((materialize(tmp_path, "numbers", settings, _write_numbers(4)) / "metadata.jsonl")
               .read_text().splitlines()) == 4  # a manifest for other settings is not this dataset


def test_when_another_process_publishes_first_its_copy_is_used(tmp_path, monkeypatch):
    """Without a lock (file systems without flock) both processes write; the first rename wins."""
    monkeypatch.setattr(materialize_module, "_exclusive", lambda lock: nullcontext())
    settings = {"version": 1}

    def slow_writer(folder: Path) -> None:
        # meanwhile the "other rank" materializes the same dataset and publishes it
        materialize(tmp_path, "numbers", settings, _write_numbers(2))
        _write_numbers(5)(folder)

    folder = materialize(tmp_path, "numbers", settings, slow_writer)
    assert len((folder / "metadata.jsonl").read_text().splitlines()) == 2  # the winner's files
    assert _leftovers(tmp_path) == []


def test_two_processes_at_once_write_once_and_agree(tmp_path):
    script = textwrap.dedent(f"""
        import json, time
        from pathlib import Path
        from multidiff.datasets.materialize import materialize

        def write(folder):
            with open({str(tmp_path / "calls.txt")!r}, "a") as f:
                f.write("x")
            time.sleep(1.0)
            (folder / "metadata.jsonl").write_text(json.dumps({{"file_name": "a", "text": "a"}}) + "\\n")

        print(materialize({str(tmp_path / "data")!r}, "shared", {{"version": 1}}, write))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    assert (Path(outs[0]) / "metadata.jsonl").is_file() and _leftovers(tmp_path / "data") == []
    assert (tmp_path / "calls.txt").read_text() == "x"  # the second waited on the lock and reused


# -- configs: datasets read their shape from the adapter --------------------------------------------


def test_no_data_config_interpolates_the_modality():
    paths = sorted((ROOT / "conf" / "data").glob("*.yaml")) + sorted((ROOT / "examples").glob("*/conf/data/*.yaml"))
    assert len(paths) >= 6
    for path in paths:
        text = path.read_text()
        assert "${modality." not in text and "oc.select:modality" not in text, path.name


# Fingerprints of the default recipes' data as written before the datasets read the adapter:
# sha256 of metadata.jsonl (captions, labels, order, trajectories), and a sum over every k-th file.
REFERENCE = {
    "image_digits": ("e13322ced1fc66d77544bafe5e60f78ac5b6459d6e1c03fa393a1f0bd5988128", 1797, 60, 2364.9412161232904),
    "audio_notes": ("7c80b536da3d67f2c7547b4aa0d8e75053c69e2daf77a81c00ad07abb8f07c16", 1000, 40, 2407250431.0),
    "video_moving_digits": ("af659f2f7831eadc29d86e7c48c001365e432b47867cf2447dcc25e0140591e9", 7188, 300,
                            3635.6392755508423),
}


def _content_sum(path: Path) -> float:
    if path.suffix == ".wav":
        return float(np.abs(sf.read(str(path), dtype="int16")[0].astype(np.int64)).sum())
    if path.suffix == ".gif":
        return float(read_video(path, channels=1)[0].double().sum())
    return float(ImageAdapter(size=16).load(path).double().sum())


@pytest.mark.parametrize("recipe", sorted(REFERENCE))
def test_default_recipes_make_the_same_data_as_before(recipe, data_root):
    digest, count, every, total = REFERENCE[recipe]
    cfg = compose("train", [f"recipe={recipe}", f"data_root={data_root}"])
    adapter = safe_instantiate(cfg.modality)
    ds = safe_instantiate(cfg.data.dataset, adapter=adapter, cache=False)
    assert hashlib.sha256((ds.root / "metadata.jsonl").read_bytes()).hexdigest() == digest
    assert len(ds) == count and ds[0]["x"].shape == tuple(adapter.shape)
    assert sum(_content_sum(path) for path, _ in ds.items[::every]) == pytest.approx(total, rel=1e-9)


def test_digits_take_their_size_from_the_modality(tmp_path):
    cfg = compose("train", ["recipe=image_digits", f"data_root={tmp_path}", "modality.size=8"])
    ds = safe_instantiate(cfg.data.dataset, adapter=safe_instantiate(cfg.modality), cache=False)
    assert ds[0]["x"].shape == (1, 8, 8)
    with Image.open(ds.items[0][0]) as im:
        assert im.size == (8, 8)
    wide = digits_dataset(tmp_path, adapter=ImageAdapter(size=(12, 20), channels=3), cache=False)
    with Image.open(wide.items[0][0]) as im:
        assert im.size == (20, 12) and im.mode == "L"  # stored grayscale, read as RGB
    assert wide[0]["x"].shape == (3, 12, 20) and wide.root != ds.root
    with pytest.raises(DatasetError, match="use modality=image with data=digits"):
        digits_dataset(tmp_path, adapter=VideoAdapter())


def test_notes_take_their_sample_rate_from_the_modality(tmp_path):
    small = dict(low="A4", high="B4", variants=1)
    ds = notes_dataset(tmp_path, adapter=AudioAdapter(sample_rate=22050), cache=False, **small)
    info = sf.info(str(ds.items[0][0]))
    assert len(ds) == 5 * 3 and info.samplerate == 22050 and info.frames == round(1.024 * 22050)
    assert ds.root == materialize_notes(tmp_path, sample_rate=22050, **small)
    assert notes_dataset(tmp_path, adapter=AudioAdapter(), cache=False, **small).root != ds.root
    with pytest.raises(DatasetError, match="use modality=audio with data=notes"):
        notes_dataset(tmp_path, adapter=ImageAdapter(), **small)


def test_moving_digits_take_frames_size_and_fps_from_the_modality(tmp_path):
    adapter = VideoAdapter(size=(12, 20), num_frames=6, frame_stride=2, fps=12.0)
    ds = moving_digits_dataset(tmp_path, adapter=adapter, num_digits=3, digit_size=6, cache=False)
    clip, fps = read_video(ds.items[0][0], channels=1)
    assert clip.shape == (1, 11, 12, 20) and fps == 12  # (6 - 1) * 2 + 1 frames: every one the adapter reads
    assert len(ds) == 3 * 4 and ds[0]["x"].shape == (1, 6, 12, 20)
    for row in read_rows(ds.root):  # the first half of every clip moves the captioned way on both axes
        dy, dx = DIRECTIONS[row["direction"]]
        steps = first_half_steps(11)
        assert row["ys"][steps] - row["ys"][0] == dy * steps and row["xs"][steps] - row["xs"][0] == dx * steps
        assert max(row["ys"]) <= 12 - 6 and max(row["xs"]) <= 20 - 6
    with pytest.raises(DatasetError, match="use modality=video with data=moving_digits"):
        moving_digits_dataset(tmp_path, adapter=ImageAdapter(), num_digits=2)
    with pytest.raises(DatasetError, match=r"enlarge the frames \(modality.size\)"):
        moving_digits_dataset(tmp_path, adapter=VideoAdapter(size=10), num_digits=2)


# -- digits --------------------------------------------------------------------------------------


def test_digits_materialize_deterministically(tmp_path):
    a = materialize_digits(tmp_path / "a", size=16)
    b = materialize_digits(tmp_path / "b", size=16)
    meta_a, meta_b = (a / "metadata.jsonl").read_text(), (b / "metadata.jsonl").read_text()
    assert meta_a == meta_b
    rows = [json.loads(x) for x in meta_a.splitlines()]
    assert len(rows) == 1797
    assert (a / "0000.png").read_bytes() == (b / "0000.png").read_bytes()
    with Image.open(a / "0000.png") as im:
        assert im.size == (16, 16)
    # every digit is described with several paraphrases, each naming the digit
    used = {r["text"] for r in rows if r["label"] == 7}
    assert len(used) >= len(DIGIT_TEMPLATES) - 1
    assert all("seven" in t or "7" in t for t in used)
    ds = digits_dataset(tmp_path / "a", adapter=ImageAdapter(size=16))
    assert ds.root == a
    x = torch.stack([ds[i]["x"] for i in range(50)])
    assert x.shape == (50, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert float(np.mean(x.numpy() > 0)) > 0.1  # ink, not a blank page


def test_digits_seed_changes_the_folder_and_the_captions(tmp_path):
    a = materialize_digits(tmp_path, size=8, seed=0)
    b = materialize_digits(tmp_path, size=8, seed=1)
    assert a != b
    rows_a, rows_b = read_rows(a), read_rows(b)
    assert [r["label"] for r in rows_a] == [r["label"] for r in rows_b]
    assert sum(x["text"] != y["text"] for x, y in zip(rows_a, rows_b)) > len(rows_a) // 2
    ds = digits_dataset(tmp_path, adapter=ImageAdapter(size=8), seed=1, cache=False)
    assert ds.root == b and [t for _, t in ds.items] == [r["text"] for r in rows_b]


# -- notes ---------------------------------------------------------------------------------------


def test_note_names_round_trip():
    assert note_name(69) == "A4" and note_name(61) == "C#4" and note_midi("C#4") == 61 and note_midi("A5") == 81
    assert all(note_midi(note_name(m)) == m for m in range(40, 100))
    assert math.isclose(note_frequency(81), 880.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_synthesized_notes_are_in_tune(family):
    for midi in (57, 64, 69, 76, 81):
        wave = synthesize(NoteSpec(family, midi, 3))
        assert wave.dtype == np.float32 and wave.shape == (16384,) and 0.3 < np.abs(wave).max() <= 0.8
        assert abs(cents(estimate_f0(wave, SR), note_frequency(midi))) < 10


def test_notes_materialize_deterministically(data_root, tmp_path):
    a = materialize_notes(data_root)
    b = materialize_notes(tmp_path / "b", low="A3", high="A5", variants=8)
    assert a.name == b.name
    meta_a, meta_b = (a / "metadata.jsonl").read_text(), (b / "metadata.jsonl").read_text()
    assert meta_a == meta_b
    assert (a / "0123.wav").read_bytes() == (b / "0123.wav").read_bytes()
    rows = [json.loads(x) for x in meta_a.splitlines()]
    assert len(rows) == 5 * 25 * 8
    assert {r["family"] for r in rows} == set(FAMILIES)
    assert {r["midi"] for r in rows} == set(range(57, 82))  # A3..A5: two octaves
    info = sf.info(str(a / rows[0]["file_name"]))
    assert (info.samplerate, info.frames, info.subtype) == (SR, 16384, "PCM_16")
    for family in FAMILIES:  # paraphrased captions, each naming the note
        used = {r["text"] for r in rows if r["family"] == family and r["note"] == "C#4"}
        assert len(used) >= 4 and all("C#4" in t for t in used)
        assert used <= {t.format(n="C#4") for t in TEMPLATES[family]}


def test_notes_config_builds_the_dataset(data_root):
    cfg = compose("train", ["recipe=audio_notes", f"data_root={data_root}"])
    adapter = safe_instantiate(cfg.modality)
    ds = safe_instantiate(cfg.data.dataset, adapter=adapter)
    assert len(ds) == 1000
    item = ds[0]
    assert item["x"].shape == adapter.shape and "A3" in item["text"]


# -- moving digits ---------------------------------------------------------------------------------


def test_bounce_path_reflects_at_both_edges():
    assert bounce_path(2, -1, 5, 8) == [2, 1, 0, 1, 2, 3]
    assert bounce_path(7, 2, 3, 8) == [7, 7, 5, 3]  # 9 -> 7 (reflected at 8)
    assert first_half_steps(8) == 4 and first_half_steps(16) == 8


def test_moving_digits_are_deterministic_and_true_to_their_captions(tmp_path):
    kw = dict(num_digits=25, num_frames=8, canvas=16)
    a, b = materialize_moving_digits(tmp_path / "a", **kw), materialize_moving_digits(tmp_path / "b", **kw)
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    assert (a / "clips" / "00007.gif").read_bytes() == (b / "clips" / "00007.gif").read_bytes()
    rows = read_rows(a)
    assert len(rows) == 25 * 4 and {r["direction"] for r in rows} == {"left", "right", "up", "down"}
    assert moving_caption(3, "left") == "the digit 3 moving to the left"
    assert len({r["text"].split(" moving")[0] for r in rows}) > len(MOVING_TEMPLATES) // 2  # paraphrases are used
    bounced = 0
    for r in rows:
        d, name = r["label"], ("zero one two three four five six seven eight nine").split()[r["label"]]
        assert str(d) in r["text"].split() or name in r["text"].split()
        dy, dx = DIRECTIONS[r["direction"]]
        free = first_half_steps(8)
        # the captioned direction holds for the first half of the clip; bounces may follow
        assert all(r["ys"][t + 1] - r["ys"][t] == dy and r["xs"][t + 1] - r["xs"][t] == dx for t in range(free))
        assert all(0 <= p <= 8 for p in r["ys"] + r["xs"])
        bounced += any(r["xs"][t + 1] - r["xs"][t] == -dx != 0 or r["ys"][t + 1] - r["ys"][t] == -dy != 0
                       for t in range(7))
        assert r["ys"][0] is not None
    assert 0 < bounced < len(rows)
    # the pixels agree with the recorded trajectory: the digit's box is where the row says
    clip, fps = read_video(a / rows[0]["file_name"], channels=1)
    assert clip.shape == (1, 8, 16, 16) and fps == 8
    for t in range(8):
        y, x = rows[0]["ys"][t], rows[0]["xs"][t]
        inside = clip[0, t, y : y + 8, x : x + 8].sum()
        assert inside == pytest.approx(clip[0, t].sum().item(), rel=1e-6) and inside > 3


def test_moving_digits_dataset_and_its_errors(tmp_path):
    adapter = VideoAdapter(size=16, num_frames=8)
    ds = moving_digits_dataset(tmp_path, adapter=adapter, num_digits=5, directions=("left", "up_right"))
    assert len(ds) == 10
    item = ds[1]
    assert item["x"].shape == (1, 8, 16, 16) and item["x"].min() >= -1 and "up and to the right" in item["text"]
    assert float(np.mean(item["x"].numpy() > -1)) > 0.05  # ink, not a blank clip
    with pytest.raises(DatasetError, match="unknown moving_digits direction"):
        moving_digits_dataset(tmp_path, adapter=adapter, num_digits=2, directions=("sideways",))
    with pytest.raises(DatasetError, match="need 4px before the first bounce"):
        moving_digits_dataset(tmp_path, adapter=adapter, num_digits=2, digit_size=13)
    assert not any(p.name.startswith(".") and ".tmp-" in p.name for p in tmp_path.iterdir())
    assert os.listdir(tmp_path)  # the good calls left their datasets


def test_digits_in_black_ink_are_the_originals_inverted_and_captioned_so(tmp_path):
    from multidiff.datasets.digits import BLACK_INK, DatasetError, digits_dataset

    adapter = ImageAdapter(size=16, channels=1)
    white = digits_dataset(tmp_path, adapter=adapter)
    both = digits_dataset(tmp_path, adapter=adapter, ink="both")
    black = digits_dataset(tmp_path, adapter=adapter, ink="black")
    assert len(both) == 2 * len(white) == 2 * len(black)
    for i in (0, 17):
        w, b = white[i], black[i]
        assert torch.allclose(b["x"], -w["x"], atol=1 / 127)  # 1 - x in [0, 1] is -x in [-1, 1] (PNG rounding)
        assert b["text"] == w["text"] + BLACK_INK and not w["text"].endswith(BLACK_INK)
        assert both[i]["text"] == w["text"] and both[len(white) + i]["text"] == b["text"]
    with pytest.raises(DatasetError, match="data.dataset.ink='red' is not one of white, black, both"):
        digits_dataset(tmp_path, adapter=adapter, ink="red")
