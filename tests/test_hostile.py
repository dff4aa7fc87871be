"""Hostile replies and uploads: every reply ends as a registration or a rejection with a reason.

A property-based test (hypothesis) generates reply contents of any shape (any metric types
and values, missing and extra records and keys, any array shapes, dtypes and values) from
nodes bound to hostile users, mixed with honest replies; the round always completes, every
honest user registers and the saved filter holds exactly the honest users. The probe check
and the kernels are tried with adversarial autoencoders.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from flwr.app import Array
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from docl_flower.core.filter import native
from docl_flower.core.filter.global_filter import (
    GlobalFilter,
    Registration,
    ScoringConfig,
    reference_scores,
)
from docl_flower.core.filter.probe import (
    ProbeCheck,
    ProbeSet,
    probe_set,
    record_problem,
    reference_scores64,
)
from docl_flower.core.filter.store import PersistentFilter, load_filter
from docl_flower.core.training.autoencoder import PARAM_NAMES
from docl_flower.federation import keys
from docl_flower.federation.strategy import RegisterOnce
from docl_flower.federation.uploads import UploadError, parse_upload

from .conftest import trained_registration
from .test_strategy import DIM, RULES, reply, upload

HONEST = {0: (0,), 1: (1,), 2: (2,), 3: (3,)}
HOSTILE = {4: (4,), 5: (5,), 6: (6,)}
ASSIGNMENT = {**HONEST, **HOSTILE}
BINDINGS = {100 + u: u for u in ASSIGNMENT}


def _plain(user: int) -> tuple[dict[str, object], dict[str, object]]:
    """A valid upload of ``user`` as plain, freely editable dicts."""
    content = upload(user) if user in HONEST else None
    if content is None:  # hostile users own one class each here: build their upload
        rng = np.random.default_rng(user)
        arrays = {
            f"{user}/{n}": Array(rng.normal(size=s).astype(np.float32))
            for n, s in RULES.shapes.items()
        }
        metrics: dict[str, object] = {
            keys.USER_ID: user,
            keys.CLASSES: [user],
            keys.ERR_MEAN: [2.0],
            keys.ERR_STD: [0.5],
            keys.NUM_EXAMPLES: [100],
        }
        return metrics, dict(arrays)
    return (
        dict(content.metric_records[keys.METRICS_RECORD]),
        dict(content.array_records[keys.ARRAYS_RECORD]),
    )


class FakeArray:
    """An array whose declared shape, dtype and data are whatever the attacker chose."""

    def __init__(self, shape: object, dtype: object, data: object) -> None:
        self.shape, self.dtype, self._data = shape, dtype, data

    def numpy(self) -> object:
        if isinstance(self._data, Exception):
            raise self._data
        return self._data


def _scalar(value: object) -> float | None:
    """The finite number ``value`` stands for (alone or as a one-element list), else None."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if np.isfinite(float(value)) else None


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.one_of(st.integers(-5, 10), st.floats(allow_nan=True)), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

BAD_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not np.isfinite(v)),
    st.sampled_from([-1.0, -1e300, 1e300, float(DIM) * 2, 0.0]),
    st.text(max_size=3),
    st.none(),
    st.booleans(),
)


