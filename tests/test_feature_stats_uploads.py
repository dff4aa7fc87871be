"""Feature-statistics uploads: validation, the register-once round, the client task."""

from __future__ import annotations

import math
from types import SimpleNamespace
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from docl_flower.core.baselines.fedpft import (
    TENSOR_NAMES,
    ClassStats,
    StatsLimits,
    StatsSpec,
    fit_class_stats,
)
from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.data.partitions import class_indices
from docl_flower.core.data.seeds import derive_seed
from docl_flower.core.features.extractors import Identity
from docl_flower.core.pipeline.client_spec import ClientSpec
from docl_flower.core.training.autoencoder import AutoencoderSpec, TrainSpec
from docl_flower.federation import keys
from docl_flower.federation.client_tasks import handle_train
from docl_flower.federation.stats_uploads import StatsRules, parse_stats_upload
from docl_flower.federation.strategy import RegisterOnce
from docl_flower.federation.uploads import UploadError

DIM = 8
SPEC = StatsSpec()
RULES = StatsRules(StatsLimits(SPEC, DIM))
ASSIGNMENT = {0: (0,), 1: (1,), 2: (2,), 3: (3, 4)}


def _stats(user: int, label: int) -> ClassStats:
    rng = np.random.default_rng(100 * user + label)
    x = np.clip(0.3 + 0.05 * label + 0.05 * rng.normal(size=(20, DIM)), 0.0, 1.0)
    return fit_class_stats(x, SPEC, derive_seed(0, user, label), user, label)


def _plain(user: int, classes: list[int] | None = None) -> tuple[dict, dict]:
    """Metrics and arrays of an honest upload of ``user`` (plain dicts, to corrupt)."""
    classes = list(ASSIGNMENT[user]) if classes is None else classes
    fitted = [_stats(user, c) for c in classes]
    arrays = {
        f"{c}/{name}": Array(value)
        for c, s in zip(classes, fitted, strict=True)
        for name, value in s.upload_arrays().items()
    }
    metrics: dict[str, object] = {
        keys.USER_ID: user,
        keys.CLASSES: classes,
        keys.LL_MEAN: [s.ll_mean for s in fitted],
        keys.LL_STD: [s.ll_std for s in fitted],
        keys.NUM_EXAMPLES: [s.num_examples for s in fitted],
        keys.TRAIN_SECONDS: 0.5,
        keys.RECEIVED_ARRAYS: 0,
    }
    return metrics, arrays


def upload(user: int, **changes: object) -> RecordDict:
    """An upload of ``user``; ``metrics`` / ``arrays`` in ``changes`` overwrite entries."""
    metrics, arrays = _plain(user)
    metrics.update(changes.get("metrics", {}))  # type: ignore[arg-type]
    arrays.update(changes.get("arrays", {}))  # type: ignore[arg-type]
    for key in changes.get("drop", ()):  # type: ignore[attr-defined]
        metrics.pop(key, None)
        arrays.pop(key, None)
    return RecordDict(
        {keys.ARRAYS_RECORD: ArrayRecord(arrays), keys.METRICS_RECORD: MetricRecord(metrics)}
    )


def _cov(user: int, change) -> dict[str, Array]:
    value = _stats(user, user).upload_arrays()["covariance"]
    return {f"{user}/covariance": Array(np.asarray(change(value.copy()), dtype=np.float32))}


def _not_pd(packed: np.ndarray) -> np.ndarray:
    packed[1] = 10.0 * math.sqrt(float(packed[0]) * float(packed[DIM]))  # cov[0, 1] >> stds
    return packed


