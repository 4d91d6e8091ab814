"""Checkpoint files: atomic writes, integrity checks, safe loading, rotation and RNG states.

A checkpoint is a plain dict of tensors and primitives, so `torch.load(path, weights_only=True)`
reads it and never runs code. It carries `format` and `format_version`.

Integrity: torch.save writes a zip archive with a CRC-32 for each record (the pickled structure
and every tensor's bytes), computed while it writes, so checking costs nothing at save time.
load_checkpoint verifies every record's CRC-32 itself, so a truncated, bit-flipped or foreign file
is detected even where torch would load it. Format version 1 files (isaret 0.1) carry a SHA-256
over their content under `integrity` instead, which is still verified.

A file counts only once `os.replace` has moved it into place after an fsync of its data; the
folder is fsynced after the rename.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import itertools
import logging
import os
import pickle
import random
import re
import reprlib
import resource
import shutil
import tempfile
import threading
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from isaret.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "isaret-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: SHA-256 under "integrity"; 2: the zip records' CRC-32
LAST = "last_model.pth"
BEST = "best_model.pth"
EPOCH_PATTERN = re.compile(r"^epoch_(\d{3,})\.pth$")
TEMP_PREFIX = ".tmp-"


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pth"


# ----------------------------------------------------------------------------- integrity

def _feed(digest: "hashlib._Hash", value: Any) -> None:
    """Hash a value of a checkpoint dict by type and content, in a fixed order."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise CheckpointError(f"checkpoint value of type {type(value).__name__} is not a tensor or primitive")


def integrity_digest(payload: dict) -> str:
    """The SHA-256 of a payload's content, as format version 1 stored it under `integrity`."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in payload.items() if key != "integrity"})
    return digest.hexdigest()


# ----------------------------------------------------------------------------- plain values

_ATOMS = frozenset({bool, int, float, str, type(None)})


def check_plain(value: Any) -> None:
    """Raise CheckpointError unless `value` contains only tensors, primitives, dicts, lists and tuples.

    These are the types that torch.load(weights_only=True) reads back.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        if type(item) in _ATOMS or isinstance(item, torch.Tensor):
            continue
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        else:
            raise CheckpointError(
                f"checkpoint value {reprlib.repr(item)} of type {type(item).__name__} is not a tensor or primitive"
            )


# ----------------------------------------------------------------------------- write

def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE), which starts writing a file range to disk
    without waiting; None on systems without it."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, length: function(fd, offset, length, 2)  # 2 = SYNC_FILE_RANGE_WRITE


_start_writeback = _load_sync_file_range()


