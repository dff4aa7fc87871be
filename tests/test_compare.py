"""The comparison (experiments/compare.py): tables and plots are made from results files only."""

from docl_flower.core.evaluation.results import RunResult, write_results
from docl_flower.experiments import compare


def _fake(acc: float, down: int, curve: bool = True, **extra):
    r = {
        "method": "x",
        "registered": [0, 1],
        "failed": {},
        "train_seconds": {},
        "overall_accuracy": acc,
        "per_class_accuracy": {"0": acc, "1": acc / 2},
        "rounds": 2,
        "bytes_uploaded": {"0": 100, "1": 100},
        "bytes_downloaded": {"0": down, "1": down},
        "wall_seconds": 3.0,
        "receives_others_parameters": down > 0,
        **extra,
    }
    if curve:
        r["accuracy_curve"] = [
            {"round": 0, "accuracy": 0.1, "bytes_per_user": 0.0},
            {"round": 1, "accuracy": acc, "bytes_per_user": 200.0},
        ]
    return RunResult.from_dict(r)


GUARD_CURVE = [
    {"alpha": 1.0, "guarded_accuracy": 0.80, "acceptance_rate": 0.999},
    {"alpha": 2.0, "guarded_accuracy": 0.90, "acceptance_rate": 0.985},
    {"alpha": 3.0, "guarded_accuracy": 0.95, "acceptance_rate": 0.960},
]


def test_table_and_plot_from_results(tmp_path):
    rows = {
        "docl": _fake(0.97, 0, curve=False, method="docl", guard_curve=GUARD_CURVE),
        "fedavg": _fake(0.3, 1000),
        "centralised": _fake(0.98, 0, uploads_raw_images=True),
    }
    md = compare.table(rows)
    assert md.count("\n") == 5
    assert "| DOCL (one class per user) | 0.9700 | 0.4850 | 2 | 0.9000 | 0.9850 | 2 |" in md
    assert "autoencoder weights" in md.splitlines()[2]
    assert "yes" in md.splitlines()[3] and "model updates" in md.splitlines()[3]
    assert "raw images" in md and "hands over its images" in md
    compare.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 5000


def test_the_common_acceptance_level_picks_the_closest_point():
    r = _fake(0.9, 0, guard_curve=GUARD_CURVE)
    assert compare.at_acceptance(r, 0.98)["alpha"] == 2.0
    assert compare.at_acceptance(r, 0.95)["alpha"] == 3.0
    assert compare.at_acceptance(_fake(0.9, 0), 0.98) is None


def test_the_sampled_classifier_is_a_row_of_its_own_without_a_guard():
    r = _fake(
        0.95,
        0,
        curve=False,
        method="feature_stats",
        guard_curve=GUARD_CURVE,
        guarded_accuracy=0.9,
        sampled_classifier_accuracy=0.93,
        sampled_classifier_per_class_accuracy={"0": 0.96, "1": 0.9},
        config={"strategy": {"covariance": "shrunk", "components": 1}},
    )
    md = compare.table({"feature_stats": r, "feature_stats-sampled": compare.sampled_view(r)})
    lines = md.splitlines()
    assert "| 0.9500 | 0.4750 | 2 | 0.9000 | 0.9850 | 2 |" in lines[2]
    assert "class mean and covariance" in lines[2]
    assert "| 0.9300 | 0.9000 | 2 | - | - | - | - |" in lines[3]


def test_a_partial_rerun_carries_the_previous_rows_over(tmp_path):
    # Prepare: a table of an older layout (fewer columns), as committed before.
    old = tmp_path / "comparison.md"
    old.write_text(
        "| method | overall acc. | worst class acc. | rounds | MB up / user | MB down / user | "
        "wall s | user receives others' parameters |\n|---|---|---|---|---|---|---|---|\n"
        "| FedAvg, 2NN (one class per user) | 0.7402 | 0.0011 | 30 | 23.91 | 23.91 | 282 | yes |\n"
        "| Centralised 2NN (all images on the server) (uploads raw images) | 0.9852 | 0.9713 | "
        "10 | 4.70 | 0.00 | 59 | no (hands over its images) |\n"
    )
    # Execute
    carried = compare.previous_rows(old, ["fedavg", "centralised", "fedprox"])
    md = compare.table({"docl": _fake(0.97, 0)}, carried=carried, order=["docl", *carried])
    # Assert
    assert sorted(carried) == ["centralised", "fedavg"]
    assert (
        "| FedAvg, 2NN (one class per user) (carried over) | 0.7402 | 0.0011 | 30 | - | - | - | - "
        "| 23.91 | 23.91 | 282 | model updates (every round) | yes |" in md
    )
    assert "raw images | no (hands over its images) |" in md
    # The new table can itself be carried over again.
    old.write_text(md)
    assert sorted(compare.previous_rows(old, ["fedavg", "centralised"])) == [
        "centralised",
        "fedavg",
    ]


def test_a_partial_run_runs_its_rows_reads_the_others_and_carries_the_rest(tmp_path):
    # Prepare: FedAvg ran before (its results file), the centralised row only in the old table.
    write_results(tmp_path / "runs" / "fedavg" / "results.json", _fake(0.7, 1000))
    (tmp_path / "comparison.md").write_text(
        compare.table({"centralised": _fake(0.98, 0, uploads_raw_images=True)})
    )
    stats = _fake(
        0.9,
        0,
        method="feature_stats",
        sampled_classifier_accuracy=0.85,
        config={"strategy": {"covariance": "shrunk", "components": 1}},
    )
    ran = []

    def runner(overrides, run_dir, reuse):
        ran.append((run_dir.name, list(overrides), reuse))
        return stats if run_dir.name == "feature_stats" else _fake(0.97, 0, method="docl")

    settings = compare.CompareSettings(
        out=tmp_path, dataset="mnist", only=["docl", "feature_stats"], reuse=True, extra=("x=1",)
    )
    # Execute
    md, states = compare.compare_table("mnist", settings, runner)
    # Assert
    assert ran == [
        ("docl", ["x=1"], True),
        ("feature_stats", ["strategy=feature_stats", "x=1"], True),
    ]
    labels = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines()[2:]]
    assert labels == [
        "DOCL (one class per user)",
        "Feature statistics, shrunk Gaussian, likelihood",
        "Feature statistics, shrunk Gaussian, classifier of sampled features",
        "FedAvg, 2NN (one class per user)",
        "Centralised 2NN (all images on the server) (carried over)",
    ]
    assert states == {
        "feature_stats-mix3": "not run",
        "fedprox": "not run",
        "fedavg-iid": "not run",
        "fedprox-iid": "not run",
        "centralised": "carried over from the previous table",
    }
    assert (tmp_path / "comparison.md").read_text() == md
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 5000  # with the carried row


def test_the_rounds_and_epochs_go_to_the_rows_that_have_them():
    settings = compare.CompareSettings(rounds=7, centralised_epochs=3)
    assert compare.overrides_for("fedprox-iid", settings)[-1] == "strategy.num_rounds=7"
    assert compare.overrides_for("centralised", settings) == [
        "strategy=centralised",
        "strategy.epochs=3",
    ]
    # The faces reference sets its own epochs; DOCL has no rounds.
    assert compare.overrides_for("faces-centralised", settings)[-1] == "strategy.epochs=100"
    assert compare.overrides_for("docl", settings) == []
    assert compare.CompareSettings(dataset="faces").datasets() == ["faces"]
    assert compare.CompareSettings().datasets() == ["mnist", "faces"]