@st.composite
def hostile_content(draw: st.DrawFn, user: int) -> object:
    """A reply content of hostile ``user`` that must never register."""
    metrics, arrays = _plain(user)
    kind = draw(
        st.sampled_from(
            [
                "garbage",
                "metric",
                "drop",
                "shape",
                "dtype",
                "values",
                "extra-array",
                "missing-array",
                "unreadable",
                "no-records",
            ]
        )
    )
    if kind == "garbage":
        return SimpleNamespace(
            metric_records=draw(st.dictionaries(st.text(max_size=8), ANY_VALUE, max_size=3)),
            array_records=draw(st.one_of(st.none(), st.dictionaries(st.text(), ANY_VALUE))),
        )
    if kind == "metric":
        key = draw(
            st.sampled_from(
                [keys.USER_ID, keys.CLASSES, keys.ERR_MEAN, keys.ERR_STD, keys.NUM_EXAMPLES]
            )
        )
        good = metrics[key]
        value = draw(
            (ANY_VALUE | BAD_NUMBER).filter(
                lambda v, good=good: (
                    not (
                        v == good or (isinstance(good, list) and [v] == good)  # still valid
                    )
                    or isinstance(v, bool)
                )
            )
        )
        number = _scalar(value)
        if number is not None:  # a number that the rules might accept: make sure they do not
            integral = number.is_integer()
            if key == keys.ERR_MEAN and 0 <= number <= DIM:
                value = -1.0
            elif key == keys.ERR_STD and 1e-6 <= number <= DIM:
                value = float(DIM) + 1.0
            elif key == keys.NUM_EXAMPLES and integral and 1 <= number <= 10**9:
                value = 0
            elif key in (keys.USER_ID, keys.CLASSES) and integral:
                value = number + 0.5
        metrics[key] = value
    elif kind == "drop":
        metrics.pop(
            draw(
                st.sampled_from(
                    [keys.USER_ID, keys.CLASSES, keys.ERR_MEAN, keys.ERR_STD, keys.NUM_EXAMPLES]
                )
            )
        )
    elif kind in ("shape", "dtype", "values", "unreadable"):
        key = draw(st.sampled_from(sorted(arrays)))
        expected = RULES.shapes[key.split("/", 1)[1]]
        if kind == "shape":
            shape = draw(
                st.lists(st.integers(0, 20), min_size=0, max_size=3).filter(
                    lambda s: tuple(s) != tuple(expected)
                )
            )
            arrays[key] = FakeArray(shape, "float32", np.zeros(shape, np.float32))
        elif kind == "dtype":
            dtype = draw(st.sampled_from([np.float64, np.float16, np.int8, np.int64, np.bool_]))
            arrays[key] = Array(np.zeros(expected, dtype))
        elif kind == "values":
            bad = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -1e4, 1e3 * 1.01]))
            value = np.zeros(expected, np.float32)
            value.flat[draw(st.integers(0, value.size - 1))] = bad
            arrays[key] = Array(value)
        else:
            arrays[key] = FakeArray(
                expected,
                "float32",
                draw(
                    st.sampled_from(
                        [ValueError("truncated bytes"), "not an array", np.zeros(7, np.float32)]
                    )
                ),
            )
    elif kind == "extra-array":
        arrays[f"{user}/{draw(st.text(min_size=1, max_size=6))}x"] = Array(np.zeros(2, np.float32))
    elif kind == "missing-array":
        arrays.pop(draw(st.sampled_from(sorted(arrays))))
    else:
        return SimpleNamespace(metric_records={}, array_records={})
    return SimpleNamespace(
        metric_records={keys.METRICS_RECORD: metrics},
        array_records={keys.ARRAYS_RECORD: arrays},
    )


@st.composite
def rounds(draw: st.DrawFn) -> list[tuple[object, int, int | None]]:
    """(content, node, node the answered message went to) in arrival order."""
    events: list[tuple[object, int, int | None]] = []
    for user in HOSTILE:
        for _ in range(draw(st.integers(1, 3))):
            events.append((draw(hostile_content(user)), 100 + user, 100 + user))
    # A valid upload of a hostile user that answers no message of this run, or another node's.
    metrics, arrays = _plain(4)
    stray = SimpleNamespace(
        metric_records={keys.METRICS_RECORD: metrics}, array_records={keys.ARRAYS_RECORD: arrays}
    )
    assert parse_upload(stray, ASSIGNMENT, RULES)[0] == 4  # valid, but not an answer
    events.append((stray, 104, draw(st.sampled_from([None, 101, 999]))))
    honest = [(upload(u), 100 + u, 100 + u) for u in HONEST]
    order = draw(st.permutations(list(range(len(events) + len(honest)))))
    everything = events + honest
    return [everything[i] for i in order]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(rounds())
