"""`isaret evaluate`: accuracy, top-k accuracy, macro-F1 and per-class scores of a checkpoint.

By default the checkpoint is measured on its own validation split. The data set named in its
config is read again and preprocessed with the checkpoint's settings (through the same cache as
training), and the stored validation sample ids are selected. With `--data`, another data set
is measured. Its classes are matched to the checkpoint's by name, and samples of classes that
the checkpoint does not know are reported and left out of the metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from isaret.checkpoint import load_checkpoint
from isaret.config import Config, DataConfig
from isaret.data.cache import CachedData, load_or_build
from isaret.data.readers import FORMATS, list_samples
from isaret.errors import CheckpointError, ConfigError, DataError
from isaret.metrics import accuracy, confusion_matrix, macro_f1, per_class_scores, top_k_correct
from isaret.predict import Predictor

log = logging.getLogger(__name__)

TOP_K = 5
REPORT_NAME = "evaluation.json"
CONFUSION_NAME = "confusion_matrix.png"


# ----------------------------------------------------------------------------- data

@dataclass
class EvalSet:
    """Rows of a cached, preprocessed data set to evaluate, in order."""

    description: str
    data: CachedData
    indices: list[int]

    @property
    def sample_ids(self) -> list[str]:
        return [self.data.sample_ids[i] for i in self.indices]

    @property
    def labels(self) -> list[str]:
        return [self.data.labels[i] for i in self.indices]


def checkpoint_data_root(config: Config) -> Path:
    """Return the data set folder of a checkpoint's config, where an empty data_path means the demo data."""
    from isaret.trainer import demo_data_path

    return Path(config.data.data_path) if config.data.data_path else demo_data_path()


def _load_cached(checkpoint: dict, root: Path, data_cfg: DataConfig, show_progress: bool) -> CachedData:
    """Preprocess (or read from the cache) a data set with the checkpoint's settings, and check they match."""
    samples = list_samples(root, data_cfg.data_format, data_cfg.signer_csv)
    data = load_or_build(samples, data_cfg, show_progress=show_progress)
    stored = checkpoint["preprocessing"]
    found = data.preprocessing.to_dict()
    if found != stored:
        raise DataError(
            f"{root}: the data preprocesses to {found['layout']} frames {tuple(found['frame_shape'])} with "
            f"{found['feature_dim']} features, but the checkpoint expects {stored['layout']} frames "
            f"{tuple(stored['frame_shape'])} with {stored['feature_dim']} features; evaluate on data recorded "
            "with the checkpoint's landmark layout"
        )
    return data


def load_validation_set(checkpoint: dict, cache_dir: str = "", show_progress: bool = False) -> EvalSet:
    """Reload the checkpoint's data set and select the samples of its stored validation split."""
    if "split" not in checkpoint:
        raise CheckpointError("the checkpoint stores no train/validation split; pass --data to evaluate it on a "
                              "data set")
    config = Config.from_dict(checkpoint["config"], source="checkpoint config")
    data_cfg = replace(config.data, cache_dir=cache_dir or config.data.cache_dir)
    root = checkpoint_data_root(config)
    data = _load_cached(checkpoint, root, data_cfg, show_progress)
    position = {sample_id: i for i, sample_id in enumerate(data.sample_ids)}
    val_ids = list(checkpoint["split"]["val"])
    missing = [sample_id for sample_id in val_ids if sample_id not in position]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(val_ids)} validation samples of the checkpoint are not in {root}, e.g. "
            f"{', '.join(missing[:5])}; restore the data the run was trained on, or pass --data to evaluate on "
            "another data set"
        )
    kind = checkpoint["split"].get("kind", "?")
    description = f"validation split of {root} ({len(val_ids)} samples, {kind} split)"
    return EvalSet(description=description, data=data, indices=[position[s] for s in val_ids])


def load_data_set(checkpoint: dict, root: Path, data_format: str = "auto", bad_file_policy: str = "error",
                  cache_dir: str = "", show_progress: bool = False) -> EvalSet:
    """Preprocess every sample of another data set with the checkpoint's settings."""
    config = Config.from_dict(checkpoint["config"], source="checkpoint config")
    data_cfg = replace(config.data, data_path=str(root), data_format=data_format, signer_csv="",
                       bad_file_policy=bad_file_policy, cache_dir=cache_dir or config.data.cache_dir)
    data = _load_cached(checkpoint, root, data_cfg, show_progress)
    description = f"all samples of {root} ({len(data)} samples)"
    return EvalSet(description=description, data=data, indices=list(range(len(data))))


