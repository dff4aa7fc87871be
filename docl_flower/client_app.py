"""ClientApp: train the user's one-class autoencoder(s) on its own partition, upload once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import keys
from .config import ClientSpec, derive_seed
from .data import class_indices
from .logs import setup_logging
from .model import error_stats, reconstruction_errors, state_to_numpy, train_autoencoder

log = logging.getLogger(__name__)

app = ClientApp()


def resolve_user(node_config: Mapping[str, object]) -> int:
    """The user id of this node: ``user-id`` if the operator set one, else ``partition-id``."""
    for key in (keys.NODE_USER_ID, keys.NODE_PARTITION_ID):
        if key in node_config:
            return int(str(node_config[key]))
    raise ValueError("node config has neither 'user-id' nor 'partition-id'")


def handle_train(content: RecordDict, node_config: Mapping[str, object]) -> RecordDict:
    """Train every autoencoder of this node's user and build the one upload (Flower-free logic)."""
    received_arrays = len(content.array_records)
    spec = ClientSpec.from_json(str(content.config_records[keys.CONFIG_RECORD][keys.SPEC]))
    user = resolve_user(node_config)
    if user not in spec.assignment:
        raise ValueError(f"user {user} is not in this experiment's assignment")
    classes = spec.assignment[user]
    data_dir = node_config.get(keys.NODE_DATA_DIR)
    dataset = spec.dataset_obj(str(data_dir) if data_dir is not None else None)
    features = spec.features_obj()
    model_spec, train_spec = spec.model_spec(), spec.train_spec()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = dataset.load("train")
    arrays: dict[str, Array] = {}
    means: list[float] = []
    stds: list[float] = []
    counts: list[int] = []
    start = time.perf_counter()
    for c in classes:
        seed = derive_seed(spec.seed, user, c)
        idx = np.concatenate(
            [class_indices(labels, c, spec.fraction.get(user, 1.0), seed)]
            + [class_indices(labels, v) for v in spec.extra_classes.get(user, [])]
        )
        x = features(images[idx])
        log.info("user %d: training class %d on %d images (%s)", user, c, len(idx), device)
        model, report = train_autoencoder(
            x, model_spec, train_spec, seed, device, on_epoch=_progress(user, c, train_spec.epochs)
        )
        mu, sd = error_stats(reconstruction_errors(model, x))
        log.info(
            "user %d class %d: loss %.2f -> %.2f, mu %.3f sigma %.3f, %.1fs",
            user,
            c,
            report.losses[0],
            report.losses[-1],
            mu,
            sd,
            report.seconds,
        )
        for name, value in state_to_numpy(model).items():
            arrays[f"{c}{keys.ARRAY_KEY_SEP}{name}"] = Array(np.ascontiguousarray(value))
        means.append(mu)
        stds.append(sd)
        counts.append(len(idx))
    metrics = MetricRecord(
        {
            keys.USER_ID: user,
            keys.CLASSES: list(classes),
            keys.ERR_MEAN: means,
            keys.ERR_STD: stds,
            keys.NUM_EXAMPLES: counts,
            keys.TRAIN_SECONDS: time.perf_counter() - start,
            keys.RECEIVED_ARRAYS: received_arrays,
            keys.DEVICE_CUDA: int(device.type == "cuda"),
        }
    )
    return RecordDict({keys.ARRAYS_RECORD: ArrayRecord(arrays), keys.METRICS_RECORD: metrics})


def _progress(user: int, cls: int, epochs: int) -> Callable[[int, float], None]:
    step = max(1, epochs // 4)

    def report(epoch: int, loss: float) -> None:
        if (epoch + 1) % step == 0 or epoch + 1 == epochs:
            log.info("user %d class %d: epoch %d/%d, loss %.3f", user, cls, epoch + 1, epochs, loss)

    return report


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this user's images only and reply once with the upload."""
    setup_logging()
    return Message(handle_train(msg.content, context.node_config), reply_to=msg)