class _EarlyWriteback:
    """While torch.save writes a file, keep asking the kernel to start sending its new pages to disk.

    torch.save's own file writer leaves the whole file in the page cache, so a following fsync
    would wait for all of it. This thread starts the writeback every `INTERVAL` seconds
    (sync_file_range, which does not wait), so the disk works while torch serialises and the
    fsync waits only for the last pages. Where sync_file_range is missing it does nothing.
    """

    # Seconds. With a 5.8 MB checkpoint on ext4 (docs/benchmarks.md), save_atomic took 1.17x a
    # plain torch.save at 0.5 ms, 1.26x at 1 ms and 1.30x at 2 ms.
    # NOTE: measured on that one 2-core machine only.
    INTERVAL = 0.0005

    def __init__(self, fd: int):
        self.fd = fd
        self.done = threading.Event()
        self.thread = None
        if _start_writeback is not None:
            self.thread = threading.Thread(target=self._run, name="isaret-writeback", daemon=True)

    def __enter__(self) -> _EarlyWriteback:
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()

    def _run(self) -> None:
        while not self.done.wait(self.INTERVAL):
            _start_writeback(self.fd, 0, 0)  # from offset 0 to the end of the file


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not allow opening a folder; the rename is still atomic
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextlib.contextmanager
def _zip_checksums_on():
    """torch.save stores a CRC-32 per record only while this option is on; load_checkpoint checks them."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


_deleter: ThreadPoolExecutor | None = None
_deletions: list[tuple[Path, Future]] = []
_deletions_lock = threading.Lock()


def _delete_later(path: Path) -> None:
    """Unlink `path` in a background thread.

    Freeing the blocks of a checkpoint takes time (1.1 to 1.4 ms for 5.8 MB on the ext4 of
    docs/benchmarks.md), and it is no part of making the new file durable.
    The thread is joined at interpreter exit; a file left by a killed process has a temp name,
    which the next run removes.
    """
    global _deleter
    with _deletions_lock:
        try:
            if _deleter is None:
                _deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="isaret-delete")
            _deletions.append((path, _deleter.submit(path.unlink, missing_ok=True)))
            return
        except RuntimeError:
            pass  # the interpreter is shutting down and starts no new work: delete it here
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("Could not delete %s: %s", path, error.strerror or error)


def wait_for_deletions() -> None:
    """Wait until every file handed to the background deleter is gone."""
    with _deletions_lock:
        pending = list(_deletions)
        _deletions.clear()
    for path, future in pending:
        try:
            future.result()
        except OSError as error:
            log.warning("Could not delete %s: %s", path, error.strerror or error)


_spare_numbers = itertools.count()


def _spare_name(path: Path) -> Path:
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}-{next(_spare_numbers)}.old")


def _detach_blocks(path: Path) -> Path | None:
    """Give `path` a second, temp name if it has only one, so that replacing it frees nothing now.

    Return the temp name, for _delete_later once the replacement is in place, or None.
    """
    try:
        if os.stat(path).st_nlink != 1:
            return None
        spare = _spare_name(path)
        os.link(path, spare)
    except OSError:
        return None  # no file there, or no hard links on this file system: replacing frees it now
    return spare


def _replace(source: str | Path, target: Path) -> None:
    """os.replace `source` onto `target`; a file that loses its last name there is freed in the background."""
    old_blocks = _detach_blocks(target)
    try:
        os.replace(source, target)
    except OSError:
        if old_blocks is not None:
            old_blocks.unlink(missing_ok=True)  # a second name of the intact old file
        raise
    if old_blocks is not None:
        _delete_later(old_blocks)


def _write_failure(error: BaseException, folder: Path) -> str:
    """Describe a failed write. torch's file writer (RuntimeError) does not keep the errno of a
    full disk or a file size limit, so the free space and the limit are given instead."""
    first_line = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    if not isinstance(error, RuntimeError):
        return first_line
    details = [f"the write stopped (torch: {first_line})"]
    try:
        details.append(f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free on that disk")
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        details.append(f"this process may write files of at most {limit / 1e6:.1f} MB (ulimit -f)")
    return ", ".join(details)


def save_atomic(payload: dict, path: Path, sync_folder: bool = True) -> None:
    """Write a checkpoint: temp file in the same folder, fsync, os.replace, fsync of the folder.

    A caller that renames more files into the same folder may pass sync_folder=False and fsync
    the folder once after the last rename.
    """
    payload = dict(payload, format=FORMAT, format_version=FORMAT_VERSION)
    check_plain(payload)
    temp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # torch names the zip records after the file: the name needs text before its last dot.
        handle, temp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
        try:
            # torch's file writer (a path, not a file object) releases the GIL while it writes
            # tensor bytes, so a save in a background thread holds up training less.
            with _zip_checksums_on(), _EarlyWriteback(handle):
                torch.save(payload, temp_name)
            os.fsync(handle)
        finally:
            os.close(handle)
        _replace(temp_name, path)
    except BaseException as error:
        if temp_name is not None:
            Path(temp_name).unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):
            raise CheckpointError(
                f"failed to write checkpoint {path}: {_write_failure(error, path.parent)}; the checkpoints "
                "written before are intact. Free disk space or choose another --checkpoint-dir, then resume "
                "with --auto-resume"
            ) from None
        raise
    if sync_folder:
        _fsync_folder(path.parent)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temp files that a killed save left behind; they never count as checkpoints.

    Anything else with a temp name (a folder, say) is left alone with a warning.
    """
    removed = []
    for path in folder.glob(f"{TEMP_PREFIX}*"):
        if path.is_symlink() or not path.is_file():
            log.warning("Leaving %s in place: it has a temp file's name but is not a file", path)
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# ----------------------------------------------------------------------------- read

