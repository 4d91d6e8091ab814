"""Benchmark of checkpoint cost: save time, per-epoch overhead and time to the first step of a resume.

Measures in one run, and prints as markdown tables with the targets:

1. the per-epoch checkpoint cost of `Trainer._save_epoch` (state dict, history files, atomic
   save, hard links, rotation) as a percentage of the epoch time (target: under 1 %). It comes
   from a training run in this process with the default settings on a Kaggle ISLR data set.
   An A/B comparison then trains several times without checkpoints, with the default
   checkpoints and with background saves (`async_save = true`), to show what the checkpoints
   cost the training as a whole;
2. `save_atomic` against a plain `torch.save` of the same checkpoint dict, the median of
   several saves, and where the time of `save_atomic` goes (target: at most 1.2x);
3. the time from process start to the end of the first optimizer step, for a fresh
   `isaret train` and for `isaret train --resume`, each in a new process with the cache warm
   (target: resume at most 1.2x the fresh start).

Every run works in a temporary folder, so ~/.cache/isaret is never touched.
Run `python bench/bench_checkpoint.py --help` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

import isaret.checkpoint as checkpoint_module
from isaret.checkpoint import BEST, LAST, Checkpointer, load_checkpoint, save_atomic
from isaret.config import Config
from isaret.distributed import DistContext, init_distributed
from isaret.history import write_history
from isaret.trainer import Trainer, run_training

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_DATA = SHARED_DATA / "kaggle-islr-hello-thankyou"

SAVE_TARGET = 1.2  # save_atomic time / plain torch.save time, at most
OVERHEAD_TARGET = 1.0  # per-epoch checkpoint cost as a percentage of the epoch time, below
START_TARGET = 1.2  # resume start / fresh start, at most

# Runs `isaret train` with the arguments sys.argv[2:] and writes time.monotonic() marks as JSON
# to the file sys.argv[1]. The process exits at once after the first optimizer step, so no
# checkpoint is written. CLOCK_MONOTONIC, which time.monotonic() reads on Linux, is system-wide,
# so the parent can subtract its own start time from these marks.
CHILD_CODE = """
import json, os, sys, time
marks = {"interpreter_ready": time.monotonic()}
from isaret import cli, trainer
marks["imported"] = time.monotonic()
original_fit = trainer.Trainer.fit
original_step = trainer.Trainer._optimizer_step
def fit(self):
    marks["setup_done"] = time.monotonic()
    return original_fit(self)
def first_step(self):
    original_step(self)
    marks["first_step"] = time.monotonic()
    with open(sys.argv[1], "w", encoding="utf-8") as handle:
        json.dump(marks, handle)
    os._exit(0)