BAD = {
    "nan means": upload(0, arrays={"0/means": Array(np.full((1, DIM), np.nan, np.float32))}),
    "inf covariance": upload(0, arrays=_cov(0, lambda v: v * np.inf)),
    "not positive-definite": upload(0, arrays=_cov(0, _not_pd)),
    "huge covariance": upload(0, arrays=_cov(0, lambda v: v * 1e30)),
    "huge means": upload(0, arrays={"0/means": Array(np.full((1, DIM), 3e38, np.float32))}),
    "wrong covariance shape": upload(0, arrays=_cov(0, lambda v: v[:-1])),
    "full instead of packed": upload(
        0, arrays={"0/covariance": Array(np.eye(DIM, dtype=np.float32))}
    ),
    "float64 means": upload(0, arrays={"0/means": Array(np.full((1, DIM), 0.5))}),
    "extra tensor": upload(0, arrays={"0/decoder.weight": Array(np.zeros(3, np.float32))}),
    "missing tensor": upload(0, drop=["0/weights"]),
    "someone else's class": upload(0, metrics={keys.CLASSES: [1]}),
    "unknown user": upload(0, metrics={keys.USER_ID: 99}),
    "user id 0.9": upload(0, metrics={keys.USER_ID: 0.9}),
    "ll-mean nan": upload(0, metrics={keys.LL_MEAN: [float("nan")]}),
    "ll-mean huge": upload(0, metrics={keys.LL_MEAN: [1e30]}),
    "ll-std zero": upload(0, metrics={keys.LL_STD: [0.0]}),
    "ll-std huge": upload(0, metrics={keys.LL_STD: [1e30]}),
    "num-examples zero": upload(0, metrics={keys.NUM_EXAMPLES: [0]}),
    "missing ll-std": upload(0, drop=[keys.LL_STD]),
    "lengths differ": upload(0, metrics={keys.LL_MEAN: [1.0, 2.0]}),
    "no arrays": RecordDict({keys.METRICS_RECORD: upload(0)[keys.METRICS_RECORD]}),
}


def test_a_valid_upload_parses_into_the_clients_statistics():
    user, found = parse_stats_upload(upload(3), ASSIGNMENT, RULES)
    assert user == 3 and [s.label for s in found] == [3, 4]
    expected = _stats(3, 4)
    np.testing.assert_array_equal(found[1].covariance, expected.covariance)
    assert (found[1].ll_mean, found[1].ll_std) == (expected.ll_mean, expected.ll_std)


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_kind_of_bad_upload_is_rejected_with_a_reason(case):
    with pytest.raises(UploadError) as err:
        parse_stats_upload(BAD[case], ASSIGNMENT, RULES)
    assert str(err.value)


def reply(content: object, node: int, error: str | None = None) -> Mock:
    msg = Mock(spec=Message)
    msg.metadata.src_node_id = node
    msg.metadata.message_id = f"m{node}-{id(content)}"
    msg.has_error.return_value = error is not None
    if error is not None:
        msg.error.code, msg.error.reason = 5, error
    msg.content = content
    return msg


def _strategy() -> RegisterOnce[ClassStats]:
    return RegisterOnce(
        ASSIGNMENT, None, parse=lambda c, a: parse_stats_upload(c, a, RULES), node_wait_s=0.0
    )


@pytest.mark.parametrize("case", ["not positive-definite", "ll-std zero", "someone else's class"])
def test_a_bad_upload_is_rejected_while_all_others_register(case):
    # Prepare
    strat = _strategy()
    replies = [reply(BAD[case], 100)] + [reply(upload(u), 100 + u) for u in (1, 2, 3)]
    # Execute: as StreamingGrid delivers them, then the aggregate step.
    for msg in replies:
        strat.handle_reply(msg, msg.metadata.src_node_id)
    arrays, metrics = strat.aggregate_train(1, replies)
    # Assert
    out = strat.outcome
    assert arrays is None and sorted(out.registered) == [1, 2, 3]
    assert sorted(s.label for s in out.registrations) == [1, 2, 3, 4]
    assert list(out.failed) == [0] and out.failed[0].startswith("rejected")
    assert metrics is not None and metrics["registered"] == 3
    assert out.bytes_downloaded == {1: 0, 2: 0, 3: 0}


def test_a_reply_that_answers_no_message_of_this_run_is_ignored():
    strat = _strategy()
    stray = reply(upload(1), 101)
    strat.handle_reply(stray, None)  # valid content, but not an answer to this run
    strat.aggregate_train(1, [stray])
    assert strat.outcome.registered == {} and "ignored" in strat.outcome.node_errors[101]


def test_the_probe_vet_rejects_an_upload_through_the_strategy():
    def vet(stats: ClassStats) -> None:
        raise UploadError(f"class {stats.label}: catch-all")

    strat = RegisterOnce(
        ASSIGNMENT, None, parse=lambda c, a: parse_stats_upload(c, a, RULES), vet=vet
    )
    msg = reply(upload(1), 101)
    strat.handle_reply(msg, 101)
    strat.aggregate_train(1, [msg])
    assert "catch-all" in strat.outcome.failed[1]


