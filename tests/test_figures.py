"""The figure pipeline (analysis, plots, summary) on small saved filters, without Flower."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.data.partitions import class_indices
from docl_flower.core.features.extractors import Deskew
from docl_flower.core.filter.store import save_filter

from .conftest import PROJECT_ROOT, trained_registration

spec = importlib.util.spec_from_file_location("figures", PROJECT_ROOT / "scripts" / "figures.py")
assert spec is not None and spec.loader is not None
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)


@pytest.fixture(scope="module")
def saved_runs(tiny_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"data_root={tiny_root}",
                "dataset.verify=false",
                "dataset.harmless.verify=false",
                "model.hidden=8",
            ],
        )
    images, labels = IdxDataset("mnist", str(tiny_root / "mnist"), verify=False).load("train")
    feats = Deskew()
    honest, adv, imb = [], [], []
    extra_adv, extra_imb = {}, {}
    for c in range(3):
        idx = class_indices(labels, c)
        honest.append(trained_registration(feats(images[idx]), c, c, 3, seed=c))
        for v in range(3):
            if v != c:
                both = np.concatenate([idx, class_indices(labels, v)])
                extra_adv[len(adv)] = {"trained_on": sorted({c, v})}
                adv.append(trained_registration(feats(images[both]), len(adv), c, 3, seed=10 + v))
        for frac in (0.1, 0.5):
            few = class_indices(labels, c, frac, seed=1)
            extra_imb[len(imb)] = {"fraction": frac}
            imb.append(trained_registration(feats(images[few]), len(imb), c, 3, seed=20))
    for name, regs, extra in (
        ("honest", honest, None),
        ("adv", adv, extra_adv),
        ("imb", imb, extra_imb),
    ):
        (root / name).mkdir()
        OmegaConf.save(cfg, root / name / "experiment.yaml", resolve=True)
        save_filter(root / name / "filter", regs, extra, info={"config": {"train": {"epochs": 3}}})
    return root


def test_analysis_plots_and_summary_on_small_filters(saved_runs, tmp_path):
    # Execute
    raw = figures.analyze(saved_runs / "honest", saved_runs / "adv", saved_runs / "imb", 2, 0)
    analysis = json.loads(json.dumps(raw))
    paths = figures.plot(analysis, tmp_path)
    text = figures.summary(analysis)
    # Assert
    assert 0.0 <= analysis["overall_accuracy"] <= 1.0
    assert set(analysis["per_class_accuracy"]) == {"0", "1", "2"}
    assert [r["alpha"] for r in analysis["alpha_sweep"]["paper"]] == figures.ALPHAS
    assert set(analysis["scalability"]) == {"1", "3"}
    for rule in ("paper", "strict"):
        m = np.array(analysis["adversaries"][rule], dtype=float)
        assert m.shape == (3, 3) and np.isnan(np.diag(m)).all()
        assert np.isfinite(m[~np.eye(3, dtype=bool)]).all()
    assert set(analysis["imbalance"]) == {"0.1", "0.5"}
    # The strict rule never blocks less than the paper rule.
    strict = np.nan_to_num(np.array(analysis["adversaries"]["strict"], dtype=float))
    argmin = np.nan_to_num(np.array(analysis["adversaries"]["paper"], dtype=float))
    assert (strict >= argmin - 1e-12).all()
    names = {p.name for p in paths}
    assert {
        "fig2_per_class.png",
        "fig3_tradeoff.png",
        "fig3_roc.png",
        "fig4_adversaries.png",
        "fig5_scalability.png",
        "imbalance.png",
    } <= names
    assert all(p.stat().st_size > 5000 for p in paths)
    assert "overall accuracy" in text and "Imbalance" in text
