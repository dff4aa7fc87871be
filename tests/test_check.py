"""`docl-flower filter check` on a saved filter and image files, without Flower running."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import SafetensorError

from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.data.partitions import class_indices
from docl_flower.core.features.extractors import Identity
from docl_flower.core.filter.store import save_filter
from docl_flower.operations import check
from docl_flower.operations.check import main

from .conftest import PROJECT_ROOT, random_registration, trained_registration

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
            "dataset": {"image_shape": [28, 28]},
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


def _saved_filter(folder: Path, alpha: float = 1.5, max_alpha: float | None = 2.0) -> Path:
    """A two-user filter of random 784-4-784 autoencoders, with an Identity extractor."""
    guard: dict[str, object] = {"alpha": alpha}
    if max_alpha is not None:
        guard["max_alpha"] = max_alpha
    rng = np.random.default_rng(0)
    regs = [random_registration(rng, u, u, dim=784, hidden=4) for u in (0, 1)]
    info = {
        "config": {
            "features": {"_target_": "docl_flower.core.features.Identity"},
            "guard": guard,
            "dataset": {"image_shape": [28, 28]},
        }
    }
    save_filter(folder, regs, info=info)
    return folder


def _png(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def saved_filter(tmp_path: Path) -> Path:
    return _saved_filter(tmp_path / "filter")


def test_unreadable_files_get_one_error_line_each_and_the_rest_is_decided(
    saved_filter, tmp_path, capsys
):
    # Prepare: two good images, a text file, a truncated PNG and a dangling link.
    folder = tmp_path / "uploads"
    folder.mkdir()
    good = [_png(folder / "a.png", 1), _png(folder / "b.png", 2)]
    (folder / "notes.png").write_text("not an image\n")
    whole = _png(tmp_path / "whole.png", 3).read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    missing = tmp_path / "missing.png"
    # Execute
    code = main([str(saved_filter), str(folder), str(missing), "--uploader", "0"])
    out, err = capsys.readouterr()
    # Assert: exit 1, one error line per bad file, the good images decided.
    assert code == 1
    errors = err.splitlines()
    assert len(errors) == 4, err
    for name in ("notes.png", "cut.png", "gone.png", "missing.png"):
        assert sum(name in line for line in errors) == 1, err
    assert all(line.startswith("docl-flower filter check: ") for line in errors)
    assert "Traceback" not in err
    rows = [line.split("\t") for line in out.splitlines()[2:]]
    assert [Path(r[0]) for r in rows] == good
    assert all(r[5] in ("block", "share") for r in rows)


def test_all_files_readable_exits_0(saved_filter, tmp_path, capsys):
    image = _png(tmp_path / "a.png", 1)
    code = main([str(saved_filter), str(image), "--uploader", "-1", "--alpha", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert "alpha 2.0" in out and len(out.splitlines()) == 3


@pytest.mark.parametrize(
    ("max_alpha", "asked", "limit"),
    [(2.0, "2.5", "2"), (None, "1.6", "1.5")],  # None: a filter saved before max_alpha existed
)
def test_an_alpha_above_the_filters_max_alpha_is_refused(tmp_path, capsys, max_alpha, asked, limit):
    # Prepare: the upload check judged what a Guard up to max_alpha (or the saved alpha) blocks.
    folder = _saved_filter(tmp_path / "filter", alpha=1.5, max_alpha=max_alpha)
    image = _png(tmp_path / "a.png", 1)
    # Execute
    code = main([str(folder), str(image), "--uploader", "0", "--alpha", asked])
    # Assert: one line, exit 2, nothing decided.
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and f"max_alpha {limit}" in err, err
    assert main([str(folder), str(image), "--uploader", "0", "--alpha", limit]) == 0


BAD_ARGS = {
    "alpha zero": (["--alpha", "0"], "--alpha"),
    "alpha negative": (["--alpha", "-1"], "--alpha"),
    "alpha nan": (["--alpha", "nan"], "--alpha"),
    "alpha inf": (["--alpha", "inf"], "--alpha"),
    "alpha text": (["--alpha", "abc"], "--alpha"),
    "uploader text": (["--uploader", "abc"], "--uploader"),
    "uploader below -1": (["--uploader", "-2"], "--uploader"),
    "unknown guard": (["--guard", "lenient"], "--guard"),
    "image size zero": (["--image-size", "0", "28"], "--image-size"),
}


@pytest.mark.parametrize(("extra", "name"), BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_bad_arguments_print_usage_and_exit_2(saved_filter, tmp_path, capsys, extra, name):
    # Prepare
    image = _png(tmp_path / "a.png", 1)
    argv = [str(saved_filter), str(image), "--uploader", "0", *extra]
    # Execute
    with pytest.raises(SystemExit) as exc:
        main(argv)
    # Assert
    _, err = capsys.readouterr()
    assert exc.value.code == 2
    assert err.startswith("usage: docl-flower filter check")
    assert f"argument {name}" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["missing folder", "folder without filter.json"])
def test_a_folder_that_is_no_filter_prints_usage(tmp_path, capsys, kind):
    # Prepare
    folder = tmp_path / "filter"
    if kind != "missing folder":
        folder.mkdir()
        (folder / "notes.txt").write_text("hello\n")
    image = _png(tmp_path / "a.png", 1)
    # Execute
    with pytest.raises(SystemExit) as exc:
        main([str(folder), str(image), "--uploader", "0"])
    # Assert
    _, err = capsys.readouterr()
    assert exc.value.code == 2
    assert "usage:" in err and str(folder) in err
    assert ("no such folder" if kind == "missing folder" else "filter.json") in err


def test_a_corrupt_tensors_file_gives_one_line_and_exit_2(saved_filter, tmp_path, capsys):
    # Prepare: overwrite the safetensors header length (its first 8 bytes) with garbage.
    (tensors,) = saved_filter.glob("*.safetensors")
    data = bytearray(tensors.read_bytes())
    data[:8] = b"\xff" * 8
    tensors.write_bytes(bytes(data))
    image = _png(tmp_path / "a.png", 1)
    # Execute
    code = main([str(saved_filter), str(image), "--uploader", "0"])
    # Assert
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and str(saved_filter) in err, err
    assert err.startswith("docl-flower filter check: ")


def test_a_safetensors_error_gives_one_line_and_exit_2(saved_filter, tmp_path, capsys, monkeypatch):
    # Prepare: the reader fails as safetensors does on a header it cannot parse.
    def corrupt(folder):
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")

    monkeypatch.setattr(check, "load_filter", corrupt)
    image = _png(tmp_path / "a.png", 1)
    # Execute
    code = main([str(saved_filter), str(image), "--uploader", "0"])
    # Assert
    _, err = capsys.readouterr()
    assert code == 2
    assert err.splitlines() == [
        f"docl-flower filter check: {saved_filter}: cannot read the filter "
        "(Error while deserializing header: HeaderTooLarge)"
    ]


def test_a_filter_without_extractor_config_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    save_filter(tmp_path / "filter", [random_registration(rng, 0, 0, dim=784)], info={})
    image = _png(tmp_path / "a.png", 1)
    code = main([str(tmp_path / "filter"), str(image), "--uploader", "0"])
    _, err = capsys.readouterr()
    assert code == 2 and "no usable extractor" in err and len(err.splitlines()) == 1


def test_a_16_bit_png_gets_the_decision_of_its_8_bit_original(saved_filter, tmp_path, capsys):
    # Prepare: one digit-like image, as 8-bit and as 16-bit (v * 257) PNG, and an RGB copy.
    rng = np.random.default_rng(3)
    grey = (rng.random((28, 28)) * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    # Execute
    code = main([str(saved_filter), str(tmp_path), "--uploader", "-1"])
    # Assert: the same predicted owner, score and decision for the three files.
    assert code == 0
    rows = [line.split("\t")[1:] for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 3 and rows[0] == rows[1] == rows[2]


def test_a_face_filter_reads_the_extractor_and_image_shape_from_the_filter(tmp_path, capsys):
    # Prepare: a filter of 128-d autoencoders with the face extractor, as a face run saves it.
    rng = np.random.default_rng(0)
    regs = [random_registration(rng, u, u, dim=128, hidden=4) for u in (0, 1)]
    info = {
        "config": {
            "features": {"_target_": "docl_flower.core.features.FaceDescriptor"},
            "guard": {"alpha": 1.5, "sided": "one"},
            "dataset": {"image_shape": [112, 92]},
        }
    }
    save_filter(tmp_path / "filter", regs, info=info)
    photo = PROJECT_ROOT / "data" / "att-faces" / "s1" / "1.pgm"
    # Execute
    code = main([str(tmp_path / "filter"), str(photo), "--uploader", "-1"])
    # Assert
    out = capsys.readouterr().out
    assert code == 0 and "one-sided" in out and "1.pgm" in out


def test_filter_check_uses_the_alpha_the_run_calibrated_for_its_guard(tmp_path, capsys):
    # Prepare: a filter whose run calibrated the paper's one-sided Guard to alpha 0.8125.
    info = {
        "config": {
            "features": {"_target_": "docl_flower.core.features.Identity"},
            "guard": {"name": "paper", "alpha": 2.0, "sided": "one", "max_alpha": 3.0},
            "dataset": {"image_shape": [28, 28]},
        },
        "calibration": {"alpha": 0.8125, "guard": "paper", "sided": "one"},
    }
    save_filter(
        tmp_path / "filter",
        [random_registration(np.random.default_rng(0), 0, 0, dim=784)],
        info=info,
    )
    folder = tmp_path / "uploads"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "a.png")
    # Execute and Assert: the calibrated alpha for its rule, the fixed one for another rule,
    # and --alpha over both.
    # (in-process: the command's own start is tested above)
    outputs = []
    for extra in ([], ["--guard", "strict"], ["--alpha", "1.25"]):
        assert main([str(tmp_path / "filter"), str(folder), "--uploader", "0", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    paper, strict, given = outputs
    assert "alpha 0.8125" in paper
    assert "alpha 2.0" in strict
    assert "alpha 1.25" in given
