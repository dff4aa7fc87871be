import numpy as np
import pytest

from docl_flower.core.data import DataError, IdxDataset, Partition, class_indices

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
