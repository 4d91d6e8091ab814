"""Config comparison against a checkpoint: the changes a resume allows, checked before any weights load."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from isaret.config import ARCHITECTURE_FIELDS, DATA_FIELDS, Config
from isaret.errors import CheckpointError

log = logging.getLogger(__name__)

# Fields that only select where and how to resume. Their changes are neither blocking nor logged.
RESUME_FIELDS = ("auto_resume", "resume_checkpoint")
# Fields that pick the data set, split or sample order: changing them breaks exactness but not the model.
EXACTNESS_FIELDS = ("data_path", "data_format", "signer_csv", "split", "val_fraction", "seed", "bad_file_policy")


@dataclass
class FieldChange:
    name: str
    old: Any
    new: Any

    @property
    def blocking(self) -> bool:
        return self.name in ARCHITECTURE_FIELDS or self.name in DATA_FIELDS


def config_changes(stored: dict, current: Config) -> list[FieldChange]:
    """List every field whose value differs between a checkpoint's config dict and `current`."""
    stored_config = Config.from_dict(stored, source="checkpoint config")
    old, new = stored_config.flat(), current.flat()
    return [FieldChange(name, old[name], new[name]) for name in new
            if name not in RESUME_FIELDS and old.get(name) != new[name]]


def check_compatible(stored: dict, current: Config, path: str) -> list[FieldChange]:
    """Raise CheckpointError listing every blocking change; return the allowed ones."""
    changes = config_changes(stored, current)
    blocking = [c for c in changes if c.blocking]
    if blocking:
        lines = "\n".join(f"  {c.name}: checkpoint {c.old!r}, current {c.new!r}" for c in blocking)
        fix = " ".join(f"--set {c.name}={_toml_value(c.old)}" for c in blocking)
        raise CheckpointError(
            f"cannot resume from {path}: the model or its input would change:\n{lines}\n"
            f"resume with the checkpoint's values ({fix}), or start a fresh run in another --checkpoint-dir"
        )
    return [c for c in changes if not c.blocking]


def log_changes(changes: list[FieldChange]) -> None:
    for change in changes:
        log.info("  %s: %r -> %r", change.name, change.old, change.new)
        if change.name in EXACTNESS_FIELDS:
            log.warning("  %s changed: the resumed run will not match an uninterrupted one exactly", change.name)


def check_same(name: str, stored: Any, current: Any, path: str, fix: str) -> None:
    """Raise CheckpointError when a property of the data differs from the checkpoint's."""
    if stored != current:
        raise CheckpointError(
            f"cannot resume from {path}: {name} does not match\n  checkpoint: {_short(stored)}\n  current: {_short(current)}\n"
            f"{fix}"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + " ..."


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
