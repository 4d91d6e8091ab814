"""Measure `isaret extract` speed (frames per second) with 1 and 2 worker processes.

Usage, with the video extra installed:

    python bench/bench_extract.py [--clips DIR] [--workers 1 2] [--repeats N]

Each run extracts every clip in DIR into a new temporary folder, so nothing is reused. The wall
time includes starting the worker processes and writing the parquet files, as in `isaret extract`.
The CPU time is that of this process plus its finished worker processes. The script prints the
machine, the versions and one Markdown table row per run.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from isaret import extract

DEFAULT_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sign-clips"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def machine_busy_seconds() -> float:
    """Return the CPU seconds that all processes of the machine have used, from /proc/stat (Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(clips_dir: Path, workers: int) -> dict:
    """Extract every clip once and return the counts and timings of that run."""
    clips = extract.collect_clips([str(clips_dir)])
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as out:
        busy_start, cpu_start, wall_start = machine_busy_seconds(), cpu_seconds(), time.perf_counter()
        summary = extract.extract_videos(clips, Path(out), extract.Settings(), workers=workers)
        wall, cpu = time.perf_counter() - wall_start, cpu_seconds() - cpu_start
        busy = machine_busy_seconds() - busy_start
    if summary.failed:
        raise SystemExit("\n".join(r.error for r in summary.failed))
    # Other processes' share of the machine during the run; a benchmark on a busy machine is slower.
    others = max(0.0, busy - cpu) / (wall * (os.cpu_count() or 1))
    return {"clips": len(clips), "frames": summary.extracted_frames, "wall": wall, "cpu": cpu, "others": others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=Path, default=DEFAULT_CLIPS,
                        help=f"folder of videos (default {DEFAULT_CLIPS})")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts to measure (default 1 2)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per worker count (default 2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    cv2, mediapipe = extract.import_video_packages()
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}")
    print(f"python {platform.python_version()}, mediapipe {mediapipe.__version__}, opencv {cv2.__version__}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| workers | clips | frames | wall s | frames/s | CPU s per frame | other processes' CPU share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for workers in args.workers:
        for _ in range(args.repeats):
            run = measure(args.clips, workers)
            print(f"| {workers} | {run['clips']} | {run['frames']} | {run['wall']:.1f} | "
                  f"{run['frames'] / run['wall']:.1f} | {run['cpu'] / run['frames']:.3f} | {run['others']:.0%} |",
                  flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
