"""Image adapter round trips and folder datasets with captions (the embedded digits: test_datasets.py)."""

from __future__ import annotations

import json

import pytest
import torch

from multidiff.adapters.image import ImageAdapter
from multidiff.datasets.folder import CaptionFolder, DatasetError


def test_image_encode_decode_round_trip():
    a = ImageAdapter(size=16, channels=1)
    raw = torch.rand(1, 16, 16)
    x0 = a.encode(raw)
    assert x0.shape == a.shape == (1, 16, 16)
    assert x0.min() >= -1 and x0.max() <= 1
    torch.testing.assert_close(a.decode(x0), raw, atol=1e-6, rtol=0)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_image_file_round_trip(tmp_path, suffix):
    rgb = ImageAdapter(size=(12, 20), channels=3)
    raw = torch.rand(3, 12, 20)
    path = tmp_path / f"img{suffix}"
    rgb.save(raw, path)
    back = rgb.load(path)
    assert back.shape == (3, 12, 20)
    tol = 1 / 255 if suffix == ".png" else 0.25
    assert (back - raw).abs().mean() <= tol


def test_resize_and_center_crop():
    a = ImageAdapter(size=8, channels=1)
    raw = torch.zeros(1, 20, 40)
    raw[:, :, 10:30] = 1.0  # bright centre, dark sides
    x = a.encode(raw)
    assert x.shape == (1, 8, 8)
    assert x[0, :, 2:6].mean() > 0.9  # the centre survives the crop


def test_rgb_to_grayscale_and_back():
    gray, rgb = ImageAdapter(size=4, channels=1), ImageAdapter(size=4, channels=3)
    assert gray.encode(torch.rand(3, 4, 4)).shape == (1, 4, 4)
    assert rgb.encode(torch.rand(1, 4, 4)).shape == (3, 4, 4)
    assert rgb.preview(torch.rand(3, 4, 4)).shape == gray.preview(torch.rand(1, 4, 4)).shape == (3, 4, 4)


def _write_images(folder, n, adapter):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        adapter.save(torch.full((1, 8, 8), i / n), folder / f"{i}.png")


def test_caption_folder_with_metadata_jsonl(tmp_path):
    a = ImageAdapter(size=8)
    _write_images(tmp_path, 3, a)
    rows = [{"file_name": f"{i}.png", "text": f"caption {i}"} for i in range(3)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = CaptionFolder(tmp_path, a)
    assert len(ds) == 3 and ds[1]["text"] == "caption 1" and ds[1]["x"].shape == (1, 8, 8)


def test_caption_folder_with_txt_files(tmp_path):
    a = ImageAdapter(size=8)
    _write_images(tmp_path, 2, a)
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text(f"text {i}\n")
    ds = CaptionFolder(tmp_path, a, cache=False)
    assert [ds[i]["text"] for i in range(2)] == ["text 0", "text 1"]


def test_caption_folder_errors(tmp_path):
    a = ImageAdapter(size=8)
    with pytest.raises(DatasetError, match="does not exist"):
        CaptionFolder(tmp_path / "missing", a)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no files"):
        CaptionFolder(tmp_path / "empty", a)
    _write_images(tmp_path / "nocap", 2, a)
    with pytest.raises(DatasetError, match="have no caption"):
        CaptionFolder(tmp_path / "nocap", a)


def test_corrupt_files_fail_or_skip(tmp_path, caplog):
    a = ImageAdapter(size=8)
    _write_images(tmp_path, 2, a)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    names = ["0.png", "1.png", "bad.png"]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in names))
    with pytest.raises(DatasetError, match="bad.png"):
        CaptionFolder(tmp_path, a)
    ds = CaptionFolder(tmp_path, a, on_error="skip")
    assert len(ds) == 2 and ds.skipped == [str(tmp_path / "bad.png")]
    assert "skipped 1 unreadable" in caplog.text
