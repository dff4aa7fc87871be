"""`docl-flower filter check` on a saved filter and image files, without Flower running."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from docl_flower.core.data import IdxDataset, class_indices
from docl_flower.core.features import Identity
from docl_flower.core.store import save_filter

from .conftest import trained_registration

CLI = str(Path(sys.executable).parent / "docl-flower")


def _filter_check(*args: object) -> subprocess.CompletedProcess[str]:
    """Run ``docl-flower filter check ARGS`` as a user would."""
    return subprocess.run(
        [CLI, "filter", "check", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_filter_check_decides_per_image(tiny_root, tmp_path):
    # Prepare: a two-user filter (digits 0 and 1) and four test images.
    images, labels = IdxDataset("mnist", str(tiny_root / "mnist"), verify=False).load("train")
    regs = [
        trained_registration(
            Identity()(images[class_indices(labels, u)]), u, u, epochs=30, std_scale=3.0
        )
        for u in (0, 1)
    ]
    info = {
        "config": {
            "features": {"_target_": "docl_flower.core.features.Identity"},
            "guard": {"alpha": 2.0},
        }
    }
    save_filter(tmp_path / "filter", regs, info=info)
    test_images, test_labels = IdxDataset("mnist", str(tiny_root / "mnist"), verify=False).load(
        "test"
    )
    folder = tmp_path / "uploads"
    folder.mkdir()
    for k, i in enumerate(
        [*np.flatnonzero(test_labels == 0)[:2], *np.flatnonzero(test_labels == 1)[:2]]
    ):
        Image.fromarray(test_images[i]).save(folder / f"{k}-digit{test_labels[i]}.png")
    # Execute: user 0 uploads them.
    proc = _filter_check(tmp_path / "filter", folder, "--uploader", "0")
    # Assert
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()[2:]]
    assert len(rows) == 4
    by_name = {Path(r[0]).name: r for r in rows}
    for name, row in by_name.items():
        digit = int(name.split("digit")[1][0])
        assert row[2] == str(digit)  # predicted class
        if digit == 0:
            assert row[5] == "share"  # the uploader's own images are shared
    assert "alpha 2.0" in proc.stdout


def test_filter_check_reports_bad_input(tmp_path):
    proc = _filter_check(tmp_path / "nothing", tmp_path, "--uploader", "0")
    assert proc.returncode == 2 and "filter check:" in proc.stderr
