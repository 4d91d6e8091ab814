"""Readers of landmark data sets: the Kaggle ISLR parquet layout and folders of `.npy` arrays.

A reader lists the samples of a data set (`list_samples`) and loads one sample's frames
(`read_frames`); nothing here preprocesses. Every problem raises DataError naming the file.
"""

from __future__ import annotations

import csv
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from isaret.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("kaggle-islr", "npy-folder")
KAGGLE_TYPES = ("face", "left_hand", "pose", "right_hand")
KAGGLE_TYPE_OFFSETS = np.array([0, 468, 489, 522], dtype=np.int64)
KAGGLE_TYPE_SIZES = np.array([468, 21, 33, 21], dtype=np.int64)
KAGGLE_POINTS = 543
KAGGLE_COLUMNS = ("frame", "type", "landmark_index", "x", "y", "z")
KAGGLE_CSV_COLUMNS = ("path", "participant_id", "sequence_id", "sign")


@dataclass(frozen=True)
class SampleRef:
    """One sample of a data set, before reading."""

    sample_id: str  # the file's path relative to the data set root, with '/' separators
    path: Path
    label: str
    signer: str  # empty when the data set has no signer ids


def detect_format(root: Path) -> str:
    if root.is_file() and root.suffix.lower() == ".csv":
        return "kaggle-islr"
    if (root / "train.csv").is_file():
        return "kaggle-islr"
    if root.is_dir():
        return "npy-folder"
    if root.exists():
        raise DataError(f"{root} is a file, not a data set; pass --data with a Kaggle ISLR folder (or its train.csv) "
                        "or a folder of class folders")
    raise DataError(f"data path not found: {root}; pass --data with a Kaggle ISLR folder or a folder of class folders")


def list_samples(root: Path, data_format: str, signer_csv: str = "", bad_file_policy: str = "error") -> list[SampleRef]:
    if not root.exists():
        raise DataError(f"data path not found: {root}; check --data")
    if data_format == "auto":
        data_format = detect_format(root)
    if data_format == "kaggle-islr":
        return list_kaggle_islr(root, bad_file_policy)
    if data_format == "npy-folder":
        return list_npy_folder(root, signer_csv)
    raise DataError(f"unknown data format {data_format!r}; use one of {', '.join(FORMATS)}")


def list_kaggle_islr(root: Path, bad_file_policy: str = "error") -> list[SampleRef]:
    """List the samples of a Kaggle ISLR folder (train.csv plus one parquet per sample)."""
    csv_path = root if root.is_file() else root / "train.csv"
    base = csv_path.parent
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found; a kaggle-islr data set needs train.csv beside its parquet files")
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in KAGGLE_CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{csv_path}: missing column(s) {', '.join(missing)}; expected {', '.join(KAGGLE_CSV_COLUMNS)}"
                )
            rows = list(reader)
    except UnicodeDecodeError as error:
        raise DataError(f"{csv_path}: not valid UTF-8 text ({error})") from None
    except csv.Error as error:
        raise DataError(f"{csv_path}: invalid CSV ({error})") from None
    samples, unlabelled = [], []
    for line, row in enumerate(rows, start=2):
        relative = (row.get("path") or "").strip()
        label = unicodedata.normalize("NFC", (row.get("sign") or "").strip())
        if not relative:
            raise DataError(f"{csv_path}, line {line}: empty 'path'")
        if not label and bad_file_policy == "error":
            raise DataError(f"{csv_path}, line {line}: missing label in column 'sign' for {relative}; add the sign, "
                            "or set bad_file_policy=skip to leave such rows out")
        if not label:
            unlabelled.append(f"line {line}: {relative}")
            continue
        samples.append(SampleRef(sample_id=relative.replace("\\", "/"), path=base / relative, label=label,
                                 signer=(row.get("participant_id") or "").strip()))
    if unlabelled:
        log.warning("Skipped %d row(s) of %s without a label in column 'sign' (bad_file_policy=skip):\n  %s",
                    len(unlabelled), csv_path, "\n  ".join(unlabelled[:50]))
    if not samples:
        raise DataError(f"{csv_path}: no samples listed")
    return samples


