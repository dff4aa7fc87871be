from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from docl_flower.core.baselines.classifiers import (
    Cnn,
    Mlp2NN,
    SgdSpec,
    accuracy_report,
    predict,
    train_classifier,
)
from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.data.partitions import Partition
from docl_flower.core.features.extractors import Identity
from docl_flower.core.pipeline.client_spec import ClientSpec
from docl_flower.federation import keys
from docl_flower.federation.grids import CountingGrid
from docl_flower.federation.workflows import as_workflow


def test_mcmahan_models_have_the_published_sizes():
    assert sum(p.numel() for p in Mlp2NN().build(784).parameters()) == 199_210
    cnn = Cnn((28, 28)).build(784)
    assert cnn(torch.rand(2, 784)).shape == (2, 10)
    assert sum(p.numel() for p in cnn.parameters()) == 1_663_370
    with pytest.raises(ValueError):
        Cnn((28, 28)).build(100)


def _blobs(n: int = 300):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.rand(3, 20, generator=g)
    return centers[y] + 0.05 * torch.randn(n, 20, generator=g), y


def test_sgd_learns_and_fedprox_term_limits_the_drift():
    x, y = _blobs()
    free = Mlp2NN(hidden=16, num_classes=3).build(20)
    prox = Mlp2NN(hidden=16, num_classes=3).build(20)
    prox.load_state_dict(free.state_dict())
    start = [p.detach().clone() for p in free.parameters()]
    train_classifier(free, x, y, SgdSpec(epochs=20, batch_size=16, lr=0.1), seed=0)
    train_classifier(prox, x, y, SgdSpec(epochs=20, batch_size=16, lr=0.1), seed=0, proximal_mu=5.0)
    overall, per_class = accuracy_report(predict(free, x), y)
    assert overall > 0.9 and set(per_class) == {0, 1, 2}

    def drift(m):
        return sum(
            float(((p.detach() - s) ** 2).sum()) for p, s in zip(m.parameters(), start, strict=True)
        )

    assert drift(prox) < drift(free)


def test_iid_shards_are_disjoint_and_cover_every_class():
    labels = np.repeat(np.arange(3), 50)
    assignment = Partition(num_users=4, iid=True).assignment(3)
    assert assignment == {u: (0, 1, 2) for u in range(4)}
    spec = ClientSpec(
        seed=1,
        dataset=IdxDataset("mnist", "unused"),
        features=Identity(),
        model=Mlp2NN(num_classes=3),
        train=SgdSpec(),
        assignment={u: list(c) for u, c in assignment.items()},
        shards=4,
    )
    parts = [spec.user_indices(u, labels) for u in range(4)]
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(150))
    assert all(set(np.unique(labels[p])) == {0, 1, 2} for p in parts)
    assert spec.class_user_indices(0, 1, labels).size in (12, 13)


def test_counting_grid_counts_parameter_bytes_per_user_and_direction():
    arrays = ArrayRecord({"w": Array(np.ones(10, np.float32))})
    sent = Mock(spec=Message)
    sent.metadata.dst_node_id = 7
    sent.content = RecordDict({"arrays": arrays, "config": ConfigRecord({"x": 1})})
    reply = Mock(spec=Message)
    reply.metadata.src_node_id = 7
    reply.has_error.return_value = False
    reply.content = RecordDict(
        {
            "arrays": arrays,
            keys.METRICS_RECORD: MetricRecord({keys.USER_ID: 3, keys.NUM_EXAMPLES: 5}),
        }
    )
    inner = Mock()
    inner.send_and_receive.return_value = [reply]
    grid = CountingGrid(inner)
    for _ in range(2):  # two rounds
        assert list(grid.send_and_receive([sent], timeout=1.0)) == [reply]
    assert grid.per_user(grid.down) == {"3": 80}
    assert grid.per_user(grid.up) == {"3": 80}


def test_centralised_reference_trains_on_the_union_of_partitions(tiny_root, tmp_path):
    from hydra import compose, initialize_config_dir

    from docl_flower.federation.components import build_experiment

    from .conftest import PROJECT_ROOT

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "strategy=centralised",
                "strategy.epochs=10",
                "num_users=3",
                f"data_root={tiny_root}",
                "dataset.verify=false",
                "dataset.harmless.verify=false",
            ],
        )
    exp = build_experiment(cfg)
    results = as_workflow(exp.workflow).run(Mock(), exp, tmp_path)
    assert results.method == "centralised" and results.rounds == 10
    assert results.bytes_uploaded == {str(u): 60 * 784 for u in range(3)}
    assert results.bytes_downloaded == {"0": 0, "1": 0, "2": 0}
    assert len(results.accuracy_curve) == 10 and results.overall_accuracy > 0.5
