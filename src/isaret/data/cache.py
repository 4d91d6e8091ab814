"""On-disk cache of preprocessed samples, read through memory mapping.

An entry is a folder named by a fingerprint of the input files (path, size, modification time,
label, signer) and of the preprocessing settings. It contains `features.npy`, shaped
(samples, max_seq_len, features) with NaN for missing values and padding, and `meta.json`.
It is written into a temporary folder and renamed into place, so a killed run leaves no entry
that a later run trusts. A changed file or setting gives a new fingerprint, so a stale entry is
never read.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from isaret.config import DataConfig
from isaret.data.preprocess import Preprocessing, canonical_frame_shape, preprocess_clip
from isaret.data.readers import KAGGLE_POINTS, SampleRef, read_frames
from isaret.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class CachedData:
    """A preprocessed data set: sample metadata in memory, features memory-mapped from disk."""

    folder: Path
    sample_ids: list[str]
    labels: list[str]
    signers: list[str]
    lengths: list[int]
    preprocessing: Preprocessing
    skipped: list[tuple[str, str]]

    @property
    def features_path(self) -> Path:
        return self.folder / "features.npy"

    def features(self) -> np.ndarray:
        return np.load(self.features_path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.sample_ids)


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "isaret"


def fingerprint(samples: list[SampleRef], cfg: DataConfig) -> str:
    digest = hashlib.sha256()
    settings = {
        "version": CACHE_VERSION,
        "landmarks": cfg.landmarks,
        "coords": cfg.coords,
        "normalize": cfg.normalize,
        "max_seq_len": cfg.max_seq_len,
        "seq_policy": cfg.seq_policy,
        "bad_file_policy": cfg.bad_file_policy,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for sample in samples:
        try:
            stat = sample.path.stat()
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"\n{sample.sample_id}\t{sample.label}\t{sample.signer}\t{stamp}".encode())
    return digest.hexdigest()[:24]


def load_or_build(samples: list[SampleRef], cfg: DataConfig, cache_root: Path | None = None,
                  show_progress: bool = True) -> CachedData:
    """Return the cached preprocessed data set, building it first if no valid entry exists."""
    cache_root = Path(cache_root or cfg.cache_dir or default_cache_root())
    key = fingerprint(samples, cfg)
    folder = cache_root / key
    if (folder / "meta.json").is_file():
        try:
            cached = _read_entry(folder)
            log.info("Using %d preprocessed samples from cache %s", len(cached), folder)
            _warn_skipped(cached.skipped, len(samples))
            return cached
        except (OSError, ValueError, KeyError) as error:
            log.warning("Cache entry %s is unreadable (%s); rebuilding it", folder, error)
            shutil.rmtree(folder, ignore_errors=True)
    return _build_entry(samples, cfg, cache_root, key, show_progress)


def _read_entry(folder: Path) -> CachedData:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"cache version {meta.get('version')} is not {CACHE_VERSION}")
    features = np.load(folder / "features.npy", mmap_mode="r")
    if features.shape[0] != len(meta["sample_ids"]):
        raise ValueError("features.npy and meta.json disagree on the number of samples")
    return CachedData(
        folder=folder,
        sample_ids=meta["sample_ids"],
        labels=meta["labels"],
        signers=meta["signers"],
        lengths=meta["lengths"],
        preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
        skipped=[tuple(item) for item in meta["skipped"]],
    )


def _probe_frame_shape(sample: SampleRef) -> tuple[int, ...]:
    """Read a sample's frame shape without loading it (the .npy header only)."""
    if sample.path.suffix.lower() == ".parquet":
        return (KAGGLE_POINTS, 3)
    if not sample.path.is_file():
        raise DataError(f"{sample.path}: file not found")
    try:
        array = np.load(sample.path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{sample.path}: unreadable .npy file ({error})") from None
    if array.ndim < 2:
        raise DataError(f"{sample.path}: wrong shape {array.shape}; expected (frames, features) or (frames, ..., coords)")
    return canonical_frame_shape(array.shape[1:])


class _BadSamples:
    """Failed samples: raised at once under bad_file_policy 'error', collected under 'skip'."""

    def __init__(self, policy: str):
        self.policy = policy
        self.items: list[tuple[str, str]] = []

    def add(self, sample: SampleRef, error: DataError) -> None:
        if self.policy == "error":
            raise DataError(f"{error} (set bad_file_policy=skip to leave such files out)")
        self.items.append((sample.sample_id, str(error)))


def _expected_frame_shape(samples: list[SampleRef], bad: _BadSamples) -> tuple[tuple[int, ...], list[SampleRef]]:
    """Find the frame shape most files share; files with another shape are reported, never mixed in."""
    shapes: dict[str, tuple[int, ...]] = {}
    for sample in samples:
        try:
            shapes[sample.sample_id] = _probe_frame_shape(sample)
        except DataError as error:
            bad.add(sample, error)
    if not shapes:
        raise DataError("no readable samples: " + "; ".join(reason for _, reason in bad.items[:5]))
    expected, _ = collections.Counter(shapes.values()).most_common(1)[0]
    odd = [s for s in samples if s.sample_id in shapes and shapes[s.sample_id] != expected]
    if odd and bad.policy == "error":
        listing = "\n".join(f"  {s.path}: frames {shapes[s.sample_id]}" for s in odd[:20])
        more = f"\n  ... and {len(odd) - 20} more" if len(odd) > 20 else ""
        raise DataError(
            f"{len(odd)} file(s) have frames of another shape than the {expected} of most files:\n{listing}{more}\n"
            "fix or remove them, or set bad_file_policy=skip to leave them out"
        )
    for sample in odd:
        bad.add(sample, DataError(f"{sample.path}: frames {shapes[sample.sample_id]}, expected {expected}"))
    good = [s for s in samples if s.sample_id in shapes and shapes[s.sample_id] == expected]
    return expected, good


def _build_entry(samples: list[SampleRef], cfg: DataConfig, cache_root: Path, key: str,
                 show_progress: bool) -> CachedData:
    bad = _BadSamples(cfg.bad_file_policy)
    frame_shape, good = _expected_frame_shape(samples, bad)
    try:
        prep = Preprocessing.for_frame_shape(frame_shape, cfg.landmarks, cfg.coords, cfg.normalize,
                                             cfg.max_seq_len, cfg.seq_policy)
    except ValueError as error:
        raise DataError(f"{good[0].path} and {len(good) - 1} other file(s): unsupported frame shape: {error}") from None
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_root))
    try:
        features = np.lib.format.open_memmap(staging / "features.npy", mode="w+", dtype=np.float32,
                                             shape=(len(good), cfg.max_seq_len, prep.feature_dim))
        kept, lengths = [], []
        for sample in tqdm(good, desc="Preprocessing", unit="clip", disable=not show_progress, leave=False):
            try:
                clip, length = preprocess_clip(read_frames(sample), prep, name=str(sample.path))
            except DataError as error:
                bad.add(sample, error)
                continue
            features[len(kept)] = clip
            kept.append(sample)
            lengths.append(length)
        if not kept:
            raise DataError("no usable samples: " + "; ".join(reason for _, reason in bad.items[:5]))
        features.flush()
        del features
        if len(kept) < len(good):
            _shrink(staging / "features.npy", len(kept))
        meta = {
            "version": CACHE_VERSION,
            "sample_ids": [s.sample_id for s in kept],
            "labels": [s.label for s in kept],
            "signers": [s.signer for s in kept],
            "lengths": lengths,
            "preprocessing": prep.to_dict(),
            "skipped": bad.items,
        }
        (staging / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        target = cache_root / key
        try:
            os.rename(staging, target)
        except OSError:
            # Another process wrote the same entry first; both are built from the same inputs.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _warn_skipped(bad.items, len(samples))
    log.info("Preprocessed %d samples into cache %s", len(kept), target)
    return _read_entry(target)


def _warn_skipped(skipped: list[tuple[str, str]], total: int) -> None:
    """Log one warning listing the samples left out under bad_file_policy=skip (the first 50)."""
    if not skipped:
        return
    listing = "\n".join(f"  {sample_id}: {reason}" for sample_id, reason in skipped[:50])
    more = f"\n  ... and {len(skipped) - 50} more" if len(skipped) > 50 else ""
    log.warning("Skipped %d of %d samples (bad_file_policy=skip):\n%s%s", len(skipped), total, listing, more)


def _shrink(path: Path, rows: int) -> None:
    """Rewrite a memory-mapped .npy keeping only its first `rows` rows, streaming in chunks."""
    source = np.load(path, mmap_mode="r")
    shrunk_path = path.with_suffix(".shrink.npy")
    shrunk = np.lib.format.open_memmap(shrunk_path, mode="w+", dtype=source.dtype, shape=(rows,) + source.shape[1:])
    for start in range(0, rows, 1024):
        stop = min(start + 1024, rows)
        shrunk[start:stop] = source[start:stop]
    shrunk.flush()
    del shrunk, source
    os.replace(shrunk_path, path)
