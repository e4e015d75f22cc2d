"""The gridlet console script as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edge_runtime.cli import main


def test_help_lists_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "codec-info" in result.output


def test_codec_info_names_the_loaded_implementation() -> None:
    result = CliRunner().invoke(main, ["codec-info"])
    assert result.exit_code == 0
    assert "compiled (Cython extension)" in result.output


def test_console_script_is_installed() -> None:
    exe = shutil.which("gridlet", path=str(Path(sys.executable).parent))
    assert exe is not None
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "Usage: gridlet" in out.stdout


def test_pure_switch_loads_the_twin() -> None:
    code = "import predictor_ext as p; print(p.compiled)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"GRIDLET_PURE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip() == "False"
