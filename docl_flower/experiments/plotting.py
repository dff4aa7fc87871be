"""Matplotlib for the experiments' PNGs: a file backend and the text sizes they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

# No display: the experiments write PNG files only (and run on headless machines).
matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: Text sizes (points): values written inside matrix cells, tick labels and annotations,
#: legends and axis labels, panel titles. Small enough for 10 x 10 matrices and 10 users.
CELL_TEXT = 6
SMALL_TEXT = 7
LEGEND_TEXT = 8
TITLE_TEXT = 9

__all__ = ["CELL_TEXT", "LEGEND_TEXT", "SMALL_TEXT", "TITLE_TEXT", "plt", "save"]


def save(fig: Any, path: Path, dpi: int, tight: bool = True) -> Path:
    """Lay out ``fig`` (``tight``), write it to ``path`` at ``dpi``, close it; return ``path``."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