def load_checkpoint(path: str | Path) -> dict:
    """Load and verify a checkpoint; every problem raises CheckpointError with the path and reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"invalid checkpoint {path}: the file is empty (0 bytes)")

    # Check the records first, so that damage is reported as damage and not as whatever the
    # changed bytes look like to the unpickler (code, a foreign file or another format version).
    _verify_records(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unpickling_error(path, error) from None
    except Exception as error:
        # Damaged bytes make torch.load raise many exception types (seen with torch 2.13 on
        # single-bit flips: RuntimeError, EOFError, ValueError, IndexError, TypeError,
        # AttributeError, AssertionError), so any failure here means a corrupt file.
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointError(f"invalid checkpoint {path}: corrupt or truncated file ({reason})") from None

    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"invalid checkpoint {path}: not an isaret checkpoint (no format '{FORMAT}')")
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"unsupported checkpoint {path}: format version {version}; this isaret reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if version == 1:
        _verify_digest(path, payload)
    return payload


_DOS_FOLDER_ATTRIBUTE = 0x10  # MS-DOS folder bit of a zip record's external attributes


def _verify_records(path: Path) -> None:
    """Check the CRC-32 of every record of the zip archive that torch.save wrote; skip a file that is no zip.

    torch reads the archive with miniz and this check uses Python's zipfile. They differ in one
    field that matters: torch reads a record whose folder attribute is set (one flipped bit) as
    empty, but zipfile's CRC check passes it. So that bit is checked too.
    """
    try:
        if not zipfile.is_zipfile(path):
            return  # torch.load then separates a legacy torch file or a plain pickle from garbage
        with zipfile.ZipFile(path) as archive:
            folders = [info.filename for info in archive.infolist()
                       if info.external_attr & _DOS_FOLDER_ATTRIBUTE or info.is_dir()]
            bad = archive.testzip()
    except Exception as error:  # noqa: BLE001 - damaged zip headers raise many types (see torch.load above)
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointError(
            f"invalid checkpoint {path}: corrupt or truncated file (zip structure: {reason})"
        ) from None
    if folders:
        raise CheckpointError(
            f"invalid checkpoint {path}: integrity check failed (record {folders[0]} is marked as a folder, which "
            "torch.save (2.13) does not set); the file is corrupt"
        )
    if bad is not None:
        raise CheckpointError(
            f"invalid checkpoint {path}: integrity check failed (the stored CRC-32 of record {bad} does not match "
            "its bytes); the file is corrupt"
        )


def _verify_digest(path: Path, payload: dict) -> None:
    """Check the SHA-256 of a format version 1 file."""
    try:
        digest = integrity_digest(payload)
    except (CheckpointError, RuntimeError) as error:
        reason = str(error).splitlines()[0][:200]
        raise CheckpointError(f"invalid checkpoint {path}: corrupt content ({reason})") from None
    if payload.get("integrity") != digest:
        raise CheckpointError(
            f"invalid checkpoint {path}: integrity check failed (the stored SHA-256 does not match the content); "
            "the file is corrupt"
        )


# Phrases of torch's weights_only unpickler (torch 2.6 to 2.13) for a pickle that names a
# global outside its allowlist, which is what a file carrying code looks like.
_CODE_PATTERNS = re.compile(r"(Unsupported global[^\n]*|unsupported GLOBAL[^\n]*|Unsupported class[^\n]*)")


def _unpickling_error(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    """Tell a file that carries pickled objects (a global outside the allowlist) from a corrupt one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = _CODE_PATTERNS.search(text)
    if found:
        return CheckpointError(
            f"refused to load {path}: it contains pickled Python code or objects ({found.group(1).strip()[:160]}); "
            "weights_only loading rejected it and none of it ran. Load only checkpoints written by isaret"
        )
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    first = detail[0].strip() if detail else ""
    return CheckpointError(f"invalid checkpoint {path}: corrupt file (unpickling failed: {first[:200]})")


