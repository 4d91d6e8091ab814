"""The preprocessed-sample cache: bad inputs under both bad_file_policy values, reuse and invalidation."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import data_config, hands_clip, holistic_clip
from isaret.data import cache
from isaret.data.cache import load_or_build
from isaret.data.preprocess import preprocess_clip
from isaret.data.readers import list_samples, read_frames
from isaret.errors import DataError

LOGGER = "isaret.data.cache"


# ----------------------------------------------------------------------------- damaged files

def _replace_table(path: Path, change) -> None:
    pq.write_table(change(pq.read_table(path)), path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set_columns(path: Path, **columns) -> None:
    def change(table: pa.Table) -> pa.Table:
        for name, values in columns.items():
            table = table.set_column(table.column_names.index(name), name, values(table))
        return table

    _replace_table(path, change)


def _all_nan(table: pa.Table) -> pa.Array:
    return pa.array(np.full(table.num_rows, np.nan))


PARQUET_DAMAGE = {
    "missing file": (lambda path: path.unlink(), "file not found"),
    "corrupt bytes": (lambda path: path.write_bytes(b"PAR1 this is not parquet"), "unreadable parquet file"),
    "truncated": (_truncate, "unreadable parquet file"),
    "no rows": (lambda path: _replace_table(path, lambda table: table.slice(0, 0)), r"empty sequence \(no rows\)"),
    "missing column": (lambda path: _replace_table(path, lambda table: table.drop_columns(["z"])),
                       r"missing column\(s\) z"),
    "all frames NaN": (lambda path: _set_columns(path, x=_all_nan, y=_all_nan, z=_all_nan), "all frames are NaN"),
    "text coordinates": (lambda path: _set_columns(path, x=lambda table: pa.array(["a"] * table.num_rows)),
                         "invalid values in column"),
    "null frame": (lambda path: _set_columns(path, frame=lambda table: pa.array([None] * table.num_rows,
                                                                                pa.int16())),
                   r"null values in column\(s\) frame"),
    "unknown type": (lambda path: _set_columns(path, type=lambda table: pa.array(["hand"] * table.num_rows)),
                     "unknown landmark type"),
}

NPY_DAMAGE = {
    "missing file": (lambda path: path.unlink(), "file not found"),
    "corrupt bytes": (lambda path: path.write_bytes(b"\x93NUMPY garbage"), "unreadable .npy file"),
    "truncated": (_truncate, "unreadable .npy file"),
    "zero frames": (lambda path: np.save(path, np.zeros((0, 2, 21, 3), np.float32)), r"empty sequence \(0 frames\)"),
    "one-dimensional": (lambda path: np.save(path, np.zeros(126, np.float32)), "wrong shape"),
    "all frames NaN": (lambda path: np.save(path, np.full((5, 2, 21, 3), np.nan, np.float32)), "all frames are NaN"),
    "pickled objects": (lambda path: np.save(path, np.array([None, {}], dtype=object), allow_pickle=True),
                        "unreadable .npy file"),
    "text values": (lambda path: np.save(path, np.full((5, 2, 21, 3), "a")), "expected a numeric array"),
}


@pytest.fixture
def kaggle_set(tmp_path, make_kaggle_dataset):
    """Return (root, samples) of six three-frame clips of two signs by three signers."""
    rng = np.random.default_rng(0)
    clips = [(f"s{i % 3}", "hello" if i % 2 else "thanks", holistic_clip(rng, 3)) for i in range(6)]
    root = make_kaggle_dataset(tmp_path / "kaggle", clips)
    return root, list_samples(root, "auto")


@pytest.fixture
def npy_set(small_npy_dataset):
    return small_npy_dataset, list_samples(small_npy_dataset, "auto")


def _check_bad_file(samples, damage, reason, tmp_path, caplog):
    bad = samples[1]
    damage(bad.path)

    with pytest.raises(DataError) as error:
        load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)
    message = str(error.value)
    assert str(bad.path) in message
    assert re.search(reason, message), message
    assert "bad_file_policy=skip" in message

    caplog.clear()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    data = load_or_build(samples, data_config(bad_file_policy="skip"), cache_root=tmp_path / "cache",
                         show_progress=False)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert f"Skipped 1 of {len(samples)} samples" in text
    assert bad.sample_id in text
    assert re.search(reason, text), text
    assert len(data) == len(samples) - 1
    assert bad.sample_id not in data.sample_ids
    assert [sample_id for sample_id, _ in data.skipped] == [bad.sample_id]


@pytest.mark.parametrize("kind", list(PARQUET_DAMAGE))
def test_bad_parquet_reported(kind, kaggle_set, tmp_path, caplog):
    _, samples = kaggle_set
    damage, reason = PARQUET_DAMAGE[kind]
    _check_bad_file(samples, damage, reason, tmp_path, caplog)


@pytest.mark.parametrize("kind", list(NPY_DAMAGE))
def test_bad_npy_reported(kind, npy_set, tmp_path, caplog):
    _, samples = npy_set
    damage, reason = NPY_DAMAGE[kind]
    _check_bad_file(samples, damage, reason, tmp_path, caplog)


def test_odd_shapes_all_reported(tmp_path, make_npy_folder, caplog):
    rng = np.random.default_rng(5)
    classes = {name: [rng.normal(size=(6, 126)).astype(np.float32) for _ in range(4)] for name in ("a", "b")}
    classes["a"].append(rng.normal(size=(6, 63)).astype(np.float32))
    classes["b"].append(rng.normal(size=(8, 63)).astype(np.float32))
    root = make_npy_folder(tmp_path / "data", classes)
    samples = list_samples(root, "npy-folder")
    odd = [s for s in samples if s.path.name == "4.npy"]

    with pytest.raises(DataError, match="2 file") as error:
        load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)
    for sample in odd:
        assert str(sample.path) in str(error.value)
    assert "(126,)" in str(error.value)

    caplog.set_level(logging.WARNING, logger=LOGGER)
    data = load_or_build(samples, data_config(bad_file_policy="skip"), cache_root=tmp_path / "cache",
                         show_progress=False)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Skipped 2 of 10 samples" in warnings[0].getMessage()
    for sample in odd:
        assert sample.sample_id in warnings[0].getMessage()
    assert len(data) == 8
    assert data.features().shape == (8, 16, 126)


def test_unsupported_frame_shape_rejected(tmp_path, make_npy_folder):
    rng = np.random.default_rng(6)
    root = make_npy_folder(tmp_path / "data", {"a": [rng.normal(size=(5, 21, 4)) for _ in range(2)]})
    samples = list_samples(root, "npy-folder")

    with pytest.raises(DataError, match="4 coordinates per point") as error:
        load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)
    assert str(samples[0].path) in str(error.value)


def test_all_files_bad_leaves_no_entry(npy_set, tmp_path):
    _, samples = npy_set
    for sample in samples:
        np.save(sample.path, np.full((3, 2, 21, 3), np.nan, np.float32))
    cache_root = tmp_path / "cache"

    with pytest.raises(DataError, match="no usable samples"):
        load_or_build(samples, data_config(bad_file_policy="skip"), cache_root=cache_root, show_progress=False)
    assert list(cache_root.iterdir()) == []


# ----------------------------------------------------------------------------- CSV problems

def test_csv_missing_label(kaggle_set):
    root, _ = kaggle_set
    csv_path = root / "train.csv"
    lines = csv_path.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ","
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(DataError) as error:
        list_samples(root, "auto")
    assert str(csv_path) in str(error.value)
    assert "line 3" in str(error.value)
    assert "missing label" in str(error.value)


def test_csv_missing_column(kaggle_set):
    root, _ = kaggle_set
    csv_path = root / "train.csv"
    lines = csv_path.read_text(encoding="utf-8").splitlines()
    csv_path.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"missing column\(s\) sign") as error:
        list_samples(root, "auto")
    assert str(csv_path) in str(error.value)


# ----------------------------------------------------------------------------- reuse and invalidation

def _fail(*args, **kwargs):
    raise AssertionError("the cache entry should have been reused without reading the files")


def test_cache_reused_without_reparse(npy_set, tmp_path, monkeypatch):
    _, samples = npy_set
    first = load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)
    monkeypatch.setattr(cache, "read_frames", _fail)
    monkeypatch.setattr(cache, "_probe_frame_shape", _fail)
    second = load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)

    assert second.folder == first.folder
    assert second.sample_ids == first.sample_ids
    assert second.labels == first.labels
    np.testing.assert_array_equal(second.features(), first.features())


def test_cache_features_are_memmap(npy_set, tmp_path):
    _, samples = npy_set
    data = load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)
    features = data.features()

    assert isinstance(features, np.memmap)
    assert features.shape == (12, 16, 42 * 3)
    assert features.dtype == np.float32


def test_cache_matches_preprocess_clip(npy_set, tmp_path):
    _, samples = npy_set
    data = load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)
    features = data.features()
    for row, sample in enumerate(samples):
        clip, length = preprocess_clip(read_frames(sample), data.preprocessing)

        assert data.sample_ids[row] == sample.sample_id
        assert data.lengths[row] == length
        np.testing.assert_array_equal(features[row], clip)


def test_cache_changed_file_rebuilds(npy_set, tmp_path):
    _, samples = npy_set
    first = load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)
    old_row = np.array(first.features()[0])
    stat = samples[0].path.stat()
    np.save(samples[0].path, hands_clip(np.random.default_rng(99), 9))
    os.utime(samples[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    second = load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)

    assert second.folder != first.folder
    assert second.lengths[0] == 9
    assert not np.array_equal(np.array(second.features()[0]), old_row, equal_nan=True)


def test_cache_changed_setting_rebuilds(npy_set, tmp_path):
    _, samples = npy_set
    first = load_or_build(samples, data_config(max_seq_len=16), cache_root=tmp_path / "cache", show_progress=False)
    second = load_or_build(samples, data_config(max_seq_len=8), cache_root=tmp_path / "cache", show_progress=False)

    assert second.folder != first.folder
    assert first.features().shape[1] == 16
    assert second.features().shape[1] == 8
    assert second.preprocessing.max_seq_len == 8


def test_cache_default_root_is_xdg(npy_set, tmp_path):
    _, samples = npy_set
    data = load_or_build(samples, data_config(), show_progress=False)

    assert data.folder.parent == tmp_path / "xdg-cache" / "isaret"


def test_cache_unreadable_entry_rebuilt(npy_set, tmp_path, caplog):
    _, samples = npy_set
    first = load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)
    (first.folder / "meta.json").write_text("{not json", encoding="utf-8")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    second = load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)

    assert second.sample_ids == first.sample_ids
    assert any("unreadable" in record.getMessage() for record in caplog.records)


def test_cache_reuse_repeats_skip_warning(npy_set, tmp_path, caplog):
    _, samples = npy_set
    samples[0].path.unlink()
    config = data_config(bad_file_policy="skip")
    load_or_build(samples, config, cache_root=tmp_path / "cache", show_progress=False)
    caplog.clear()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    data = load_or_build(samples, config, cache_root=tmp_path / "cache", show_progress=False)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]

    assert len(data) == len(samples) - 1
    assert len(warnings) == 1
    assert samples[0].sample_id in warnings[0].getMessage()


def test_kaggle_cache_reads_parquet(kaggle_set, tmp_path):
    _, samples = kaggle_set
    data = load_or_build(samples, data_config(), cache_root=tmp_path / "cache", show_progress=False)

    assert len(data) == 6
    assert data.signers == [s.signer for s in samples]
    assert data.preprocessing.selection.layout.name == "holistic"
    assert data.lengths == [3] * 6

