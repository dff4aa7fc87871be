"""Executables that stand in for a Flower command in tests (a tampered or a tuned one)."""

from __future__ import annotations

import stat
import sys
from pathlib import Path


def install(bindir: Path, command: str, module: str) -> Path:
    """Write an executable ``command`` into ``bindir``: it runs ``tests/<module>.py``:main."""
    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / command
    here = str(Path(__file__).resolve().parent)
    exe.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {here!r})\n"
        f"from {module} import main\n"
        "main()\n",
        encoding="utf-8",
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe
