"""Inversion and membership inference on uploads (core privacy_attacks, experiments/privacy),
no Flower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from docl_flower.core.evaluation.privacy_attacks import (
    InversionSpec,
    NearestNeighbours,
    PublicPrior,
    dissimilarity,
    frozen_autoencoder,
    identification_ranks,
    invert,
    membership_auroc,
    nearest_is_member,
)
from docl_flower.core.training.autoencoder import (
    AutoencoderSpec,
    TrainSpec,
    reconstruction_errors,
    state_to_numpy,
    train_autoencoder,
)
from docl_flower.experiments import privacy, privacy_attack
from docl_flower.federation.components import load_experiment

from .fake_runs import FakeLaunch

#: Small attacks for tests (the script's defaults run 500 steps x 16 restarts).
SMALL = {
    "prior": InversionSpec(space="prior", steps=60, lr=0.05, restarts=4),
    "pixels": InversionSpec(space="pixels", steps=30, lr=0.01, restarts=3, fixed_point_steps=10),
}


def bars(n: int, horizontal: bool, rng: np.random.Generator) -> torch.Tensor:
    """4x4 images (16 features) with one bright bar: a row (horizontal) or a column."""
    x = rng.uniform(0.0, 0.1, size=(n, 4, 4))
    where = rng.integers(0, 4, size=n)
    for i, k in enumerate(where):
        if horizontal:
            x[i, k, :] = rng.uniform(0.8, 1.0, size=4)
        else:
            x[i, :, k] = rng.uniform(0.8, 1.0, size=4)
    return torch.tensor(x.reshape(n, 16), dtype=torch.float32)


@pytest.fixture(scope="module")
def bars_setup():
    rng = np.random.default_rng(0)
    private = bars(200, horizontal=True, rng=rng)  # the user's class: horizontal bars
    model, _ = train_autoencoder(
        private, AutoencoderSpec(hidden=6), TrainSpec(epochs=150, batch_size=32), seed=0
    )
    public = torch.cat([bars(100, True, rng), bars(100, False, rng)])
    labels = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    return frozen_autoencoder(state_to_numpy(model)), public, labels


def test_inversion_recovers_the_trained_class_not_the_other(bars_setup):
    # Prepare: an autoencoder of horizontal bars; public data holds both kinds of bars.
    model, public, labels = bars_setup
    knn = NearestNeighbours(public, labels, k=5)
    prior = PublicPrior.from_features(public, components=8)
    spec = InversionSpec(space="prior", steps=300, lr=0.05, restarts=16, seed=1)
    starts = prior.decode(prior.sample(16, torch.Generator().manual_seed(1)))
    # Execute
    recovered = invert(model, spec, prior)
    pixels = invert(
        model, InversionSpec(space="pixels", steps=300, lr=0.02, restarts=16, seed=1), prior
    )
    # Assert: most recovered inputs are horizontal bars, far more than where the search started
    assert recovered.shape == (16, 16)
    assert float(recovered.min()) >= 0.0 and float(recovered.max()) <= 1.0
    named = (knn.predict(recovered) == 0).float().mean().item()
    assert named >= 0.75
    assert named > (knn.predict(starts) == 0).float().mean().item() + 0.2
    assert (knn.predict(pixels) == 0).float().mean().item() >= 0.75
    # ... and the autoencoder reconstructs them better than its own training images on average
    assert dissimilarity(model, recovered).mean() < dissimilarity(model, public[:100]).mean()


def test_inversion_is_seeded_and_checks_its_inputs(bars_setup):
    model, public, _ = bars_setup
    prior = PublicPrior.from_features(public, components=4)
    spec = InversionSpec(steps=5, restarts=2, seed=3)
    assert torch.equal(invert(model, spec, prior), invert(model, spec, prior))
    with pytest.raises(ValueError, match="needs a PublicPrior"):
        invert(model, spec)
    with pytest.raises(ValueError, match="space must be one of"):
        InversionSpec(space="latent")
    with pytest.raises(ValueError, match="dimension"):
        invert(model, spec, PublicPrior.from_features(torch.rand(10, 8), 2))


def test_frozen_autoencoder_scores_like_the_training_code(bars_setup):
    model, public, _ = bars_setup
    assert torch.allclose(dissimilarity(model, public), reconstruction_errors(model, public))
    assert not any(p.requires_grad for p in model.parameters())


def test_membership_auroc_on_synthetic_errors():
    members = np.array([0.1, 0.2, 0.3])
    others = np.array([1.0, 2.0])
    assert membership_auroc(members, others) == 1.0  # training images: lower errors
    assert membership_auroc(others, members) == 0.0
    assert membership_auroc(np.ones(5), np.ones(3)) == 0.5
    assert membership_auroc(torch.tensor([0.5, 1.5]), torch.tensor([1.0])) == 0.5


def test_nearest_is_member_tells_copies_of_training_images_from_class_prototypes():
    rng = np.random.default_rng(0)
    members = torch.tensor(rng.uniform(size=(20, 8)), dtype=torch.float32)
    others = torch.tensor(rng.uniform(size=(20, 8)), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    assert nearest_is_member(members[:10] + 1e-4, members, others, gen) == 1.0
    assert nearest_is_member(others[:10], members, others, gen) == 0.0
    # Unbalanced: 20 of 200 training images are drawn, so copies of the others still lose.
    many = torch.cat([members, torch.rand(180, 8, generator=gen)])
    assert nearest_is_member(others, many, others, gen) == 0.0
    with pytest.raises(ValueError, match="need"):
        nearest_is_member(others, members[:0], others, gen)


def test_identification_ranks_people_by_mean_distance():
    gallery = torch.tensor([[0.0, 0.0], [0.0, 0.2], [1.0, 1.0], [1.0, 1.2], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    templates = torch.tensor([[0.0, 0.1], [1.0, 1.1], [4.0, 4.0]])
    ranks, per = identification_ranks(templates, gallery, labels, owner=0)
    assert ranks == [0, 1, 2]
    assert per[0][0] == pytest.approx(0.1)
    ranks, _ = identification_ranks(templates, gallery, labels, owner=1, candidates=[0, 1])
    assert ranks == [1, 0, 0]
    with pytest.raises(ValueError, match="not among"):
        identification_ranks(templates, gallery, labels, owner=2, candidates=[0, 1])


#: The tiny MNIST copy (60 training, 30 test images per digit), 3 users.
TINY = ("dataset.verify=false", "dataset.harmless.verify=false", "num_users=3")


def small_attack(folder):
    return privacy_attack.attack_run(folder, SMALL)


def test_privacy_experiment_on_tiny_digits_without_dp(tiny_root, tmp_path):
    # Prepare: a checkout without train.dp: the DP settings are skipped, "none" runs
    settings = privacy.PrivacySettings(
        out=tmp_path / "out",
        datasets=("mnist",),
        epsilons=("8", "none"),
        extra=(f"data_root={tiny_root}", *TINY),
    )
    fake = FakeLaunch(epochs=3, hidden=8)
    # Execute
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(privacy, "launch", fake)
        report, md = privacy.run_privacy(settings, attack=small_attack, has_dp=lambda: False)
    # Assert: one run, into OUT/runs/mnist/none, with the data set's and the extra overrides
    assert fake.calls == [(list(settings.extra), settings.out / "runs" / "mnist" / "none")]
    saved = json.loads((settings.out / "results.json").read_text())
    assert saved["skipped"] == report["skipped"] and saved["seconds"] == report["seconds"]
    assert set(saved) == {"machine_start", "datasets", "skipped", "seconds", "machine_end"}
    assert list(saved["datasets"]) == ["mnist"] and list(saved["datasets"]["mnist"]) == ["none"]
    numbers = saved["datasets"]["mnist"]["none"]
    assert numbers["run"] == "runs/mnist/none" and numbers["overrides"] == list(settings.extra)
    assert numbers["kind"] == "classes" and numbers["users"] == 3
    assert set(numbers["membership"]["per_user"]) == {"0", "1", "2"}
    assert numbers["membership"]["members_nonmembers"]["0"] == [60, 30]
    assert all(0.0 <= v <= 1.0 for v in numbers["membership"]["per_user"].values())
    for name in ("prior", "pixels"):
        inv = numbers["inversion"][name]
        assert 0.0 <= inv["score"] <= 1.0 and len(inv["named"]["1"]) == SMALL[name].restarts
        assert 0.0 <= inv["nearest_is_member"] <= 1.0
    assert numbers["attacks"]["prior"]["steps"] == SMALL["prior"].steps
    # The attack works on these easy autoencoders: every user's restarts are mostly named as
    # its digit by the public classifier, far above where the search started.
    prior = numbers["inversion"]["prior"]
    assert prior["users_recovered"] == 3
    assert prior["score"] >= numbers["inversion"]["start"]["score"] + 0.4
    assert [prior["named"][u].count(int(u)) >= 3 for u in "012"] == [True] * 3
    assert numbers["public"]["num_images"] == 150  # the first half of the 300 test images
    assert numbers["overall_accuracy"] == 0.9 and numbers["train_seconds_mean"] == 2.0
    assert (settings.out / "summary.md").read_text() == md
    assert "| none (default recipe) | 3 |" in md and "Not run: DP settings" in md
    for png in ("inversion_mnist.png", "tradeoff.png"):
        assert (settings.out / png).stat().st_size > 5000


def test_attacking_a_tiny_face_run_folder(tmp_path):
    # Prepare: 3 of the 40 ORL people on pixel features (the face extractor is slow in tests)
    run = tmp_path / "runs" / "faces" / "eps-8"
    FakeLaunch(epochs=3, hidden=8)(
        ["dataset=att_faces", "features=identity", "partition=random_classes", "num_users=3"], run
    )
    settings = privacy.PrivacySettings(out=tmp_path, attack=(run,))
    # Execute: --attack (no run), with the prior attack only
    report, md = privacy.run_privacy(
        settings, attack=lambda f: privacy_attack.attack_run(f, {"prior": SMALL["prior"]})
    )
    # Assert: the run is filed under its kind and folder name
    numbers = report["datasets"]["people"]["eps-8"]
    assert numbers["run"] == "runs/faces/eps-8" and "overrides" not in numbers
    assert numbers["kind"] == "people"
    assert numbers["public"]["num_images"] == 37 * 10  # the unregistered people's photos
    assert numbers["membership"]["members_nonmembers"]["0"] == [7, 3]
    per_user = numbers["inversion"]["prior"]["per_user"]
    drawn = load_experiment(run / "experiment.yaml").assignment
    assert {v["person"] for v in per_user.values()} == {cs[0] for cs in drawn.values()}
    assert all(0 <= v["rank_among_registered"] <= 2 for v in per_user.values())
    assert all(0 <= v["rank_among_all"] <= 39 for v in per_user.values())
    assert numbers["inversion"]["prior"]["within_tolerance"] is None  # not dlib descriptors
    assert numbers["inversion"]["prior"]["distance_training_photos"] > 0.0
    assert numbers["public"]["people"] == 40
    assert "epsilon = 8" in md
    assert (tmp_path / "inversion_people_eps-8.png").stat().st_size > 5000
    assert (tmp_path / "tradeoff.png").stat().st_size > 5000


def test_settings_and_overrides_of_the_runs():
    assert privacy.settings_for(["1", "4", "8", "none"], "dp", dp=True) == [
        "eps-1",
        "eps-4",
        "eps-8",
        "none-dp-recipe",
        "none",
    ]
    assert privacy.settings_for(["1", "none"], "dp", dp=False) == ["none"]
    assert privacy.settings_for(["8", "none"], "default", dp=True) == ["eps-8", "none"]
    faces = privacy.overrides_for("faces", "none", "dp", [])
    assert "train.min_steps=1000" in faces and "features=face" in faces
    assert privacy.overrides_for("mnist", "eps-4", "dp", []) == ["train=dp", "train.dp.epsilon=4"]
    assert privacy.overrides_for("mnist", "none-dp-recipe", "dp", []) == [
        "train=dp",
        "train.dp.epsilon=null",
    ]
    assert privacy.overrides_for("faces", "eps-1", "default", [])[-2:] == [
        "train.min_steps=1000",
        "train.dp.epsilon=1",
    ]
    assert privacy.PrivacySettings().epsilons == ("1", "4", "8", "none")
    for bad in ("0", "-1"):
        with pytest.raises(ValueError, match="epsilon must be > 0"):
            privacy.PrivacySettings(epsilons=(bad, "none"))
    with pytest.raises(ValueError, match="unknown data sets"):
        privacy.PrivacySettings(datasets=("cifar",))