def compute_logits(predictor: Predictor, eval_set: EvalSet, batch_size: int) -> torch.Tensor:
    """Return the logits (N, classes) of every selected row, in batches of `batch_size` rows."""
    features = eval_set.data.features()
    chunks = []
    for start in range(0, len(eval_set.indices), batch_size):
        rows = np.asarray(features[eval_set.indices[start:start + batch_size]], dtype=np.float32)
        x, valid = predictor.prepare_preprocessed(rows)
        chunks.append(predictor.logits(x, valid))
    if not chunks:
        return torch.zeros(0, len(predictor.classes))
    return torch.cat(chunks)


# ----------------------------------------------------------------------------- metrics

def match_labels(labels: list[str], classes: list[str]) -> list[int]:
    """Return the class index of each label, matched by name after Unicode NFC normalisation, or -1 if unknown."""
    index = {unicodedata.normalize("NFC", name): i for i, name in enumerate(classes)}
    return [index.get(unicodedata.normalize("NFC", label), -1) for label in labels]


def _prediction_rows(sample_ids: list[str], labels: list[str], probabilities: torch.Tensor, classes: list[str],
                     k: int) -> list[dict]:
    values, order = probabilities.topk(k, dim=-1)
    rows = []
    for i, sample_id in enumerate(sample_ids):
        top = [classes[j] for j in order[i].tolist()]
        rows.append({"sample_id": sample_id, "label": labels[i], "prediction": top[0],
                     "probability": float(values[i, 0]), "top_labels": top,
                     "top_probabilities": [float(v) for v in values[i]]})
    return rows


def build_report(classes: list[str], sample_ids: list[str], labels: list[str], logits: torch.Tensor,
                 label_smoothing: float = 0.0) -> dict:
    """Compute the metrics of known-class samples and list every sample's top predictions.

    Macro-F1 averages over the classes that occur in the targets or the predictions, as the
    trainer's validation and scikit-learn's `f1_score(average="macro")` do.
    """
    targets = torch.tensor(match_labels(labels, classes), dtype=torch.int64)
    known = targets >= 0
    if not bool(known.any()):
        found = ", ".join(sorted(set(labels))[:10])
        raise DataError(
            f"none of the {len(labels)} samples belongs to a class of the checkpoint; the data has the classes "
            f"{found}, the checkpoint {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}; evaluate on "
            "data whose class names match the checkpoint's"
        )
    count = len(classes)
    k = min(TOP_K, count)
    known_logits, known_targets = logits[known], targets[known]
    confusion = confusion_matrix(known_targets, known_logits.argmax(dim=-1), count)
    scores = per_class_scores(confusion)
    loss = torch.nn.functional.cross_entropy(known_logits, known_targets, reduction="mean",
                                             label_smoothing=label_smoothing)
    rows = _prediction_rows(sample_ids, labels, torch.softmax(logits, dim=-1), classes, k)
    unknown = Counter(label for label, target in zip(labels, targets.tolist()) if target < 0)
    return {
        "samples": int(known.sum()),
        "accuracy": accuracy(confusion),
        "top_k": k,
        "top_k_accuracy": top_k_correct(known_logits, known_targets, k) / int(known.sum()),
        "macro_f1": macro_f1(confusion),
        "loss": float(loss),
        "classes": list(classes),
        "per_class": [{"class": name, "precision": float(scores["precision"][i]),
                       "recall": float(scores["recall"][i]), "f1": float(scores["f1"][i]),
                       "support": int(scores["support"][i])} for i, name in enumerate(classes)],
        "confusion_matrix": confusion.tolist(),
        "unknown_classes": dict(sorted(unknown.items())),
        "predictions": [row for row, target in zip(rows, targets.tolist()) if target >= 0],
        "unknown_class_predictions": [row for row, target in zip(rows, targets.tolist()) if target < 0],
    }