trainer.Trainer.fit = fit
trainer.Trainer._optimizer_step = first_step
sys.exit(cli.main(["train", *sys.argv[2:]]))
"""


# NOTE: the timing hooks wrap private names of isaret. check_hooks() stops the benchmark with an
# error when one of them is renamed, because a hook that is never called would measure nothing.
HOOKS = (("isaret.trainer", "Trainer", "_save_epoch"), ("isaret.trainer", "Trainer", "fit"),
         ("isaret.trainer", "Trainer", "_optimizer_step"), ("isaret.checkpoint", None, "_fsync_folder"),
         ("isaret.checkpoint", None, "check_plain"))


def check_hooks() -> list[str]:
    """Return the hooked names that isaret no longer defines."""
    import importlib

    missing = []
    for module_name, class_name, attribute in HOOKS:
        owner = importlib.import_module(module_name)
        if class_name:
            owner = getattr(owner, class_name)
        if not hasattr(owner, attribute):
            missing.append(".".join(filter(None, (module_name, class_name, attribute))))
    return missing


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def verdict(passed: bool) -> str:
    return "pass" if passed else "fail"


# ----------------------------------------------------------------------------- 1. per-epoch overhead

@dataclass
class OverheadRun:
    epoch_seconds: list[float]
    save_seconds: list[float]
    improved: list[bool]
    checkpoint_path: Path

    @property
    def percentages(self) -> list[float]:
        return [100 * save / epoch for save, epoch in zip(self.save_seconds, self.epoch_seconds)]


def bench_config(data: Path, cache_root: Path, folder: Path, epochs: int) -> Config:
    cfg = Config()
    cfg.data.data_path = str(data)
    cfg.data.cache_dir = str(cache_root)
    cfg.checkpoint.checkpoint_dir = str(folder)
    cfg.train.num_epochs = epochs
    cfg.validate()
    return cfg


@contextlib.contextmanager
def timed_saves(skip: bool = False):
    """Time each Trainer._save_epoch call, or replace it by the history write alone; yield (seconds, improved)."""
    saves: list[float] = []
    improved_flags: list[bool] = []
    original = Trainer._save_epoch

    def timed_save_epoch(self: Trainer, epoch: int, improved: bool) -> None:
        started = time.perf_counter()
        if skip:
            write_history(self.folder, self.progress.history, self.progress.resume_points)
        else:
            original(self, epoch, improved)
        saves.append(time.perf_counter() - started)
        improved_flags.append(improved)

    Trainer._save_epoch = timed_save_epoch
    try:
        yield saves, improved_flags
    finally:
        Trainer._save_epoch = original


def run_overhead(data: Path, epochs: int, workdir: Path, cache_root: Path) -> OverheadRun:
    """Train with the defaults in this process and time each call of Trainer._save_epoch.

    The epoch seconds in the history cover training and validation and stop before
    `_save_epoch`, so the two times do not overlap.
    """
    cfg = bench_config(data, cache_root, workdir / "base", epochs)
    ctx = init_distributed(cfg.train.device, cfg.train.dist_backend)
    with timed_saves() as (saves, improved_flags):
        progress = run_training(cfg, None, None, ctx, show_progress=False)
    return OverheadRun([row["seconds"] for row in progress.history], saves, improved_flags,
                       Path(cfg.checkpoint.checkpoint_dir) / LAST)


AB_MODES = ("no saves", "foreground saves", "background saves")


def run_ab(data: Path, epochs: int, runs: int, workdir: Path, cache_root: Path) -> dict[str, list[float]]:
    """Train `runs` times in each mode, alternating, and return the training seconds of each run.

    The training seconds are the epochs' seconds plus the time inside Trainer._save_epoch, so a
    background write that slows the next epoch counts, and setup does not.
    """
    ctx = init_distributed("cpu", "gloo")
    totals: dict[str, list[float]] = {mode: [] for mode in AB_MODES}
    for run in range(runs):
        for mode in AB_MODES:
            cfg = bench_config(data, cache_root, workdir / f"ab-{run}-{AB_MODES.index(mode)}", epochs)
            cfg.train.early_stopping_patience = 0  # every run trains all epochs
            cfg.checkpoint.async_save = mode == "background saves"  # off by default
            with timed_saves(skip=mode == "no saves") as (saves, _):
                progress = run_training(cfg, None, None, ctx, show_progress=False)
            totals[mode].append(sum(row["seconds"] for row in progress.history) + sum(saves))
    return totals


# ----------------------------------------------------------------------------- 2. save time

@dataclass
class SaveTimes:
    file_bytes: int
    plain: list[float] = field(default_factory=list)
    plain_fsync: list[float] = field(default_factory=list)
    atomic: list[float] = field(default_factory=list)
    checkpointer: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def fsync_file(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def checkpoint_dict(path: Path) -> dict:
    """Return the dict that Trainer.state_dict() produced for this file, without the keys save_atomic adds."""
    payload = load_checkpoint(path)
    for key in ("format", "format_version", "integrity"):
        payload.pop(key, None)
    return payload


@contextlib.contextmanager
def timed_save_parts():
    """Time the steps of save_atomic by wrapping the functions it calls, and yield {step: seconds}."""
    current: dict[str, float] = defaultdict(float)
    in_folder_fsync = False

    def wrap(name: str, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                current[name] += time.perf_counter() - started
        return timed

    real_fsync, real_fsync_folder = os.fsync, checkpoint_module._fsync_folder
    timed_file_fsync = wrap("fsync of the file (the pages not yet written back)", real_fsync)

    def fsync(handle: int) -> None:
        # _fsync_folder calls os.fsync too; its time counts as the folder's, not the file's.
        (real_fsync if in_folder_fsync else timed_file_fsync)(handle)

    def fsync_folder(folder: Path) -> None:
        nonlocal in_folder_fsync
        in_folder_fsync = True
        try:
            wrap("fsync of the folder", real_fsync_folder)(folder)
        finally:
            in_folder_fsync = False

    patches = [
        (checkpoint_module, "check_plain", wrap("check of the value types", checkpoint_module.check_plain)),
        (torch, "save", wrap("torch.save into the temp file (writeback starts meanwhile)", torch.save)),
        (os, "fsync", fsync),
        (os, "replace", wrap("os.replace", os.replace)),
        (checkpoint_module, "_fsync_folder", fsync_folder),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield current
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def run_save_times(checkpoint_path: Path, repeats: int, workdir: Path) -> SaveTimes:
    """Time plain torch.save, torch.save + fsync, save_atomic and Checkpointer.save of one checkpoint dict.

    The four alternate within each repeat, so load on a shared machine hits them alike. Each
    overwrites its own file, as a trainer overwrites last_model.pth. One untimed round first
    creates the files. An untimed os.sync() before each save writes out what the previous one
    left in the page cache (a plain torch.save leaves all of its file there), so no save pays
    for another's data.
    """
    payload = checkpoint_dict(checkpoint_path)
    folder = workdir / "saves"
    folder.mkdir()
    checkpointer = Checkpointer(workdir / "saves-checkpointer", Config().checkpoint.keep_last_k, DistContext())
    times = SaveTimes(file_bytes=checkpoint_path.stat().st_size)

    def plain() -> None:
        torch.save(payload, folder / "plain.pth")

    def plain_fsync() -> None:
        torch.save(payload, folder / "plain_fsync.pth")
        fsync_file(folder / "plain_fsync.pth")

    def atomic() -> None:
        save_atomic(payload, folder / "atomic.pth")

    epoch = 0

    def checkpointer_save() -> None:
        # As at an epoch with a better validation accuracy: epoch file, last and best links, rotation.
        nonlocal epoch
        epoch += 1
        checkpointer.save(payload, epoch_file=epoch, links=(BEST,))

    methods = [(times.plain, plain), (times.plain_fsync, plain_fsync), (times.atomic, atomic),
               (times.checkpointer, checkpointer_save)]
    for _, function in methods:
        function()
    for _ in range(repeats):
        for target, function in methods:
            os.sync()  # no save waits for data that an earlier one left in the page cache
            started = time.perf_counter()
            function()
            target.append(time.perf_counter() - started)

    for _ in range(repeats):
        os.sync()
        with timed_save_parts() as current:
            started = time.perf_counter()
            atomic()
            total = time.perf_counter() - started
        for name, seconds in current.items():
            times.parts[name].append(seconds)
        times.parts["other (dict copy, mkstemp, writeback thread, close)"].append(total - sum(current.values()))
        times.parts["total"].append(total)
    return times


# ----------------------------------------------------------------------------- 3. time to first step

@dataclass
class StartTimes:
    fresh: list[dict[str, float]] = field(default_factory=list)
    resume: list[dict[str, float]] = field(default_factory=list)


def time_to_first_step(train_args: list[str], workdir: Path, name: str, env: dict[str, str]) -> dict[str, float]:
    """Start `isaret train` in a new process and return its marks in seconds since just before the start."""
    marks_path = workdir / f"{name}.json"
    log_path = workdir / f"{name}.log"
    command = [sys.executable, "-c", CHILD_CODE, str(marks_path), *train_args]
    with log_path.open("wb") as log:
        started = time.monotonic()
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if result.returncode != 0 or not marks_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"{name}: isaret train exited with status {result.returncode} before the first "
                           f"optimizer step:\n{tail}")
    marks = json.loads(marks_path.read_text(encoding="utf-8"))
    return {key: value - started for key, value in marks.items()}


def run_start_times(data: Path, checkpoint_path: Path, epochs: int, repeats: int, workdir: Path,
                    cache_root: Path, env: dict[str, str]) -> StartTimes:
    """Alternate fresh and resumed starts, each into a new checkpoint folder with the same warm cache."""
    times = StartTimes()
    common = ["--epochs", str(epochs), "--no-progress"]
    for repeat in range(repeats):
        fresh_args = ["--data", str(data), "--set", f"cache_dir={cache_root}",
                      "--checkpoint-dir", str(workdir / f"fresh-{repeat}"), *common]
        resume_args = ["--resume", str(checkpoint_path), "--checkpoint-dir", str(workdir / f"resume-{repeat}"), *common]
        times.fresh.append(time_to_first_step(fresh_args, workdir, f"fresh-{repeat}", env))
        times.resume.append(time_to_first_step(resume_args, workdir, f"resume-{repeat}", env))
    return times


# ----------------------------------------------------------------------------- report

def ab_cost(totals: dict[str, list[float]], mode: str) -> float:
    """Median training time of `mode` over that of runs without saves, as a percentage more."""
    return 100 * (statistics.median(totals[mode]) / statistics.median(totals["no saves"]) - 1)


def targets_table(overhead: OverheadRun, saves: SaveTimes, starts: StartTimes, totals: dict[str, list[float]]) -> str:
    save_ratio = statistics.median(saves.atomic) / statistics.median(saves.plain)
    overhead_percent = statistics.median(overhead.percentages)
    fresh = statistics.median(m["first_step"] for m in starts.fresh)
    resume = statistics.median(m["first_step"] for m in starts.resume)
    start_ratio = resume / fresh
    return "\n".join([
        "| measure | value | target | result |",
        "| --- | ---: | ---: | --- |",
        f"| `save_atomic` / plain `torch.save` (median ms) | {save_ratio:.2f}x ({median_ms(saves.atomic):.1f} / "
        f"{median_ms(saves.plain):.1f}) | <= {SAVE_TARGET}x | {verdict(save_ratio <= SAVE_TARGET)} |",
        f"| checkpoint cost per epoch / epoch time (median) | {overhead_percent:.2f} % "
        f"({median_ms(overhead.save_seconds):.0f} ms / {statistics.median(overhead.epoch_seconds):.2f} s) | "
        f"< {OVERHEAD_TARGET} % | {verdict(overhead_percent < OVERHEAD_TARGET)} |",
        f"| epoch length from which that cost is under {OVERHEAD_TARGET} % | "
        f"{statistics.median(overhead.save_seconds) * 100 / OVERHEAD_TARGET:.2f} s | | |",
        f"| training time with checkpoints (defaults) / without, {len(totals['no saves'])} runs each (median) | "
        f"{ab_cost(totals, 'foreground saves'):+.2f} % | | see the A/B table |",
        f"| resume start / fresh start to first step (median s) | {start_ratio:.2f}x ({resume:.2f} / {fresh:.2f}) | "
        f"<= {START_TARGET}x | {verdict(start_ratio <= START_TARGET)} |",
    ])


def save_table(saves: SaveTimes) -> str:
    lines = [f"Checkpoint file: {saves.file_bytes / 1e6:.2f} MB, {len(saves.plain)} saves per method.", "",
             "| save | median ms | min ms | max ms |", "| --- | ---: | ---: | ---: |"]
    rows = [("plain `torch.save(dict, path)`", saves.plain),
            ("`torch.save` + `os.fsync` of the file", saves.plain_fsync),
            ("`save_atomic` (temp file, early writeback, fsync, replace, folder fsync)", saves.atomic),
            ("`Checkpointer.save`, improved epoch (epoch file + last + best links, rotation)", saves.checkpointer)]
    for name, values in rows:
        lines.append(f"| {name} | {median_ms(values):.1f} | {min(values) * 1000:.1f} | {max(values) * 1000:.1f} |")
    lines += ["", "Where the time of `save_atomic` goes (median of each step over the same saves):", "",
              "| step | median ms |", "| --- | ---: |"]
    for name, values in saves.parts.items():
        lines.append(f"| {name} | {median_ms(values):.1f} |")
    return "\n".join(lines)


def overhead_table(overhead: OverheadRun) -> str:
    lines = ["| epoch | epoch s (train + validation) | `_save_epoch` ms | best link | overhead % |",
             "| ---: | ---: | ---: | --- | ---: |"]
    rows = zip(overhead.epoch_seconds, overhead.save_seconds, overhead.improved, overhead.percentages)
    for index, (epoch_s, save_s, improved, percent) in enumerate(rows, start=1):
        best_link = "yes" if improved else "no"
        lines.append(f"| {index} | {epoch_s:.2f} | {save_s * 1000:.1f} | {best_link} | {percent:.2f} |")
    return "\n".join(lines)


def ab_table(totals: dict[str, list[float]], epochs: int) -> str:
    lines = [f"Training seconds of {epochs} epochs (epochs plus time inside `_save_epoch`), runs alternating:", "",
             "| mode | every run (s) | median s | vs no saves |", "| --- | --- | ---: | ---: |"]
    for mode, values in totals.items():
        cost = "" if mode == "no saves" else f"{ab_cost(totals, mode):+.2f} %"
        lines.append(f"| {mode} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values):.2f} | {cost} |")
    return "\n".join(lines)


def start_table(starts: StartTimes) -> str:
    stages = [("interpreter_ready", "Python interpreter ready"), ("imported", "isaret and torch imported"),
              ("setup_done", "config, checkpoint, data and model ready"), ("first_step", "first optimizer step done")]
    lines = ["Seconds since just before the process start (median over the repeats):", "",
             "| stage | fresh s | resume s |", "| --- | ---: | ---: |"]
    for key, label in stages:
        fresh = statistics.median(m[key] for m in starts.fresh)
        resume = statistics.median(m[key] for m in starts.resume)
        lines.append(f"| {label} | {fresh:.2f} | {resume:.2f} |")
    fresh_all = ", ".join(f"{m['first_step']:.2f}" for m in starts.fresh)
    resume_all = ", ".join(f"{m['first_step']:.2f}" for m in starts.resume)
    lines += ["", f"First step, every repeat (s): fresh {fresh_all}; resume {resume_all}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"Kaggle ISLR folder with train.csv (default: {DEFAULT_DATA})")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs of the in-process training run that measures the per-epoch overhead and "
                             "writes the checkpoint used afterwards (default 3)")
    parser.add_argument("--save-repeats", type=int, default=20,
                        help="timed saves per save method; medians are reported (default 20)")
    parser.add_argument("--start-repeats", type=int, default=5,
                        help="fresh and resumed process starts each; medians are reported (default 5)")
    parser.add_argument("--ab-runs", type=int, default=3,
                        help="training runs per mode (no saves, foreground saves, background saves) for the "
                             "A/B comparison of training time (default 3)")
    parser.add_argument("--ab-epochs", type=int, default=10, help="epochs of each A/B run (default 10)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="intra-op threads of torch in this process and OMP_NUM_THREADS of the child "
                             "processes; 0 keeps torch's default (default 0)")
    parser.add_argument("--workdir", type=Path,
                        help="folder for the cache, runs and logs (default: a new temporary folder, deleted at "
                             "the end)")
    return parser


def argument_error(args: argparse.Namespace) -> str:
    """Return what is wrong with the arguments or the installed isaret, or an empty string."""
    if min(args.epochs, args.save_repeats, args.start_repeats, args.ab_runs, args.ab_epochs) < 1 \
            or args.torch_threads < 0:
        return ("--epochs, --save-repeats, --start-repeats, --ab-runs and --ab-epochs must be at least 1, "
                "--torch-threads at least 0")
    if not (args.data / "train.csv").is_file():
        return f"{args.data / 'train.csv'} not found; pass --data with a Kaggle ISLR folder"
    missing = check_hooks()
    if missing:
        return f"isaret no longer defines {', '.join(missing)}; update the hooks in {Path(__file__).name}"
    return ""


def print_report(overhead: OverheadRun, saves: SaveTimes, starts: StartTimes, totals: dict[str, list[float]],
                 args: argparse.Namespace) -> None:
    print("## Targets\n")
    print(targets_table(overhead, saves, starts, totals))
    print(f"\n## Per-epoch checkpoint overhead ({args.epochs} epochs, defaults)\n")
    print(overhead_table(overhead))
    print("\n## Training time with and without checkpoints\n")
    print(ab_table(totals, args.ab_epochs))
    print("\n## Save time\n")
    print(save_table(saves))
    print(f"\n## Start to first optimizer step ({args.start_repeats} repeats each)\n")
    print(start_table(starts))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    error = argument_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    env = dict(os.environ)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    openmp = ", ".join(f"{name}={env[name]}" for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if name in env)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="isaret-bench-checkpoint-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache_root = workdir / "cache"
    try:
        print(f"# bench_checkpoint: {args.data}, torch {torch.__version__} with {torch.get_num_threads()} "
              f"intra-op threads, {os.cpu_count()} CPUs, {openmp or 'no OpenMP variables set'}, "
              f"load average {os.getloadavg()[0]:.2f} at the start")
        overhead = run_overhead(args.data, args.epochs, workdir, cache_root)
        saves = run_save_times(overhead.checkpoint_path, args.save_repeats, workdir)
        starts = run_start_times(args.data, overhead.checkpoint_path, args.epochs + 1, args.start_repeats, workdir,
                                 cache_root, env)
        deleted = " (deleted at the end)" if args.workdir is None else ""
        print(f"load average {os.getloadavg()[0]:.2f} at the end; working folder {workdir}{deleted}\n")
        totals = run_ab(args.data, args.ab_epochs, args.ab_runs, workdir, cache_root)
        print(f"load average {os.getloadavg()[0]:.2f} after the A/B runs\n")
        print_report(overhead, saves, starts, totals, args)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
