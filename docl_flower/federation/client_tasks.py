"""What a client does with a train message: train on the user's own partition, upload once.

The train message's spec names the task, a key of :data:`TASKS`: DOCL's one-class
autoencoders, a FedAvg-family classifier update, or per-class feature statistics. The
ClientApp (:mod:`.client_app`) imports this module on its first message.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from numpy.typing import NDArray

from docl_flower.core.baselines.classifiers import SgdSpec
from docl_flower.core.baselines.classifiers import train_classifier as sgd_train
from docl_flower.core.baselines.fedpft import fit_class_stats
from docl_flower.core.common.logs import setup_logging
from docl_flower.core.data.base import DataError, ImageDataset, load_cached
from docl_flower.core.data.folders import OwnPhotos, holds_photos
from docl_flower.core.data.seeds import derive_seed
from docl_flower.core.pipeline.client_spec import ClientSpec
from docl_flower.core.pipeline.inputs import split_features
from docl_flower.core.pipeline.user_fit import fit_user
from docl_flower.core.training.autoencoder import AutoencoderSpec, state_to_numpy
from docl_flower.core.training.dp import PrivacySpent, per_user

from . import keys

log = logging.getLogger(__name__)


Task = Callable[[RecordDict, ClientSpec, int, Mapping[str, object]], RecordDict]


def resolve_user(node_config: Mapping[str, object], assigned: object = None) -> int:
    """The user this node trains for.

    A node whose operator set ``user-id`` (a device: its data is that user's) trains that
    user, and refuses a message that binds it to another. A simulated node (``partition-id``
    only; every node can read every user's data) trains the user the server assigned it
    (``assigned``, from :data:`keys.ASSIGNED_USER`), or its partition without one.
    """
    bound = None if assigned is None else int(str(assigned))
    if keys.NODE_USER_ID in node_config:
        own = int(str(node_config[keys.NODE_USER_ID]))
        if bound is not None and bound != own:
            raise ValueError(
                f"the server bound this node to user {bound}, but its node config names user {own}"
            )
        return own
    if bound is not None:
        return bound
    if keys.NODE_PARTITION_ID in node_config:
        return int(str(node_config[keys.NODE_PARTITION_ID]))
    raise ValueError("node config has neither 'user-id' nor 'partition-id'")


def _load(
    spec: ClientSpec, node_config: Mapping[str, object], user: int
) -> tuple[ImageDataset, NDArray[np.uint8], NDArray[np.int64]]:
    """The training data of this node's ``user``, read before any training.

    With the operator's ``data-dir``: a folder with image files at its top level holds the
    user's own photos (:class:`OwnPhotos`, all of the one class the user registers); any other
    folder is the root of the experiment's data set (``data_root``: a device that holds the
    whole archive). Without it: the experiment's data set (a simulation). A folder without
    usable data fails here, in one line that says what the folder needs.
    """
    data_dir = node_config.get(keys.NODE_DATA_DIR)
    if data_dir is None:
        dataset = spec.dataset
    else:
        folder = Path(str(data_dir)).expanduser()
        if holds_photos(folder):
            classes = list(spec.assignment[user])
            if len(classes) != 1:
                raise DataError(
                    f"data-dir {folder}: a device's own photos are of one class, but user "
                    f"{user} registers classes {classes}"
                )
            shape = spec.image_shape or spec.dataset.image_shape
            dataset = OwnPhotos(str(folder), tuple(shape), classes[0])
        else:
            dataset = spec.with_data_root(str(folder))
    try:
        images, labels = load_cached(dataset, "train")
    except (DataError, OSError) as err:
        if data_dir is None:
            raise
        raise DataError(
            f"data-dir {data_dir}: no usable training data for user {user} (put the user's "
            f"photos at its top level, or the data set's files under it): "
            f"{' '.join(str(err).split())}"
        ) from err
    return dataset, images, labels


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _upload(
    content: RecordDict,
    spec: ClientSpec,
    user: int,
    arrays: dict[str, Array],
    stats: Mapping[str, list[float] | float],
    counts: list[int],
    start: float,
    cuda: bool,
) -> RecordDict:
    """The one reply of a register-once task: arrays plus per-class statistics and counts."""
    metrics = MetricRecord(
        {
            keys.USER_ID: user,
            keys.CLASSES: list(spec.assignment[user]),
            **stats,
            keys.NUM_EXAMPLES: counts,
            keys.TRAIN_SECONDS: time.perf_counter() - start,
            keys.RECEIVED_ARRAYS: len(content.array_records),
            keys.DEVICE_CUDA: int(cuda),
        }
    )
    return RecordDict({keys.ARRAYS_RECORD: ArrayRecord(arrays), keys.METRICS_RECORD: metrics})


def train_docl(
    content: RecordDict, spec: ClientSpec, user: int, node_config: Mapping[str, object]
) -> RecordDict:
    """DOCL: one one-class autoencoder per class the user owns; upload parameters and stats.

    A user already in the saved filter replies ``skipped`` without training.
    """
    config = content.config_records[keys.CONFIG_RECORD]
    registered = config.get(keys.REGISTERED_USERS, [])
    if isinstance(registered, list) and user in registered:
        log.info("user %d is already in the filter: nothing to train", user)
        skipped = MetricRecord(
            {
                keys.USER_ID: user,
                keys.SKIPPED: 1,
                keys.RECEIVED_ARRAYS: len(content.array_records),
            }
        )
        return RecordDict({keys.METRICS_RECORD: skipped})
    dataset, images, labels = _load(spec, node_config, user)
    device = _device()
    arrays: dict[str, Array] = {}
    means: list[float] = []
    stds: list[float] = []
    counts: list[int] = []
    spent: list[PrivacySpent] = []
    used: list[NDArray[np.int64]] = []
    start = time.perf_counter()
    for one in fit_user(spec, user, dataset, images, labels, device):
        for name, value in state_to_numpy(one.fit.model).items():
            arrays[f"{one.label}{keys.ARRAY_KEY_SEP}{name}"] = Array(np.ascontiguousarray(value))
        means.append(one.fit.err_mean)
        stds.append(one.fit.err_std)
        counts.append(int(one.rows.size))
        if one.fit.privacy is not None:
            spent.append(one.fit.privacy)
            used.append(one.rows)
    stats: dict[str, list[float] | float] = {keys.ERR_MEAN: means, keys.ERR_STD: stds}
    if spent:
        # Disjoint images (one class each): parallel composition; shared ones: basic.
        disjoint = np.unique(np.concatenate(used)).size == sum(i.size for i in used)
        privacy = per_user(spent, disjoint)
        log.info(
            "user %d: differential privacy epsilon %.3f, delta %.2g, noise multiplier %.3f",
            user,
            privacy["epsilon"],
            privacy["delta"],
            privacy["noise_multiplier"],
        )
        stats[keys.DP_EPSILON] = privacy["epsilon"]
        stats[keys.DP_DELTA] = privacy["delta"]
        stats[keys.DP_NOISE_MULTIPLIER] = privacy["noise_multiplier"]
    return _upload(content, spec, user, arrays, stats, counts, start, device.type == "cuda")


def train_classifier(
    content: RecordDict, spec: ClientSpec, user: int, node_config: Mapping[str, object]
) -> RecordDict:
    """FedAvg family: start from the received global model, train locally, return the update."""
    config = content.config_records[keys.CONFIG_RECORD]
    server_round = int(str(config.get("server-round", 0)))
    proximal_mu = float(str(config.get("proximal-mu", 0.0)))
    model_spec, sgd = spec.model, spec.train
    if isinstance(model_spec, AutoencoderSpec) or not isinstance(sgd, SgdSpec):
        raise ValueError("the classifier task needs a classifier model and SGD")
    dataset, images, labels = _load(spec, node_config, user)
    idx = spec.user_indices(user, labels)
    x = split_features(dataset, spec.features, "train", idx, images).features
    y = torch.as_tensor(labels[idx])
    model = model_spec.build(int(x.shape[1]))
    model.load_state_dict(content.array_records[keys.ARRAYS_RECORD].to_torch_state_dict())
    seconds = sgd_train(
        model,
        x,
        y,
        sgd,
        derive_seed(spec.seed, user, server_round),
        proximal_mu=proximal_mu,
        device=_device(),
    )
    metrics = MetricRecord(
        {
            keys.USER_ID: user,
            keys.NUM_EXAMPLES: int(idx.size),
            keys.TRAIN_SECONDS: seconds,
        }
    )
    return RecordDict(
        {keys.ARRAYS_RECORD: ArrayRecord(model.state_dict()), keys.METRICS_RECORD: metrics}
    )


def train_feature_stats(
    content: RecordDict, spec: ClientSpec, user: int, node_config: Mapping[str, object]
) -> RecordDict:
    """One-shot feature statistics (after FedPFT): a Gaussian (mixture) per class, uploaded once.

    Per class the user owns: the statistics of its features (:class:`StatsSpec` from the
    spec's ``stats``) and the mean and std of held-out log-likelihoods of its own images, which
    the server's Guard uses as DOCL uses ``mu``, ``sigma``. Nothing is trained or received.
    """
    stats_spec = spec.stats
    if stats_spec is None:
        raise ValueError("the feature_stats task needs the statistics' options (spec.stats)")
    dataset, images, labels = _load(spec, node_config, user)
    features = spec.features
    arrays: dict[str, Array] = {}
    means: list[float] = []
    stds: list[float] = []
    counts: list[int] = []
    start = time.perf_counter()
    for c in spec.assignment[user]:
        idx = spec.training_indices(user, c, labels)
        if idx.size == 0:
            raise ValueError(f"user {user} holds no training image of class {c}")
        # Only this user's rows: from the feature cache, or extracted here on the device.
        x = split_features(dataset, features, "train", idx, images).features
        stats = fit_class_stats(x.numpy(), stats_spec, derive_seed(spec.seed, user, c), user, c)
        log.info(
            "user %d class %d: %s statistics of %d images, held-out ll %.1f +- %.1f",
            user,
            c,
            stats_spec.covariance,
            len(idx),
            stats.ll_mean,
            stats.ll_std,
        )
        for name, value in stats.upload_arrays().items():
            arrays[f"{c}{keys.ARRAY_KEY_SEP}{name}"] = Array(np.ascontiguousarray(value))
        means.append(stats.ll_mean)
        stds.append(stats.ll_std)
        counts.append(len(idx))
    ll_stats = {keys.LL_MEAN: means, keys.LL_STD: stds}
    return _upload(content, spec, user, arrays, ll_stats, counts, start, cuda=False)


def idle(
    content: RecordDict, spec: ClientSpec, user: int, node_config: Mapping[str, object]
) -> RecordDict:
    """Workflows that never contact clients (the centralised reference)."""
    raise RuntimeError("this experiment sends no work to clients")


#: The tasks a client runs, by the name a workflow's ``CLIENT_TASK`` gives: the message names
#: one of these; nothing is imported or called by a name that arrives in a message.
TASKS: dict[str, Task] = {
    "docl": train_docl,
    "classifier": train_classifier,
    "feature_stats": train_feature_stats,
    "idle": idle,
}


def handle_train(content: RecordDict, node_config: Mapping[str, object]) -> RecordDict:
    """Run the task the spec names for this node's user (Flower-free logic)."""
    config = content.config_records[keys.CONFIG_RECORD]
    spec = ClientSpec.from_json(str(config[keys.SPEC]))
    user = resolve_user(node_config, config.get(keys.ASSIGNED_USER))
    if user not in spec.assignment:
        raise ValueError(f"user {user} is not in this experiment's assignment")
    task = TASKS.get(spec.task)
    if task is None:
        raise ValueError(f"unknown task {spec.task!r}; this client runs {sorted(TASKS)}")
    return task(content, spec, user, node_config)


def threads_from_environment() -> None:
    """Run torch on the threads the runtime gives this process (``OMP_NUM_THREADS``).

    Ray sets ``OMP_NUM_THREADS`` to an actor's CPUs, and torch reads it once, when it starts
    its thread pool: a worker that imported torch before (a Ray ``worker_process_setup_hook``
    does) would run as many threads as the machine has cores in every actor (measured: 7x
    slower training with two actors on two cores). Without the variable (a SuperNode) nothing
    changes.
    """
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0 and torch.get_num_threads() != int(value):
        torch.set_num_threads(int(value))


def train(msg: Message, context: Context) -> Message:
    """Train on this user's images only and reply (the ClientApp's train handler)."""
    setup_logging()
    threads_from_environment()
    try:
        reply = handle_train(msg.content, context.node_config)
    except Exception as err:  # the server reports it once, with every user it hit
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
        log.debug("training failed", exc_info=True)
        log.info("training failed, reported to the server: %s", reason[:200])
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
        return Message(error=error, reply_to=msg)
    return Message(reply, reply_to=msg)