def test_any_reply_ends_as_registration_or_rejection_and_honest_users_register(events):
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.dict(os.environ, {"DOCL_FLOWER_FILTER_KEY": str(Path(tmp) / "filter.key")}),
    ):
        # Prepare
        store = PersistentFilter(Path(tmp) / "filter", {"config": {}})
        strat = RegisterOnce(
            ASSIGNMENT,
            RULES,
            bindings=BINDINGS,
            on_register=lambda user, regs, node: store.register(user, regs, [{}] * len(regs)),
        )
        replies = []
        # Execute: as StreamingGrid delivers them, then Flower's aggregate step.
        for content, node, answered in events:
            msg = reply(content, node)  # type: ignore[arg-type]
            strat.handle_reply(msg, answered)
            replies.append(msg)
        strat.aggregate_train(1, replies)
        # Assert
        out = strat.outcome
        assert sorted(out.registered) == sorted(HONEST)
        assert sorted(out.failed) == sorted(HOSTILE)
        assert all(out.failed[u] for u in HOSTILE)
        saved, _ = load_filter(Path(tmp) / "filter")
        assert sorted(r.user_id for r in saved) == sorted(HONEST)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({keys.USER_ID: float("inf")}, "user id"),
        ({keys.USER_ID: float("nan")}, "user id"),
        ({keys.CLASSES: [float("nan")]}, "class"),
        ({keys.CLASSES: [0.9]}, "not an integer"),
        ({keys.NUM_EXAMPLES: [float("inf")]}, "num-examples"),
        ({keys.NUM_EXAMPLES: [1e300]}, "num-examples"),
        ({keys.TRAIN_SECONDS: [1.0, 2.0]}, "train-seconds"),
        ({keys.TRAIN_SECONDS: float("nan")}, "train-seconds"),
    ],
)
def test_the_replies_that_used_to_abort_a_round_are_rejected_with_a_reason(change, reason):
    metrics, arrays = _plain(0)
    metrics.update(change)
    content = SimpleNamespace(
        metric_records={keys.METRICS_RECORD: metrics}, array_records={keys.ARRAYS_RECORD: arrays}
    )
    with pytest.raises(UploadError, match=reason):
        parse_upload(content, ASSIGNMENT, RULES)


def test_absurd_weights_are_refused_before_they_reach_the_filter():
    metrics, arrays = _plain(0)
    weight = np.zeros(RULES.shapes["encoder.weight"], np.float32)
    weight[0, 0] = 3e38
    arrays["0/encoder.weight"] = Array(weight)
    content = SimpleNamespace(
        metric_records={keys.METRICS_RECORD: metrics}, array_records={keys.ARRAYS_RECORD: arrays}
    )
    with pytest.raises(UploadError, match="above"):
        parse_upload(content, ASSIGNMENT, RULES)


