"""Conventions that CI enforces: ruff lint and format, mypy --strict on the package."""

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PROJECT_ROOT

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "docl_flower", "tests", "scripts"],
        ["ruff", "format", "--check", "docl_flower", "tests", "scripts"],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_tool_is_clean(cmd):
    proc = subprocess.run(
        [str(BIN / cmd[0]), *cmd[1:]], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
