"""`isaret export`: a checkpoint as an ONNX model plus a JSON sidecar, checked against torch.

The ONNX model takes preprocessed, scaled input and returns softmax probabilities:

- input `x`: float32 (batch, time, features), the output of `FeatureScaler.transform`, with
  0 where a value is missing. Time may be anything from 1 to max_seq_len.
- input `valid`: bool (batch, time), true for frames that had at least one finite value
  before scaling, so padding and empty frames are false. Each clip needs one true frame.
- output `probabilities`: float32 (batch, classes), in the order of the sidecar's label_map.

The sidecar (the ONNX path with `.json`) stores the label map, the feature scaler's mean and
std and the preprocessing settings, which is all a runtime needs besides the landmarks.

The model is traced with the TorchScript exporter (`dynamo=False`), because torch 2.13's
default dynamo exporter needs the onnxscript package, and the TorchScript exporter bakes the
batch and sequence sizes of `nn.MultiheadAttention` into Reshape nodes. So the export traces a
copy of the model whose encoder layers are replaced by `OnnxEncoderLayer`, which computes the
same attention with the same weights and with shapes taken from the input. Every export is then
compared with the real torch model on validation clips, and a model that differs by more than the
tolerance is not written.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from isaret import __version__
from isaret.checkpoint import load_checkpoint
from isaret.errors import ConfigError, DataError, IsaretError
from isaret.predict import Predictor

log = logging.getLogger(__name__)

OPSET = 17
TOLERANCE = 1e-4  # max absolute difference of probabilities between ONNX Runtime and torch
DEFAULT_CHECK_CLIPS = 256
TRIMMED_CHECK_CLIPS = 16  # clips also run cut to their own length, to check the dynamic time axis
CHECK_BATCH = 64
SIDECAR_FORMAT = "isaret-onnx"
SIDECAR_VERSION = 1
INSTALL_HINT = "pip install 'isaret[export]'"


class ExportError(IsaretError):
    """An ONNX export that failed, or whose output differs from the torch model."""


def require_onnx():
    """Import onnx and onnxruntime, or raise ExportError naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ExportError(f"ONNX export needs the onnx and onnxruntime packages ({error}); install them with "
                          f"{INSTALL_HINT}") from None
    return onnx, onnxruntime


# ----------------------------------------------------------------------------- export-only model

