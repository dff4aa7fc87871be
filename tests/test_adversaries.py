"""The adversary protocol (Fig. 4, experiments/adversaries.py): the run's partition, the pairs
read back from its saved filter and the matrix, on tiny synthetic data (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from docl_flower.core.filter.global_filter import ArgminGuard, StrictGuard
from docl_flower.core.filter.store import save_filter
from docl_flower.core.pipeline.config import compose_config
from docl_flower.experiments import adversaries
from docl_flower.experiments.privacy_attack import one_thread
from docl_flower.federation.components import build_experiment

from .conftest import trained_registration


def test_the_adversary_run_of_a_draw_of_people_trains_every_pair_of_them():
    # Prepare: an honest run of 3 people drawn from ORL's 40 (the paper's face protocol)
    data = ["dataset=att_faces", "features=identity", "seed=2"]
    honest = build_experiment(compose_config([*data, "partition=random_classes", "num_users=3"]))
    people = adversaries.owned_classes(honest)
    # Execute
    overrides = adversaries.adversary_overrides(honest, data, ["train.epochs=7"])
    exp = build_experiment(compose_config(overrides))
    # Assert: one user per ordered pair, owning the adversary's class, trained on the victim's too
    pairs = adversaries.ordered_pairs(people)
    assert len(people) == 3 and pairs[:2] == [(people[0], people[1]), (people[0], people[2])]
    assert len(pairs) == 6 and all(a != v for a, v in pairs)
    assert dict(exp.assignment) == {k: (a,) for k, (a, _) in enumerate(pairs)}
    assert exp.client_spec.extra_classes == {k: [v] for k, (_, v) in enumerate(pairs)}
    # ... with the honest run's data, seed and the adversaries' own recipe change
    assert overrides[: len(data)] == data and overrides[-1] == "train.epochs=7"
    assert exp.seed == honest.seed and exp.config["train"]["epochs"] == 7
    # ... and the photos of the 37 people nobody registered stay the harmless set
    assert exp.harmless_unregistered
    assert {c for cs in exp.assignment.values() for c in cs} == set(people)


def test_every_class_registered_is_the_adversaries_config_group():
    assert adversaries.pair_partition(range(10), num_classes=10) == ["partition=adversaries"]
    exp = build_experiment(compose_config(["partition=adversaries"]))
    pairs = adversaries.ordered_pairs(range(10))
    assert dict(exp.assignment) == {k: (a,) for k, (a, _) in enumerate(pairs)}
    assert exp.client_spec.extra_classes == {k: [v] for k, (_, v) in enumerate(pairs)}
    two = build_experiment(compose_config(["partition=two_classes_per_user", "num_users=5"]))
    with pytest.raises(ValueError, match="one class per user"):
        adversaries.owned_classes(two)


def blocks(n: int, cls: int, rng: np.random.Generator) -> torch.Tensor:
    """16 features in [0, 1]: bright in the 4 features of block ``cls``, dark elsewhere."""
    x = rng.uniform(0.0, 0.15, size=(n, 16))
    x[:, 4 * cls : 4 * cls + 4] = rng.uniform(0.8, 1.0, size=(n, 4))
    return torch.tensor(x, dtype=torch.float32)


def test_the_matrix_measures_what_an_adversary_that_learned_the_victim_gets_through(tmp_path):
    # Prepare: three users of classes 10, 11, 12 (user ids 5, 6, 7) on easy synthetic data; honest
    # autoencoders barely trained, with wide intervals (each accepts everything near its class)
    rng = np.random.default_rng(0)
    train = {c: blocks(60, c - 10, rng) for c in (10, 11, 12)}
    with one_thread():
        honest = [
            trained_registration(train[c], 5 + i, c, epochs=1, seed=i, std_scale=1e3)
            for i, c in enumerate((10, 11, 12))
        ]
        # The adversary of class 10 that learned the victim of class 11 (both classes, long);
        # one "adversary" of class 10 that never saw its victim's (class 12's) images; saved in
        # the adversary run's filter out of order, with the run's user ids and classes trained on.
        both = torch.cat([train[10], train[11]])
        learned = trained_registration(both, 40, 10, epochs=20, seed=1)
        unaware = trained_registration(train[10], 41, 10, epochs=20, seed=2)
    save_filter(
        tmp_path / "filter",
        [unaware, learned],
        {0: {"trained_on": [10, 12]}, 1: {"trained_on": [10, 11]}},
    )
    x = torch.cat([blocks(40, k, rng) for k in range(3)])
    labels = torch.arange(10, 13).repeat_interleave(40)
    # Execute
    pairs, _ = adversaries.adversarial_pairs(honest, tmp_path / "filter")
    guards = {"paper": ArgminGuard(1.5), "strict": StrictGuard(1.5)}
    mats = adversaries.adversary_matrices(honest[::-1], pairs, x, labels, guards)
    # Assert: pairs keyed by the honest users, registered under the adversary's honest id
    assert sorted(pairs) == [(5, 6), (5, 7)] and pairs[(5, 6)].user_id == 5
    assert pairs[(5, 6)].err_mean == learned.err_mean
    paper, strict = (np.array(mats[k], dtype=float) for k in ("paper", "strict"))
    # Rows adversaries, columns victims, in class order; unmeasured pairs and the diagonal NaN
    assert paper.shape == (3, 3)
    assert np.isnan(np.diag(paper)).all()
    assert np.isnan(paper[1:, :]).all() and np.isnan(paper[0, 0])
    # The adversary that learned its victim takes the argmin and passes the paper's Guard; the
    # one that did not is blocked; the strict rule blocks both (the victim's interval accepts).
    assert paper[0, 1] <= 0.1
    assert paper[0, 2] >= 0.9
    assert strict[0, 1] == 1.0 and strict[0, 2] == 1.0
    assert list(adversaries.off_diagonal(mats["paper"])[:2]) == [paper[0, 1], paper[0, 2]]
