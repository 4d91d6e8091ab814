"""Comparisons shared by the resume and distributed tests."""

from __future__ import annotations

import torch


def assert_same_tensors(left, right, where: str = "") -> None:
    """Compare nested state dicts tensor by tensor, bit for bit."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor), where
        assert left.dtype == right.dtype, where
        assert torch.equal(left, right), f"tensors differ at {where}"
    elif isinstance(left, dict):
        assert set(left) == set(right), where
        for key in left:
            assert_same_tensors(left[key], right[key], f"{where}/{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        assert left == right, f"values differ at {where}: {left!r} != {right!r}"


def without_timings(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in history]