class OnnxEncoderLayer(nn.Module):
    """`nn.TransformerEncoderLayer` (norm_first, batch_first) in eval mode, with traceable shapes.

    It uses the parameters of `layer`. Masked keys get the lowest float32 value instead of
    -inf, which gives the same softmax for every query that can see one valid frame.
    """

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        attention = layer.self_attn
        supported = (layer.norm_first and attention.batch_first and attention.in_proj_weight is not None
                     and attention.in_proj_bias is not None and attention.bias_k is None
                     and not attention.add_zero_attn)
        if not supported:
            raise ExportError("the model's encoder layer is not a norm_first, batch_first self-attention layer with "
                              "packed input projections, which is the only kind that the ONNX export supports")
        self.layer = layer
        self.heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.scale = 1.0 / math.sqrt(attention.head_dim)

    def forward(self, h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        layer, attention = self.layer, self.layer.self_attn
        batch, time = h.shape[0], h.shape[1]
        qkv = nn.functional.linear(layer.norm1(h), attention.in_proj_weight, attention.in_proj_bias)
        qkv = qkv.reshape(batch, time, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, d)
        scores = torch.matmul(qkv[0], qkv[1].transpose(-2, -1)) * self.scale  # (B, H, T, T)
        scores = scores.masked_fill(padding[:, None, None, :], torch.finfo(scores.dtype).min)
        context = torch.matmul(torch.softmax(scores, dim=-1), qkv[2])  # (B, H, T, d)
        context = context.transpose(1, 2).reshape(batch, time, self.heads * self.head_dim)
        h = h + attention.out_proj(context)
        return h + layer.linear2(layer.activation(layer.linear1(layer.norm2(h))))


class OnnxEncoder(nn.Module):
    """Stand-in for the model's `nn.TransformerEncoder`, called the same way, made of OnnxEncoderLayer."""

    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.layers = nn.ModuleList(OnnxEncoderLayer(layer) for layer in encoder.layers)
        self.norm = encoder.norm

    def forward(self, src: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
        h = src
        for layer in self.layers:
            h = layer(h, src_key_padding_mask)
        return h if self.norm is None else self.norm(h)


class OnnxClassifier(nn.Module):
    """A copy of the classifier whose encoder is swapped for OnnxEncoder, followed by softmax.

    The rest of the model's own forward pass (embedding, positional encoding, pooling, head)
    runs unchanged, so only the encoder layer is re-implemented.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.model.encoder = OnnxEncoder(self.model.encoder)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x, valid), dim=-1)  # (B, classes)


def trace_to_onnx(predictor: Predictor, path: Path, opset: int = OPSET) -> None:
    """Write the ONNX file of a predictor's model, with dynamic batch and time axes."""
    prep = predictor.preprocessing
    wrapper = OnnxClassifier(predictor.model).cpu().eval()
    x = torch.zeros(2, prep.max_seq_len, prep.feature_dim)
    valid = torch.ones(2, prep.max_seq_len, dtype=torch.bool)
    valid[1, prep.max_seq_len // 2:] = False
    axes = {"x": {0: "batch", 1: "time"}, "valid": {0: "batch", 1: "time"}, "probabilities": {0: "batch"}}
    with warnings.catch_warnings():
        # TODO: torch 2.13 deprecates the TorchScript exporter. Move to dynamo=True, which needs
        # onnxscript, before a torch release removes it.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            torch.onnx.export(wrapper, (x, valid), str(path), input_names=["x", "valid"],
                              output_names=["probabilities"], dynamic_axes=axes, opset_version=opset, dynamo=False)
        except (RuntimeError, torch.onnx.errors.OnnxExporterError) as error:
            reason = str(error).splitlines()[0][:300]
            raise ExportError(f"torch.onnx.export failed for {path}: {reason}") from None


# ----------------------------------------------------------------------------- check

@dataclass
class CheckInputs:
    """Model inputs to compare ONNX Runtime with torch on, and where they came from."""

    x: np.ndarray  # (N, max_seq_len, F) float32, scaled
    valid: np.ndarray  # (N, max_seq_len) bool
    source: str


def validation_inputs(checkpoint: dict, predictor: Predictor, max_clips: int, cache_dir: str = "") -> CheckInputs:
    """Return the first `max_clips` validation clips, or random clips if the data set cannot be loaded."""
    from isaret.evaluate import load_validation_set

    try:
        eval_set = load_validation_set(checkpoint, cache_dir)
    except DataError as error:
        log.warning("Validation data unavailable (%s); checking the ONNX model on random inputs instead", error)
        return random_inputs(predictor, min(max_clips, 32), f"validation data unavailable: {error}")
    indices = eval_set.indices[:max_clips]
    rows = np.asarray(eval_set.data.features()[indices], dtype=np.float32)
    x, valid = predictor.prepare_preprocessed(rows)
    return CheckInputs(x=x, valid=valid, source=f"{len(indices)} clips of the {eval_set.description}")


def random_inputs(predictor: Predictor, count: int, reason: str) -> CheckInputs:
    """Standard-normal features with random lengths, for a check without the data set."""
    prep = predictor.preprocessing
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count, prep.max_seq_len, prep.feature_dim)).astype(np.float32)
    lengths = rng.integers(1, prep.max_seq_len + 1, size=count)
    valid = np.arange(prep.max_seq_len)[None, :] < lengths[:, None]
    x[~valid] = 0.0
    return CheckInputs(x=x, valid=valid, source=f"{count} random inputs ({reason})")


def compare_with_torch(predictor: Predictor, session, inputs: CheckInputs) -> tuple[float, int]:
    """Return the max abs difference of probabilities over padded batches and clips cut to their length."""
    worst = 0.0
    for start in range(0, len(inputs.x), CHECK_BATCH):
        x, valid = inputs.x[start:start + CHECK_BATCH], inputs.valid[start:start + CHECK_BATCH]
        worst = max(worst, _difference(predictor, session, x, valid))
    trimmed = 0
    for x, valid in zip(inputs.x[:TRIMMED_CHECK_CLIPS], inputs.valid[:TRIMMED_CHECK_CLIPS]):
        length = int(np.flatnonzero(valid).max()) + 1
        worst = max(worst, _difference(predictor, session, x[None, :length], valid[None, :length]))
        trimmed += 1
    return worst, trimmed


def open_session(onnxruntime, path: Path):
    """Open a CPU ONNX Runtime session whose idle threads sleep, so that they do not slow the torch runs."""
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _difference(predictor: Predictor, session, x: np.ndarray, valid: np.ndarray) -> float:
    expected = predictor.probabilities(x, valid)
    found = session.run(["probabilities"], {"x": np.ascontiguousarray(x), "valid": np.ascontiguousarray(valid)})[0]
    return float(np.abs(found - expected).max())


# ----------------------------------------------------------------------------- export

def sidecar_path(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".json")


