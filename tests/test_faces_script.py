"""The face experiment (experiments/faces.py): one draw of 3 ORL people on pixel features and its
adversaries, analysed, summarised and plotted, with an in-process stand-in for ``docl-flower``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from docl_flower.experiments import adversaries, faces

from .fake_runs import FakeLaunch


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    settings = faces.FaceSettings(
        out=tmp_path_factory.mktemp("faces"),
        draws=1,
        extractors=("identity",),
        adversaries=("identity",),
        subsets=3,
        extra=("num_users=3",),
    )
    fake = FakeLaunch(epochs=3, hidden=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(faces, "launch", fake)
        mp.setattr(adversaries, "launch", fake)
        report, md = faces.run_faces(settings)
    return settings, fake, report, md


def test_a_draw_and_its_adversaries_are_two_runs(made):
    settings, fake, report, _ = made
    data = ["dataset=att_faces", "features=identity"]
    assert fake.runs("draw-0") == [[*data, "partition=random_classes", "seed=0", "num_users=3"]]
    # The adversaries pair the drawn people (3 of 40), with the draw's data, seed and extras.
    people = report["extractors"]["identity"][0]["people"]
    (adv,) = fake.runs("adversaries-draw-0")
    assert adv[:4] == [*data, "seed=0", "num_users=3"]
    assert "num_users=6" in adv
    assert (
        "partition.user_classes=[" + ",".join(f"[{p}]" for p in people for _ in "ab") + "]" in adv
    )
    folders = [folder for _, folder in fake.calls]
    assert folders == [
        faces.run_dir(settings.out, "identity", 0),
        faces.adversary_dir(settings.out, "identity"),
    ]


def test_numbers_summary_and_plots_of_the_draw(made):
    settings, _, report, md = made
    saved = json.loads((settings.out / "faces.json").read_text())
    assert set(saved) == {"draws", "alpha", "extractors", "adversaries", "seconds"}
    assert saved["extractors"] == report["extractors"] and saved["alpha"] == 1.5
    assert (settings.out / "summary.md").read_text() == md
    (numbers,) = report["extractors"]["identity"]
    assert len(numbers["people"]) == 3 and all(0 <= p < 40 for p in numbers["people"])
    assert numbers["num_harmless"] == 37 * 10  # every photo of the 37 unregistered people
    assert set(numbers["per_person_accuracy"]) == {str(p) for p in numbers["people"]}
    assert set(numbers["alpha_sweep"]) == {"one", "two"}
    one = [r["acceptance_rate"] for r in numbers["alpha_sweep"]["one"]]
    assert one == sorted(one, reverse=True)  # a wider interval never shares more
    assert set(numbers["scalability"]) == {"1", "3"}
    assert "raw pixels" in md and "Scalability" in md
    for png in ("faces_tradeoff.png", "faces_scalability.png", "faces_adversaries_identity.png"):
        assert (settings.out / png).stat().st_size > 5000


def test_the_adversary_matrix_of_the_draw(made):
    _, _, report, md = made
    mats = report["adversaries"]["identity"]
    assert set(mats) == set(faces.SIDES)
    for sided in faces.SIDES:
        m = np.array(mats[sided], dtype=float)
        assert m.shape == (3, 3) and np.isnan(np.diag(m)).all()
        off = m[~np.eye(3, dtype=bool)]
        assert np.isfinite(off).all() and ((off >= 0) & (off <= 1)).all()
        assert f"{sided}-sided: mean {off.mean():.3f}, min {off.min():.3f}" in md
    # The one-sided interval holds the two-sided one: it never blocks less.
    two, one = (np.nan_to_num(np.array(mats[s], dtype=float)) for s in ("two", "one"))
    assert (one >= two - 1e-12).all()
