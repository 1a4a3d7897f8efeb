"""The real packaged text encoder, label conditioning and condition dropout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from multidiff.conditioning import LabelConditioner, TextConditioner, drop_condition
from multidiff.conditioning.text import DEFAULT_SHA256, ConditioningError, packaged_encoder_dir, sha256_of


@pytest.fixture(scope="module")
def text():
    return TextConditioner()


def test_packaged_weights_are_the_real_minilm():
    assert sha256_of(packaged_encoder_dir() / "model.safetensors") == DEFAULT_SHA256


def test_encode_shapes_mask_and_semantics(text):
    c = text.encode(["a cat", "a kitten", "a car"])
    assert c.tokens.shape == (3, 24, 384) and c.mask.shape == (3, 24) and c.pooled.shape == (3, 384)
    assert c.mask.dtype == torch.bool and c.mask[0].sum() == 4  # [CLS] a cat [SEP]
    assert torch.all(c.tokens[0, ~c.mask[0]] == 0)
    sim = lambda i, j: F.cosine_similarity(c.pooled[i], c.pooled[j], dim=0).item()  # noqa: E731
    assert sim(0, 1) > 0.7 and sim(0, 1) - sim(0, 2) > 0.3


def test_pooled_vector_equals_sentence_transformers(text):
    from sentence_transformers import SentenceTransformer

    prompts = ["cat", "a handwritten digit seven", "the number 7, written by hand"]
    ref = SentenceTransformer(str(packaged_encoder_dir()), device="cpu").encode(prompts, convert_to_tensor=True)
    ours = F.normalize(text.encode(prompts).pooled, dim=-1)
    torch.testing.assert_close(ours, ref.cpu(), atol=1e-5, rtol=0)


def test_cache_returns_identical_encodings(text):
    a = text.encode(["the digit seven"])
    b = text.encode(["x", "the digit seven"])
    torch.testing.assert_close(a.tokens[0], b.tokens[1])
    assert "the digit seven" in text._cache


def test_null_condition_is_the_empty_prompt(text):
    null = text.null(3)
    assert null.tokens.shape == (3, 24, 384)
    torch.testing.assert_close(null.tokens[0], text.encode([""]).tokens[0])


def test_local_directory_and_sha_check(tmp_path):
    local = tmp_path / "enc"
    shutil.copytree(packaged_encoder_dir(), local)
    enc = TextConditioner(str(local), sha256=DEFAULT_SHA256, max_length=8)
    assert enc.encode(["hello"]).tokens.shape == (1, 8, 384)
    with pytest.raises(ConditioningError, match="expected 0000"):
        TextConditioner(str(local), sha256="0" * 64)
    with pytest.raises(ConditioningError, match="does not exist"):
        TextConditioner(str(tmp_path / "nope"))


def test_constructing_the_default_encoder_leaves_the_environment_alone(text, monkeypatch):
    """No process-wide switch (HF_HUB_OFFLINE used to be set here) for loading local weights.
    ``text`` was built first, so lazy imports that set variables of their own have happened."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it for the whole session
    before = dict(os.environ)
    TextConditioner(max_length=8)
    assert dict(os.environ) == before


def test_default_encoder_loads_without_network_or_offline_switch():
    """A fresh process without HF_HUB_OFFLINE, every socket connection refused: the packaged
    encoder (a local directory) still loads, and the environment is what it was."""
    code = """
import os, socket
def refuse(self, address):
    raise AssertionError(f"network access to {address}")
socket.socket.connect = refuse
from transformers import AutoModel  # import-time variables (torch's compile cache) are not ours
import torch._dynamo  # noqa: F401
from multidiff.conditioning.text import TextConditioner
before = dict(os.environ)
TextConditioner(max_length=8).encode(["a cat"])
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_unloadable_hub_name_fails_with_one_paragraph_naming_the_key():
    with pytest.raises(ConditioningError) as info:  # offline in tests (conftest): the hub cannot answer
        TextConditioner("multidiff-tests/no-such-encoder")
    message = str(info.value)
    assert "conditioning.encoder.encoder" in message and "local transformers model directory" in message
    assert "\n" not in message


def test_labels_and_dropout():
    lab = LabelConditioner(10)
    c = lab.encode([3, "7"])
    assert c.labels.tolist() == [3, 7]
    assert lab.null(2).labels.tolist() == [10, 10]
    with pytest.raises(ValueError, match="out of range"):
        lab.encode([12])
    cond = lab.encode(list(range(10)) * 100)
    dropped = drop_condition(cond, lab.null(), 0.3, generator=torch.Generator().manual_seed(0))
    share = (dropped.labels == 10).float().mean().item()
    assert 0.25 < share < 0.35
    assert drop_condition(cond, lab.null(), 0.0) is cond


def test_encodings_made_under_inference_mode_train_afterwards(text):
    """generate and the training previews sample under torch.inference_mode; the prompts they encode
    land in the cache, and a training step that later meets the same caption must be able to save
    them for backward (an inference tensor would raise there)."""
    prompt = "a caption first seen by a preview under inference mode"
    with torch.inference_mode():
        text.encode([prompt])
        text.null()
    cond = text.encode([prompt])
    assert not cond.tokens.is_inference() and not text.null().tokens.is_inference()
    layer = torch.nn.Linear(cond.tokens.shape[-1], 2)
    (layer(cond.tokens).sum() + layer(text.null(2).tokens).sum()).backward()
    assert layer.weight.grad is not None
