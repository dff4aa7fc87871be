import gzip

import numpy as np
import pytest

from docl_flower.core.data.base import DataError
from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.data.partitions import Partition, class_indices

from .conftest import PROJECT_ROOT, write_idx


def test_shipped_mnist_loads_with_checksums_and_paper_counts():
    images, labels = IdxDataset("mnist", str(PROJECT_ROOT / "data" / "mnist")).load("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    counts = np.bincount(labels).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_corrupt_file_fails_its_checksum(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="SHA-256"):
        IdxDataset("mnist", str(tmp_path)).load("test")
    images, labels = IdxDataset("mnist", str(tmp_path), verify=False).load("test")
    assert images.shape == (2, 28, 28) and labels.tolist() == [0, 0]


def test_missing_file_without_download_says_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="missing"):
        IdxDataset("mnist", str(tmp_path), download=False).load("test")


def test_default_partition_is_user_i_owns_class_i():
    assert Partition().assignment(10) == {u: (u,) for u in range(10)}
    assert Partition(num_users=3, classes_per_user=2).assignment(10) == {
        0: (0, 1),
        1: (2, 3),
        2: (4, 5),
    }
    assert Partition(num_users=2, user_classes=[[7], [1, 9]]).assignment(10) == {0: (7,), 1: (1, 9)}


@pytest.mark.parametrize(
    "partition",
    [
        Partition(num_users=11),
        Partition(num_users=6, classes_per_user=2),
        Partition(num_users=2, user_classes=[[1], [1]]),
        Partition(num_users=1, user_classes=[[12]]),
        Partition(num_users=2, user_classes=[[1]]),
        Partition(num_users=2, fraction={0: 0.0}),
        Partition(num_users=2, fraction={5: 0.5}),
    ],
)
def test_invalid_partitions_are_rejected(partition):
    with pytest.raises(ValueError):
        partition.assignment(10)


def test_class_indices_keep_natural_counts_or_a_seeded_fraction():
    labels = np.array([0, 1, 1, 2, 1, 1, 0] * 10)
    assert class_indices(labels, 1).size == 40
    a = class_indices(labels, 1, fraction=0.1, seed=5)
    b = class_indices(labels, 1, fraction=0.1, seed=5)
    assert a.size == 4 and np.array_equal(a, b) and (labels[a] == 1).all()
    assert class_indices(labels, 2, fraction=0.01).size == 1


# ---------------------------------------- Fashion-MNIST, checksums, fingerprints

FASHION_FILES = {
    "train-images-idx3-ubyte.gz": np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28),
    "train-labels-idx1-ubyte.gz": np.array([0, 9, 4], np.uint8),
    "t10k-images-idx3-ubyte.gz": np.full((2, 28, 28), 7, np.uint8),
    "t10k-labels-idx1-ubyte.gz": np.array([1, 2], np.uint8),
}


def _write_fashion(folder, names=tuple(FASHION_FILES)):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        write_idx(folder / name, FASHION_FILES[name])
    return folder


def test_fashion_mnist_loads_as_registered_data_from_a_folder_with_the_four_files(tmp_path):
    # Prepare
    root = _write_fashion(tmp_path / "fashion-mnist")
    dataset = IdxDataset("fashion-mnist", str(root), verify=False, download=False)

    # Execute
    train_x, train_y = dataset.load("train")
    test_x, test_y = dataset.load("test")

    # Assert
    assert np.array_equal(train_x, FASHION_FILES["train-images-idx3-ubyte.gz"])
    assert train_y.dtype == np.int64 and train_y.tolist() == [0, 9, 4]
    assert test_x.shape == (2, 28, 28) and test_y.tolist() == [1, 2]
    assert dataset.image_shape == (28, 28)


def test_search_folders_supply_the_files_that_root_lacks(tmp_path):
    # Prepare: the test split in root (as data/ ships it), the train split elsewhere (as
    # Debian's dataset-fashion-mnist installs it).
    root = _write_fashion(tmp_path / "data", [n for n in FASHION_FILES if n.startswith("t10k")])
    system = _write_fashion(
        tmp_path / "system", [n for n in FASHION_FILES if n.startswith("train")]
    )
    dataset = IdxDataset(
        "fashion-mnist",
        str(root),
        verify=False,
        download=False,
        search=[str(tmp_path / "none"), str(system)],
    )

    # Execute
    train_x, _ = dataset.load("train")
    test_x, _ = dataset.load("test")

    # Assert
    assert train_x.shape == (3, 28, 28) and test_x.shape == (2, 28, 28)
    assert dataset.search == (str(tmp_path / "none"), str(system))


