"""Shared fixtures: paths to the real data sets and writers of small synthetic data sets.

Synthetic Kaggle ISLR files use the long layout of the competition: one row per
(frame, type, landmark_index) with x, y, z, and NaN coordinates where MediaPipe found nothing.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import isaret
from isaret.config import DataConfig
from isaret.data.readers import KAGGLE_TYPE_OFFSETS, KAGGLE_TYPE_SIZES, KAGGLE_TYPES

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KAGGLE_DIR = SHARED_DATA / "kaggle-islr-hello-thankyou"
THAI_DIR = SHARED_DATA / "thai-tsl-leapmotion"
DEMO_DIR = Path(isaret.__file__).resolve().parent / "demo_data"

# Holistic point indices used to build synthetic clips (pose starts at 489).
POSE = 489
LEFT_SHOULDER, RIGHT_SHOULDER = POSE + 11, POSE + 12
LEFT_HAND, RIGHT_HAND = 468, 522


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Point the default cache root into tmp_path so that no test writes to ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def kaggle_dir() -> Path:
    if not (KAGGLE_DIR / "train.csv").is_file():
        pytest.skip(f"real Kaggle ISLR data not found at {KAGGLE_DIR}")
    return KAGGLE_DIR


@pytest.fixture
def thai_dir() -> Path:
    if not THAI_DIR.is_dir():
        pytest.skip(f"real Thai TSL data not found at {THAI_DIR}")
    return THAI_DIR


@pytest.fixture
def demo_dir() -> Path:
    return DEMO_DIR


def holistic_clip(rng: np.random.Generator, frames: int, left_hand_missing: tuple[int, ...] = ()) -> np.ndarray:
    """Return a random (frames, 543, 3) clip with shoulders 0.2 apart around (0.5, 0.5)."""
    clip = rng.uniform(0.3, 0.7, size=(frames, 543, 3)).astype(np.float32)
    clip[:, LEFT_SHOULDER, :2] = (0.6, 0.5)
    clip[:, RIGHT_SHOULDER, :2] = (0.4, 0.5)
    clip[list(left_hand_missing), LEFT_HAND:LEFT_HAND + 21] = np.nan
    return clip


def hands_clip(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Return a random (frames, 2, 21, 3) clip of two hands, left then right."""
    return rng.uniform(-50, 50, size=(frames, 2, 21, 3)).astype(np.float32)


def kaggle_table(clip: np.ndarray, first_frame: int = 0) -> pa.Table:
    """Convert a (frames, 543, 3) clip to the long Kaggle table, one row per frame and point."""
    rows_frame, rows_type, rows_index = [], [], []
    for t in range(clip.shape[0]):
        for kind, offset, size in zip(KAGGLE_TYPES, KAGGLE_TYPE_OFFSETS, KAGGLE_TYPE_SIZES):
            rows_frame += [first_frame + t] * int(size)
            rows_type += [kind] * int(size)
            rows_index += list(range(int(size)))
    frame = np.asarray(rows_frame, dtype=np.int16)
    index = np.asarray(rows_index, dtype=np.int16)
    offsets = dict(zip(KAGGLE_TYPES, KAGGLE_TYPE_OFFSETS))
    point = np.asarray([offsets[kind] for kind in rows_type]) + index
    values = clip[frame - first_frame, point].astype(np.float64)
    row_id = [f"{f}-{kind}-{i}" for f, kind, i in zip(rows_frame, rows_type, rows_index)]
    return pa.table({
        "frame": frame, "row_id": row_id, "type": rows_type, "landmark_index": index,
        "x": values[:, 0], "y": values[:, 1], "z": values[:, 2],
    })


@pytest.fixture
def write_parquet():
    """Return a function that writes a clip as a Kaggle long-format parquet file."""

    def write(path: Path, clip: np.ndarray, first_frame: int = 0, shuffle_seed: int | None = None) -> Path:
        table = kaggle_table(clip, first_frame)
        if shuffle_seed is not None:
            table = table.take(np.random.default_rng(shuffle_seed).permutation(table.num_rows))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return path

    return write


@pytest.fixture
def make_kaggle_dataset(write_parquet):
    """Return a function that writes train.csv and one parquet per (signer, sign, clip) under root."""

    def make(root: Path, clips: list[tuple[str, str, np.ndarray]]) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        with (root / "train.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "participant_id", "sequence_id", "sign"])
            for number, (signer, sign, clip) in enumerate(clips):
                relative = f"train_landmark_files/{signer}/{1000 + number}.parquet"
                write_parquet(root / relative, clip)
                writer.writerow([relative, signer, 1000 + number, sign])
        return root

    return make


@pytest.fixture
def make_npy_folder():
    """Return a function that writes <root>/<class>/<n>.npy for {class name: [arrays]}."""

    def make(root: Path, classes: dict[str, list[np.ndarray]]) -> Path:
        for name, arrays in classes.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            for number, array in enumerate(arrays):
                np.save(root / name / f"{number}.npy", array)
        return root

    return make


@pytest.fixture
def small_npy_dataset(tmp_path, make_npy_folder) -> Path:
    """Three classes of four two-hand clips each, with class names that have spaces and non-ASCII letters."""
    rng = np.random.default_rng(0)
    classes = {name: [hands_clip(rng, int(rng.integers(6, 20))) for _ in range(4)]
               for name in ("güle güle", "teşekkürler", "merhaba")}
    return make_npy_folder(tmp_path / "npy data", classes)


def data_config(**overrides) -> DataConfig:
    """Return a DataConfig with short clips, for fast tests."""
    values = {"max_seq_len": 16}
    values.update(overrides)
    return DataConfig(**values)


# ----------------------------------------------------------------------------- trained runs

TINY_RUN = ["--epochs", "2", "--no-progress", "--set", "d_model=32", "--set", "dim_feedforward=64",
            "--set", "num_layers=1"]


def train_tiny_run(folder: Path, cache: Path, data_args: list[str]) -> Path:
    """Train a tiny model in-process and return its checkpoint folder."""
    from isaret.cli import main

    status = main(["train", "--checkpoint-dir", str(folder), "--set", f"cache_dir={cache}", *TINY_RUN, *data_args])
    assert status == 0
    return folder


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """A tiny run on the embedded demo data, trained once per test session."""
    base = tmp_path_factory.mktemp("demo_run")
    return train_tiny_run(base / "run", base / "cache", [])


@pytest.fixture(scope="session")
def thai_run(tmp_path_factory) -> Path:
    """A tiny run on the Thai Leap Motion data, trained once per test session."""
    if not THAI_DIR.is_dir():
        pytest.skip(f"real Thai TSL data not found at {THAI_DIR}")
    base = tmp_path_factory.mktemp("thai_run")
    return train_tiny_run(base / "run", base / "cache", ["--data", str(THAI_DIR)])


@pytest.fixture(params=["demo", "thai"])
def run_folder(request) -> Path:
    return request.getfixturevalue(f"{request.param}_run")