def build_sidecar(checkpoint: dict, predictor: Predictor, onnx_path: Path, checkpoint_path: Path,
                  check: dict) -> dict:
    prep = predictor.preprocessing
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "isaret_version": __version__,
        "onnx": onnx_path.name,
        "opset": OPSET,
        "inputs": {
            "x": f"float32 (batch, time, {prep.feature_dim}): preprocessed clip after the feature scaler, 0 where "
                 f"a value is missing; time <= {prep.max_seq_len}",
            "valid": "bool (batch, time): true for frames with at least one finite value before scaling",
        },
        "output": {"probabilities": f"float32 (batch, {len(predictor.classes)}): softmax over label_map"},
        "label_map": list(predictor.classes),
        "feature_scaler": {"mean": [float(v) for v in predictor.scaler.mean],
                           "std": [float(v) for v in predictor.scaler.std]},
        "preprocessing": dict(checkpoint["preprocessing"]),
        "checkpoint": {"path": str(checkpoint_path), "epoch": int(checkpoint.get("epoch", 0)),
                       "val_acc": float(checkpoint.get("val_acc", 0.0)),
                       "val_f1": float(checkpoint.get("val_f1", 0.0))},
        "check": check,
    }


def export_checkpoint(checkpoint_path: Path, onnx_path: Path, max_check_clips: int = DEFAULT_CHECK_CLIPS,
                      cache_dir: str = "") -> dict:
    """Export, check against torch, write the ONNX file and its sidecar, and return the sidecar dict.

    The ONNX file is written under a temporary name and moved into place only after the check
    passes, so a model that disagrees with torch never appears at `onnx_path`.
    """
    onnx, onnxruntime = require_onnx()
    checkpoint = load_checkpoint(checkpoint_path)
    predictor = Predictor(checkpoint, source=str(checkpoint_path), device="cpu")
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = onnx_path.with_name(f".tmp-{onnx_path.name}.{os.getpid()}")
    try:
        trace_to_onnx(predictor, temp_path)
        try:
            onnx.checker.check_model(str(temp_path))
        except onnx.checker.ValidationError as error:
            raise ExportError(f"the exported ONNX model is invalid ({error}); {onnx_path} was not written") from None
        session = open_session(onnxruntime, temp_path)
        inputs = validation_inputs(checkpoint, predictor, max_check_clips, cache_dir)
        worst, trimmed = compare_with_torch(predictor, session, inputs)
        if not worst <= TOLERANCE:
            raise ExportError(
                f"the ONNX model differs from torch by {worst:.3g} in probability on {inputs.source}, more than the "
                f"tolerance {TOLERANCE:g}; {onnx_path} was not written. Check that the model in isaret.model "
                "still matches isaret.export.OnnxEncoderLayer"
            )
        os.replace(temp_path, onnx_path)
    finally:
        temp_path.unlink(missing_ok=True)
    check = {"max_abs_difference": worst, "tolerance": TOLERANCE, "inputs": inputs.source,
             "trimmed_clips": trimmed, "onnxruntime_version": onnxruntime.__version__,
             "torch_version": torch.__version__}
    sidecar = build_sidecar(checkpoint, predictor, onnx_path, checkpoint_path, check)
    sidecar_path(onnx_path).write_text(json.dumps(sidecar, ensure_ascii=False, indent=1), encoding="utf-8")
    return sidecar


# ----------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pth) written by isaret train")
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx",
                        help="ONNX file to write; the sidecar with labels and preprocessing goes to OUT.json")
    parser.add_argument("--check-clips", type=int, default=DEFAULT_CHECK_CLIPS, metavar="N",
                        help=f"validation clips on which ONNX Runtime is compared with torch "
                             f"(default {DEFAULT_CHECK_CLIPS})")
    parser.add_argument("--cache-dir", metavar="DIR", default="",
                        help="preprocessed-sample cache (default: the checkpoint's cache_dir setting)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def run(args: argparse.Namespace) -> int:
    if args.check_clips < 1:
        raise ConfigError(f"--check-clips: invalid value {args.check_clips}; expected an integer of at least 1")
    onnx_path = Path(args.onnx)
    sidecar = export_checkpoint(Path(args.checkpoint), onnx_path, args.check_clips, args.cache_dir)
    check = sidecar["check"]
    print(f"ONNX model: {onnx_path} (inputs x float32 (batch, time, features) and valid bool (batch, time); "
          "output probabilities float32 (batch, classes))")
    print(f"sidecar: {sidecar_path(onnx_path)}")
    print(f"check: max abs difference of probabilities, ONNX Runtime vs torch: {check['max_abs_difference']:.3g} "
          f"(tolerance {check['tolerance']:g}) on {check['inputs']}, {check['trimmed_clips']} of them also cut to "
          "their own length: passed")
    return 0
