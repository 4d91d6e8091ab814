"""Checkpoint file format: atomic writes, safe loading, integrity checks, rotation and fallback."""

from __future__ import annotations

import builtins
import logging
import os
import pickle
import random
import struct
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import isaret.checkpoint as checkpoint_module
from isaret.checkpoint import (
    BEST,
    FORMAT,
    Checkpointer,
    LAST,
    capture_rng_state,
    checkpoint_candidates,
    epoch_name,
    find_resumable,
    integrity_digest,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
    rotate_epoch_files,
    save_atomic,
    wait_for_deletions,
)
from isaret.distributed import DistContext
from isaret.errors import CheckpointError


def sample_payload(step: int = 30) -> dict:
    torch.manual_seed(step)
    return {
        "model_state_dict": {"embed.weight": torch.randn(8, 6), "embed.bias": torch.zeros(8),
                             "head.weight": torch.randn(3, 8, dtype=torch.bfloat16)},
        "epoch": 3,
        "global_step": step,
        "best_val_acc": 0.75,
        "run_name": "adamw-run",
        "label_map": ["güle güle", "teşekkürler"],
        "history": [{"epoch": 1, "val_acc": 0.5, "note": None}, {"epoch": 2, "val_acc": 0.75, "note": "best"}],
        "split": {"kind": "stratified", "train": ["a/0.npy"], "val": ["a/1.npy"]},
    }


def write(folder: Path, name: str, step: int = 30) -> Path:
    path = folder / name
    save_atomic(sample_payload(step), path)
    return path


def entry_data_range(path: Path, member: str) -> tuple[int, int]:
    """Return the byte range of an uncompressed zip member's data inside the file."""
    data = path.read_bytes()
    info = zipfile.ZipFile(path).getinfo(member)
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    return start, start + info.compress_size


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def assert_same_payload(loaded: dict, expected: dict) -> None:
    for key, value in expected.items():
        if key == "model_state_dict":
            for name, tensor in value.items():
                assert torch.equal(loaded[key][name], tensor), name
        else:
            assert loaded[key] == value, key


# ----------------------------------------------------------------------------- writing and loading

def test_save_atomic_weights_only_load(tmp_path):
    path = write(tmp_path, LAST)
    raw = torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)

    assert raw["format"] == FORMAT
    assert raw["format_version"] == 2
    assert "integrity" not in raw
    assert zipfile.ZipFile(path).testzip() is None
    assert_same_payload(loaded, sample_payload())
    assert loaded["model_state_dict"]["head.weight"].dtype == torch.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


def test_save_atomic_large_tensors_round_trip(tmp_path):
    payload = {"weights": {f"layer{i}": torch.randn(200_000) for i in range(4)}, "epoch": 1}
    path = tmp_path / LAST
    save_atomic(payload, path)

    loaded = load_checkpoint(path)
    for name, tensor in payload["weights"].items():
        assert torch.equal(loaded["weights"][name], tensor), name
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


