import numpy as np
from flwr.app import ConfigRecord, RecordDict

from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.data.partitions import class_indices
from docl_flower.core.data.seeds import derive_seed
from docl_flower.core.features.extractors import Identity
from docl_flower.core.pipeline.config import ClientSpec
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
        dataset={
            "_target_": "docl_flower.core.data.IdxDataset",
            "name": "mnist",
            "root": str(root / "mnist"),
            "verify": False,
        },
        features={"_target_": "docl_flower.core.features.Identity"},
        model={"_target_": "docl_flower.core.model.AutoencoderSpec", "hidden": 8},
        train={"_target_": "docl_flower.core.model.TrainSpec", "epochs": epochs, "batch_size": 16},
        assignment={0: [3]},
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
    rules = UploadRules(AutoencoderSpec(hidden=8).shapes(784), max_error=784.0)
    user, (reg,) = parse_upload(reply, {0: (3,)}, rules)
    assert user == 0 and reg.label == 3 and reg.num_examples == 60
    for name, value in state_to_numpy(central).items():
        np.testing.assert_array_equal(reg.params[name], value)
    metrics = reply.metric_records[keys.METRICS_RECORD]
    assert metrics[keys.RECEIVED_ARRAYS] == 0


def test_node_config_user_id_and_data_dir_take_precedence(tiny_root, tmp_path):
    spec = _spec(tmp_path / "nowhere", epochs=1)  # the server's path does not exist here
    spec = ClientSpec(**{**spec.__dict__, "assignment": {0: [3], 1: [4]}})
    content = RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})
    reply = handle_train(
        content, {"partition-id": 0, "user-id": 1, "data-dir": str(tiny_root / "mnist")}
    )
    assert reply.metric_records[keys.METRICS_RECORD][keys.USER_ID] == 1
    assert reply.metric_records[keys.METRICS_RECORD][keys.CLASSES] == [4]


def test_an_adversary_trains_on_its_own_and_the_victims_images(tiny_root):
    spec = ClientSpec(**{**_spec(tiny_root, epochs=1).__dict__, "extra_classes": {0: [5]}})
    content = RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})
    reply = handle_train(content, {"partition-id": 0})
    metrics = reply.metric_records[keys.METRICS_RECORD]
    assert metrics[keys.CLASSES] == [3]  # it registers as its own class ...
    assert metrics[keys.NUM_EXAMPLES] == [120]  # ... trained on 60 own + 60 victim images
