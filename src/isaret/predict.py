"""`isaret predict` and `Predictor`, the one place that turns raw frames into class probabilities.

A Predictor needs only a checkpoint: its model weights, model config, preprocessing settings,
feature scaler and label map. `evaluate` and `export` reuse it, so a clip gets the same input
tensors here as in training and validation: `preprocess_clip`, then `valid` from the finite
values before scaling, then `FeatureScaler.transform`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from isaret.checkpoint import load_checkpoint
from isaret.config import Config
from isaret.data.dataset import FeatureScaler
from isaret.data.preprocess import Preprocessing, canonical_frame_shape, preprocess_clip
from isaret.data.readers import read_kaggle_parquet, read_npy
from isaret.errors import CheckpointError, ConfigError, DataError, IsaretError
from isaret.model import build_model

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
DEFAULT_BATCH_SIZE = 64
LANDMARK_SUFFIXES = (".parquet", ".npy")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mov")
EXTRACT_MODULE = "isaret.extract"


# ----------------------------------------------------------------------------- reading clips

def read_clip(path: str | Path) -> np.ndarray:
    """Read one clip file as raw frames (T, ...): parquet, .npy, or a video through `isaret.extract`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return read_kaggle_parquet(path)
    if suffix == ".npy":
        return read_npy(path)
    if suffix in VIDEO_SUFFIXES:
        return _extract_video(path)
    raise DataError(
        f"{path}: unsupported file type {suffix or '(no suffix)'!r}; expected a landmark file "
        f"({', '.join(LANDMARK_SUFFIXES)}) or a video ({', '.join(VIDEO_SUFFIXES)})"
    )


def _extract_video(path: Path) -> np.ndarray:
    """Run the landmark extractor on a video, which returns MediaPipe Holistic frames (T, 543, 3)."""
    install_hint = "install the video extra: pip install 'isaret[video]'"
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if importlib.util.find_spec(EXTRACT_MODULE) is None:
        raise DataError(f"{path}: predicting from a video needs landmark extraction, which is not installed; "
                        f"{install_hint}")
    try:
        extract = importlib.import_module(EXTRACT_MODULE)
        return np.asarray(extract.extract_clip(path), dtype=np.float32)
    except ImportError as error:
        raise DataError(f"{path}: landmark extraction failed to load ({error}); {install_hint}") from None


# ----------------------------------------------------------------------------- predictor

@dataclass
class Prediction:
    """The top-k classes of one clip, most probable first."""

    source: str
    labels: list[str]
    probabilities: list[float]

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]

    def to_dict(self) -> dict:
        return {"file": self.source,
                "predictions": [{"label": label, "probability": probability}
                                for label, probability in zip(self.labels, self.probabilities)]}