def checkpoint_candidates(folder: Path) -> list[Path]:
    """Checkpoint files in a folder, newest first (by modification time, then last > epoch > best)."""
    if not folder.is_dir():
        return []
    rank = {LAST: 0, BEST: 2}
    paths = [p for p in folder.iterdir() if p.is_file() and (p.name in rank or EPOCH_PATTERN.match(p.name))]
    return sorted(paths, key=lambda p: (-p.stat().st_mtime_ns, rank.get(p.name, 1), p.name))


def training_position(payload: dict) -> tuple[int, int, int]:
    """Return (global step, epoch, batches into the next epoch): the order of training progress."""
    return int(payload.get("global_step", 0)), int(payload.get("epoch", 0)), int(payload.get("batch_in_epoch", 0))


def find_resumable(folder: Path) -> tuple[Path, dict] | None:
    """Return the most advanced checkpoint in `folder` that loads and verifies, or None if there is none.

    Checkpoints are ordered by their stored training position, not by file time, so a copied
    folder resumes from the same file. Invalid files are skipped with a warning that names each
    one. If files exist but none is valid, CheckpointError is raised instead of starting fresh.
    """
    candidates = checkpoint_candidates(folder)
    failures, valid = [], []
    for order, path in enumerate(candidates):
        try:
            payload = load_checkpoint(path)
        except CheckpointError as error:
            log.warning("Skipping checkpoint: %s", error)
            failures.append(str(error))
            continue
        valid.append((training_position(payload), -order, path, payload))
    if valid:
        _, _, path, payload = max(valid, key=lambda item: (item[0], item[1]))
        if failures:
            log.warning("Falling back to the newest valid checkpoint: %s", path)
        return path, payload
    if failures:
        raise CheckpointError(
            f"no valid checkpoint in {folder} ({len(failures)} invalid):\n  " + "\n  ".join(failures)
            + "\nmove the invalid files away to start fresh there, or use another --checkpoint-dir"
        )
    return None


def set_aside_later_checkpoints(folder: Path, position: tuple[int, int, int]) -> list[Path]:
    """Move checkpoints beyond `position` into a `superseded-<time>` subfolder, deleting nothing.

    A run resumed from an earlier checkpoint starts a new continuation. Files of the abandoned
    one would otherwise mix with it, and --auto-resume could pick them up later.
    """
    later = []
    for path in checkpoint_candidates(folder):
        try:
            if training_position(load_checkpoint(path)) > position:
                later.append(path)
        except CheckpointError:
            continue
    if not later:
        return []
    target = folder / time.strftime("superseded-%Y%m%d-%H%M%S")
    target.mkdir(exist_ok=True)
    moved = []
    for path in later:
        os.replace(path, target / path.name)
        moved.append(target / path.name)
    _fsync_folder(folder)
    return moved


# ----------------------------------------------------------------------------- rotation

def rotate_epoch_files(folder: Path, keep_last_k: int, protected: set[Path]) -> list[Path]:
    """Remove all but the newest `keep_last_k` epoch_NNN.pth files, never one in `protected`.

    Each file leaves its name at once; its blocks are freed in the background (see _delete_later).
    """
    epoch_files = sorted((int(m.group(1)), p) for p in folder.glob("epoch_*.pth")
                         if (m := EPOCH_PATTERN.match(p.name)) and p.is_file())
    doomed = [p for _, p in epoch_files[: max(0, len(epoch_files) - keep_last_k)]]
    removed = []
    for path in doomed:
        if path.resolve() in protected:
            continue
        spare = _spare_name(path)
        os.replace(path, spare)
        _delete_later(spare)
        removed.append(path)
    return removed


