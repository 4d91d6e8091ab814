"""Benchmark of inference latency per clip at batch size 1 on the CPU, for torch and ONNX Runtime.

Without --checkpoint, it trains the default model for one epoch on the demo data in a temporary
folder, because latency does not depend on the weights. It exports the checkpoint with the code of
`isaret export`. Then it times one forward pass per real clip of a data set. Each clip is read,
preprocessed, scaled and padded to max_seq_len beforehand, as `isaret predict` feeds the model.
Each clip runs `--repeats` times after `--warmup` untimed runs. It prints a markdown table with
the median, 95th percentile and mean per clip for each runtime and thread count, and the time
to read and preprocess one clip.

Target: median forward pass <= 5 ms per clip for the default model.
Run `python bench/bench_inference.py --help` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from isaret.checkpoint import load_checkpoint
from isaret.cli import main
from isaret.config import Config
from isaret.data.readers import list_samples
from isaret.evaluate import checkpoint_data_root
from isaret.export import export_checkpoint
from isaret.predict import Predictor, read_clip

TARGET_MS = 5.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="checkpoint to time (default: train the default model for one epoch on the demo data)")
    parser.add_argument("--data", metavar="PATH",
                        help="data set whose clips are timed (default: the checkpoint's own data set)")
    parser.add_argument("--clips", type=int, default=100, metavar="N", help="clips timed, at most (default 100)")
    parser.add_argument("--repeats", type=int, default=5, metavar="N", help="timed runs per clip (default 5)")
    parser.add_argument("--warmup", type=int, default=20, metavar="N", help="untimed runs first (default 20)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0], metavar="N",
                        help="intra-op thread counts to time; 0 keeps each library's default (default: 1 0)")
    return parser.parse_args()


def train_default_checkpoint(folder: Path) -> Path:
    """Train the default model for one epoch on the demo data; its log goes to a buffer."""
    arguments = ["train", "--checkpoint-dir", str(folder / "run"), "--epochs", "1", "--no-progress",
                 "--device", "cpu", "--set", f"cache_dir={folder / 'cache'}"]
    with contextlib.redirect_stderr(io.StringIO()):
        status = main(arguments)
    if status != 0:
        sys.exit(f"training the benchmark checkpoint failed with exit status {status}")
    return folder / "run" / "last_model.pth"


def clip_paths(checkpoint_path: Path, data: str | None, count: int) -> tuple[Path, list[Path]]:
    """Return the data set folder and its first `count` clip files."""
    checkpoint = load_checkpoint(checkpoint_path)
    config = Config.from_dict(checkpoint["config"])
    root = Path(data) if data else checkpoint_data_root(config)
    data_format = "auto" if data else config.data.data_format
    return root, [sample.path for sample in list_samples(root, data_format)[:count]]


def percentile(values: list[float], share: float) -> float:
    return float(np.percentile(np.asarray(values), share))


def time_runs(run, inputs: list[tuple[np.ndarray, np.ndarray]], repeats: int, warmup: int) -> list[float]:
    """Return the milliseconds of `run(x, valid)` for each input, `repeats` times, after warmup runs."""
    for i in range(warmup):
        x, valid = inputs[i % len(inputs)]
        run(x, valid)
    times = []
    for _ in range(repeats):
        for x, valid in inputs:
            start = time.perf_counter()
            run(x, valid)
            times.append((time.perf_counter() - start) * 1000.0)
    return times


def onnx_session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main_benchmark() -> None:
    args = parse_args()
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="isaret-bench-inference-") as temp:
        folder = Path(temp)
        checkpoint_path = Path(args.checkpoint) if args.checkpoint else train_default_checkpoint(folder)
        predictor = Predictor.from_checkpoint(checkpoint_path, device="cpu")
        onnx_path = folder / "model.onnx"
        with contextlib.redirect_stderr(io.StringIO()):
            export_checkpoint(checkpoint_path, onnx_path, max_check_clips=32)

        root, paths = clip_paths(checkpoint_path, args.data, args.clips)
        preprocess_ms, inputs = [], []
        for path in paths:
            start = time.perf_counter()
            x, valid = predictor.prepare(read_clip(path), name=str(path))
            preprocess_ms.append((time.perf_counter() - start) * 1000.0)
            inputs.append((x[None], valid[None]))

        rows = []
        for threads in args.threads:
            torch.set_num_threads(threads or default_threads)
            torch_ms = time_runs(predictor.logits, inputs, args.repeats, args.warmup)
            session = onnx_session(onnx_path, threads)
            onnx_ms = time_runs(lambda x, valid: session.run(["probabilities"], {"x": x, "valid": valid}),
                                inputs, args.repeats, args.warmup)
            label = str(threads) if threads else "default"
            rows.append(("torch", label, torch_ms))
            rows.append(("ONNX Runtime", label, onnx_ms))
        torch.set_num_threads(default_threads)

    config = predictor.config.model
    prep = predictor.preprocessing
    print(f"date: {datetime.date.today().isoformat()}")
    print(f"command: python {' '.join(sys.argv)}")
    load = ", load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs; torch default threads {default_threads}{load}")
    print(f"software: Python {platform.python_version()}, torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}")
    print(f"model: d_model {config.d_model}, {config.num_layers} layers, {config.nhead} heads, feed-forward "
          f"{config.dim_feedforward}, {sum(p.numel() for p in predictor.model.parameters()):,} parameters; "
          f"input {prep.max_seq_len} frames x {prep.feature_dim} features, {len(predictor.classes)} classes")
    print(f"clips: {len(paths)} from {root}, {args.repeats} timed runs each "
          f"after {args.warmup} warmup runs")
    print()
    print("| runtime | threads | median ms | p95 ms | mean ms | target median |")
    print("| --- | --- | --- | --- | --- | --- |")
    for runtime, threads, times in rows:
        verdict = "met" if statistics.median(times) <= TARGET_MS else "missed"
        print(f"| {runtime} | {threads} | {statistics.median(times):.2f} | {percentile(times, 95):.2f} | "
              f"{statistics.fmean(times):.2f} | <= {TARGET_MS:g} ms: {verdict} |")
    print()
    print(f"read + preprocess + scale one clip (not in the rows above): median {statistics.median(preprocess_ms):.2f} "
          f"ms, p95 {percentile(preprocess_ms, 95):.2f} ms")


if __name__ == "__main__":
    main_benchmark()