# ----------------------------------------------------------------------- probe check
def _digits(n: int = 40, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Bright blobs in the first half of the features: one "class" of images."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, dim, generator=g) * 0.1
    x[:, : dim // 2] += 0.8
    return x.clamp(0, 1)


@pytest.fixture(scope="module")
def honest_reg() -> Registration:
    return trained_registration(_digits(), user=0, label=0, epochs=30)


@pytest.fixture(scope="module")
def probe() -> ProbeSet:
    harmless = torch.rand(200, 64, generator=torch.Generator().manual_seed(5)) * 0.3
    return probe_set(harmless, 64, count=128, noise=32, seed=1)


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_an_honest_autoencoder_passes_the_probe_check(honest_reg, probe, kernel):
    if kernel == "native" and native.load() is None:
        pytest.skip("the fused kernel cannot be built here")
    check = ProbeCheck(probe, max_alpha=2.0, scoring=ScoringConfig(kernel=kernel))
    assert check.problem(honest_reg) is None


def test_a_catch_all_interval_is_refused_with_the_measured_share(honest_reg, probe):
    dim = probe.images.shape[1]
    swallow = Registration(0, 0, honest_reg.params, dim / 2, float(dim), 40)
    problem = ProbeCheck(probe, max_alpha=2.0, scoring=ScoringConfig(kernel="torch")).problem(
        swallow
    )
    assert problem is not None and "catch-all" in problem
    assert "100.0% of its harmless images" in problem and "100.0% of its noise images" in problem


def test_the_saved_record_vouches_for_what_passed_and_not_for_a_catch_all(honest_reg, probe):
    # The record a run saves with an upload is what the upload service holds to its limit.
    check = ProbeCheck(probe, max_alpha=2.0, scoring=ScoringConfig(kernel="torch"))
    passed = check.measure(honest_reg)
    record = json.loads(json.dumps(passed.record()))  # as filter.json holds it
    assert passed.problem is None and record["harmless_images"] == 128
    assert record["noise_images"] == 32 and set(record["shares"]) == {"harmless", "noise"}
    assert record_problem(record, 0.02, 2.0) is None
    assert "up to alpha 2.0, not up to" in str(record_problem(record, 0.02, 2.5))
    dim = probe.images.shape[1]
    swallow = check.measure(Registration(0, 0, honest_reg.params, dim / 2, float(dim), 40))
    assert swallow.problem is not None and swallow.shares == {"harmless": 1.0, "noise": 1.0}
    assert "100.0% of the harmless" in str(record_problem(swallow.record(), 1.0 - 1e-9, 2.0))


def test_large_mu_tiny_sigma_is_judged_by_what_it_blocks_one_sided(honest_reg, probe):
    # Prepare: an interval far above every honest error and a tiny sigma. Its two-sided
    # interval [mu - 2 sigma, mu + 2 sigma] holds none of the probe (the check of before let it
    # in), but one-sided, or under the strict Guard, it blocks every image below mu.
    scores = reference_scores64(honest_reg, probe.images)
    mu = 10 * float(scores.max())
    reg = Registration(0, 0, honest_reg.params, mu, 1e-6, 40)
    two_sided = ((scores >= mu - 2e-6) & (scores <= mu + 2e-6)).to(torch.float64).mean()
    assert float(two_sided) == 0.0
    # Execute
    problem = ProbeCheck(probe, max_alpha=2.0, scoring=ScoringConfig(kernel="torch")).problem(reg)
    # Assert
    assert problem is not None and "catch-all" in problem and "d <= mu + 2 sigma" in problem


def test_overflowing_weights_are_refused_by_the_probe_check(honest_reg, probe):
    params = {k: v.copy() for k, v in honest_reg.params.items()}
    params["encoder.weight"][:] = 3e38  # the encoder overflows to inf in float32
    params["decoder.weight"][:] = 0.0  # and 0 * inf = NaN
    reg = Registration(0, 0, params, 1.0, 0.5, 40)
    problem = ProbeCheck(probe, max_alpha=2.0, scoring=ScoringConfig(kernel="torch")).problem(reg)
    assert problem is not None and "not finite" in problem


# ------------------------------------------------- one hostile user against everyone's uploads
#: Segments of the 64 features: honest class k is bright in segment k; the attacker's in 3.
_SEG = 16


def _blobs(segment: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 64, generator=g) * 0.15
    x[:, segment * _SEG : (segment + 1) * _SEG] += 0.75
    return x.clamp(0, 1)


def _harmless(n: int, seed: int) -> torch.Tensor:
    """Harmless uploads: every brightness from dark to bright, any pattern."""
    g = torch.Generator().manual_seed(seed)
    level = torch.rand(n, 1, generator=g)
    return (torch.rand(n, 64, generator=g) * level).clamp(0, 1)


@pytest.fixture(scope="module")
def crowd():
    """Three honest autoencoders, the attacker's honestly trained one, the provider's sets."""
    honest = [
        trained_registration(_blobs(k, 60, k), user=k, label=k, epochs=40, seed=k) for k in range(3)
    ]
    attacker = trained_registration(_blobs(3, 60, 3), user=3, label=3, epochs=40, seed=3)
    pool = _harmless(5120, seed=11)
    probe = probe_set(pool[:1024], 64, count=1024, noise=64, seed=2)
    return SimpleNamespace(honest=honest, attacker=attacker, probe=probe, fresh=pool[1024:])


def _acceptance(regs: list[Registration], x: torch.Tensor, max_alpha: float) -> float:
    """Share of ``x`` that the loosest allowed Guard (strict, one-sided, max_alpha) shares."""
    flt = GlobalFilter(regs, ScoringConfig(kernel="torch"))
    blocked = flt.inside(flt.scores(x), max_alpha, "one").any(dim=1)
    return 1.0 - float(blocked.to(torch.float64).mean())


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    log_mu=st.floats(-6.0, 4.0),
    log_sigma=st.floats(-6.0, 3.0),
    far=st.booleans(),
)
def test_one_hostile_upload_cannot_cut_the_acceptance_of_harmless_images(
    crowd, log_mu, log_sigma, far
):
    # Prepare: an honestly trained autoencoder uploaded with any mu and sigma over ten orders
    # of magnitude, or with an interval far above every honest error (mu 1-10^4 times the
    # largest score any probe image gets).
    max_alpha, limit = 2.0, 0.01
    check = ProbeCheck(crowd.probe, max_alpha, ScoringConfig(kernel="torch"), limit)
    top = float(reference_scores64(crowd.attacker, crowd.probe.images).max())
    mu = top * 10 ** (log_mu % 4.0) if far else 10**log_mu
    attacker = Registration(3, 3, crowd.attacker.params, mu, 10**log_sigma, 60)
    # Execute
    problem = check.problem(attacker)
    # Assert: refused, or what it blocks of fresh harmless uploads (not in the probe), under
    # the loosest Guard any later check may use, stays within 0.02.
    if problem is None:
        without = _acceptance(crowd.honest, crowd.fresh, max_alpha)
        with_attacker = _acceptance([*crowd.honest, attacker], crowd.fresh, max_alpha)
        assert without - with_attacker <= 0.02, (mu, attacker.err_std, problem)
    else:
        assert "catch-all" in problem
    if far:
        assert problem is not None  # above every honest error: blocks everything below it


def test_the_honest_crowd_passes_its_own_probe_check(crowd):
    check = ProbeCheck(crowd.probe, 2.0, ScoringConfig(kernel="torch"), 0.01)
    assert [check.problem(r) for r in [*crowd.honest, crowd.attacker]] == [None] * 4


def _adversarial(seed: int, dim: int = 37, hidden: int = 9, scale: float = 1e3) -> Registration:
    """Parameters at the upload bound, biases included: saturated and extreme activations."""
    rng = np.random.default_rng(seed)
    shapes = {
        "encoder.weight": (hidden, dim),
        "encoder.bias": (hidden,),
        "decoder.weight": (dim, hidden),
        "decoder.bias": (dim,),
    }
    params = {
        name: (rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0, scale, size=shape)).astype(
            np.float32
        )
        for name, shape in shapes.items()
    }
    assert sorted(params) == sorted(PARAM_NAMES)
    return Registration(seed, seed, params, 1.0, 0.5, 10)


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_kernels_agree_with_the_reference_on_adversarial_parameters(kernel):
    if kernel == "native" and native.load() is None:
        pytest.skip("the fused kernel cannot be built here")
    regs = [_adversarial(s) for s in range(6)]
    x = torch.rand(150, 37, generator=torch.Generator().manual_seed(3))
    x[:10] = 0.0
    x[10:20] = 1.0
    got = GlobalFilter(regs, ScoringConfig(kernel=kernel)).scores(x).to(torch.float64)
    want = torch.stack([reference_scores64(r, x) for r in regs], 1)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(reference_scores(regs, x).to(torch.float64), want, rtol=1e-4, atol=1e-3)


def test_a_nan_score_is_never_the_argmin():
    regs = [_adversarial(s, dim=4, hidden=2) for s in range(3)]
    flt = GlobalFilter(regs, ScoringConfig(kernel="torch"))
    scores = torch.tensor([[float("nan"), 5.0, 7.0], [3.0, float("nan"), 1.0]])
    idx, dmin = flt.predict(scores)
    assert idx.tolist() == [1, 2] and dmin.tolist() == [5.0, 1.0]
