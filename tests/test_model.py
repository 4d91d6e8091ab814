"""The transformer classifier: output shape, padding invariance and masking of invalid frames.

Every test runs with and without the frame-difference (motion) features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isaret.config import ModelConfig
from isaret.data.dataset import FeatureScaler
from isaret.model import build_model

FEATURES = 12
CLASSES = 5


@pytest.fixture(params=[True, False], ids=["motion", "no-motion"])
def model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, dropout=0.1,
                      motion_features=request.param)
    return build_model(FEATURES, CLASSES, max_seq_len=64, cfg=cfg).eval()


def padded(clip: torch.Tensor, total: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x, valid) of shape (1, total, F) and (1, total) with `clip` first and `fill` after it."""
    x = torch.full((1, total, clip.shape[-1]), fill)
    x[0, : len(clip)] = clip
    valid = torch.zeros(1, total, dtype=torch.bool)
    valid[0, : len(clip)] = True
    return x, valid


def test_model_output_shape(model):
    x = torch.randn(3, 20, FEATURES)
    valid = torch.ones(3, 20, dtype=torch.bool)
    with torch.no_grad():
        logits = model(x, valid)

    assert logits.shape == (3, CLASSES)
    assert torch.isfinite(logits).all()


def test_model_padding_invariance(model):
    clip = torch.randn(20, FEATURES)
    x32, valid32 = padded(clip, 32, 0.0)
    x64, valid64 = padded(clip, 64, 0.0)
    x64[0, 20:] = torch.randn(44, FEATURES) * 100
    with torch.no_grad():
        logits32 = model(x32, valid32)
        logits64 = model(x64, valid64)

    torch.testing.assert_close(logits32, logits64, atol=1e-5, rtol=0)


def test_model_padding_invariance_with_grad(model):
    # With autograd on, PyTorch skips the fused inference path of the encoder layers.
    clip = torch.randn(20, FEATURES)
    x32, valid32 = padded(clip, 32, 0.0)
    x64, valid64 = padded(clip, 64, 0.0)
    logits32 = model(x32, valid32)
    logits64 = model(x64, valid64)
    with torch.no_grad():
        fused = model(x32, valid32)

    torch.testing.assert_close(logits32, logits64, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits32.detach(), fused, atol=1e-5, rtol=1e-5)


def test_model_batch_matches_single(model):
    short, long = torch.randn(7, FEATURES), torch.randn(30, FEATURES)
    x_short, valid_short = padded(short, 30, 0.0)
    x_long, valid_long = padded(long, 30, 0.0)
    with torch.no_grad():
        batch = model(torch.cat([x_short, x_long]), torch.cat([valid_short, valid_long]))
        alone = model(*padded(short, 7, 0.0))

    torch.testing.assert_close(batch[0:1], alone, atol=1e-5, rtol=0)


def test_model_masked_nan_frame_ignored(model):
    clip = torch.randn(20, FEATURES)
    x, valid = padded(clip, 32, float("nan"))
    x[0, 10] = float("nan")
    valid[0, 10] = False
    x_zero = torch.nan_to_num(x, nan=0.0)
    x_random = x_zero.clone()
    x_random[0, 10] = torch.randn(FEATURES) * 50
    with torch.no_grad():
        logits_nan = model(x, valid)
        logits_zero = model(x_zero, valid)
        logits_random = model(x_random, valid)

    assert torch.isfinite(logits_nan).all()
    torch.testing.assert_close(logits_nan, logits_zero, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits_random, logits_zero, atol=1e-6, rtol=0)


def test_model_masked_frame_differs_from_valid(model):
    clip = torch.randn(20, FEATURES)
    x, valid = padded(clip, 20, 0.0)
    masked = valid.clone()
    masked[0, 10] = False
    with torch.no_grad():
        logits_all = model(x, valid)
        logits_masked = model(x, masked)

    assert not torch.allclose(logits_all, logits_masked, atol=1e-5)


def test_model_nan_frame_through_scaler(model):
    clip = np.random.default_rng(0).normal(size=(20, FEATURES)).astype(np.float32)
    clip[10] = np.nan
    scaler = FeatureScaler(mean=np.zeros(FEATURES, np.float32), std=np.ones(FEATURES, np.float32))
    valid = torch.from_numpy(np.isfinite(clip).any(axis=-1))[None]
    x = torch.from_numpy(scaler.transform(clip))[None]
    with torch.no_grad():
        logits = model(x, valid)

    assert not bool(valid[0, 10])
    assert int(valid.sum()) == 19
    assert torch.isfinite(logits).all()


def test_model_dropout_only_in_training(model):
    x = torch.randn(2, 16, FEATURES)
    valid = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        eval_logits = [model(x, valid) for _ in range(2)]
        model.train()
        torch.manual_seed(1)
        train_first = model(x, valid)
        torch.manual_seed(2)
        train_second = model(x, valid)

    torch.testing.assert_close(eval_logits[0], eval_logits[1])
    assert not torch.allclose(train_first, train_second)