def resolve_device(name: str) -> torch.device:
    """Map 'auto', 'cpu' or 'cuda' to a torch device. 'auto' picks CUDA when it is available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


class Predictor:
    """A checkpoint's model with its preprocessing, feature scaler and class names, in eval mode."""

    def __init__(self, checkpoint: dict, source: str = "checkpoint", device: str | torch.device = "cpu"):
        self.source = source
        self.device = resolve_device(device) if isinstance(device, str) else device
        try:
            self.classes = [str(name) for name in checkpoint["label_map"]]
            self.preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])
            self.scaler = FeatureScaler.from_state_dict(checkpoint["feature_scaler"])
            self.config = Config.from_dict(checkpoint["config"], source=f"{source} config")
            state = checkpoint["model_state_dict"]
        except KeyError as error:
            raise CheckpointError(f"{source}: the checkpoint has no {error.args[0]!r} entry, which prediction "
                                  "needs; use a checkpoint written by 'isaret train'") from None
        prep = self.preprocessing
        self.model = build_model(prep.feature_dim, len(self.classes), prep.max_seq_len, self.config.model)
        try:
            self.model.load_state_dict(state)
        except RuntimeError as error:
            reason = " ".join(line.strip() for line in str(error).splitlines()[:2])[:300]
            raise CheckpointError(f"{source}: the model weights do not fit the model that the stored config "
                                  f"builds ({reason}); the checkpoint may come from another isaret version") from None
        self.model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        return cls(load_checkpoint(path), source=str(path), device=device)

    # ------------------------------------------------------------------ inputs

    def prepare(self, frames: np.ndarray, name: str = "clip") -> tuple[np.ndarray, np.ndarray]:
        """Turn raw frames (T, ...) into model input: x (max_seq_len, F) float32 and valid (max_seq_len,) bool."""
        frames = np.asarray(frames)
        expected = self.preprocessing.frame_shape
        if frames.ndim >= 2 and canonical_frame_shape(frames.shape[1:]) != expected:
            raise DataError(
                f"{name}: wrong landmark layout: frames shaped {tuple(frames.shape[1:])}, but the checkpoint was "
                f"trained on {self.preprocessing.selection.layout.name} frames {expected}; pass clips recorded "
                "with the same landmark layout as the training data"
            )
        clip, _ = preprocess_clip(frames, self.preprocessing, name=name)
        return self.prepare_preprocessed(clip)

    def prepare_preprocessed(self, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scale a NaN-padded preprocessed clip (..., T, F) and mark its valid frames, as `SignDataset` does."""
        clip = np.asarray(clip, dtype=np.float32)
        valid = np.isfinite(clip).any(axis=-1)
        return self.scaler.transform(clip), valid

    # ------------------------------------------------------------------ forward

    def logits(self, x: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """Return float32 logits (B, classes) on the CPU for a batch x (B, T, F) and valid (B, T)."""
        inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(valid, dtype=bool)).to(self.device)
        with torch.no_grad():
            return self.model(inputs, mask).float().cpu()

    def probabilities(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Return softmax probabilities (B, classes) for a batch x (B, T, F) and valid (B, T)."""
        return torch.softmax(self.logits(x, valid), dim=-1).numpy()

    def top_k(self, probabilities: np.ndarray, top_k: int, source: str) -> Prediction:
        """Pick the `top_k` most probable classes of one row of probabilities."""
        count = max(1, min(top_k, len(self.classes)))
        order = np.argsort(-probabilities, kind="stable")[:count]
        return Prediction(source=source, labels=[self.classes[i] for i in order],
                          probabilities=[float(probabilities[i]) for i in order])

    def predict(self, clip: np.ndarray | str | Path, top_k: int = DEFAULT_TOP_K) -> Prediction:
        """Predict one clip, given as raw frames (T, ...) as the readers return them or as a file path."""
        if isinstance(clip, (str, Path)):
            source = str(clip)
            frames = read_clip(clip)
        else:
            source = "array"
            frames = np.asarray(clip)
        x, valid = self.prepare(frames, name=source)
        return self.top_k(self.probabilities(x[None], valid[None])[0], top_k, source)


# ----------------------------------------------------------------------------- files

@dataclass
class FileResult:
    """The prediction for one file, or the reason it failed."""

    path: str
    prediction: Prediction | None = None
    error: str = ""

    def to_dict(self) -> dict:
        if self.prediction is None:
            return {"file": self.path, "error": self.error}
        return self.prediction.to_dict()


def predict_files(predictor: Predictor, paths: list[str], top_k: int,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> list[FileResult]:
    """Predict each file. A file that cannot be read or preprocessed gets an error, and the rest still run."""
    results = [FileResult(path=path) for path in paths]
    prepared: list[tuple[int, np.ndarray, np.ndarray]] = []
    for index, path in enumerate(paths):
        try:
            x, valid = predictor.prepare(read_clip(path), name=path)
        except IsaretError as error:
            message = str(error) if path in str(error) else f"{path}: {error}"
            results[index].error = message
            log.error("%s", message)
            continue
        prepared.append((index, x, valid))
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start:start + batch_size]
        probabilities = predictor.probabilities(np.stack([x for _, x, _ in chunk]),
                                                np.stack([valid for _, _, valid in chunk]))
        for (index, _, _), row in zip(chunk, probabilities):
            results[index].prediction = predictor.top_k(row, top_k, paths[index])
    return results


def format_results(results: list[FileResult]) -> str:
    lines = []
    for result in results:
        lines.append(result.path)
        if result.prediction is None:
            lines.append(f"  error: {result.error}")
            continue
        width = max(len(label) for label in result.prediction.labels)
        for rank, (label, probability) in enumerate(
                zip(result.prediction.labels, result.prediction.probabilities), start=1):
            lines.append(f"  {rank}. {label:<{width}}  {probability:.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pth) written by isaret train")
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="clips to classify: Kaggle ISLR .parquet, .npy arrays shaped like the training "
                             f"data, or videos ({', '.join(VIDEO_SUFFIXES)}) with the isaret[video] extra")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="N",
                        help=f"classes listed per clip, most probable first (default {DEFAULT_TOP_K}; "
                             "at most the number of classes)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"clips per forward pass (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                        help="inference device (default cpu; auto picks cuda when available)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ConfigError(f"--top-k: invalid value {args.top_k}; expected an integer of at least 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: invalid value {args.batch_size}; expected an integer of at least 1")
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    results = predict_files(predictor, list(args.files), args.top_k, args.batch_size)
    failed = sum(1 for result in results if result.prediction is None)
    if args.json:
        document = {"checkpoint": str(args.checkpoint), "results": [result.to_dict() for result in results]}
        print(json.dumps(document, ensure_ascii=False, indent=1))
    else:
        print(format_results(results))
    if failed:
        log.error("Failed to predict %d of %d file(s); see the errors above", failed, len(results))
        return 1
    return 0
