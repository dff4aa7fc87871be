"""The pluggable data sets: image folders, the ORL faces, CIFAR-10, and the random-class draw."""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from docl_flower.core.data.base import DataError, ImageDataset
from docl_flower.core.data.catalog import DATASETS, as_image_dataset
from docl_flower.core.data.cifar import CIFAR10_SHA256, Cifar10Dataset
from docl_flower.core.data.folders import ImageFolderDataset, natural_key
from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.data.partitions import PARTITIONS, Partition, random_classes_partition
from docl_flower.core.pipeline.components import build

from .conftest import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"
DATA = PROJECT_ROOT / "data"

# ---------------------------------------------------------------- helpers


def _save(path: Path, image: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _digit() -> np.ndarray:
    """A real 28x28 digit (the first MNIST test image)."""
    images, _ = IdxDataset("mnist", str(DATA / "mnist")).load("test")
    return images[0]


def _dataset_yaml(option: str) -> dict:
    """A dataset option's YAML, resolved with the repository's data/ as data_root."""
    cfg = OmegaConf.create({"data_root": str(DATA), "seed": 0})
    cfg.dataset = OmegaConf.load(CONF / "dataset" / f"{option}.yaml")
    return OmegaConf.to_container(cfg.dataset, resolve=True)


def _build(node: dict) -> ImageDataset:
    args = {k: v for k, v in node.items() if k not in ("num_classes", "image_shape", "harmless")}
    return as_image_dataset(build("dataset", args))


# ---------------------------------------------------------------- image folders


@pytest.fixture
def mixed_tree(tmp_path: Path) -> Path:
    """Classes of every image kind PIL reads, plus a corrupt file and a one-image class."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    for i in range(4):  # "a": 8-bit grey PNG
        _save(root / "a" / f"{i}.png", Image.fromarray((grey + 40 * i).astype(np.uint8)))
    for i in range(4):  # "b": RGB JPEG, palette PNG, 16-bit PNG, PGM
        rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        _save(root / "b" / f"{i}.jpg", Image.fromarray(rgb))
    _save(root / "b" / "p.png", Image.fromarray(grey).convert("RGB").quantize(16))
    _save(root / "b" / "w.png", Image.fromarray(grey.astype(np.uint16) * 257))
    _save(root / "b" / "g.pgm", Image.fromarray(grey))
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "b" / "notes.txt").write_text("not an image: ignored")
    _save(root / "c10" / "only.png", Image.fromarray(grey))  # one image
    _save(root / "c2" / "0.bmp", Image.fromarray(grey))
    _save(root / "c2" / "1.bmp", Image.fromarray(255 - grey))
    (root / "README").write_text("top-level files are not classes")
    return root


def test_image_folder_reads_every_kind_skips_the_corrupt_file_and_reports_it(mixed_tree, caplog):
    # Prepare
    dataset = ImageFolderDataset(str(mixed_tree), image_size=[16, 16], test_per_class=1)

    # Execute
    with caplog.at_level(logging.WARNING, logger="docl_flower.core.data.folders"):
        train_x, train_y = dataset.load("train")
        test_x, test_y = dataset.load("test")

    # Assert: classes in natural order; c10 keeps its only image for training.
    assert dataset.classes() == ["a", "b", "c2", "c10"]
    counts = np.bincount(np.concatenate([train_y, test_y]), minlength=4).tolist()
    assert counts == [4, 7, 2, 1]  # b: 4 JPEG + palette + 16-bit + PGM; broken.png skipped
    assert np.bincount(test_y, minlength=4).tolist() == [1, 1, 1, 0]
    assert train_x.dtype == np.uint8 and train_x.shape[1:] == (16, 16) and train_y.dtype == np.int64
    assert test_x.shape == (3, 16, 16)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1 and "broken.png" in warnings[0] and "skipped 1 unreadable" in warnings[0]
    )


def test_image_folder_converts_mode_and_size(mixed_tree):
    # Prepare
    grey_small = ImageFolderDataset(str(mixed_tree), image_size=[8, 12], mode="L")
    rgb = ImageFolderDataset(str(mixed_tree), image_size=[16, 16], mode="RGB")

    # Execute
    small_x, _ = grey_small.load("train")
    rgb_x, rgb_y = rgb.load("train")

    # Assert
    assert small_x.shape[1:] == (8, 12) == grey_small.image_shape
    assert rgb_x.shape[1:] == (16, 16, 3) == rgb.image_shape
    first_a = np.asarray(Image.open(mixed_tree / "a" / "0.png").convert("RGB"))
    assert any(np.array_equal(x, first_a) for x in rgb_x[rgb_y == 0])


def test_sixteen_bit_png_of_a_digit_gives_its_8_bit_original(tmp_path):
    # Prepare: both 16-bit encodings of 8-bit data (v * 257 and v << 8).
    digit = _digit()
    _save(tmp_path / "d" / "8bit.png", Image.fromarray(digit))
    _save(tmp_path / "d" / "x257.png", Image.fromarray(digit.astype(np.uint16) * 257))
    _save(tmp_path / "d" / "x256.png", Image.fromarray(digit.astype(np.uint16) << 8))
    assert Image.open(tmp_path / "d" / "x257.png").mode.startswith("I")
    dataset = ImageFolderDataset(str(tmp_path), image_size=[28, 28], test_per_class=0)

    # Execute
    images, _ = dataset.load("train")

    # Assert
    assert images.shape == (3, 28, 28)
    for image in images:
        assert np.abs(image.astype(int) - digit.astype(int)).max() <= 1


def test_exif_orientation_is_applied(tmp_path):
    # Prepare: stored 40 wide x 20 high, left half white; EXIF 6 = rotate 90 degrees clockwise
    # to display, so the displayed image is 20 wide x 40 high with its top half white.
    stored = np.zeros((20, 40), np.uint8)
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(tmp_path / "c" / "rotated.jpg", Image.fromarray(stored), exif=exif, quality=95)
    dataset = ImageFolderDataset(str(tmp_path), image_size=[40, 20], test_per_class=0)

    # Execute
    (image,), _ = dataset.load("train")

    # Assert
    assert image.shape == (40, 20)
    assert image[:20].mean() > 200 and image[20:].mean() < 50


def test_split_is_seeded_and_deterministic(tmp_path):
    # Prepare: 3 classes x 10 images, each image a distinct constant value.
    for c in range(3):
        for i in range(10):
            _save(
                tmp_path / f"k{c}" / f"{i}.png",
                Image.fromarray(np.full((4, 4), 10 * c + i, np.uint8)),
            )

    def test_ids(seed: int, **split: object) -> list[int]:
        dataset = ImageFolderDataset(str(tmp_path), image_size=[4, 4], split_seed=seed, **split)
        images, _ = dataset.load("test")
        return images[:, 0, 0].tolist()

    # Execute
    first, again, other = (
        test_ids(1, test_per_class=3),
        test_ids(1, test_per_class=3),
        test_ids(2, test_per_class=3),
    )
    by_fraction = test_ids(1, test_fraction=0.2)
    train, _ = ImageFolderDataset(
        str(tmp_path), image_size=[4, 4], split_seed=1, test_per_class=3
    ).load("train")

    # Assert
    assert first == again and first != other and len(first) == 9
    assert len(by_fraction) == 6
    assert sorted(first + train[:, 0, 0].tolist()) == list(range(30))  # disjoint, complete


def test_flat_folder_is_a_harmless_set_in_its_test_split(tmp_path):
    # Prepare
    for i in range(3):
        _save(
            tmp_path / "any" / "where" / f"{i}.png", Image.fromarray(np.full((5, 5), i, np.uint8))
        )
    dataset = ImageFolderDataset(str(tmp_path), image_size=[5, 5], flat=True)

    # Execute
    test_x, test_y = dataset.load("test")
    train_x, train_y = dataset.load("train")

    # Assert
    assert test_x.shape == (3, 5, 5) and test_y.tolist() == [-1, -1, -1]
    assert train_x.shape == (0, 5, 5) and train_y.shape == (0,)


def test_image_folder_errors_are_clear(tmp_path):
    # Prepare
    (tmp_path / "no-classes").mkdir()
    (tmp_path / "empty-class" / "a").mkdir(parents=True)
    _save(tmp_path / "empty-class" / "b" / "0.png", Image.fromarray(np.zeros((4, 4), np.uint8)))
    (tmp_path / "all-corrupt" / "a").mkdir(parents=True)
    (tmp_path / "all-corrupt" / "a" / "0.png").write_bytes(b"garbage")

    def load(name: str) -> None:
        ImageFolderDataset(str(tmp_path / name), image_size=[4, 4]).load("train")

    # Execute / Assert
    with pytest.raises(DataError, match="no class folders"):
        load("no-classes")
    with pytest.raises(DataError, match=r"empty-class.a: class folder holds no image"):
        load("empty-class")
    with pytest.raises(DataError, match="no readable training image"):
        load("all-corrupt")
    with pytest.raises(DataError, match="not a folder"):
        load("absent")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"image_size": [28]}, "image_size"),
        ({"image_size": [0, 4]}, "image_size"),
        ({"mode": "CMYK"}, "mode"),
        ({"test_per_class": 2, "test_fraction": 0.2}, "test_per_class"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_per_class": -1}, "test_per_class"),
        ({"sha256": "abc"}, "sha256"),
        ({"flat": "no"}, "flat"),
    ],
)
def test_image_folder_settings_are_validated_with_the_key_first(kwargs, key):
    args = {"root": "somewhere", "image_size": [4, 4], **kwargs}
    with pytest.raises(ValueError, match=f"^{key}"):
        ImageFolderDataset(**args)


def test_image_folder_fingerprint_follows_contents_and_parameters(mixed_tree):
    # Prepare
    dataset = ImageFolderDataset(str(mixed_tree), image_size=[16, 16], test_per_class=1)
    base = dataset.fingerprint()

    # Execute
    same = ImageFolderDataset(str(mixed_tree), image_size=[16, 16], test_per_class=1).fingerprint()
    other_seed = ImageFolderDataset(
        str(mixed_tree), image_size=[16, 16], test_per_class=1, split_seed=3
    ).fingerprint()
    other_mode = ImageFolderDataset(
        str(mixed_tree), image_size=[16, 16], test_per_class=1, mode="RGB"
    ).fingerprint()
    _save(mixed_tree / "a" / "0.png", Image.fromarray(np.zeros((16, 16), np.uint8)))
    changed = dataset.fingerprint()

    # Assert
    assert base == same
    assert len({base, other_seed, other_mode, changed}) == 4


def test_natural_sort_orders_numbers_by_value():
    names = ["s10", "s2", "s1", "S3", "b", "a10", "a9", "10"]
    assert sorted(names, key=natural_key) == ["10", "a9", "a10", "b", "s1", "s2", "S3", "s10"]


# ---------------------------------------------------------------- ORL faces


def test_att_faces_option_loads_40_people_7_train_3_test():
    # Prepare
    node = _dataset_yaml("att_faces")
    dataset = _build(node)

    # Execute
    train_x, train_y = dataset.load("train")
    test_x, test_y = dataset.load("test")
    fingerprint = dataset.fingerprint()

    # Assert
    assert isinstance(dataset, ImageFolderDataset)
    assert dataset.classes() == [f"s{i}" for i in range(1, 41)]
    assert train_x.shape == (280, 112, 92) and test_x.shape == (120, 112, 92)
    assert np.bincount(train_y).tolist() == [7] * 40 and np.bincount(test_y).tolist() == [3] * 40
    assert tuple(node["image_shape"]) == dataset.image_shape == (112, 92)
    assert node["num_classes"] == 40 and node["harmless"] == "unregistered"
    # Class 1 is s2: its images are s2's files.
    s2 = {np.asarray(Image.open(p)).tobytes() for p in (DATA / "att-faces" / "s2").glob("*.pgm")}
    assert {x.tobytes() for x in np.concatenate([train_x[train_y == 1], test_x[test_y == 1]])} == s2
    # Stable across loads and objects.
    assert _build(_dataset_yaml("att_faces")).fingerprint() == fingerprint == dataset.fingerprint()


def test_att_faces_files_are_pinned_by_their_checksum(tmp_path):
    # Prepare: a copy with one photo missing.
    node = _dataset_yaml("att_faces")
    copy = tmp_path / "att-faces"
    for person in range(1, 41):
        for src in (DATA / "att-faces" / f"s{person}").glob("*.pgm"):
            (copy / f"s{person}").mkdir(parents=True, exist_ok=True)
            (copy / f"s{person}" / src.name).write_bytes(src.read_bytes())
    (copy / "s7" / "3.pgm").unlink()

    # Execute / Assert
    with pytest.raises(DataError, match="SHA-256"):
        _build({**node, "root": str(copy)}).load("train")


# ---------------------------------------------------------------- CIFAR-10


def _cifar_archive(
    folder: Path, per_batch: int = 2, test: int = 3, protocol: int = 2
) -> tuple[Path, dict]:
    """A small archive in CIFAR-10's python format, and its images and labels per split."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cifar-10-python.tar.gz"
    expected: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            n = test if name == "test_batch" else per_batch
            images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, 10, n).tolist()
            batch = {
                b"batch_label": name.encode(),
                b"labels": labels,
                b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072),  # R, G, B planes
                b"filenames": [f"{i}.png".encode() for i in range(n)],
            }
            raw = pickle.dumps(batch, protocol=protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
            split = "test" if name == "test_batch" else "train"
            expected[split][0].append(images)
            expected[split][1].extend(labels)
    return path, {s: (np.concatenate(x), np.array(y)) for s, (x, y) in expected.items()}


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_reads_batches_from_the_archive(tmp_path, protocol):
    # Prepare
    path, expected = _cifar_archive(tmp_path / "cifar", protocol=protocol)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    dataset = Cifar10Dataset(root=str(path.parent), sha256=digest, download=False)

    # Execute
    train_x, train_y = dataset.load("train")
    test_x, test_y = dataset.load("test")

    # Assert
    assert train_x.shape == (10, 32, 32, 3) and train_x.dtype == np.uint8 == test_x.dtype
    assert test_x.shape == (3, 32, 32, 3) == (3, *dataset.image_shape)
    assert np.array_equal(train_x, expected["train"][0]) and np.array_equal(
        test_x, expected["test"][0]
    )
    assert train_y.dtype == np.int64 and train_y.tolist() == expected["train"][1].tolist()
    assert test_y.tolist() == expected["test"][1].tolist()
    assert not (path.parent / "cifar-10-batches-py").exists()  # nothing extracted
    assert dataset.fingerprint() == Cifar10Dataset(root="elsewhere", sha256=digest).fingerprint()
    assert dataset.fingerprint() != Cifar10Dataset(root="elsewhere").fingerprint()


def test_cifar10_refuses_a_wrong_checksum_and_names_the_fix(tmp_path):
    # Prepare: the default checksum is the official archive's, which this one is not.
    path, _ = _cifar_archive(tmp_path / "cifar")
    dataset = Cifar10Dataset(root=str(path.parent), download=False)

    # Execute
    with pytest.raises(DataError) as caught:
        dataset.load("test")

    # Assert
    message = str(caught.value)
    assert "SHA-256" in message and CIFAR10_SHA256 in message and str(path) in message


def test_cifar10_missing_archive_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"missing.*cifar-10-python.tar.gz.*network"):
        Cifar10Dataset(root=str(tmp_path), download=False).load("train")


