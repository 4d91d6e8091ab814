"""Preprocessing of one clip, identical at training, resume, evaluation and prediction.

A clip of frames (T, ...) becomes a (max_seq_len, features) float32 array: normalised on the
body reference, reduced to the selected landmarks and coordinates, resampled or truncated to
max_seq_len frames and padded with NaN. NaN stays wherever a landmark is missing and becomes
0 only after the feature scaler (see `dataset.FeatureScaler`). A frame without any finite
value is masked out of attention like padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from isaret.data.layouts import Selection, detect_layout, normalize_clip, select_landmarks
from isaret.errors import DataError


@dataclass(frozen=True)
class Preprocessing:
    """The settings that turn a clip into model input; stored in every checkpoint."""

    selection: Selection
    normalize: bool
    max_seq_len: int
    seq_policy: str

    @property
    def feature_dim(self) -> int:
        return self.selection.feature_dim

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return self.selection.layout.frame_shape

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.selection.to_dict(),
            "landmarks": ",".join(self.selection.groups),
            "coords": "xyz"[: self.selection.coord_count] if self.selection.coord_count else "",
            "normalize": self.normalize,
            "max_seq_len": self.max_seq_len,
            "seq_policy": self.seq_policy,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        layout = detect_layout(tuple(values["frame_shape"]))
        selection = select_landmarks(layout, values["landmarks"], values["coords"] or "xyz")
        return cls(selection=selection, normalize=bool(values["normalize"]),
                   max_seq_len=int(values["max_seq_len"]), seq_policy=str(values["seq_policy"]))

    @classmethod
    def for_frame_shape(cls, frame_shape: tuple[int, ...], landmarks: str, coords: str, normalize: bool,
                        max_seq_len: int, seq_policy: str) -> Preprocessing:
        layout = detect_layout(frame_shape)
        return cls(selection=select_landmarks(layout, landmarks, coords), normalize=normalize,
                   max_seq_len=max_seq_len, seq_policy=seq_policy)


def canonical_frame_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return a frame shape with two stacked hands (2, 21, C) merged into (42, C)."""
    if len(shape) == 3 and shape[:2] == (2, 21):
        return (42, shape[2])
    return tuple(shape)


def frame_indices(length: int, max_seq_len: int, seq_policy: str) -> np.ndarray:
    """Frames kept from a clip of `length` frames: all of them, evenly spaced ones, or the first ones."""
    if length <= max_seq_len:
        return np.arange(length)
    if seq_policy == "truncate":
        return np.arange(max_seq_len)
    return np.round(np.linspace(0, length - 1, max_seq_len)).astype(np.int64)


def preprocess_clip(frames: np.ndarray, prep: Preprocessing, name: str = "clip") -> tuple[np.ndarray, int]:
    """Turn raw frames (T, ...) into a NaN-padded (max_seq_len, features) array and its length."""
    shape = canonical_frame_shape(frames.shape[1:])
    if frames.shape[0] == 0:
        raise DataError(f"{name}: empty sequence (0 frames)")
    if shape != prep.frame_shape:
        raise DataError(
            f"{name}: wrong shape {tuple(frames.shape)}: frames are {shape}, expected {prep.frame_shape} "
            f"({prep.selection.layout.name} layout)"
        )
    frames = frames.reshape((frames.shape[0],) + shape).astype(np.float32, copy=False)
    frames = np.where(np.isfinite(frames), frames, np.nan)
    selection = prep.selection
    if selection.coord_count:
        if prep.normalize and np.isfinite(frames).any():
            frames = normalize_clip(frames, selection.layout)
        features = frames[:, selection.points, : selection.coord_count].reshape(frames.shape[0], -1)
    else:
        features = frames[:, selection.points]
    if not np.isfinite(features).any():
        raise DataError(f"{name}: all frames are NaN for the selected landmarks ({', '.join(selection.groups)})")

    kept = features[frame_indices(len(features), prep.max_seq_len, prep.seq_policy)]
    # Resampling or truncation can drop every frame that has a value, and a clip without one
    # valid frame gives NaN logits.
    if not np.isfinite(kept).any():
        raise DataError(
            f"{name}: all {len(kept)} frames kept by seq_policy={prep.seq_policy} "
            f"(max_seq_len={prep.max_seq_len}) are NaN for the selected landmarks "
            f"({', '.join(selection.groups)}); a larger max_seq_len keeps more frames"
        )
    out = np.full((prep.max_seq_len, features.shape[1]), np.nan, dtype=np.float32)
    out[: len(kept)] = kept
    return out, len(kept)
