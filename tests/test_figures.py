"""The paper's figures (experiments/figures.py): the three runs, the analysis, the plots and the
summary, on a tiny MNIST copy, with an in-process stand-in for ``docl-flower`` (no Flower)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from docl_flower.experiments import adversaries, figures

from .fake_runs import FakeLaunch

#: The tiny MNIST copy, 3 honest users (digits 0, 1, 2): 6 adversaries instead of 90.
TINY = ("dataset.verify=false", "dataset.harmless.verify=false", "num_users=3")


@pytest.fixture(scope="module")
def made(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    settings = figures.FigureSettings(
        out=out, adversary_epochs=7, subsets=2, extra=(f"data_root={tiny_root}", *TINY)
    )
    fake = FakeLaunch(epochs=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(figures, "launch", fake)
        mp.setattr(adversaries, "launch", fake)
        analysis, paths, text = figures.run_figures(settings)
    return settings, fake, analysis, paths, text


def test_the_three_runs_and_what_each_trains(made):
    settings, fake, *_ = made
    base = ["seed=0", *settings.extra]
    assert [folder.name for _, folder in fake.calls] == ["honest", "adversaries", "imbalance"]
    assert fake.runs("honest") == [base]
    # The adversaries of the honest users' digits (0, 1, 2), with their own recipe.
    (adv,) = fake.runs("adversaries")
    assert adv[: len(base)] == base and adv[-2:] == ["train.epochs=7", "train.min_steps=0"]
    assert "partition.user_classes=[[0],[0],[1],[1],[2],[2]]" in adv
    assert "++partition.extra_classes={0:[1],1:[2],2:[0],3:[2],4:[0],5:[1]}" in adv
    assert fake.runs("imbalance") == [[*base, "partition=imbalance"]]
    assert all(folder.parent == settings.out / "runs" for _, folder in fake.calls)


def test_outputs_hold_every_figure_and_the_numbers_behind_them(made):
    settings, _, analysis, paths, text = made
    # analysis.json is what the plots and the summary saw
    saved = json.loads((settings.out / "analysis.json").read_text())
    assert saved == analysis
    assert (settings.out / "summary.md").read_text() == text
    assert {p.name for p in paths} == {
        "fig2_per_class.png",
        "fig3_tradeoff.png",
        "fig3_roc.png",
        "fig4_adversaries.png",
        "fig5_scalability.png",
        "imbalance.png",
    }
    assert all(p.stat().st_size > 5000 for p in paths)
    assert 0.0 <= analysis["overall_accuracy"] <= 1.0
    assert set(analysis["per_class_accuracy"]) == {"0", "1", "2"}
    assert [r["alpha"] for r in analysis["alpha_sweep"]["paper"]] == figures.ALPHAS
    assert figures.ALPHAS[0] == 0.25 and figures.ALPHAS[-1] == 5.0 and len(figures.ALPHAS) == 20
    assert set(analysis["scalability"]) == {"1", "3"}
    # The adversaries' recipe is read back from their run's saved config.
    assert analysis["adversary_epochs"] == settings.adversary_epochs
    # Imbalance: the reduced users keep 1%, 5% or 10% of 60 images (at least one); of the
    # reduced digits 1, 3, 5, 7, 9 only 1 has an honest user here to swap with.
    assert set(analysis["imbalance"]) == {"0.01", "0.05", "0.1"}
    assert analysis["imbalance"]["0.1"]["num_examples"] == {"1": 6}
    assert analysis["imbalance"]["0.01"]["reduced_classes"] == [1]
    for line in (
        "| overall accuracy |",
        "| mean fraction blocked over the 6 pairs (strict Guard) |",
        "Adversary autoencoders were trained for 7 epochs.",
        "| 0.01 | 1-1 |",
    ):
        assert line in text


def test_the_adversary_matrix_of_the_figures(made):
    _, _, analysis, _, text = made
    for rule in ("paper", "strict"):
        m = np.array(analysis["adversaries"][rule], dtype=float)
        assert m.shape == (3, 3) and np.isnan(np.diag(m)).all()
        assert np.isfinite(m[~np.eye(3, dtype=bool)]).all()
        assert f"| {np.nanmean(m):.3f} | - |" in text
    assert "u7 adversary" not in text  # the paper's pair needs 8 users
    # The strict rule never blocks less than the paper rule.
    strict = np.nan_to_num(np.array(analysis["adversaries"]["strict"], dtype=float))
    argmin = np.nan_to_num(np.array(analysis["adversaries"]["paper"], dtype=float))
    assert (strict >= argmin - 1e-12).all()