# ----------------------------------------------------------------------------- RNG states

def capture_rng_state() -> dict:
    """Return the python, numpy, torch and CUDA generator states as tensors and primitives."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [t for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for device in range(count):
            torch.cuda.set_rng_state(cuda_states[device], device)


# ----------------------------------------------------------------------------- folder lock

class FolderLock:
    """An exclusive lock on a checkpoint folder (`.lock`), so that a second run into the folder fails.

    The lock is an fcntl.flock on an open file, which the kernel releases when the process ends,
    also after SIGKILL. So a leftover `.lock` file does not block a later run. NOTE: flock is
    advisory and may not hold across machines on some network file systems.
    """

    NAME = ".lock"

    def __init__(self, handle):
        self.handle = handle

    @classmethod
    def acquire(cls, folder: Path) -> FolderLock:
        import fcntl

        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / cls.NAME, "a+", encoding="utf-8")
        except OSError as error:
            raise CheckpointError(f"cannot use checkpoint folder {folder}: {error.strerror or error}; "
                                  "choose another --checkpoint-dir") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise CheckpointError(
                f"another isaret run (process {owner}) is writing to {folder}; wait for it to finish, stop it, "
                "or choose another --checkpoint-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        lock = cls(handle)
        _held_locks.append(lock)
        return lock

    def release(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        if self in _held_locks:
            _held_locks.remove(self)


_held_locks: list[FolderLock] = []


def close_inherited_folder_locks() -> None:
    """Close the folder locks' files in a forked child, such as a DataLoader worker.

    The lock stays with the training process, because closing a copy of the file does not
    unlock it. Without this, a worker that outlives a killed training process keeps the folder
    locked until the worker exits.
    """
    for lock in _held_locks:
        lock.handle.close()


# ----------------------------------------------------------------------------- checkpointer

def _link_atomic(source: Path, target: Path) -> None:
    """Make `target` name the same file as `source` (a hard link renamed into place), else copy it."""
    temp = target.with_name(f"{TEMP_PREFIX}{target.name}.{os.getpid()}.link")
    try:
        temp.unlink(missing_ok=True)
        try:
            os.link(source, temp)
        except OSError:
            with source.open("rb") as reader, temp.open("wb") as writer:
                while chunk := reader.read(1 << 20):
                    writer.write(chunk)
                writer.flush()
                os.fsync(writer.fileno())
        _replace(temp, target)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise CheckpointError(
            f"failed to write checkpoint {target}: {error.strerror or error}; {source} contains the same state. "
            f"Remove or rename what is at {target.name}, then resume with --auto-resume"
        ) from None


def snapshot(value: Any) -> Any:
    """Copy every tensor of a state dict, so that training may change the originals meanwhile."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(item) for item in value)
    return value


