import dataclasses
import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.data.partitions import class_indices
from docl_flower.core.data.seeds import derive_seed
from docl_flower.core.features.extractors import Identity
from docl_flower.core.pipeline.client_spec import ClientSpec
from docl_flower.core.training.autoencoder import (
    AutoencoderSpec,
    TrainSpec,
    state_to_numpy,
    train_autoencoder,
)
from docl_flower.federation import keys
from docl_flower.federation.client_tasks import handle_train
from docl_flower.federation.uploads import UploadRules, parse_upload


def _spec(root, epochs=2) -> ClientSpec:
    return ClientSpec(
        seed=11,
        dataset=IdxDataset("mnist", str(root / "mnist"), verify=False),
        features=Identity(),
        model=AutoencoderSpec(hidden=8),
        train=TrainSpec(epochs=epochs, batch_size=16),
        assignment={0: [3]},
        image_shape=(28, 28),
    )


def test_docl_with_one_user_equals_central_training_with_the_same_seed(tiny_root):
    # Prepare
    spec = _spec(tiny_root)
    content = RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})
    # Execute: the ClientApp's logic, and the same autoencoder trained centrally.
    reply = handle_train(content, {"partition-id": 0})
    images, labels = IdxDataset("mnist", str(tiny_root / "mnist"), verify=False).load("train")
    x = Identity()(images[class_indices(labels, 3)])
    central, _ = train_autoencoder(
        x, AutoencoderSpec(hidden=8), TrainSpec(epochs=2, batch_size=16), derive_seed(11, 0, 3)
    )
    # Assert
    rules = UploadRules.for_autoencoder(AutoencoderSpec(hidden=8), 784)
    user, (reg,) = parse_upload(reply, {0: (3,)}, rules)
    assert user == 0 and reg.label == 3 and reg.num_examples == 60
    for name, value in state_to_numpy(central).items():
        np.testing.assert_array_equal(reg.params[name], value)
    metrics = reply.metric_records[keys.METRICS_RECORD]
    assert metrics[keys.RECEIVED_ARRAYS] == 0


def test_node_config_user_id_and_data_dir_take_precedence(tiny_root, tmp_path):
    spec = _spec(tmp_path / "nowhere", epochs=1)  # the server's path does not exist here
    spec = dataclasses.replace(spec, assignment={0: [3], 1: [4]})
    content = RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})
    reply = handle_train(
        content, {"partition-id": 0, "user-id": 1, "data-dir": str(tiny_root / "mnist")}
    )
    assert reply.metric_records[keys.METRICS_RECORD][keys.USER_ID] == 1
    assert reply.metric_records[keys.METRICS_RECORD][keys.CLASSES] == [4]


def test_an_adversary_trains_on_its_own_and_the_victims_images(tiny_root):
    spec = dataclasses.replace(_spec(tiny_root, epochs=1), extra_classes={0: [5]})
    content = RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})
    reply = handle_train(content, {"partition-id": 0})
    metrics = reply.metric_records[keys.METRICS_RECORD]
    assert metrics[keys.CLASSES] == [3]  # it registers as its own class ...
    assert metrics[keys.NUM_EXAMPLES] == [120]  # ... trained on 60 own + 60 victim images