def test_save_atomic_write_error_keeps_old_file(tmp_path):
    # A child process may write files of at most 100 kB, so the second, larger save fails in
    # torch's file writer (EFBIG), as on a full disk.
    code = textwrap.dedent(f"""
        import resource, signal, sys, torch
        from pathlib import Path
        from isaret.checkpoint import save_atomic
        from isaret.errors import CheckpointError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        path = Path({str(tmp_path / LAST)!r})
        save_atomic({{"epoch": 1}}, path)
        try:
            save_atomic({{"epoch": 2, "weight": torch.zeros(2_000_000)}}, path)
        except CheckpointError as error:
            print(error)
            sys.exit(3)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert result.returncode == 3, result.stderr
    assert f"failed to write checkpoint {tmp_path / LAST}: the write stopped" in result.stdout
    assert "MB free on that disk" in result.stdout
    assert "this process may write files of at most 0.1 MB (ulimit -f)" in result.stdout
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


def test_save_atomic_replaces_file(tmp_path):
    write(tmp_path, LAST, step=1)
    write(tmp_path, LAST, step=2)
    wait_for_deletions()  # the replaced file's blocks are freed in the background

    assert load_checkpoint(tmp_path / LAST)["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


def test_save_atomic_keeps_other_hard_link(tmp_path):
    write(tmp_path, epoch_name(1), step=1)
    os.link(tmp_path / epoch_name(1), tmp_path / LAST)
    write(tmp_path, LAST, step=2)
    wait_for_deletions()

    assert load_checkpoint(tmp_path / epoch_name(1))["global_step"] == 1
    assert load_checkpoint(tmp_path / LAST)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [epoch_name(1), LAST]


def test_replaced_file_deleted_before_exit(tmp_path):
    code = textwrap.dedent(f"""
        from pathlib import Path
        from isaret.checkpoint import save_atomic
        for step in range(3):
            save_atomic({{"global_step": step}}, Path({str(tmp_path / LAST)!r}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


def test_save_atomic_folder_error_clean(tmp_path):
    (tmp_path / "plain-file").write_bytes(b"x")
    target = tmp_path / "plain-file" / LAST

    with pytest.raises(CheckpointError, match=f"failed to write checkpoint {target}"):
        save_atomic(sample_payload(), target)


def test_link_onto_folder_error_clean(tmp_path):
    (tmp_path / BEST).mkdir()
    checkpointer = Checkpointer(tmp_path, keep_last_k=2, ctx=DistContext())

    with pytest.raises(CheckpointError, match=f"failed to write checkpoint {tmp_path / BEST}") as error:
        checkpointer.save(sample_payload(), epoch_file=1, links=(BEST,))
    assert f"{tmp_path / epoch_name(1)} contains the same state" in str(error.value)
    assert load_checkpoint(tmp_path / epoch_name(1))["global_step"] == 30
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_save_atomic_rejects_objects(tmp_path):
    with pytest.raises(CheckpointError, match="not a tensor or primitive"):
        save_atomic({"optimizer": object()}, tmp_path / LAST)
    assert list(tmp_path.iterdir()) == []


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_atomic({"rng": capture_rng_state()}, tmp_path / LAST)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / LAST)["rng"])

    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_integrity_digest_sensitivity():
    payload = sample_payload()
    reordered = dict(reversed(list(payload.items())))
    changed_dtype = dict(payload, model_state_dict=dict(payload["model_state_dict"]))
    changed_dtype["model_state_dict"]["embed.bias"] = torch.zeros(8, dtype=torch.float64)
    changed_type = dict(payload, epoch=3.0)

    assert integrity_digest(reordered) == integrity_digest(payload)
    assert integrity_digest(dict(payload, integrity="x")) == integrity_digest(payload)
    assert integrity_digest(changed_dtype) != integrity_digest(payload)
    assert integrity_digest(changed_type) != integrity_digest(payload)
    assert integrity_digest(dict(payload, history=tuple(payload["history"]))) != integrity_digest(payload)


# ----------------------------------------------------------------------------- damaged files

@pytest.mark.parametrize("cut", ["half", "most", "last byte", "first 30 bytes"])
def test_truncated_file_rejected(tmp_path, cut):
    path = write(tmp_path, LAST)
    data = path.read_bytes()
    sizes = {"half": len(data) // 2, "most": len(data) * 9 // 10, "last byte": len(data) - 1, "first 30 bytes": 30}
    path.write_bytes(data[:sizes[cut]])

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)
    assert "corrupt or truncated" in str(error.value)


def test_empty_file_rejected(tmp_path):
    path = tmp_path / LAST
    path.write_bytes(b"")

    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_missing_file_and_folder_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / LAST)
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_bitflip_in_tensor_data_rejected(tmp_path):
    path = write(tmp_path, LAST)
    members = [name for name in zipfile.ZipFile(path).namelist() if "/data/" in name and "/.data/" not in name]
    start, stop = entry_data_range(path, members[0])
    flip_byte(path, (start + stop) // 2)

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)
    assert f"integrity check failed (the stored CRC-32 of record {members[0]} does not match" in str(error.value)


