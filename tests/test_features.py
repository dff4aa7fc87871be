"""Feature extractors (pixels, dlib faces, EfficientNet-Lite0, ResNet) and the feature cache."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from docl_flower.core.common import files
from docl_flower.core.common.files import file_sha256
from docl_flower.core.features.cache import FeatureCache, array_fingerprint, default_folder
from docl_flower.core.features.extractors import (
    EXTRACTORS,
    Deskew,
    EfficientNetLite0,
    Extraction,
    FaceDescriptor,
    FeatureExtractor,
    Identity,
    ResNetFeatures,
    describe,
)
from docl_flower.core.pipeline.components import build

from .conftest import PROJECT_ROOT

ORL = PROJECT_ROOT / "data" / "att-faces"


def read_pgm(path: Path) -> np.ndarray:
    """A binary 8-bit PGM image as ``(H, W)`` uint8."""
    data = path.read_bytes()
    match = re.match(rb"P5\s+(?:#.*\s+)*(\d+)\s+(\d+)\s+(\d+)\s", data)
    assert match is not None, path
    w, h = int(match.group(1)), int(match.group(2))
    return np.frombuffer(data, np.uint8, count=w * h, offset=match.end()).reshape(h, w).copy()


def orl(people: range, shots: range) -> tuple[np.ndarray, np.ndarray]:
    """ORL images ``(n, 112, 92)`` of the given people (1-40) and shots (1-10), with labels."""
    images = [read_pgm(ORL / f"s{p}" / f"{k}.pgm") for p in people for k in shots]
    labels = [p for p in people for _ in shots]
    return np.stack(images), np.asarray(labels)


@pytest.fixture(scope="module")
def faces() -> tuple[np.ndarray, np.ndarray]:
    return orl(range(1, 5), range(1, 4))  # 4 people x 3 images


@pytest.fixture(scope="module")
def face_features(faces: tuple[np.ndarray, np.ndarray]) -> Extraction:
    return FaceDescriptor().extract(faces[0])


def in_unit_range(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all() and (x >= 0).all() and (x <= 1).all())


# ------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_every_registered_extractor_follows_the_protocol(name: str) -> None:
    # Prepare / Execute
    extractor = build(
        "features", {"_target_": name, **({"weights": "random"} if "ResNet" in name else {})}
    )
    # Assert
    assert isinstance(extractor, FeatureExtractor)
    assert isinstance(extractor.key(), str) and extractor.key()
    assert describe(extractor)
    assert extractor.key() == type(extractor)(**_init_args(extractor)).key()


def _init_args(obj: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


@pytest.mark.parametrize("name", ["face", "imagenet", "resnet", "identity", "deskew"])
def test_yaml_configs_build_their_extractor_with_the_documented_constants(name: str) -> None:
    import yaml

    # Prepare
    node = yaml.safe_load((PROJECT_ROOT / "conf" / "features" / f"{name}.yaml").read_text())
    # Execute
    extractor = build("features", node)
    # Assert: the YAML spells out every constructor default (saved with the filter's config)
    assert extractor == type(extractor)()


# ------------------------------------------------------------------- pixel extractors


def test_identity_flattens_grey_and_rgb_without_touching_its_input() -> None:
    # Prepare
    grey = torch.full((2, 4, 5), 255.0)
    rgb = np.full((2, 4, 5, 3), 51, dtype=np.uint8)
    # Execute
    out_grey, out_rgb = Identity()(grey), Identity()(rgb)
    # Assert
    assert out_grey.shape == (2, 20) and torch.all(out_grey == 1.0)
    assert grey.max() == 255.0  # the caller's tensor is not divided in place
    assert out_rgb.shape == (2, 60) and torch.allclose(out_rgb, torch.full((2, 60), 0.2))
    assert Identity().dim((4, 5, 3)) == 60 and not Identity().cacheable


def test_deskew_converts_rgb_to_luminance() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    # Execute
    a, b = Deskew()(grey), Deskew()(torch.from_numpy(rgb))
    # Assert
    assert a.shape == b.shape == (3, 784)
    assert torch.allclose(a, b, atol=1e-5)
    assert Deskew().dim((28, 28, 3)) == 784 and not Deskew().cacheable


# ------------------------------------------------------------------------ dlib faces


def test_face_descriptors_are_128_values_in_unit_range(face_features: Extraction) -> None:
    # Assert
    assert face_features.features.shape == (12, 128)
    assert face_features.features.dtype == torch.float32
    assert in_unit_range(face_features.features)
    assert face_features.fallback.shape == (12,)


def test_same_person_is_closer_than_different_people(
    faces: tuple[np.ndarray, np.ndarray], face_features: Extraction
) -> None:
    # Prepare
    labels = faces[1]
    dist = torch.cdist(face_features.features, face_features.features)
    same = torch.from_numpy(labels[:, None] == labels[None, :])
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    # Execute
    intra = dist[same & off_diagonal].mean()
    inter = dist[~same].mean()
    # Assert
    assert intra < 0.7 * inter


def test_a_blank_image_counts_as_no_face_and_still_gets_a_descriptor(
    faces: tuple[np.ndarray, np.ndarray],
) -> None:
    # Prepare
    extractor = FaceDescriptor()
    images = np.stack([faces[0][0], np.zeros_like(faces[0][0])])
    # Execute
    features, no_face = extractor.extract_with_count(images)
    # Assert
    assert features.shape == (2, 128) and in_unit_range(features)
    assert no_face == 1
    assert extractor.stats.last_fallback == 1 and extractor.stats.images == 2
    assert extractor.extract(images).fallback.tolist() == [False, True]


def test_grey_rgb_and_tensor_input_give_the_same_face_descriptor(
    faces: tuple[np.ndarray, np.ndarray], face_features: Extraction
) -> None:
    # Prepare
    grey = faces[0][:2]
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    # Execute
    from_rgb = FaceDescriptor()(rgb)
    from_tensor = FaceDescriptor()(torch.from_numpy(grey))
    # Assert
    assert torch.allclose(from_rgb, face_features.features[:2], atol=1e-6)
    assert torch.allclose(from_tensor, face_features.features[:2], atol=1e-6)


def test_face_key_holds_the_model_hashes_and_the_parameters() -> None:
    # Prepare
    from docl_flower.core.features.extractors import FACE_RECOGNITION, face_models_folder

    digest = file_sha256(face_models_folder() / FACE_RECOGNITION)
    # Execute
    key, other = FaceDescriptor().key(), FaceDescriptor(low=-0.5).key()
    # Assert
    assert digest in key and key != other
    assert FaceDescriptor().cacheable and not FaceDescriptor().spatial
    with pytest.raises(ValueError, match="low must be < high"):
        FaceDescriptor(low=1.0, high=0.0)


def test_non_uint8_images_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        FaceDescriptor()(np.zeros((1, 20, 20), dtype=np.float32))


# -------------------------------------------------------------------------- imagenet


def test_imagenet_features_are_deterministic_1280_values_in_unit_range(
    faces: tuple[np.ndarray, np.ndarray],
) -> None:
    # Prepare
    rng = np.random.default_rng(1)
    digits = rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    extractor = EfficientNetLite0(batch_size=2)
    # Execute
    face_out = extractor(faces[0][:3])
    again = EfficientNetLite0()(faces[0][:3])
    rgb_out = extractor(np.repeat(faces[0][:1, ..., None], 3, axis=-1))
    digit_out = extractor(torch.from_numpy(digits))
    # Assert
    assert face_out.shape == (3, 1280) and digit_out.shape == (2, 1280)
    assert in_unit_range(face_out) and in_unit_range(digit_out)
    assert torch.allclose(face_out, again, atol=1e-6)
    assert torch.allclose(rgb_out, face_out[:1], atol=1e-6)
    assert extractor.stats.clipped == 0
    assert file_sha256(_lite0_weights()) in extractor.key()


def _lite0_weights() -> Path:
    from docl_flower.core.features.extractors import efficientnet_lite0_weights

    return efficientnet_lite0_weights()


# ---------------------------------------------------------------------------- resnet


def test_resnet_random_weights_give_512_and_2048_values_in_unit_range() -> None:
    # Prepare
    images = np.random.default_rng(2).integers(0, 256, size=(2, 40, 40), dtype=np.uint8)
    # Execute
    small = ResNetFeatures(arch="resnet18", weights="random", image_size=64)(images)
    large = ResNetFeatures(arch="resnet50", weights="random", image_size=64)(images)
    # Assert
    assert small.shape == (2, 512) and large.shape == (2, 2048)
    assert in_unit_range(small) and in_unit_range(large)
    torch.nn.Linear(512, 1)(small).sum().backward()  # ordinary tensors: usable for training


def test_resnet_loads_a_named_weights_file_and_keys_it_by_its_hash(tmp_path: Path) -> None:
    import torchvision

    # Prepare: the state dict of the seed-0 random network, written to a file
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    images = np.random.default_rng(3).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    # Execute
    from_file = ResNetFeatures(weights=str(path), image_size=64)
    features = from_file(images)
    # Assert
    assert hashlib.sha256(path.read_bytes()).hexdigest() in from_file.key()
    reference = ResNetFeatures(weights="random", seed=0, image_size=64)(images)
    assert torch.allclose(features, reference, atol=1e-5)
    assert from_file.key() != ResNetFeatures(weights="random", image_size=64).key()


def test_resnet_refuses_a_weights_file_of_another_architecture(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    # Execute / Assert
    with pytest.raises(ValueError, match="not a torchvision resnet18 state dict"):
        ResNetFeatures(weights=str(path))(np.zeros((1, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="arch"):
        ResNetFeatures(arch="vgg16", weights="random")


def test_resnet_imagenet_weights_offline_name_the_two_ways_out(monkeypatch) -> None:
    import torchvision.models

    # Prepare: the download fails as it does without network
    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models, "resnet50", offline)
    extractor = ResNetFeatures(arch="resnet50", weights="imagenet")
    # Execute / Assert
    with pytest.raises(RuntimeError) as err:
        extractor(np.zeros((1, 32, 32), dtype=np.uint8))
    message = str(err.value)
    assert "network" in message and "features.weights" in message and "state-dict" in message
    assert "resnet50-" in extractor.key()  # the weights' identity is known without the download


# ----------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class Counting:
    """A fast extractor that counts its calls: mean and max pixel, times ``scale``."""

    scale: float = 1.0
    calls: list[int] | None = None

    def __call__(self, images: Any) -> torch.Tensor:
        return self.extract(images).features

    def extract(self, images: Any) -> Extraction:
        if self.calls is not None:
            self.calls.append(len(images))
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32).flatten(1) / 255.0
        out = torch.stack([x.mean(1), x.amax(1), x.amin(1)], dim=1) * self.scale
        return Extraction(out, np.asarray(x.amax(1) == 0))

    def dim(self, image_shape: tuple[int, ...]) -> int:
        return 3

    @property
    def spatial(self) -> bool:
        return False

    @property
    def cacheable(self) -> bool:
        return True

    def key(self) -> str:
        return f"Counting(scale={self.scale})"


def images_loader(images: np.ndarray, loads: list[int]) -> Any:
    def load() -> np.ndarray:
        loads.append(1)
        return images

    return load


@pytest.fixture
def data() -> np.ndarray:
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(10, 6, 6), dtype=np.uint8)
    images[3] = 0  # a "no face" image: its fallback flag is stored
    return images


def test_features_are_computed_once_then_read_from_disk(tmp_path: Path, data: np.ndarray) -> None:
    # Prepare
    calls: list[int] = []
    loads: list[int] = []
    extractor = Counting(calls=calls)
    load = images_loader(data, loads)
    # Execute
    first = FeatureCache(tmp_path, chunk=4).features("ds", extractor, "train", load)
    second = FeatureCache(tmp_path).features("ds", extractor, "train", load)
    # Assert
    assert calls == [4, 4, 2] and loads == [1]  # computed in chunks, once; images loaded once
    assert torch.equal(first, second) and first.dtype == torch.float32
    assert torch.allclose(first, extractor(data))


def test_rows_read_only_a_subset_with_their_fallback_flags(
    tmp_path: Path, data: np.ndarray
) -> None:
    # Prepare
    cache = FeatureCache(tmp_path)
    loads: list[int] = []
    full = cache.features("ds", Counting(), "train", images_loader(data, loads))
    rows = np.array([7, 3, 0])
    # Execute
    part = cache.extract("ds", Counting(), "train", images_loader(data, loads), rows=rows)
    # Assert
    assert torch.equal(part.features, full[rows])
    assert part.fallback.tolist() == [False, True, False]
    assert loads == [1]
    with pytest.raises(IndexError):
        cache.features("ds", Counting(), "train", images_loader(data, loads), rows=np.array([10]))


@pytest.mark.parametrize(
    "damage", ["truncate", "garbage", "wrong_shape", "out_of_range", "bad_meta", "no_flags"]
)
def test_a_damaged_entry_is_recomputed(tmp_path: Path, data: np.ndarray, damage: str) -> None:
    # Prepare
    calls: list[int] = []
    cache = FeatureCache(tmp_path)
    extractor = Counting(calls=calls)
    good = cache.features("ds", extractor, "test", lambda: data)
    path = cache.paths("ds", extractor, "test")["features"]
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "garbage":
        path.write_bytes(b"not a numpy file")
    elif damage == "bad_meta":
        cache.paths("ds", extractor, "test")["meta"].write_text("{")
    elif damage == "no_flags":
        cache.paths("ds", extractor, "test")["fallback"].unlink()
    elif damage == "wrong_shape":
        np.save(path, np.zeros((10, 2), dtype=np.float32))
    else:
        np.save(path, np.full((10, 3), 7.0, dtype=np.float32))
    # Execute
    again = cache.features("ds", extractor, "test", lambda: data)
    # Assert
    assert len(calls) == 2
    assert torch.equal(again, good)
    assert cache.computed == 2


def test_different_parameters_data_or_split_use_different_entries(tmp_path: Path) -> None:
    # Prepare
    cache = FeatureCache(tmp_path)
    # Execute
    names = {
        cache.entry("ds", Counting(scale=1.0), "train"),
        cache.entry("ds", Counting(scale=0.5), "train"),
        cache.entry("other", Counting(scale=1.0), "train"),
        cache.entry("ds", Counting(scale=1.0), "test"),
    }
    # Assert
    assert len(names) == 4
    assert FaceDescriptor(upsample=0).key() != FaceDescriptor().key()
    assert EfficientNetLite0(image_size=160).key() != EfficientNetLite0().key()


def test_uncacheable_extractors_compute_only_the_rows_and_store_nothing(
    tmp_path: Path, data: np.ndarray
) -> None:
    # Prepare
    cache = FeatureCache(tmp_path)
    # Execute
    out = cache.features("ds", Identity(), "train", lambda: data, rows=np.array([1, 2]))
    # Assert
    assert torch.equal(out, Identity()(data[1:3]))
    assert list(tmp_path.iterdir()) == []


def test_face_no_face_flags_survive_the_cache(
    tmp_path: Path, faces: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    images = np.stack([faces[0][0], np.zeros_like(faces[0][0])])
    key = array_fingerprint(images)
    FeatureCache(tmp_path).features(key, FaceDescriptor(), "train", lambda: images)
    # Execute
    cached = FeatureCache(tmp_path).extract(key, FaceDescriptor(), "train", lambda: images[:0])
    # Assert
    assert cached.features.shape == (2, 128) and cached.fallback.tolist() == [False, True]
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["n"] == 2 and meta["dim"] == 128 and meta["image_shape"] == [112, 92]


WORKER = textwrap.dedent(
    """
    import sys, time
    import numpy as np, torch
    from docl_flower.core.features.cache import FeatureCache
    from docl_flower.core.features.extractors import Extraction

    class Slow:
        spatial = False
        cacheable = True
        def key(self): return "Slow"
        def dim(self, shape): return 2
        def __call__(self, images): return self.extract(images).features
        def extract(self, images):
            with open(sys.argv[2], "a") as log:
                log.write("computed\\n")
            time.sleep(1.0)
            x = torch.as_tensor(np.asarray(images), dtype=torch.float32).flatten(1) / 255
            return Extraction(torch.stack([x.mean(1), x.amax(1)], 1), np.zeros(len(x), bool))

    # Barrier: both processes ask only once both have started (so they really overlap).
    ready = sys.argv[2] + ".ready"
    with open(ready, "a") as handle:
        handle.write("x")
    while open(ready).read().count("x") < 2:
        time.sleep(0.01)
    images = np.arange(5 * 16, dtype=np.uint8).reshape(5, 4, 4)
    out = FeatureCache(sys.argv[1]).features("ds", Slow(), "train", lambda: images)
    print(out.sum().item())
    """
)


def test_two_processes_asking_at_once_compute_once(tmp_path: Path) -> None:
    # Prepare
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    counter = tmp_path / "computed.txt"
    cmd = [sys.executable, str(script), str(tmp_path / "cache"), str(counter)]
    # Execute
    procs = [
        subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    # Assert
    assert [p.returncode for p in procs] == [0, 0], [r[1].decode()[-2000:] for r in results]
    assert counter.read_text().splitlines() == ["computed"]
    assert results[0][0] == results[1][0]


def test_cache_folder_follows_the_environment(tmp_path: Path, monkeypatch) -> None:
    # Prepare / Execute / Assert
    monkeypatch.setenv("DOCL_FLOWER_CACHE", str(tmp_path / "own"))
    assert default_folder() == tmp_path / "own" / "features"
    monkeypatch.delenv("DOCL_FLOWER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_folder() == tmp_path / "xdg" / "docl_flower" / "features"
    assert (tmp_path / "xdg" / "docl_flower" / "features").is_dir()


def test_unwritable_cache_folder_falls_back_to_a_private_temp_folder(
    tmp_path: Path, monkeypatch
) -> None:
    # Prepare: a "folder" that is a file cannot be created
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("DOCL_FLOWER_CACHE", str(blocker))
    monkeypatch.setattr(files.tempfile, "gettempdir", lambda: str(tmp_path))
    # Execute
    folder = default_folder()
    # Assert
    assert folder.parent == tmp_path and folder.name.startswith("docl_flower-features-")
    assert folder.stat().st_mode & 0o077 == 0


def test_progress_lines_are_logged_without_tqdm(tmp_path: Path, data: np.ndarray, caplog) -> None:
    # Prepare
    caplog.set_level("INFO", logger="docl_flower.core.features.cache")
    start = time.monotonic()
    # Execute
    FeatureCache(tmp_path, progress=False, chunk=2).features("ds", Counting(), "x", lambda: data)
    # Assert
    assert any("computing 10 images" in r.getMessage() for r in caplog.records)
    assert time.monotonic() - start < 10


def test_extractors_pickle_and_copy_with_their_counters() -> None:
    import copy
    import pickle

    # Prepare
    extractor = ResNetFeatures(weights="random", image_size=32)
    extractor(np.zeros((1, 32, 32), dtype=np.uint8))
    # Execute
    clones = [pickle.loads(pickle.dumps(extractor)), copy.deepcopy(extractor)]
    # Assert
    for clone in clones:
        assert clone == extractor and clone.key() == extractor.key()
        assert clone.stats.images == 1
        clone(np.zeros((1, 32, 32), dtype=np.uint8))  # a working lock
        assert clone.stats.images == 2