def test_missing_fashion_mnist_names_both_ways_to_get_it(tmp_path):
    # Prepare
    empty = tmp_path / "empty"
    empty.mkdir()
    dataset = IdxDataset(
        "fashion-mnist", str(empty), download=False, search=[str(tmp_path / "nope")]
    )

    # Execute
    with pytest.raises(DataError) as caught:
        dataset.load("train")

    # Assert: the Debian package, the folder, and the download.
    message = str(caught.value)
    assert "train-images-idx3-ubyte.gz" in message and str(empty) in message
    assert "dataset-fashion-mnist" in message and "/usr/share/datasets/fashion-mnist" in message
    assert "download: true" in message and "network" in message


def test_a_failed_fashion_mnist_download_names_both_ways_too(tmp_path, monkeypatch):
    # Prepare: no network here; make torchvision's downloader fail at once.
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(datasets, "FashionMNIST", offline)
    dataset = IdxDataset("fashion-mnist", str(tmp_path / "root"), download=True)

    # Execute
    with pytest.raises(DataError) as caught:
        dataset.load("train")

    # Assert
    message = str(caught.value)
    assert "dataset-fashion-mnist" in message and "no network" in message and "download" in message


def test_a_recompressed_archive_passes_by_its_decompressed_contents(tmp_path):
    # Prepare: the shipped test labels, recompressed (other gzip bytes, same contents), and a
    # copy whose contents differ by one byte.
    shipped = PROJECT_ROOT / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(shipped.read_bytes())
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder, data in ((good, raw), (bad, raw[:-1] + bytes([(raw[-1] + 1) % 256]))):
        folder.mkdir()
        (folder / shipped.name).write_bytes(gzip.compress(data, compresslevel=1, mtime=0))
    assert (good / shipped.name).read_bytes() != shipped.read_bytes()

    # Execute
    path = IdxDataset("mnist", str(good), download=False).path(shipped.name)

    # Assert
    assert path == good / shipped.name
    with pytest.raises(DataError, match="SHA-256"):
        IdxDataset("mnist", str(bad), download=False).path(shipped.name)


def test_idx_fingerprint_is_content_based(tmp_path):
    # Prepare: a copy with the same contents in other gzip bytes (header time stamp, level).
    root = _write_fashion(tmp_path / "a")
    same = _write_fashion(tmp_path / "b")
    for archive in same.iterdir():
        raw = gzip.decompress(archive.read_bytes())
        archive.write_bytes(gzip.compress(raw, compresslevel=1, mtime=12345))
        assert archive.read_bytes() != (root / archive.name).read_bytes()
    known_here = IdxDataset("mnist", str(PROJECT_ROOT / "data" / "mnist"))
    known_elsewhere = IdxDataset("mnist", str(tmp_path / "absent"), download=False)

    # Execute
    first = IdxDataset("fashion-mnist", str(root), verify=False).fingerprint()
    again = IdxDataset("fashion-mnist", str(root), verify=False).fingerprint()
    copy = IdxDataset("fashion-mnist", str(same), verify=False).fingerprint()
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([1, 3, 5], np.uint8))
    changed = IdxDataset("fashion-mnist", str(root), verify=False).fingerprint()

    # Assert: stable, folder-independent, sensitive to contents; verified MNIST needs no file.
    assert first == again == copy and changed != first
    assert known_here.fingerprint() == known_elsewhere.fingerprint()
    # Hashing the shipped files gives what their known contents give.
    unverified = IdxDataset("mnist", str(PROJECT_ROOT / "data" / "mnist"), verify=False)
    assert unverified.fingerprint() == known_here.fingerprint()
    assert known_here.fingerprint() != IdxDataset("fashion-mnist", "x").fingerprint()


def test_idx_dataset_rejects_bad_settings():
    with pytest.raises(ValueError, match="search"):
        IdxDataset("mnist", "root", search="one-folder")
    with pytest.raises(ValueError, match="verify"):
        IdxDataset("mnist", "root", verify="yes")
    with pytest.raises(ValueError, match="split"):
        IdxDataset("mnist", str(PROJECT_ROOT / "data" / "mnist")).load("validation")
