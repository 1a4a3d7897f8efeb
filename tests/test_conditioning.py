"""The real packaged text encoder, label conditioning and condition dropout."""

from __future__ import annotations

import shutil

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
