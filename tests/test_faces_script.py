"""The face experiment's analysis (scripts/faces.py) on a small saved face filter, no Flower."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from omegaconf import OmegaConf

from docl_flower.core.filter.global_filter import Registration
from docl_flower.core.filter.store import save_filter
from docl_flower.core.pipeline.config import compose_config
from docl_flower.core.pipeline.inputs import split_features
from docl_flower.core.training.autoencoder import AutoencoderSpec, TrainSpec, state_to_numpy
from docl_flower.core.training.calibration import train_and_calibrate
from docl_flower.federation.components import build_experiment

from .conftest import PROJECT_ROOT

spec = importlib.util.spec_from_file_location("faces", PROJECT_ROOT / "scripts" / "faces.py")
assert spec is not None and spec.loader is not None
faces = importlib.util.module_from_spec(spec)
spec.loader.exec_module(faces)


def test_face_analysis_summary_and_plots_on_a_small_run(tmp_path):
    # Prepare: a "run" of 3 of the 40 ORL people with pixel features and tiny autoencoders.
    cfg = compose_config(
        [
            "dataset=att_faces",
            "features=identity",
            "partition=random_classes",
            "num_users=3",
            "model.hidden=4",
            "train.epochs=3",
            "train.min_steps=0",
            "train.folds=2",
        ]
    )
    run = tmp_path / "runs" / "identity" / "draw-0"
    run.mkdir(parents=True)
    OmegaConf.save(cfg, run / "experiment.yaml", resolve=True)
    exp = build_experiment(cfg)
    assert isinstance(exp.model, AutoencoderSpec) and isinstance(exp.train, TrainSpec)
    images, labels = exp.dataset.load("train")
    x = split_features(exp.dataset, exp.features, "train", images=images).features
    regs = []
    for user, (label,) in exp.assignment.items():
        rows = torch.from_numpy(exp.client_spec.user_indices(user, labels))
        fit = train_and_calibrate(x[rows], exp.model, exp.train, seed=user)
        assert fit.method == "heldout"  # 7 photos: below heldout_below
        regs.append(
            Registration(user, label, state_to_numpy(fit.model), fit.err_mean, fit.err_std, 7)
        )
    save_filter(run / "filter", regs, info={"config": OmegaConf.to_container(cfg)})
    # Execute
    numbers, exp2, honest = faces.analyse_run(run, subsets=3)
    matrices = faces.adversaries(exp2, honest, alpha=1.5)
    report = {
        "draws": 1,
        "alpha": 1.5,
        "extractors": {"identity": [numbers]},
        "adversaries": {"identity": matrices},
    }
    md = faces.summarise(report, 1.5, 0.98)
    faces.plot(report, tmp_path)
    # Assert
    assert numbers["num_harmless"] == 37 * 10  # every photo of the 37 unregistered people
    assert set(numbers["per_person_accuracy"]) == {str(r.label) for r in regs}
    assert set(numbers["alpha_sweep"]) == {"one", "two"}
    one = [r["acceptance_rate"] for r in numbers["alpha_sweep"]["one"]]
    assert one == sorted(one, reverse=True)  # a wider interval never shares more
    assert set(numbers["scalability"]) == {"1", "3"}
    mat = np.array(matrices["one"], dtype=float)
    assert mat.shape == (3, 3) and np.isnan(np.diag(mat)).all()
    assert "raw pixels" in md and "Scalability" in md
    for png in ("faces_tradeoff.png", "faces_scalability.png", "faces_adversaries_identity.png"):
        assert (tmp_path / png).stat().st_size > 5000
