#!/usr/bin/env python3
"""`python train.py [options]` is `isaret train [options]`; see `python train.py --help`."""

import sys
from pathlib import Path

# Run from a source checkout even when isaret is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from isaret.cli import train_script_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_script_main())