# ----------------------------------------------------------------------- hostile replies
def _corrupt(draw: st.DrawFn, user: int) -> object:
    metrics, arrays = _plain(user)
    kind = draw(st.sampled_from(["metric", "array", "drop", "shape", "foreign"]))
    if kind == "metric":
        key = draw(st.sampled_from([keys.USER_ID, keys.CLASSES, keys.LL_MEAN, keys.LL_STD]))
        metrics[key] = draw(
            st.one_of(
                st.floats(allow_nan=True, allow_infinity=True),
                st.just([float("inf")]),
                st.just("x"),
                st.just([-1e300]),
                st.just(True),
            )
        )
    elif kind == "array":
        key = draw(st.sampled_from(sorted(arrays)))
        value = arrays[key].numpy().copy()
        index = draw(st.integers(0, value.size - 1))
        value.flat[index] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 3e38, -3e38, 0.0, 2.0])
        )
        if value.flat[index] == 0.0 and key.endswith("weights"):
            value.flat[index] = -1.0
        arrays[key] = Array(value)
    elif kind == "drop":
        arrays.pop(draw(st.sampled_from(sorted(arrays))))
    elif kind == "shape":
        key = draw(st.sampled_from(sorted(arrays)))
        arrays[key] = Array(np.zeros(draw(st.integers(0, 40)), np.float32))
    else:
        return SimpleNamespace(metric_records={keys.METRICS_RECORD: [1, 2]}, array_records=None)
    return SimpleNamespace(
        metric_records={keys.METRICS_RECORD: metrics}, array_records={keys.ARRAYS_RECORD: arrays}
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_reply_ends_as_registration_or_rejection_with_a_reason(data):
    # Prepare: user 0 sends a corrupted upload, the others honest ones.
    content = _corrupt(data.draw, 0)
    strat = _strategy()
    replies = [reply(content, 100)] + [reply(upload(u), 100 + u) for u in (1, 2, 3)]
    # Execute
    for msg in replies:
        strat.handle_reply(msg, msg.metadata.src_node_id)
    strat.aggregate_train(1, replies)
    # Assert: user 0 is registered only if its content still parses; never an exception.
    out = strat.outcome
    assert {1, 2, 3} <= set(out.registered)
    try:
        parse_stats_upload(content, ASSIGNMENT, RULES)
        still_valid = True
    except UploadError:
        still_valid = False
    assert (0 in out.registered) == still_valid
    if not still_valid:
        assert out.failed[0] and out.failed[0] != "rejected: "
    assert not out.node_errors or all("not handled" not in e for e in out.node_errors.values())


# ----------------------------------------------------------------------- the client task
def test_the_client_task_uploads_the_statistics_of_its_own_images(tiny_root):
    # Prepare
    spec = ClientSpec(
        seed=11,
        dataset=IdxDataset("mnist", str(tiny_root / "mnist"), verify=False),
        features=Identity(),
        model=AutoencoderSpec(hidden=8),
        train=TrainSpec(epochs=1),
        assignment={0: [3]},
        task="feature_stats",
        stats=StatsSpec(covariance="diag", components=2),
    )
    content = RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})
    # Execute: the ClientApp's logic, and the same statistics computed centrally.
    reply_content = handle_train(content, {"partition-id": 0})
    images, labels = IdxDataset("mnist", str(tiny_root / "mnist"), verify=False).load("train")
    x = Identity()(images[class_indices(labels, 3)]).numpy()
    central = fit_class_stats(x, spec.stats, derive_seed(11, 0, 3), 0, 3)
    # Assert
    rules = StatsRules(StatsLimits(spec.stats, 784))
    user, (stats,) = parse_stats_upload(reply_content, {0: (3,)}, rules)
    assert user == 0 and stats.label == 3 and stats.num_examples == 60
    for name in TENSOR_NAMES:
        np.testing.assert_array_equal(stats.upload_arrays()[name], central.upload_arrays()[name])
    assert stats.ll_mean == central.ll_mean
    assert reply_content.metric_records[keys.METRICS_RECORD][keys.RECEIVED_ARRAYS] == 0