def list_npy_folder(root: Path, signer_csv: str = "") -> list[SampleRef]:
    """List `<root>/<class>/<file>.npy`; other files, and folders without `.npy` files, are ignored."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; an npy-folder data set is a folder of class folders")
    signers = _read_signer_csv(Path(signer_csv), root) if signer_csv else {}
    samples = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.npy")):
            # NFC, so that names written in decomposed form (as some file systems and zip tools
            # do) give the same classes and sample ids.
            label = unicodedata.normalize("NFC", class_dir.name)
            sample_id = unicodedata.normalize("NFC", f"{class_dir.name}/{path.name}")
            samples.append(SampleRef(sample_id=sample_id, path=path, label=label,
                                     signer=signers.get(sample_id, "")))
    if not samples:
        raise DataError(f"{root}: no class folders with .npy files found")
    if signers:
        unmapped = [s.sample_id for s in samples if not s.signer]
        if unmapped:
            raise DataError(
                f"{signer_csv}: no signer for {len(unmapped)} file(s), e.g. {', '.join(unmapped[:5])}; "
                "add a row per file or drop --set signer_csv"
            )
    return samples


def _read_signer_csv(path: Path, root: Path) -> dict[str, str]:
    if not path.is_file():
        raise DataError(f"signer_csv: file not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not {"path", "signer"} <= set(reader.fieldnames or []):
            raise DataError(f"{path}: expected columns path,signer; found {', '.join(reader.fieldnames or [])}")
        return {row["path"].strip().replace("\\", "/"): row["signer"].strip() for row in reader}


def read_frames(sample: SampleRef) -> np.ndarray:
    """Read one sample as float32 frames shaped (T, ...); raises DataError naming the file."""
    suffix = sample.path.suffix.lower()
    if suffix == ".parquet":
        return read_kaggle_parquet(sample.path)
    if suffix == ".npy":
        return read_npy(sample.path)
    raise DataError(f"{sample.path}: unsupported file type {suffix!r}; expected .parquet or .npy")


def read_kaggle_parquet(path: Path) -> np.ndarray:
    """Read a long-format Kaggle ISLR parquet into (frames, 543, 3), NaN where no landmark was found.

    Rows are placed by their (frame, type, landmark_index), so files in any row order, or with
    missing rows, are read correctly.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with pq.ParquetFile(path) as parquet:
            present = set(parquet.schema_arrow.names)
            table = parquet.read(columns=[name for name in KAGGLE_COLUMNS if name in present])
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: unreadable parquet file ({reason})") from None
    missing = [name for name in KAGGLE_COLUMNS if name not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(KAGGLE_COLUMNS)}")
    if table.num_rows == 0:
        raise DataError(f"{path}: empty sequence (no rows)")
    with_nulls = [name for name in ("frame", "type", "landmark_index") if table[name].null_count]
    if with_nulls:
        raise DataError(f"{path}: null values in column(s) {', '.join(with_nulls)}")
    try:
        frame_column = pc.cast(table["frame"], pa.int64()).to_numpy(zero_copy_only=False)
        landmark = pc.cast(table["landmark_index"], pa.int64()).to_numpy(zero_copy_only=False)
        coordinates = [pc.cast(table[name], pa.float32()).to_numpy(zero_copy_only=False) for name in "xyz"]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
        raise DataError(
            f"{path}: invalid values in column frame, landmark_index, x, y or z "
            f"({str(error).splitlines()[0]}); expected integer frame and landmark_index, numeric x, y, z"
        ) from None
    type_index = pc.index_in(pc.cast(table["type"], pa.string()), value_set=pa.array(KAGGLE_TYPES))
    if type_index.null_count:
        bad = pc.unique(pc.filter(table["type"], pc.is_null(type_index))).to_pylist()[:5]
        raise DataError(f"{path}: unknown landmark type(s) {bad}; expected {', '.join(KAGGLE_TYPES)}")
    type_index = type_index.to_numpy(zero_copy_only=False).astype(np.int64)
    if ((landmark < 0) | (landmark >= KAGGLE_TYPE_SIZES[type_index])).any():
        raise DataError(f"{path}: landmark_index out of range for its type")
    frame_ids, frame_index = np.unique(frame_column, return_inverse=True)
    frames = np.full((len(frame_ids), KAGGLE_POINTS, 3), np.nan, dtype=np.float32)
    point = KAGGLE_TYPE_OFFSETS[type_index] + landmark
    for axis, values in enumerate(coordinates):
        frames[frame_index, point, axis] = values
    return frames


def read_npy(path: Path) -> np.ndarray:
    """Read a (frames, features) or (frames, ..., coords) array; pickled objects are rejected."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{path}: unreadable .npy file ({error})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise DataError(f"{path}: expected a numeric array, found dtype {getattr(array, 'dtype', None)}")
    if array.ndim < 2:
        raise DataError(f"{path}: wrong shape {array.shape}; expected (frames, features) or (frames, ..., coords)")
    if array.shape[0] == 0:
        raise DataError(f"{path}: empty sequence (0 frames)")
    return array.astype(np.float32, copy=False)
