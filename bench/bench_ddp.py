"""Benchmark of training throughput with 1 and 2 CPU processes (DistributedDataParallel over gloo).

Trains the default model on an .npy-folder data set (by default the Thai TSL Leap Motion set)
in four setups and prints a markdown table of training samples per second:

- 1 process with torch's default number of threads;
- 1 process with OMP_NUM_THREADS=1;
- N processes under `torchrun --standalone`, which sets OMP_NUM_THREADS=1 in each worker,
  with the default batch size per process, so an N times larger global batch;
- the same with batch size / N per process, so the global batch of the 1-process runs.

The time of an epoch is that of `Trainer._train_epoch` on rank 0 (forward, backward, gradient
all-reduce and optimizer steps, without validation or checkpoints). The first epoch of every
run is left out because it includes warm-up. The setups run in turn, `--repeats` times, so
that a change of machine load spreads over all of them; the table shows the median epoch.
Every run works in a temporary folder, so ~/.cache/isaret is never touched.
Run `python bench/bench_ddp.py --help` for the options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from isaret.config import Config
from isaret.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "thai-tsl-leapmotion"

# Runs `isaret train` with the arguments after the first and times every `Trainer._train_epoch`.
# Rank 0 writes the timings as JSON to the file named by the first argument.
CHILD_CODE = """
import json, os, sys, time
from isaret import trainer
from isaret.cli import main

epochs = []
original = trainer.Trainer._train_epoch
def timed_train_epoch(self, epoch):
    started = time.perf_counter()
    original(self, epoch)
    epochs.append({"epoch": epoch, "seconds": time.perf_counter() - started, "samples": len(self.train_set),
                   "global_batch": self.cfg.train.batch_size * self.ctx.world_size * self.cfg.train.accum_steps})
trainer.Trainer._train_epoch = timed_train_epoch
code = main(["train", *sys.argv[2:]])
if int(os.environ.get("RANK", "0")) == 0:
    with open(sys.argv[1], "w", encoding="utf-8") as handle:
        json.dump(epochs, handle)
sys.exit(code)
"""


@dataclass
class Setup:
    name: str
    processes: int
    threads: str  # threads per process, as the table shows it
    batch_size: int  # per process


@dataclass
class Result:
    setup: Setup
    runs: list[list[dict]]  # per run, rank 0's timing of every epoch

    @property
    def timed_epochs(self) -> list[dict]:
        return [epoch for run in self.runs for epoch in run[1:]]

    @property
    def median_seconds(self) -> float:
        return statistics.median(epoch["seconds"] for epoch in self.timed_epochs)

    @property
    def samples_per_second(self) -> float:
        return self.runs[0][0]["samples"] / self.median_seconds


def run_setup(setup: Setup, script: Path, folder: Path, train_args: list[str]) -> list[dict]:
    """Train once in `setup` and return rank 0's epoch timings."""
    timings = folder.with_suffix(".json")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    env.pop("OMP_NUM_THREADS", None)
    if setup.processes == 1 and setup.threads == "1":
        env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, str(script)]
    if setup.processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={setup.processes}", str(script)]
    command += [str(timings), "--checkpoint-dir", str(folder), "--batch-size", str(setup.batch_size), *train_args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{setup.name} failed with exit status {result.returncode}:\n{result.stderr[-3000:]}")
    epochs = json.loads(timings.read_text(encoding="utf-8"))
    if not epochs:
        raise RuntimeError(f"{setup.name}: no epoch was timed; was Trainer._train_epoch renamed?")
    return epochs


def results_table(results: list[Result]) -> str:
    reference = results[0].samples_per_second
    lines = ["| setup | processes | threads per process | batch per process | global batch | training samples "
             "| timed epochs | median epoch (s) | samples/s | vs first row |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        first, setup = result.runs[0][0], result.setup
        lines.append(f"| {setup.name} | {setup.processes} | {setup.threads} | {setup.batch_size} | "
                     f"{first['global_batch']} | {first['samples']} | {len(result.timed_epochs)} | "
                     f"{result.median_seconds:.3f} | {result.samples_per_second:.1f} | "
                     f"{result.samples_per_second / reference:.2f}x |")
    return "\n".join(lines)


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass  # keep the platform's name when lscpu is missing or prints no model name
    return (f"{cpu}, {os.cpu_count()} CPUs (nproc), Python {platform.python_version()}, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}, load average {os.getloadavg()[0]:.2f} at the start")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"folder of class folders of .npy files (default {DEFAULT_DATA})")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not timed (default 4)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the torchrun setups (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every setup, taken in turn (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.epochs < 2 or args.processes < 2 or args.repeats < 1:
        print("error: --epochs and --processes must be at least 2, --repeats at least 1", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        print(f"error: {args.data} not found; pass --data with a folder of class folders of .npy files",
              file=sys.stderr)
        return 2
    if not hasattr(Trainer, "_train_epoch"):
        print("error: isaret.trainer.Trainer._train_epoch not found; update CHILD_CODE", file=sys.stderr)
        return 1
    batch = Config().train.batch_size
    setups = [Setup("1 process, torch default threads", 1, str(torch.get_num_threads()), batch),
              Setup("1 process, OMP_NUM_THREADS=1", 1, "1", batch),
              Setup(f"torchrun, {args.processes} processes", args.processes, "1", batch),
              Setup(f"torchrun, {args.processes} processes, same global batch", args.processes, "1",
                    max(1, batch // args.processes))]
    workdir = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    try:
        script = workdir / "timed_train.py"
        script.write_text(CHILD_CODE, encoding="utf-8")
        train_args = ["--data", str(args.data), "--epochs", str(args.epochs), "--device", "cpu", "--no-progress",
                      "--set", f"cache_dir={workdir / 'cache'}"]
        print(f"# bench_ddp: default model on {args.data}, {args.repeats} run(s) x {args.epochs} epochs per setup\n")
        print(describe_machine() + "\n")
        results = [Result(setup, []) for setup in setups]
        for repeat in range(args.repeats):
            for number, result in enumerate(results):
                folder = workdir / f"run-{number}-{repeat}"
                result.runs.append(run_setup(result.setup, script, folder, train_args))
        print(results_table(results))
        print("\nEpoch seconds per setup and run:")
        for result in results:
            print(f"- {result.setup.name}: {[[round(e['seconds'], 3) for e in run] for run in result.runs]}")
        print(f"Load average {os.getloadavg()[0]:.2f} at the end")
    finally:
        if args.keep:
            print(f"\nKept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
