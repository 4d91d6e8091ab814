"""Split, feature scaler, augmentation, torch Dataset and the epoch sampler.

Every random choice here is a pure function of the seed, the epoch and the sample index. So a
resumed run gets exactly the batches and augmentations of an uninterrupted one, with or without
DataLoader workers, as long as the number of processes stays the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from isaret.config import DataConfig
from isaret.data.cache import CachedData
from isaret.errors import DataError


# ----------------------------------------------------------------------------- split

@dataclass
class Split:
    train: list[int]  # indices into the cached data set
    val: list[int]
    kind: str  # "signer" or "stratified"

    def to_dict(self, sample_ids: list[str]) -> dict:
        return {"kind": self.kind, "train": [sample_ids[i] for i in self.train],
                "val": [sample_ids[i] for i in self.val]}

    @classmethod
    def from_dict(cls, values: dict, sample_ids: list[str]) -> Split:
        position = {sample_id: i for i, sample_id in enumerate(sample_ids)}
        missing = [s for s in values["train"] + values["val"] if s not in position]
        if missing:
            raise DataError(
                f"{len(missing)} sample(s) of the checkpoint's split are not in the data set, e.g. "
                f"{', '.join(missing[:5])}; resume with the data the run was trained on"
            )
        return cls(train=[position[s] for s in values["train"]], val=[position[s] for s in values["val"]],
                   kind=values["kind"])


def make_split(data: CachedData, cfg: DataConfig, seed: int) -> Split:
    """Split by signer when signer ids exist (and split is not 'stratified'), else stratified by class."""
    have_signers = all(data.signers) and len(set(data.signers)) >= 2
    kind = cfg.split
    if kind == "auto":
        kind = "signer" if have_signers else "stratified"
    if kind == "signer" and not have_signers:
        raise DataError("split=signer needs signer ids for every sample and at least 2 signers; "
                        "use split=stratified or give signer ids (participant_id, or signer_csv)")
    rng = np.random.default_rng([seed, 7919])
    if kind == "signer":
        signers = sorted(set(data.signers))
        order = rng.permutation(len(signers))
        val_count = min(len(signers) - 1, max(1, round(cfg.val_fraction * len(signers))))
        val_signers = {signers[i] for i in order[:val_count]}
        val = [i for i, s in enumerate(data.signers) if s in val_signers]
        train = [i for i, s in enumerate(data.signers) if s not in val_signers]
    else:
        train, val = _stratified(data.labels, cfg.val_fraction, rng)
    missing = sorted(set(data.labels) - {data.labels[i] for i in train})
    if missing:
        raise DataError(f"the {kind} split left no training samples for class(es) {', '.join(missing)}; "
                        "add samples or change val_fraction or seed")
    return Split(train=sorted(train), val=sorted(val), kind=kind)


def _stratified(labels: list[str], fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    too_small = {label: len(items) for label, items in by_class.items() if len(items) < 2}
    if too_small:
        listing = ", ".join(f"'{label}' ({count})" for label, count in sorted(too_small.items()))
        raise DataError(f"too few samples for a stratified split in class(es) {listing}; "
                        "each class needs at least 2 (one for training, one for validation)")
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        val_count = min(len(items) - 1, max(1, round(fraction * len(items))))
        val += [items[i] for i in order[:val_count]]
        train += [items[i] for i in order[val_count:]]
    return train, val


# ----------------------------------------------------------------------------- scaler

@dataclass
class FeatureScaler:
    """Per-feature mean and standard deviation of the training split, over visible values only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, indices: list[int], chunk: int = 256) -> FeatureScaler:
        """Fit on features[indices], streaming in chunks so that memory does not grow with the data set."""
        dim = features.shape[-1]
        count = np.zeros(dim, dtype=np.float64)
        total = np.zeros(dim, dtype=np.float64)
        squares = np.zeros(dim, dtype=np.float64)
        for start in range(0, len(indices), chunk):
            block = np.asarray(features[np.sort(indices[start:start + chunk])], dtype=np.float64).reshape(-1, dim)
            seen = np.isfinite(block)
            values = np.where(seen, block, 0.0)
            count += seen.sum(axis=0)
            total += values.sum(axis=0)
            squares += (values ** 2).sum(axis=0)
        safe = np.maximum(count, 1)
        mean = total / safe
        std = np.sqrt(np.maximum(squares / safe - mean ** 2, 0.0))
        std = np.where(std > 1e-6, std, 1.0)
        return cls(mean=mean.astype(np.float32), std=std.astype(np.float32))

    def transform(self, clip: np.ndarray) -> np.ndarray:
        """Standardise a (..., features) array and set missing values to 0 (the training mean)."""
        scaled = (clip - self.mean) / self.std
        return np.where(np.isfinite(scaled), scaled, 0.0).astype(np.float32)

    def state_dict(self) -> dict:
        return {"mean": torch.from_numpy(self.mean.copy()), "std": torch.from_numpy(self.std.copy())}

    @classmethod
    def from_state_dict(cls, state: dict) -> FeatureScaler:
        return cls(mean=state["mean"].numpy().astype(np.float32), std=state["std"].numpy().astype(np.float32))