def test_cifar10_pickles_cannot_call_anything(tmp_path):
    # Prepare: a batch whose pickle would call a function on load.
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ["test_batch"]:
            raw = pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    # Execute / Assert
    with pytest.raises(DataError, match="not allowed"):
        Cifar10Dataset(root=str(tmp_path), sha256=digest, download=False).load("test")


def test_cifar10_settings_are_validated():
    with pytest.raises(ValueError, match=r"^sha256"):
        Cifar10Dataset(root="x", sha256="md5:c58f30108f718f92721af3b95e74349a")
    with pytest.raises(ValueError, match=r"^filename"):
        Cifar10Dataset(root="x", filename="../escape.tar.gz")


# ---------------------------------------------------------------- dataset options and registry


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "dataset").glob("*.yaml")))
def test_every_dataset_option_declares_its_shape_and_builds(option):
    # Prepare
    node = _dataset_yaml(option)

    # Execute
    dataset = _build(node)

    # Assert
    assert node["_target_"] in DATASETS
    assert isinstance(node["num_classes"], int) and node["num_classes"] >= 2
    assert "harmless" in node
    assert tuple(node["image_shape"]) == dataset.image_shape
    harmless = node["harmless"]
    if isinstance(harmless, dict):
        assert tuple(node["image_shape"]) == _build(harmless).image_shape


