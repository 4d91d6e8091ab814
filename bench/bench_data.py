"""Benchmark of data loading, preprocessing and training throughput on a Kaggle ISLR data set.

Measures, and prints as a markdown table:

- parquet reading and preprocessing in samples/s: a plain pandas loader, isaret's
  `read_kaggle_parquet`, each followed by `preprocess_clip`, and `load_or_build` on an
  empty cache folder (first run) and on its own finished entry (cache hit);
- training throughput in samples/s and the peak resident memory (ru_maxrss) of an
  `isaret train` process run with the default model, batch size and preprocessing.

Every run works in a temporary folder, so ~/.cache/isaret is never touched.
Run `python bench/bench_data.py --help` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from isaret.checkpoint import LAST, load_checkpoint
from isaret.config import Config, DataConfig
from isaret.data.cache import load_or_build
from isaret.data.preprocess import Preprocessing, preprocess_clip
from isaret.data.readers import KAGGLE_POINTS, SampleRef, list_kaggle_islr, read_kaggle_parquet

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_DATA = SHARED_DATA / "kaggle-islr-hello-thankyou"


# ----------------------------------------------------------------------------- loaders

def load_with_pandas(path: Path) -> np.ndarray:
    """Read one Kaggle ISLR parquet into (frames, 543, 3) float32, as the widely copied
    `load_relevant_data_subset` of Kaggle ISLR solutions does.

    It relies on the row order of the Kaggle files: 543 rows per frame, in the order face, left
    hand, pose, right hand. `read_kaggle_parquet` places each row by its ids instead.
    """
    data = pd.read_parquet(path, columns=["x", "y", "z"])
    frames = len(data) // KAGGLE_POINTS
    return data.to_numpy().reshape(frames, KAGGLE_POINTS, 3).astype(np.float32)


def count_disagreements(samples: list[SampleRef]) -> int:
    """Count the files whose pandas and isaret readings differ (NaN equal to NaN)."""
    return sum(
        not np.array_equal(load_with_pandas(s.path), read_kaggle_parquet(s.path), equal_nan=True) for s in samples
    )


# ----------------------------------------------------------------------------- preprocessing

@dataclass
class Timing:
    name: str
    samples: int
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        return self.samples / self.median


def time_call(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def bench_preprocessing(samples: list[SampleRef], repeats: int, workdir: Path) -> list[Timing]:
    """Time each way of turning the parquet files into model input, alternating the methods within each repeat."""
    cfg = DataConfig()
    prep = Preprocessing.for_frame_shape((KAGGLE_POINTS, 3), cfg.landmarks, cfg.coords, cfg.normalize,
                                         cfg.max_seq_len, cfg.seq_policy)

    def pandas_read() -> None:
        for sample in samples:
            load_with_pandas(sample.path)

    def isaret_read() -> None:
        for sample in samples:
            read_kaggle_parquet(sample.path)

    def pandas_preprocess() -> None:
        for sample in samples:
            preprocess_clip(load_with_pandas(sample.path), prep, name=str(sample.path))

    def isaret_preprocess() -> None:
        for sample in samples:
            preprocess_clip(read_kaggle_parquet(sample.path), prep, name=str(sample.path))

    methods = {
        "pandas `read_parquet` + reshape (read only)": pandas_read,
        "`read_kaggle_parquet` (read only)": isaret_read,
        "pandas loader + `preprocess_clip`": pandas_preprocess,
        "`read_kaggle_parquet` + `preprocess_clip`": isaret_preprocess,
    }
    timings = {name: Timing(name, len(samples), []) for name in methods}
    first = Timing("`load_or_build`, empty cache (first run)", len(samples), [])
    hit = Timing("`load_or_build`, cache hit (second run)", len(samples), [])

    # One untimed pass puts the files in the OS page cache, so every timed pass reads from memory.
    isaret_read()
    for repeat in range(repeats):
        for name, method in methods.items():
            timings[name].seconds.append(time_call(method))
        cache_root = workdir / f"cache-{repeat}"
        first.seconds.append(time_call(lambda: load_or_build(samples, cfg, cache_root, show_progress=False)))
        hit.seconds.append(time_call(lambda: load_or_build(samples, cfg, cache_root, show_progress=False)))
        shutil.rmtree(cache_root)
    return [*timings.values(), first, hit]


# ----------------------------------------------------------------------------- training

@dataclass
class TrainingRun:
    train_samples: int
    epoch_seconds: list[float]
    wall_seconds: float
    peak_rss_bytes: int


def maxrss_bytes(usage: resource.struct_rusage) -> int:
    """Return ru_maxrss in bytes: Linux reports KiB, macOS bytes."""
    return usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024


def run_child(command: list[str], log_path: Path, env: dict[str, str]) -> tuple[float, int]:
    """Run a child process to the end and return (wall seconds, peak resident memory in bytes) of that child.

    os.wait4 returns the resource usage of this one child, unlike RUSAGE_CHILDREN, which takes
    the maximum over every child waited for so far.
    """
    started = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(command)} failed with exit status {process.returncode}:\n{tail}")
    return wall, maxrss_bytes(usage)


def bench_training(data: Path, epochs: int, run_index: int, workdir: Path, cache_root: Path,
                   env: dict[str, str]) -> TrainingRun:
    """Train with `isaret train` defaults for `epochs` epochs and read the epoch times from history.json."""
    run_dir = workdir / f"train-{run_index}"
    command = [sys.executable, "-m", "isaret", "train", "--data", str(data), "--checkpoint-dir", str(run_dir),
               "--epochs", str(epochs), "--no-progress", "--set", f"cache_dir={cache_root}"]
    wall, peak = run_child(command, workdir / f"train-{run_index}.log", env)
    history = json.loads((run_dir / "history.json").read_text(encoding="utf-8"))["epochs"]
    train_samples = len(load_checkpoint(run_dir / LAST)["split"]["train"])
    return TrainingRun(train_samples, [row["seconds"] for row in history], wall, peak)


def import_baseline_rss(workdir: Path, env: dict[str, str]) -> int:
    """Return the peak resident memory of a process that only imports torch and the trainer, in bytes."""
    command = [sys.executable, "-c", "import torch, isaret.trainer"]
    return run_child(command, workdir / "import-baseline.log", env)[1]


# ----------------------------------------------------------------------------- report

def preprocessing_table(timings: list[Timing]) -> str:
    lines = ["| method | samples | median s | min s | samples/s (median) | samples/s (best) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for timing in timings:
        best = min(timing.seconds)
        lines.append(f"| {timing.name} | {timing.samples} | {timing.median:.3f} | {best:.3f} | "
                     f"{timing.rate:,.0f} | {timing.samples / best:,.0f} |")
    return "\n".join(lines)


def training_table(runs: list[TrainingRun], baseline_rss: int) -> str:
    first = [run.train_samples / run.epoch_seconds[0] for run in runs]
    later = [run.train_samples / s for run in runs for s in run.epoch_seconds[1:]]
    later_seconds = [s for run in runs for s in run.epoch_seconds[1:]]
    mib = 1024 * 1024
    lines = ["| measure | value |", "| --- | ---: |",
             f"| training samples per epoch | {runs[0].train_samples} |",
             f"| epoch 1 (s) | {statistics.median(run.epoch_seconds[0] for run in runs):.2f} |",
             f"| epoch 1 throughput (samples/s) | {statistics.median(first):.1f} |"]
    if later:
        lines += [f"| epochs 2+ median (s) | {statistics.median(later_seconds):.2f} |",
                  f"| epochs 2+ throughput, median (samples/s) | {statistics.median(later):.1f} |",
                  f"| epochs 2+ throughput, range (samples/s) | {min(later):.1f} to {max(later):.1f} |"]
    lines += [f"| process wall time (s) | {statistics.median(run.wall_seconds for run in runs):.1f} |",
              f"| peak RSS of `isaret train` (MiB) | {max(run.peak_rss_bytes for run in runs) / mib:.0f} |",
              f"| peak RSS of `import torch, isaret.trainer` only (MiB) | {baseline_rss / mib:.0f} |"]
    return "\n".join(lines)


def describe_machine() -> str:
    import torch

    openmp = ", ".join(f"{name}={os.environ[name]}" for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")
                       if name in os.environ)
    return (f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"pandas {pd.__version__}, {os.cpu_count()} CPUs, {openmp or 'no OpenMP variables set'}, "
            f"load average {os.getloadavg()[0]:.2f} at the start")


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"Kaggle ISLR folder with train.csv (default: {DEFAULT_DATA})")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed passes over all files per preprocessing method; the median and the best pass "
                             "are reported (default 7)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per training run; epoch 1 is reported apart from the later ones (default 3)")
    parser.add_argument("--train-runs", type=int, default=1,
                        help="`isaret train` processes to run one after another (default 1)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="OMP_NUM_THREADS of the training process, which sets torch's intra-op threads; "
                             "0 keeps torch's default (default 0)")
    parser.add_argument("--skip-training", action="store_true", help="measure preprocessing only")
    parser.add_argument("--workdir", type=Path,
                        help="folder for caches, runs and logs (default: a new temporary folder, deleted at the end)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.repeats, args.epochs, args.train_runs) < 1 or args.torch_threads < 0:
        print("error: --repeats, --epochs and --train-runs must be at least 1, --torch-threads at least 0",
              file=sys.stderr)
        return 2
    if not (args.data / "train.csv").is_file():
        print(f"error: {args.data / 'train.csv'} not found; pass --data with a Kaggle ISLR folder", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="isaret-bench-data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        samples = list_kaggle_islr(args.data)
        print(f"# bench_data: {len(samples)} samples from {args.data}")
        print(describe_machine())
        disagreements = count_disagreements(samples)
        print(f"pandas loader and read_kaggle_parquet differ on {disagreements} of {len(samples)} files\n")

        timings = bench_preprocessing(samples, args.repeats, workdir)
        print(f"## Preprocessing ({args.repeats} repeats, files in the OS page cache)\n")
        print(preprocessing_table(timings))
        if args.skip_training:
            return 0

        cache_root = workdir / "train-cache"
        load_or_build(samples, Config().data, cache_root, show_progress=False)
        env = dict(os.environ)
        if args.torch_threads:
            env["OMP_NUM_THREADS"] = str(args.torch_threads)
        runs = [bench_training(args.data, args.epochs, index, workdir, cache_root, env)
                for index in range(args.train_runs)]
        baseline = import_baseline_rss(workdir, env)
        threads = f"OMP_NUM_THREADS={args.torch_threads}" if args.torch_threads else "torch's default threads"
        print(f"\n## Training ({args.train_runs} run(s) x {args.epochs} epochs, defaults, {threads}, cache warm)\n")
        print(training_table(runs, baseline))
        print("\nEpoch seconds per run:", [run.epoch_seconds for run in runs])
        print(f"Load average {os.getloadavg()[0]:.2f} at the end")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