# ----------------------------------------------------------------------------- augmentation

@dataclass
class Augmenter:
    """Training-only augmentation of one NaN-padded clip, driven by a generator the caller seeds."""

    cfg: DataConfig
    coord_count: int  # 0 for flat feature vectors, which are only resampled in time
    mirror: np.ndarray

    def __call__(self, clip: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
        frames = clip[:length]
        if self.cfg.aug_time_scale > 0:
            factor = 1.0 + rng.uniform(-self.cfg.aug_time_scale, self.cfg.aug_time_scale)
            new_length = int(np.clip(round(length * factor), 1, len(clip)))
            resampled = frames[np.round(np.linspace(0, length - 1, new_length)).astype(np.int64)]
            # Resampling can drop every visible frame of a sparse clip, and a clip without one valid
            # frame gives NaN logits, so such a clip keeps its original length.
            if np.isfinite(resampled).any():
                frames = resampled
        if self.coord_count >= 2:
            points = frames.reshape(len(frames), -1, self.coord_count).copy()
            self._affine(points, rng)
            frames = points.reshape(len(frames), -1)
        out = np.full_like(clip, np.nan)
        out[: len(frames)] = frames
        return out

    def _affine(self, points: np.ndarray, rng: np.random.Generator) -> None:
        """Flip, rotate, scale and shift (T, P, C) points in place around the clip's centre."""
        xy = points[..., :2]
        visible = xy[np.isfinite(xy).all(axis=-1)]
        if not len(visible):
            return
        centre = visible.mean(axis=0)
        if rng.random() < self.cfg.aug_flip_prob:
            points[:] = points[:, self.mirror]
            points[..., 0] = 2 * centre[0] - points[..., 0]
        angle = math.radians(rng.uniform(-self.cfg.aug_rotate_deg, self.cfg.aug_rotate_deg))
        scale = 1.0 + rng.uniform(-self.cfg.aug_scale, self.cfg.aug_scale)
        shift = rng.uniform(-self.cfg.aug_shift, self.cfg.aug_shift, size=2)
        rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        moved = (points[..., :2] - centre) @ rotation.T.astype(np.float32) + centre + shift
        points[..., :2] = moved
        if points.shape[-1] > 2:
            points[..., 2:] *= scale


# ----------------------------------------------------------------------------- dataset

class SignDataset(Dataset):
    """Samples of a cached data set; items are keyed by (sample index, epoch) from EpochSampler.

    The memory map is opened lazily in each process, so DataLoader workers share the page cache
    instead of receiving a pickled copy of the features.
    """

    def __init__(self, data: CachedData, indices: list[int], label_index: dict[str, int], scaler: FeatureScaler,
                 augmenter: Augmenter | None, seed: int):
        self.features_path = data.features_path
        self.indices = list(indices)
        self.lengths = [data.lengths[i] for i in self.indices]
        self.targets = [label_index[data.labels[i]] for i in self.indices]
        self.scaler = scaler
        self.augmenter = augmenter
        self.seed = seed
        self._features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]):
        position, epoch = key
        if self._features is None:
            self._features = np.load(self.features_path, mmap_mode="r")
        clip = np.array(self._features[self.indices[position]], dtype=np.float32)
        if self.augmenter is not None:
            rng = np.random.default_rng([self.seed, epoch, self.indices[position]])
            clip = self.augmenter(clip, self.lengths[position], rng)
        valid = np.isfinite(clip).any(axis=-1)
        x = self.scaler.transform(clip)
        return torch.from_numpy(x), torch.from_numpy(valid), self.targets[position]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_features"] = None
        return state


class EpochSampler(Sampler):
    """Batches of (position, epoch) keys for one rank, resumable at any batch.

    The epoch's order is a permutation seeded by (seed, epoch), the same for every world size.
    Rank r takes every world_size-th position, and the order is padded by wrapping around so
    that every rank runs the same number of batches.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0, pad: bool = True):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.shuffle, self.rank, self.world_size, self.start_batch, self.pad = shuffle, rank, world_size, start_batch, pad

    def rank_positions(self) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        if self.pad and self.size % self.world_size:
            extra = self.world_size - self.size % self.world_size
            order = np.concatenate([order, np.resize(order, extra)])
        return order[self.rank::self.world_size]

    def __iter__(self):
        positions = self.rank_positions()
        for batch in range(self.start_batch, len(self)):
            chunk = positions[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield [(int(p), self.epoch) for p in chunk]

    def __len__(self) -> int:
        return batches_per_epoch(self.size, self.batch_size, self.world_size) if self.pad else \
            math.ceil(len(self.rank_positions()) / self.batch_size)


def batches_per_epoch(size: int, batch_size: int, world_size: int) -> int:
    return math.ceil(math.ceil(size / world_size) / batch_size)
