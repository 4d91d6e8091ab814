"""Readers of the Kaggle ISLR parquet layout and of npy class folders, on real and synthetic files."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from conftest import LEFT_HAND, hands_clip, holistic_clip
from isaret.data.readers import (
    KAGGLE_TYPE_OFFSETS,
    KAGGLE_TYPES,
    detect_format,
    list_samples,
    read_frames,
    read_kaggle_parquet,
    read_npy,
)
from isaret.errors import DataError


def pandas_pivot(path) -> np.ndarray:
    """Read a Kaggle parquet the plain way: pivot rows to (frame, point) with pandas."""
    df = pd.read_parquet(path)
    offsets = dict(zip(KAGGLE_TYPES, KAGGLE_TYPE_OFFSETS))
    df["point"] = df["type"].map(offsets) + df["landmark_index"]
    frames = sorted(df["frame"].unique())
    out = np.full((len(frames), 543, 3), np.nan, dtype=np.float32)
    frame_position = df["frame"].map({frame: i for i, frame in enumerate(frames)}).to_numpy()
    out[frame_position, df["point"].to_numpy()] = df[["x", "y", "z"]].to_numpy(dtype=np.float32)
    return out


# ----------------------------------------------------------------------------- Kaggle ISLR, real files

def test_kaggle_real_listing(kaggle_dir):
    samples = list_samples(kaggle_dir, "auto")
    with (kaggle_dir / "train.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))

    assert len(samples) == len(rows)
    assert {s.label for s in samples} == {"hello", "thankyou"}
    assert all(s.signer for s in samples)
    assert [s.signer for s in samples] == [row["participant_id"] for row in rows]
    assert [s.sample_id for s in samples] == [row["path"] for row in rows]
    assert all(s.path.is_file() for s in samples)


def test_kaggle_real_shapes(kaggle_dir):
    samples = list_samples(kaggle_dir, "kaggle-islr")[:3]
    for sample in samples:
        frames = read_frames(sample)
        frame_count = pd.read_parquet(sample.path, columns=["frame"])["frame"].nunique()

        assert frames.shape == (frame_count, 543, 3)
        assert frames.dtype == np.float32


def test_kaggle_real_matches_pandas_pivot(kaggle_dir):
    samples = list_samples(kaggle_dir, "kaggle-islr")
    for sample in (samples[0], samples[-1]):
        frames = read_kaggle_parquet(sample.path)
        expected = pandas_pivot(sample.path)

        np.testing.assert_array_equal(frames, expected)


def test_kaggle_real_missing_hand_is_nan(kaggle_dir):
    sample = list_samples(kaggle_dir, "kaggle-islr")[0]
    df = pd.read_parquet(sample.path)
    frames = read_kaggle_parquet(sample.path)
    missing = df[df["x"].isna()]

    assert len(missing) > 0, "this clip was expected to contain rows without coordinates"
    first_frame = df["frame"].min()
    for row in missing.head(20).itertuples():
        point = dict(zip(KAGGLE_TYPES, KAGGLE_TYPE_OFFSETS))[row.type] + row.landmark_index
        assert np.isnan(frames[row.frame - first_frame, point]).all()
    assert np.isfinite(frames).any()


def test_demo_data_listing_and_shape(demo_dir):
    samples = list_samples(demo_dir, "auto")

    assert len(samples) == 75
    assert len({s.label for s in samples}) >= 2
    assert all(s.signer for s in samples)
    frames = read_frames(samples[0])
    assert frames.ndim == 3
    assert frames.shape[1:] == (543, 3)
    np.testing.assert_array_equal(frames, pandas_pivot(samples[0].path))


# ----------------------------------------------------------------------------- Kaggle ISLR, synthetic files

def test_parquet_shuffled_rows_same_array(tmp_path, write_parquet):
    clip = holistic_clip(np.random.default_rng(1), 5, left_hand_missing=(1, 3))
    ordered = read_kaggle_parquet(write_parquet(tmp_path / "ordered.parquet", clip))
    shuffled = read_kaggle_parquet(write_parquet(tmp_path / "shuffled.parquet", clip, shuffle_seed=7))

    np.testing.assert_array_equal(shuffled, ordered)
    np.testing.assert_array_equal(ordered, clip)


def test_parquet_missing_rows_are_nan(tmp_path, write_parquet):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    clip = holistic_clip(np.random.default_rng(2), 4)
    path = write_parquet(tmp_path / "clip.parquet", clip)
    table = pq.read_table(path)
    left_hand_rows = pc.equal(table["type"], "left_hand")
    pq.write_table(table.filter(pc.invert(left_hand_rows)), path)
    frames = read_kaggle_parquet(path)

    assert frames.shape == (4, 543, 3)
    assert np.isnan(frames[:, LEFT_HAND:LEFT_HAND + 21]).all()
    np.testing.assert_array_equal(frames[:, :LEFT_HAND], clip[:, :LEFT_HAND])


def test_parquet_frame_numbers_ordered(tmp_path, write_parquet):
    clip = holistic_clip(np.random.default_rng(3), 3)
    path = write_parquet(tmp_path / "clip.parquet", clip, first_frame=31, shuffle_seed=0)
    frames = read_kaggle_parquet(path)

    np.testing.assert_array_equal(frames, clip)


# ----------------------------------------------------------------------------- npy folders

def test_thai_real_listing(thai_dir):
    samples = list_samples(thai_dir, "auto")
    class_folders = sorted(p.name for p in thai_dir.iterdir() if p.is_dir())

    assert detect_format(thai_dir) == "npy-folder"
    assert len(samples) == 240
    assert sorted({s.label for s in samples}) == class_folders
    assert all(s.path.suffix == ".npy" for s in samples)
    assert all(s.signer == "" for s in samples)
    assert all(s.sample_id == f"{s.label}/{s.path.name}" for s in samples)


def test_thai_real_shapes_and_nan(thai_dir):
    with (thai_dir / "labels.csv").open(newline="", encoding="utf-8") as handle:
        expected_frames = {row["path"]: int(row["frames"]) for row in csv.DictReader(handle)}
    by_id = {s.sample_id: s for s in list_samples(thai_dir, "npy-folder")}
    hands_missing = {}
    for sample_id in ("emergency/1.npy", "hello/1.npy"):
        frames = read_frames(by_id[sample_id])
        hand_any_nan = np.isnan(frames).any(axis=(2, 3))
        hand_all_nan = np.isnan(frames).all(axis=(2, 3))
        hands_missing[sample_id] = hand_all_nan

        assert frames.shape == (expected_frames[sample_id], 2, 21, 3)
        assert frames.dtype == np.float32
        np.testing.assert_array_equal(hand_any_nan, hand_all_nan)

    # "emergency" is signed with the right hand only, and "hello" with both hands.
    assert hands_missing["emergency/1.npy"][:, 0].all()
    assert not hands_missing["emergency/1.npy"][:, 1].all()
    assert (~hands_missing["hello/1.npy"]).all(axis=1).any()


def test_npy_folder_non_ascii_names(small_npy_dataset):
    samples = list_samples(small_npy_dataset, "auto")
    labels = {s.label for s in samples}

    assert labels == {"güle güle", "teşekkürler", "merhaba"}
    assert "güle güle/0.npy" in {s.sample_id for s in samples}
    assert len(samples) == 12
    assert read_frames(samples[0]).shape[1:] == (2, 21, 3)


def test_npy_folder_ignores_other_files(small_npy_dataset):
    (small_npy_dataset / "labels.csv").write_text("path,sign\n", encoding="utf-8")
    (small_npy_dataset / "merhaba" / "notes.txt").write_text("not a sample", encoding="utf-8")
    (small_npy_dataset / "empty class").mkdir()
    samples = list_samples(small_npy_dataset, "auto")

    assert len(samples) == 12
    assert "empty class" not in {s.label for s in samples}


def test_npy_folder_signer_csv(small_npy_dataset, tmp_path):
    samples = list_samples(small_npy_dataset, "npy-folder")
    signer_csv = tmp_path / "signers.csv"
    rows = [f"{s.sample_id},signer{i % 3}" for i, s in enumerate(samples)]
    signer_csv.write_text("path,signer\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with_signers = list_samples(small_npy_dataset, "npy-folder", str(signer_csv))

    assert [s.signer for s in with_signers] == [f"signer{i % 3}" for i in range(len(samples))]

    signer_csv.write_text("path,signer\n" + "\n".join(rows[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="no signer for 1 file") as error:
        list_samples(small_npy_dataset, "npy-folder", str(signer_csv))
    assert samples[-1].sample_id in str(error.value)


def test_npy_read_converts_to_float32(tmp_path):
    path = tmp_path / "clip.npy"
    np.save(path, np.arange(12, dtype=np.int64).reshape(2, 6))
    frames = read_npy(path)

    assert frames.dtype == np.float32
    np.testing.assert_array_equal(frames, np.arange(12).reshape(2, 6))


def test_npy_read_rejects_pickled_objects(tmp_path):
    path = tmp_path / "clip.npy"
    np.save(path, np.array([{"frames": 1}, None], dtype=object), allow_pickle=True)

    with pytest.raises(DataError, match="unreadable .npy file") as error:
        read_npy(path)
    assert str(path) in str(error.value)


def test_detect_format_cases(tmp_path, small_npy_dataset):
    kaggle_root = tmp_path / "kaggle"
    kaggle_root.mkdir()
    (kaggle_root / "train.csv").write_text("path,participant_id,sequence_id,sign\n", encoding="utf-8")

    assert detect_format(kaggle_root) == "kaggle-islr"
    assert detect_format(kaggle_root / "train.csv") == "kaggle-islr"
    assert detect_format(small_npy_dataset) == "npy-folder"
    with pytest.raises(DataError, match="not found"):
        list_samples(tmp_path / "missing", "auto")


def test_hands_clip_read_back(tmp_path):
    clip = hands_clip(np.random.default_rng(4), 7)
    clip[2, 0] = np.nan
    path = tmp_path / "clip.npy"
    np.save(path, clip)

    np.testing.assert_array_equal(read_npy(path), clip)
