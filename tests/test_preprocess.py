"""Clip preprocessing: frame selection, NaN padding, landmark selection and normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import LEFT_HAND, LEFT_SHOULDER, RIGHT_HAND, RIGHT_SHOULDER, hands_clip, holistic_clip
from isaret.data.layouts import detect_layout, normalize_clip, select_landmarks
from isaret.data.preprocess import Preprocessing, frame_indices, preprocess_clip
from isaret.errors import ConfigError, DataError


def flat_prep(features: int, max_seq_len: int, seq_policy: str) -> Preprocessing:
    return Preprocessing.for_frame_shape((features,), "default", "xyz", False, max_seq_len, seq_policy)


def counting_clip(frames: int, features: int = 4) -> np.ndarray:
    """Return a flat clip whose frame t has the value t in every feature."""
    return np.repeat(np.arange(frames, dtype=np.float32)[:, None], features, axis=1)


# ----------------------------------------------------------------------------- frame selection

def test_frame_indices_short_clip_kept():
    np.testing.assert_array_equal(frame_indices(5, 8, "resample"), np.arange(5))
    np.testing.assert_array_equal(frame_indices(8, 8, "truncate"), np.arange(8))


def test_frame_indices_resample_spans_clip():
    indices = frame_indices(100, 10, "resample")

    assert len(indices) == 10
    assert indices[0] == 0
    assert indices[-1] == 99
    assert (np.diff(indices) > 0).all()
    np.testing.assert_array_equal(indices, np.round(np.linspace(0, 99, 10)).astype(int))


def test_frame_indices_truncate_keeps_start():
    np.testing.assert_array_equal(frame_indices(100, 10, "truncate"), np.arange(10))


def test_preprocess_resample_vs_truncate():
    clip = counting_clip(40)
    resampled, resampled_length = preprocess_clip(clip, flat_prep(4, 8, "resample"))
    truncated, truncated_length = preprocess_clip(clip, flat_prep(4, 8, "truncate"))

    assert resampled_length == 8
    assert truncated_length == 8
    np.testing.assert_array_equal(resampled[:, 0], np.round(np.linspace(0, 39, 8)))
    np.testing.assert_array_equal(truncated[:, 0], np.arange(8))


def test_preprocess_pads_with_nan():
    out, length = preprocess_clip(counting_clip(5), flat_prep(4, 8, "resample"))

    assert out.shape == (8, 4)
    assert out.dtype == np.float32
    assert length == 5
    np.testing.assert_array_equal(out[:5, 0], np.arange(5))
    assert np.isnan(out[5:]).all()


def test_preprocess_infinity_becomes_nan():
    clip = counting_clip(3)
    clip[1, 2] = np.inf
    out, _ = preprocess_clip(clip, flat_prep(4, 4, "resample"))

    assert np.isnan(out[1, 2])
    assert out[1, 1] == 1


# ----------------------------------------------------------------------------- bad clips

def test_preprocess_wrong_shape_rejected():
    prep = Preprocessing.for_frame_shape((2, 21, 3), "default", "xyz", True, 8, "resample")

    with pytest.raises(DataError, match="wrong shape") as error:
        preprocess_clip(np.zeros((4, 21, 3), np.float32), prep, name="clip.npy")
    assert "clip.npy" in str(error.value)


def test_preprocess_empty_clip_rejected():
    with pytest.raises(DataError, match="empty sequence"):
        preprocess_clip(np.zeros((0, 4), np.float32), flat_prep(4, 8, "resample"), name="clip.npy")


def test_preprocess_all_nan_rejected():
    prep = Preprocessing.for_frame_shape((2, 21, 3), "default", "xyz", True, 8, "resample")

    with pytest.raises(DataError, match="all frames are NaN"):
        preprocess_clip(np.full((4, 2, 21, 3), np.nan, np.float32), prep, name="clip.npy")


def test_preprocess_selected_landmarks_all_nan_rejected():
    clip = holistic_clip(np.random.default_rng(0), 3)
    clip[:, LEFT_HAND:LEFT_HAND + 21] = np.nan
    prep = Preprocessing.for_frame_shape((543, 3), "left_hand", "xyz", True, 8, "resample")

    with pytest.raises(DataError, match=r"all frames are NaN for the selected landmarks \(left_hand\)"):
        preprocess_clip(clip, prep)


@pytest.mark.parametrize("seq_policy", ["truncate", "resample"])
def test_preprocess_no_valid_frame_kept_rejected(seq_policy):
    # Truncation to 8 frames never reaches frame 50, and resampling 100 frames to 8 picks
    # frames 0, 14, 28, ... and so skips frame 3.
    clip = np.full((100, 4), np.nan, np.float32)
    clip[3 if seq_policy == "resample" else 50] = 1.0

    with pytest.raises(DataError, match="are NaN"):
        preprocess_clip(clip, flat_prep(4, 8, seq_policy), name="clip.npy")


# ----------------------------------------------------------------------------- landmarks and coordinates

def test_select_landmarks_groups_and_coords():
    layout = detect_layout((543, 3))
    selection = select_landmarks(layout, "left_hand, right_hand", "xy")

    np.testing.assert_array_equal(selection.points, list(range(LEFT_HAND, LEFT_HAND + 21))
                                  + list(range(RIGHT_HAND, RIGHT_HAND + 21)))
    assert selection.coord_count == 2
    assert selection.feature_dim == 84


def test_select_landmarks_unknown_group_rejected():
    with pytest.raises(ConfigError, match="'landmarks'") as error:
        select_landmarks(detect_layout((2, 21, 3)), "lips", "xyz")
    assert "left_hand, right_hand" in str(error.value)


def test_preprocess_coords_xy_drops_z():
    clip = hands_clip(np.random.default_rng(1), 4)
    prep = Preprocessing.for_frame_shape((2, 21, 3), "default", "xy", False, 8, "resample")
    out, _ = preprocess_clip(clip, prep)

    assert out.shape == (8, 84)
    np.testing.assert_array_equal(out[:4].reshape(4, 42, 2), clip.reshape(4, 42, 3)[..., :2])


def test_preprocessing_dict_round_trip():
    prep = Preprocessing.for_frame_shape((543, 3), "default", "xy", True, 32, "truncate")
    restored = Preprocessing.from_dict(prep.to_dict())

    assert restored.to_dict() == prep.to_dict()
    np.testing.assert_array_equal(restored.selection.points, prep.selection.points)


# ----------------------------------------------------------------------------- normalisation

def test_normalize_holistic_on_shoulders():
    clip = holistic_clip(np.random.default_rng(2), 3)
    prep = Preprocessing.for_frame_shape((543, 3), "pose_upper,left_hand", "xyz", True, 8, "resample")
    out, _ = preprocess_clip(clip, prep)
    points = out[:3].reshape(3, -1, 3)
    position = {int(p): i for i, p in enumerate(prep.selection.points)}

    # Shoulders at x 0.6 and 0.4, y 0.5: centre (0.5, 0.5), width 0.2.
    np.testing.assert_allclose(points[:, position[LEFT_SHOULDER], :2], [[0.5, 0.0]] * 3, atol=1e-6)
    np.testing.assert_allclose(points[:, position[RIGHT_SHOULDER], :2], [[-0.5, 0.0]] * 3, atol=1e-6)
    expected_hand = (clip[:, LEFT_HAND + 5, :2] - 0.5) / 0.2
    np.testing.assert_allclose(points[:, position[LEFT_HAND + 5], :2], expected_hand, atol=1e-5)


def test_normalize_holistic_centres_depth():
    clip = holistic_clip(np.random.default_rng(3), 3)
    out = normalize_clip(clip, detect_layout((543, 3)))

    np.testing.assert_allclose(np.nanmean(out[..., 2]), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[..., 2], (clip[..., 2] - clip[..., 2].mean()) / 0.2, atol=1e-4)


def test_normalize_hands_on_wrists():
    rng = np.random.default_rng(4)
    clip = hands_clip(rng, 3).reshape(3, 42, 3)
    clip[:, 0, :2] = (10.0, 20.0)  # left wrist
    clip[:, 9, :2] = (10.0, 24.0)  # left middle-finger base: hand size 4
    clip[:, 21, :2] = (30.0, 20.0)  # right wrist
    clip[:, 30, :2] = (30.0, 28.0)  # right middle-finger base: hand size 8
    out = normalize_clip(clip, detect_layout((2, 21, 3)))

    # The centre is the mean wrist (20, 20), and the scale is the mean hand size 6.
    np.testing.assert_allclose(out[:, 0, :2], [[-10 / 6, 0.0]] * 3, atol=1e-5)
    np.testing.assert_allclose(out[:, 21, :2], [[10 / 6, 0.0]] * 3, atol=1e-5)
    np.testing.assert_allclose(out[:, 5, :2], (clip[:, 5, :2] - 20.0) / 6, atol=1e-5)


def test_normalize_hands_one_hand_missing():
    clip = hands_clip(np.random.default_rng(5), 3).reshape(3, 42, 3)
    clip[:, :21] = np.nan
    clip[:, 21, :2] = (30.0, 20.0)
    clip[:, 30, :2] = (30.0, 25.0)
    out = normalize_clip(clip, detect_layout((42, 3)))

    assert np.isnan(out[:, :21]).all()
    np.testing.assert_allclose(out[:, 21, :2], [[0.0, 0.0]] * 3, atol=1e-6)
    np.testing.assert_allclose(out[:, 40, :2], (clip[:, 40, :2] - (30.0, 20.0)) / 5, atol=1e-5)


def test_normalize_holistic_without_shoulders_uses_wrists():
    clip = holistic_clip(np.random.default_rng(6), 2)
    clip[:, LEFT_SHOULDER] = np.nan
    clip[:, RIGHT_HAND:RIGHT_HAND + 21] = np.nan
    clip[:, LEFT_HAND, :2] = (0.5, 0.5)
    clip[:, LEFT_HAND + 9, :2] = (0.5, 0.4)
    out = normalize_clip(clip, detect_layout((543, 3)))

    np.testing.assert_allclose(out[:, LEFT_HAND, :2], 0.0, atol=1e-5)
    np.testing.assert_allclose(out[:, LEFT_HAND + 9, :2], [[0.0, -1.0]] * 2, atol=1e-5)


def test_normalize_fallback_mean_and_spread():
    rng = np.random.default_rng(7)
    clip = rng.normal(3.0, 2.0, size=(5, 10, 2)).astype(np.float32)
    clip[1, 4] = np.nan
    out = normalize_clip(clip, detect_layout((10, 2)))
    visible = clip[np.isfinite(clip).all(axis=-1)]

    assert detect_layout((10, 2)).name == "points"
    np.testing.assert_allclose(out[0, 0], (clip[0, 0] - visible.mean(axis=0)) / visible.std(axis=0).mean(),
                               rtol=1e-4)
    np.testing.assert_allclose(np.nanmean(out.reshape(-1, 2), axis=0), 0.0, atol=1e-5)
    assert np.isnan(out[1, 4]).all()


def test_preprocess_normalize_off_keeps_values():
    clip = hands_clip(np.random.default_rng(8), 3)
    prep = Preprocessing.for_frame_shape((2, 21, 3), "default", "xyz", False, 4, "resample")
    out, _ = preprocess_clip(clip, prep)

    np.testing.assert_array_equal(out[:3], clip.reshape(3, -1))