def test_folder_attribute_flip_rejected(tmp_path):
    # torch's zip reader skips a record marked as a folder, and zipfile's CRC check does not look
    # at the attribute, so only the explicit check catches this flip.
    path = write(tmp_path, LAST)
    data = path.read_bytes()
    member = next(name for name in zipfile.ZipFile(path).namelist() if name.endswith("/data/0"))
    central = data.index(b"PK\x01\x02")  # the first central directory entry
    entry = next(offset for offset in range(central, len(data))
                 if data.startswith(b"PK\x01\x02", offset) and data.startswith(member.encode(), offset + 46))
    flip_byte(path, entry + 38, 0x10)  # external attributes, MS-DOS folder bit

    with pytest.raises(CheckpointError, match=f"record {member} is marked as a folder") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_damaged_format_string_reported_as_damage(tmp_path):
    # Without the record check first, this flip reads as "not an isaret checkpoint".
    path = write(tmp_path, LAST)
    flip_byte(path, path.read_bytes().index(FORMAT.encode()) + 3)

    with pytest.raises(CheckpointError, match="integrity check failed"):
        load_checkpoint(path)


def test_bitflip_in_string_value_rejected(tmp_path):
    path = write(tmp_path, LAST)
    offset = path.read_bytes().index(b"adamw-run")
    flip_byte(path, offset + 2)

    with pytest.raises(CheckpointError, match="integrity check failed") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_any_bitflip_rejected_or_harmless(tmp_path):
    # The test flips every byte of the pickled structure and every 8th byte elsewhere. A flip in zip
    # metadata that torch does not read (such as a CRC or a time stamp) may load, but only unchanged content.
    original = tmp_path / "original.pth"
    save_atomic({"weight": torch.randn(3), "epoch": 1, "name": "run", "items": [1.5, None, True]}, original)
    data = original.read_bytes()
    pickle_name = next(name for name in zipfile.ZipFile(original).namelist() if name.endswith("/data.pkl"))
    pickle_start = zipfile.ZipFile(original).getinfo(pickle_name).header_offset
    pickle_stop = entry_data_range(original, pickle_name)[1]
    offsets = sorted(set(range(pickle_start, pickle_stop)) | set(range(0, len(data), 8)))
    damaged = tmp_path / LAST
    expected = load_checkpoint(original)
    escaped, changed = [], []
    for offset in offsets:
        copy = bytearray(data)
        copy[offset] ^= 0x01
        damaged.write_bytes(bytes(copy))
        try:
            loaded = load_checkpoint(damaged)
        except CheckpointError as error:
            assert str(damaged) in str(error)
            continue
        except Exception as error:  # noqa: BLE001 - the test lists every exception type that escapes
            escaped.append((offset, type(error).__name__))
            continue
        if integrity_digest(loaded) != integrity_digest(expected):
            changed.append(offset)

    assert escaped == []
    assert changed == []


def test_foreign_torch_file_rejected(tmp_path):
    path = tmp_path / LAST
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 1}, path)

    with pytest.raises(CheckpointError, match="not an isaret checkpoint") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_foreign_tensor_file_rejected(tmp_path):
    path = tmp_path / LAST
    torch.save(torch.zeros(3), path)

    with pytest.raises(CheckpointError, match="not an isaret checkpoint"):
        load_checkpoint(path)


def test_other_format_version_rejected(tmp_path):
    payload = dict(sample_payload(), format=FORMAT, format_version=99)
    payload["integrity"] = integrity_digest(payload)
    path = tmp_path / LAST
    torch.save(payload, path)

    with pytest.raises(CheckpointError, match="format version 99") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def write_version_1(path: Path, payload: dict) -> None:
    """Write a file as isaret 0.1 did: the SHA-256 of the content under "integrity"."""
    payload = dict(payload, format=FORMAT, format_version=1)
    payload["integrity"] = integrity_digest(payload)
    torch.save(payload, path)


def test_version_1_file_loads(tmp_path):
    write_version_1(tmp_path / LAST, sample_payload())

    assert_same_payload(load_checkpoint(tmp_path / LAST), sample_payload())


def test_version_1_changed_content_rejected(tmp_path):
    write_version_1(tmp_path / "original.pth", sample_payload())
    payload = torch.load(tmp_path / "original.pth", weights_only=True)
    payload["best_val_acc"] = 0.99
    torch.save(payload, tmp_path / LAST)

    with pytest.raises(CheckpointError, match=r"integrity check failed \(the stored SHA-256"):
        load_checkpoint(tmp_path / LAST)