class Checkpointer:
    """Writes and finds the checkpoints of one run folder; only rank 0 touches files.

    With `background` on and one process, save() copies the state and returns; a thread writes
    and commits the copy while training goes on. One save is in flight at most: the next save
    and wait() wait for it and raise its error. Under torchrun every save is written
    before save() returns on any rank, so all ranks see the commit, or rank 0's error.
    """

    def __init__(self, folder: Path, keep_last_k: int, ctx, background: bool = False):
        self.folder = Path(folder)
        self.keep_last_k = keep_last_k
        self.ctx = ctx
        self.background = background and not ctx.enabled
        self.pending: threading.Thread | None = None
        self.committed = threading.Event()  # set by the background thread when its save ends
        self.failure: BaseException | None = None

    def save(self, state: dict, name: str = LAST, epoch_file: int | None = None,
             protected: set[Path] | None = None, links: tuple[str, ...] = (), wait: bool = False) -> Path:
        """Write `state` as `name`, epoch_NNN.pth and each of `links`, then rotate epoch files.

        The state is serialised once; the other names are hard links to the same file. The
        returned path is committed when save() returns, unless the save runs in the background
        (then after the next wait()). `wait=True` always commits before returning.
        """
        from isaret.distributed import run_on_main

        target = self.folder / name
        keep = set(protected or ())

        def write(state: dict) -> None:
            first = target if epoch_file is None else self.folder / epoch_name(epoch_file)
            save_atomic(state, first, sync_folder=False)
            for other in ([] if first == target else [name]) + list(links):
                _link_atomic(first, self.folder / other)
            _fsync_folder(self.folder)
            if epoch_file is None:
                return
            try:
                removed = rotate_epoch_files(self.folder, self.keep_last_k, keep | {first.resolve()})
            except OSError as error:  # the new checkpoint is committed; only the clean-up failed
                log.warning("Could not remove old epoch files in %s: %s", self.folder, error)
                return
            for path in removed:
                log.debug("Deleted old checkpoint %s", path)

        self.wait()
        if not self.background or wait:
            run_on_main(lambda: write(state), self.ctx)
            return target
        copy = snapshot(state)
        # Not a daemon: the interpreter joins it at exit. A daemon thread inside torch's C++ writer
        # at interpreter shutdown aborts the process ("terminate called without an active exception").
        self.committed.clear()
        self.pending = threading.Thread(target=self._run, args=(write, copy), name="isaret-checkpoint")
        self.pending.start()
        return target

    def _run(self, write: Callable[[dict], None], state: dict) -> None:
        try:
            write(state)
        except OSError as error:  # from the folder fsync, for example; save_atomic wraps its own errors
            self.failure = CheckpointError(f"failed to write checkpoint files in {self.folder}: "
                                           f"{error.strerror or error}; the checkpoints written before are intact")
        except BaseException as error:  # noqa: BLE001 - handed to the training thread by wait()
            self.failure = error
        finally:
            self.committed.set()

    def check(self) -> None:
        """Raise the error of a background save that has failed; return at once otherwise."""
        if self.pending is not None and not self.pending.is_alive():
            self.wait()

    def wait(self) -> None:
        """Wait until the background save, if any, is committed and old files are gone; raise its error."""
        if self.pending is not None:
            # Wait on an event, not on join(): a KeyboardInterrupt inside Thread.join can mark the
            # running thread as stopped (Python 3.11), and the interpreter then exits without it.
            self.committed.wait()
            self.pending.join()
            self.pending = None
        wait_for_deletions()
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def wait_after_error(self) -> None:
        """Let a background save commit while another error ends the run; log its own error, if any.

        Not called on KeyboardInterrupt (a second Ctrl+C aborts at once): an unfinished save
        then leaves only a temp file, which the next run removes.
        """
        try:
            self.wait()
        except Exception as error:  # noqa: BLE001 - the error already on its way matters more
            log.error("The background checkpoint save failed too: %s", error)

    def existing(self) -> list[Path]:
        return checkpoint_candidates(self.folder)

    def load(self, path: Path | None, from_best: bool, auto: bool) -> tuple[Path, dict] | None:
        """Find and load the checkpoint to resume from, or return None for a fresh start.

        A fresh start into a folder that already contains checkpoints raises CheckpointError, so a
        run is never overwritten silently.
        """
        if path is not None:
            return path, load_checkpoint(path)
        if from_best:
            best = self.folder / BEST
            if not best.exists():
                raise CheckpointError(f"--resume-from-best: {best} not found; check --checkpoint-dir")
            return best, load_checkpoint(best)
        if auto:
            found = find_resumable(self.folder)
            if found is None:
                log.info("No checkpoint in %s: starting a fresh run", self.folder)
            return found
        existing = self.existing()
        if existing:
            resume_hint = f"--resume {self.folder / LAST} or " if (self.folder / LAST).exists() else ""
            raise CheckpointError(
                f"{self.folder} already contains a run ({', '.join(p.name for p in existing[:3])}); "
                f"continue it with {resume_hint}--auto-resume, or choose another --checkpoint-dir"
            )
        return None