def format_report(report: dict) -> str:
    """Render the summary and the per-class table as text."""
    lines = [
        f"checkpoint: {report['checkpoint']} (epoch {report['epoch']})",
        f"data: {report['data']}",
        f"samples: {report['samples']}",
        f"accuracy: {report['accuracy']:.4f}",
        f"top-{report['top_k']} accuracy: {report['top_k_accuracy']:.4f}",
        f"macro-F1: {report['macro_f1']:.4f}",
        "",
    ]
    width = max([len("class")] + [len(row["class"]) for row in report["per_class"]])
    lines.append(f"{'class':<{width}}  precision  recall      f1  support")
    for row in report["per_class"]:
        lines.append(f"{row['class']:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  "
                     f"{row['support']:7d}")
    unknown = report["unknown_classes"]
    if unknown:
        listing = ", ".join(f"{name} ({count})" for name, count in unknown.items())
        lines += ["", f"left out of the metrics: {sum(unknown.values())} sample(s) of {len(unknown)} class(es) "
                      f"unknown to the checkpoint: {listing}"]
    for sample_id, reason in report["skipped_files"]:
        lines.append(f"skipped unreadable sample {sample_id}: {reason}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- evaluation

def evaluate_checkpoint(path: Path, data: Path | None = None, data_format: str = "auto",
                        bad_file_policy: str = "error", batch_size: int | None = None, device: str = "cpu",
                        cache_dir: str = "", show_progress: bool = False) -> dict:
    """Evaluate a checkpoint on its validation split (`data` None) or on another data set, and return the report."""
    checkpoint = load_checkpoint(path)
    predictor = Predictor(checkpoint, source=str(path), device=device)
    if data is None:
        eval_set = load_validation_set(checkpoint, cache_dir, show_progress)
    else:
        eval_set = load_data_set(checkpoint, data, data_format, bad_file_policy, cache_dir, show_progress)
    if not eval_set.indices:
        raise DataError(f"no samples to evaluate in the {eval_set.description}")
    # The trainer validates in batches of twice the training batch size. The same batches give the
    # same float rounding, so on the CPU the metrics equal the ones it logged for the same weights.
    batch_size = batch_size or predictor.config.train.batch_size * 2
    log.info("Evaluating %s on %s", path, eval_set.description)
    logits = compute_logits(predictor, eval_set, batch_size)
    report = build_report(predictor.classes, eval_set.sample_ids, eval_set.labels, logits,
                          predictor.config.train.label_smoothing)
    # Files skipped while caching the checkpoint's own data set were never in its split, so only
    # another data set's skipped files are reported.
    skipped = [] if data is None else [list(item) for item in eval_set.data.skipped]
    header = {"checkpoint": str(path), "epoch": int(checkpoint.get("epoch", 0)), "data": eval_set.description,
              "split": "val" if data is None else None, "skipped_files": skipped}
    return {**header, **report}


def default_out_dir(checkpoint: Path, data: Path | None) -> Path:
    suffix = "val" if data is None else (data.name or "data")
    return checkpoint.parent / f"eval_{checkpoint.stem}_{suffix}"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """Write the JSON report and the confusion-matrix PNG into `out`, and return both paths."""
    from isaret.plot import save_confusion_matrix

    out.mkdir(parents=True, exist_ok=True)
    report_path = out / REPORT_NAME
    report_path.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    title = (f"{Path(report['checkpoint']).name}: accuracy {report['accuracy']:.3f}, "
             f"macro-F1 {report['macro_f1']:.3f}")
    image_path = save_confusion_matrix(np.asarray(report["confusion_matrix"]), report["classes"],
                                       out / CONFUSION_NAME, title)
    return report_path, image_path


# ----------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pth) written by isaret train")
    parser.add_argument("--data", metavar="PATH",
                        help="evaluate on every sample of this data set instead of the checkpoint's validation "
                             "split; classes are matched by name")
    parser.add_argument("--format", choices=["auto", *FORMATS], default="auto",
                        help="reader of --data (default: auto, which detects train.csv)")
    parser.add_argument("--bad-file-policy", choices=["error", "skip"], default="error",
                        help="what an unreadable sample in --data does: stop with an error (default) or skip it "
                             "and list it in the report")
    parser.add_argument("--out", metavar="DIR",
                        help=f"folder for {REPORT_NAME} and {CONFUSION_NAME} (default: "
                             "eval_<checkpoint name>_<val or data folder name> beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="clips per forward pass (default: twice the checkpoint's training batch size, "
                             "as in training's validation)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="inference device (default auto, which picks cuda when available)")
    parser.add_argument("--cache-dir", metavar="DIR", default="",
                        help="preprocessed-sample cache (default: the checkpoint's cache_dir setting)")
    parser.add_argument("--no-progress", action="store_true", help="hide the preprocessing progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size: invalid value {args.batch_size}; expected an integer of at least 1")
    checkpoint = Path(args.checkpoint)
    data = Path(args.data) if args.data else None
    report = evaluate_checkpoint(checkpoint, data, args.format, args.bad_file_policy, args.batch_size, args.device,
                                 args.cache_dir, show_progress=not args.no_progress)
    out = Path(args.out) if args.out else default_out_dir(checkpoint, data)
    report_path, image_path = write_report(report, out)
    print(format_report(report))
    print(f"\nreport: {report_path}\nconfusion matrix: {image_path}")
    return 0
