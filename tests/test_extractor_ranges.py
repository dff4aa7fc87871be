"""The extractor-range measurement (experiments/extractor_ranges.py) on tiny made-up images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from docl_flower.experiments import extractor_ranges as ranges

from .conftest import write_idx


def _pgm(path, pixels, comment=b""):
    h, w = pixels.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"P5\n" + comment + f"{w} {h}\n255\n".encode() + pixels.tobytes())


def test_pgm_files_are_read_and_16_bit_ones_refused(tmp_path):
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    _pgm(tmp_path / "a.pgm", pixels, comment=b"# made here\n")
    assert (ranges.read_pgm(tmp_path / "a.pgm") == pixels).all()
    (tmp_path / "b.pgm").write_bytes(b"P5 2 2 65535 " + bytes(8))
    with pytest.raises(ValueError, match="16-bit"):
        ranges.read_pgm(tmp_path / "b.pgm")
    (tmp_path / "c.pgm").write_bytes(b"P2 2 2 255 0 0 0 0")
    with pytest.raises(ValueError, match="not a binary PGM"):
        ranges.read_pgm(tmp_path / "c.pgm")


def test_each_set_is_summarised_with_its_no_face_count(tmp_path):
    # Prepare: an ORL folder of 40 people x 10 photos (2 x 2 pixels), 5 MNIST test digits.
    for person in range(1, 41):
        for k in range(1, 11):
            _pgm(tmp_path / "orl" / f"s{person}" / f"{k}.pgm", np.full((2, 2), person, np.uint8))
    (tmp_path / "mnist").mkdir()
    digits = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", digits)
    settings = ranges.RangeSettings(
        "face", orl=tmp_path / "orl", mnist_root=tmp_path / "mnist", mnist=3, orl_count=20
    )
    calls = []

    def extract(images):
        calls.append(len(images))
        # Two features: the image's mean pixel, and minus it.
        mean = torch.from_numpy(images.reshape(len(images), -1).mean(axis=1))
        return torch.stack([mean, -mean], dim=1), 1

    # Execute
    out = ranges.measure(settings, extract)
    # Assert: one untimed call on one image, then the set (20 of 400 ORL photos, 3 digits).
    assert calls == [1, 20, 1, 3]
    assert out[0] == "ORL: no face detected in 1 of 20 images"
    assert out[1].startswith("face on ORL: n=20 D=2")
    assert "global min -2.0000 max 2.0000" in out[1]  # people 1 and 2: pixel values 1 and 2
    assert "per-dimension min: -2.0000..1.0000; max: -1.0000..2.0000" in out[1]
    assert out[2] == "MNIST: no face detected in 1 of 3 images"
    assert ranges.load_mnist(tmp_path / "mnist", 3).shape == (3, 28, 28)
    images, labels = ranges.load_orl(tmp_path / "orl")
    assert images.shape == (400, 2, 2) and labels[::10].tolist() == list(range(40))


def test_an_unknown_extractor_is_refused():
    with pytest.raises(ValueError, match="one of"):
        ranges.raw_extractor(ranges.RangeSettings("sift"))