def test_the_spec_travels_as_a_versioned_record_and_comes_back_equal(tiny_root):
    spec = _spec(tiny_root)
    record = json.loads(spec.to_json())
    assert record["schema"] == "docl-flower/client-spec" and record["version"] == 3
    # Every field of every component is written out: the client needs no defaults of its own.
    assert record["train"]["_target_"] == "docl_flower.core.model.TrainSpec"
    assert record["train"]["min_steps"] == spec.train.min_steps
    assert ClientSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(version=1), "version 1; this client reads"),
        (lambda r: r.update(schema="x"), "schema 'x'"),
        (lambda r: r.pop("seed"), "keys"),
        (lambda r: r.update(extra=1), "keys"),
        (lambda r: r["train"].pop("min_steps"), r"train record has keys"),
        (lambda r: r["train"].update(lr_typo=1), r"train record has keys"),
        (lambda r: r["train"].update(min_steps=1.5), r"train\.min_steps must be an int"),
        (lambda r: r["model"].update(hidden=float("nan")), r"model\.hidden"),
        (lambda r: r["model"].update(_target_="os.system"), "not a registered component"),
        (lambda r: r.update(assignment={"x": [3]}), "assignment keys must be user ids"),
        (lambda r: r.update(fraction={"0": 2.0}), "fraction"),
        (lambda r: r.update(stats=[1]), "stats must be a record"),
        (lambda r: r.update(train=[]), "train must be a record"),
        (lambda r: r.update(image_shape=[28]), "image_shape must be"),
        (lambda r: r.update(image_shape=[28, 28.0]), "image_shape must be"),
        (lambda r: r.update(image_shape=[28, 0]), "image_shape must be >= 1"),
        (lambda r: r.update(image_shape="28x28"), "image_shape must be"),
    ],
)
def test_a_record_off_the_schema_is_refused_with_its_reason(tiny_root, change, message):
    record = json.loads(_spec(tiny_root).to_json())
    change(record)
    with pytest.raises(ValueError, match=message):
        ClientSpec.from_json(json.dumps(record))


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", "[" * 100_000])
def test_a_spec_that_is_not_a_record_is_refused(text):
    with pytest.raises(ValueError, match="client spec"):
        ClientSpec.from_json(text)


def _photos_of(tiny_root, cls, folder, kinds=("png",)):
    """The tiny MNIST training digits of ``cls`` as image files in one flat folder."""
    from PIL import Image

    images, labels = IdxDataset("mnist", str(tiny_root / "mnist"), verify=False).load("train")
    folder.mkdir()
    for i, k in enumerate(class_indices(labels, cls)):
        kind = kinds[i % len(kinds)]
        picture = Image.fromarray(images[k])
        if kind == "rgb-jpg-56":  # a phone's photo: colour, JPEG, another size
            picture.convert("RGB").resize((56, 56)).save(folder / f"photo-{i}.jpg", quality=95)
        else:
            picture.save(folder / f"photo-{i}.{kind}")
    return images[class_indices(labels, cls)]


def test_a_device_trains_on_a_flat_folder_of_its_own_photos(tiny_root, tmp_path):
    # Prepare: the device of user 0 (class 3) holds only its 60 photos, no archive; the
    # server's data path does not exist on it.
    own = _photos_of(tiny_root, 3, tmp_path / "photos")
    spec = _spec(tmp_path / "nowhere", epochs=2)
    content = RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})
    # Execute
    reply = handle_train(content, {"user-id": 0, "data-dir": str(tmp_path / "photos")})
    # Assert: the same autoencoder as trained on the archive's images of class 3.
    central, _ = train_autoencoder(
        Identity()(own),
        AutoencoderSpec(hidden=8),
        TrainSpec(epochs=2, batch_size=16),
        derive_seed(11, 0, 3),
    )
    rules = UploadRules.for_autoencoder(AutoencoderSpec(hidden=8), 784)
    user, (reg,) = parse_upload(reply, {0: (3,)}, rules)
    assert user == 0 and reg.label == 3 and reg.num_examples == 60
    for name, value in state_to_numpy(central).items():
        np.testing.assert_array_equal(reg.params[name], value)


def test_own_photos_in_any_format_and_size_are_read_as_the_data_sets_images(tiny_root, tmp_path):
    _photos_of(tiny_root, 3, tmp_path / "photos", kinds=("png", "rgb-jpg-56", "bmp", "webp"))
    (tmp_path / "photos" / "notes.txt").write_text("not a photo")
    spec = _spec(tmp_path / "nowhere", epochs=1)
    content = RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})
    reply = handle_train(content, {"user-id": 0, "data-dir": str(tmp_path / "photos")})
    metrics = reply.metric_records[keys.METRICS_RECORD]
    assert metrics[keys.NUM_EXAMPLES] == [60] and metrics[keys.CLASSES] == [3]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty", "no usable training data for user 0"),
        ("broken", "no readable photo"),
        ("two classes", "a device's own photos are of one class, but user 0 registers"),
        ("missing", "no usable training data for user 0"),
    ],
)
def test_a_device_without_usable_data_fails_at_once_in_one_line(tmp_path, setup, message):
    from docl_flower.core.data.base import DataError

    folder = tmp_path / "data"
    spec = _spec(tmp_path / "nowhere", epochs=50)
    if setup != "missing":
        folder.mkdir()
    if setup == "broken":
        (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    if setup == "two classes":
        (folder / "a.png").write_bytes(b"")
        spec = dataclasses.replace(spec, assignment={0: [3, 4]})
    content = RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})
    with pytest.raises(DataError, match=message) as err:
        handle_train(content, {"user-id": 0, "data-dir": str(folder)})
    assert "\n" not in str(err.value)


def test_a_face_device_trains_on_its_own_photos_through_the_face_extractor(tmp_path):
    # Person s5 (class 4) holds 7 of their ORL photos; the device computes the descriptors.
    import shutil

    from docl_flower.core.data.folders import ImageFolderDataset
    from docl_flower.core.features.extractors import FaceDescriptor

    from .conftest import PROJECT_ROOT

    photos = tmp_path / "me"
    photos.mkdir()
    for i in range(1, 8):
        shutil.copy(PROJECT_ROOT / "data" / "att-faces" / "s5" / f"{i}.pgm", photos / f"{i}.pgm")
    spec = ClientSpec(
        seed=11,
        dataset=ImageFolderDataset(str(tmp_path / "nowhere"), (112, 92)),
        features=FaceDescriptor(),
        model=AutoencoderSpec(hidden=8),
        train=TrainSpec(epochs=2, batch_size=4),
        assignment={0: [4]},
        image_shape=(112, 92),
    )
    content = RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})
    reply = handle_train(content, {"user-id": 0, "data-dir": str(photos)})
    rules = UploadRules.for_autoencoder(AutoencoderSpec(hidden=8), 128)
    user, (reg,) = parse_upload(reply, {0: (4,)}, rules)
    assert (user, reg.label, reg.num_examples) == (0, 4, 7)