def test_crc32_option_off_still_checked(tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        path = write(tmp_path, LAST)
    finally:
        torch.serialization.set_crc32_options(True)

    assert torch.serialization.get_crc32_options() is True
    assert load_checkpoint(path)["global_step"] == 30


class WritesMarker:
    """An object whose pickle calls open(marker, 'w'), so that unpickling it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def test_code_carrying_torch_file_rejected(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / LAST
    torch.save({"format": FORMAT, "format_version": 1, "payload": WritesMarker(marker)}, path)

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert not marker.exists()
    assert str(path) in str(error.value)
    assert "pickled Python code or objects" in str(error.value)
    assert "none of it ran" in str(error.value)


def test_code_carrying_plain_pickle_rejected(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / LAST
    with path.open("wb") as handle:
        pickle.dump({"format": FORMAT, "payload": WritesMarker(marker)}, handle, protocol=2)

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert not marker.exists()
    assert str(path) in str(error.value)


def test_code_carrying_file_runs_without_weights_only(tmp_path):
    # An unsafe load of such a file creates the marker, so the files of the two tests above do carry code.
    marker = tmp_path / "marker"
    path = tmp_path / LAST
    torch.save({"payload": WritesMarker(marker)}, path)
    torch.load(path, weights_only=False)["payload"].close()

    assert marker.exists()


# ----------------------------------------------------------------------------- rotation and discovery

def test_rotate_keeps_newest_and_protected(tmp_path):
    for epoch in range(1, 6):
        (tmp_path / epoch_name(epoch)).write_bytes(b"x")
    (tmp_path / LAST).write_bytes(b"x")
    (tmp_path / BEST).write_bytes(b"x")
    protected = {(tmp_path / epoch_name(1)).resolve()}
    removed = rotate_epoch_files(tmp_path, keep_last_k=2, protected=protected)
    wait_for_deletions()

    assert sorted(p.name for p in removed) == [epoch_name(2), epoch_name(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [epoch_name(1), epoch_name(4), epoch_name(5), LAST, BEST])


def test_rotate_keep_zero_spares_protected(tmp_path):
    for epoch in range(1, 4):
        (tmp_path / epoch_name(epoch)).write_bytes(b"x")
    rotate_epoch_files(tmp_path, keep_last_k=0, protected={(tmp_path / epoch_name(2)).resolve()})
    wait_for_deletions()

    assert sorted(p.name for p in tmp_path.iterdir()) == [epoch_name(2)]


def test_rotate_skips_folders(tmp_path):
    (tmp_path / epoch_name(1)).mkdir()
    for epoch in (2, 3):
        (tmp_path / epoch_name(epoch)).write_bytes(b"x")
    rotate_epoch_files(tmp_path, keep_last_k=1, protected=set())
    wait_for_deletions()

    assert sorted(p.name for p in tmp_path.iterdir()) == [epoch_name(1), epoch_name(3)]


def test_rotate_orders_epochs_numerically(tmp_path):
    for epoch in (999, 1000, 1001):
        (tmp_path / epoch_name(epoch)).write_bytes(b"x")
    (tmp_path / "epoch_12.pth").write_bytes(b"not matched: fewer than 3 digits")
    rotate_epoch_files(tmp_path, keep_last_k=2, protected=set())
    wait_for_deletions()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1000.pth", "epoch_1001.pth", "epoch_12.pth"]


def set_mtime(path: Path, seconds_ago: int) -> None:
    stamp = path.stat().st_mtime_ns - seconds_ago * 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def test_find_resumable_falls_back_to_older(tmp_path, caplog):
    older = write(tmp_path, epoch_name(1), step=10)
    set_mtime(older, 60)
    newest = write(tmp_path, LAST, step=20)
    newest.write_bytes(newest.read_bytes()[:100])
    caplog.set_level(logging.WARNING, logger="isaret.checkpoint")
    path, payload = find_resumable(tmp_path)

    assert path == older
    assert payload["global_step"] == 10
    assert any(str(newest) in record.getMessage() for record in caplog.records)


def test_find_resumable_newest_valid_first(tmp_path):
    set_mtime(write(tmp_path, epoch_name(1), step=10), 60)
    write(tmp_path, LAST, step=20)
    path, payload = find_resumable(tmp_path)

    assert path.name == LAST
    assert payload["global_step"] == 20


def test_find_resumable_all_invalid_raises(tmp_path):
    (tmp_path / LAST).write_bytes(b"")
    (tmp_path / epoch_name(1)).write_bytes(b"garbage")

    with pytest.raises(CheckpointError, match="no valid checkpoint") as error:
        find_resumable(tmp_path)
    assert LAST in str(error.value)
    assert epoch_name(1) in str(error.value)


def test_find_resumable_empty_folder(tmp_path):
    (tmp_path / ".tmp-last_model.pth.abc").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not a checkpoint", encoding="utf-8")

    assert find_resumable(tmp_path) is None
    assert find_resumable(tmp_path / "absent") is None


def test_candidates_tie_order(tmp_path):
    paths = [write(tmp_path, name) for name in (BEST, epoch_name(3), LAST)]
    stamp = paths[0].stat().st_mtime_ns
    for path in paths:
        os.utime(path, ns=(stamp, stamp))

    assert [p.name for p in checkpoint_candidates(tmp_path)] == [LAST, epoch_name(3), BEST]


def test_remove_stale_temp_files_keeps_folders(tmp_path, caplog):
    (tmp_path / ".tmp-epoch_001.pth.1-0.old").mkdir()
    (tmp_path / ".tmp-last_model.pth.x1").write_bytes(b"partial")
    caplog.set_level(logging.WARNING, logger="isaret.checkpoint")
    removed = remove_stale_temp_files(tmp_path)

    assert [p.name for p in removed] == [".tmp-last_model.pth.x1"]
    assert [p.name for p in tmp_path.iterdir()] == [".tmp-epoch_001.pth.1-0.old"]
    assert "is not a file" in caplog.text


def test_remove_stale_temp_files(tmp_path):
    (tmp_path / ".tmp-last_model.pth.x1").write_bytes(b"partial")
    write(tmp_path, LAST)
    removed = remove_stale_temp_files(tmp_path)

    assert [p.name for p in removed] == [".tmp-last_model.pth.x1"]
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


# ----------------------------------------------------------------------------- background saves

def test_background_save_writes_state_of_save_time(tmp_path, monkeypatch):
    # The thread may write only once training has changed the tensors and the history.
    trained_on = threading.Event()

    def save_later(*args, **kwargs):
        assert trained_on.wait(timeout=30)
        save_atomic(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_atomic", save_later)
    checkpointer = Checkpointer(tmp_path, keep_last_k=2, ctx=DistContext(), background=True)
    state = sample_payload()
    expected = {name: tensor.clone() for name, tensor in state["model_state_dict"].items()}
    checkpointer.save(state, epoch_file=1, links=(BEST,))
    for tensor in state["model_state_dict"].values():
        tensor.fill_(7)
    state["history"].append({"epoch": 3})
    trained_on.set()
    checkpointer.wait()

    loaded = load_checkpoint(tmp_path / LAST)
    for name, tensor in expected.items():
        assert torch.equal(loaded["model_state_dict"][name], tensor), name
    assert len(loaded["history"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST, epoch_name(1), LAST]


def test_background_save_error_raised_by_wait(tmp_path):
    (tmp_path / epoch_name(2)).mkdir()  # os.replace onto a folder fails
    checkpointer = Checkpointer(tmp_path, keep_last_k=2, ctx=DistContext(), background=True)
    checkpointer.save(sample_payload(10), epoch_file=1)
    checkpointer.save(sample_payload(20), epoch_file=2)

    with pytest.raises(CheckpointError, match=f"failed to write checkpoint {tmp_path / epoch_name(2)}"):
        checkpointer.wait()
    checkpointer.wait()  # the error is raised once
    assert load_checkpoint(tmp_path / LAST)["global_step"] == 10


def test_background_save_off_under_torchrun(tmp_path):
    two_processes = DistContext(rank=0, world_size=2)
    assert Checkpointer(tmp_path, 2, DistContext(), background=True).background
    assert not Checkpointer(tmp_path, 2, two_processes, background=True).background