def test_fashion_mnist_option_searches_the_debian_folder():
    node = _dataset_yaml("fashion_mnist")
    assert node["root"] == str(DATA / "fashion-mnist")
    assert node["search"] == ["/usr/share/datasets/fashion-mnist"]
    assert node["harmless"]["name"] == "mnist"


def test_as_image_dataset_refuses_other_objects():
    with pytest.raises(ValueError, match="dataset"):
        as_image_dataset(Partition())


# ---------------------------------------------------------------- random classes


def test_random_classes_draws_distinct_classes_per_seed():
    # Execute
    draws = {seed: random_classes_partition(10, 40, seed).assignment(40) for seed in range(5)}
    again = random_classes_partition(10, 40, 3).assignment(40)

    # Assert
    for table in draws.values():
        owned = [c for classes in table.values() for c in classes]
        assert sorted(table) == list(range(10)) and all(len(cs) == 1 for cs in table.values())
        assert len(set(owned)) == 10 and all(0 <= c < 40 for c in owned)
    assert again == draws[3]
    assert len({tuple(t.values()) for t in draws.values()}) == 5


def test_random_classes_is_registered_and_validated():
    assert PARTITIONS["docl_flower.core.data.random_classes_partition"] is random_classes_partition
    node = OmegaConf.load(CONF / "partition" / "random_classes.yaml")
    assert OmegaConf.to_container(node)["draw_seed"] == "${seed}"
    with pytest.raises(ValueError, match=r"^num_users"):
        random_classes_partition(41, 40, 0)
    with pytest.raises(ValueError, match=r"^draw_seed"):
        random_classes_partition(2, 40, -1)


def test_gzip_helpers_are_not_fooled_by_plain_files(tmp_path):
    # An IDX "archive" that is not gzip is a clear DataError, not a crash.
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"plain")
    with pytest.raises(DataError, match="gzip"):
        IdxDataset("x", str(tmp_path), verify=False, download=False).image_shape  # noqa: B018
