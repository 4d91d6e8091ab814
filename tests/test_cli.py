"""The command line: entry points, help, and errors turned into `error: ...` with an exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from isaret.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(*command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_train_script_help_lists_options():
    result = run("train.py", "--help")
    assert result.returncode == 0
    for option in ("--config", "--data", "--format", "--epochs", "--batch-size", "--lr", "--checkpoint-dir",
                   "--seed", "--device", "--set", "--resume", "--resume-from-best", "--auto-resume"):
        assert option in result.stdout
    assert "early_stopping_patience" in result.stdout


def test_module_entry_point_version():
    result = run("-m", "isaret", "--version")
    assert result.returncode == 0
    assert result.stdout.startswith("isaret ")


def test_cli_unknown_field_error(capsys):
    code = main(["train", "--set", "d_modle=64"])
    message = capsys.readouterr().err
    assert code == 2
    assert message.startswith("error: ")
    assert "unknown config field 'd_modle'" in message
    assert "d_model" in message


def test_cli_invalid_value_error(capsys):
    code = main(["train", "--epochs", "0"])
    message = capsys.readouterr().err
    assert code == 2
    assert "invalid value 0 for 'num_epochs'" in message
    assert "[1, 100000]" in message


def test_cli_missing_data_error(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "absent"), "--checkpoint-dir", str(tmp_path / "run")])
    message = capsys.readouterr().err
    assert code == 1
    assert "data path not found" in message
    assert "Traceback" not in message


def test_cli_missing_resume_file_error(tmp_path, capsys):
    code = main(["train", "--resume", str(tmp_path / "nothing.pth")])
    message = capsys.readouterr().err
    assert code == 1
    assert f"checkpoint not found: {tmp_path / 'nothing.pth'}" in message


def test_cli_config_file_and_flag_precedence(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[train]\nnum_epochs = 0\n', encoding="utf-8")
    code = main(["train", "--config", str(config)])
    message = capsys.readouterr().err
    assert code == 2
    assert str(config) in message
    assert "num_epochs" in message
