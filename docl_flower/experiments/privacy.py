"""What the server learns from DOCL's uploads: inversion and membership inference, with DP.

Every run is one ``docl-flower`` run (Flower simulation) in ``OUT/runs/DATASET/SETTING``:
MNIST with the default experiment (10 users, one digit each), faces with the paper's protocol
on ORL (``dataset=att_faces features=face partition=random_classes seed=0``: 10 of the 40
people, 7 training photos each; one draw). Settings: ``none`` is the default recipe without
differential privacy (faces: ``train.min_steps=1000`` as ``make faces`` trains them);
``eps-E`` adds ``train.dp.epsilon=E`` on the recipe that ``dp_recipe`` names (default
``train=dp``, the recipe made for DP-SGD), and ``none-dp-recipe`` is that recipe without DP,
to tell what DP costs from what the recipe costs.

Then every uploaded autoencoder is attacked from the server's side only
(:mod:`docl_flower.experiments.privacy_attack`), and :func:`run_privacy` writes
``OUT/results.json``, ``OUT/summary.md``, ``OUT/inversion_mnist.png``,
``OUT/inversion_faces.png`` (and per DP setting ``inversion_DATASET_SETTING.png``) and
``OUT/tradeoff.png`` (:mod:`docl_flower.experiments.privacy_report`). With ``attack`` set it
attacks existing run folders only (no Flower run).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docl_flower.core.pipeline.config import compose_config
from docl_flower.experiments.privacy_attack import Attacked, attack_run
from docl_flower.experiments.privacy_report import write_outputs
from docl_flower.operations.runs import launch

#: Hydra overrides of each data set (faces: the paper's protocol, one draw).
DATASETS: dict[str, list[str]] = {
    "mnist": [],
    "faces": ["dataset=att_faces", "features=face", "partition=random_classes", "seed=0"],
}
#: What the ``none`` setting adds per data set (faces are trained as ``make faces`` does).
NO_DP_EXTRA: dict[str, list[str]] = {"mnist": [], "faces": ["train.min_steps=1000"]}
#: The files a finished run must hold to be reused (the saved filter is what is attacked).
NEEDS = ("filter",)
#: Decimals of the load averages recorded with the results.
LOAD_DECIMALS = 2


@dataclass(frozen=True)
class PrivacySettings:
    """What ``scripts/privacy.py`` runs (its command-line options)."""

    out: Path = Path("privacy")
    datasets: tuple[str, ...] = tuple(DATASETS)
    #: Total epsilon per upload of each DP setting; ``none``: the settings without DP.
    epsilons: tuple[str, ...] = ("1", "4", "8", "none")
    #: The train config group of the DP runs (``default``: the default recipe).
    dp_recipe: str = "dp"
    #: Reuse finished runs.
    reuse: bool = False
    #: Hydra overrides for every run.
    extra: tuple[str, ...] = ()
    #: Attack these run folders only (no Flower run).
    attack: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        for e in self.epsilons:
            if e != "none" and not float(e) > 0:
                raise ValueError(f"epsilon must be > 0 or 'none', got {e}")
        unknown = sorted(set(self.datasets) - set(DATASETS))
        if unknown:
            raise ValueError(f"unknown data sets {unknown}; choose from {list(DATASETS)}")


# ---------------------------------------------------------------- settings and runs


def setting_name(epsilon: str) -> str:
    """``"none"`` or ``"eps-E"``."""
    return "none" if epsilon == "none" else f"eps-{epsilon}"


def settings_for(epsilons: Sequence[str], dp_recipe: str, dp: bool) -> list[str]:
    """The settings to run, most private first; the DP recipe's control next to ``none``."""
    numbers = sorted((e for e in epsilons if e != "none"), key=float)
    out = [setting_name(e) for e in numbers] if dp else []
    if "none" in epsilons:
        if dp and numbers and dp_recipe != "default":
            out.append("none-dp-recipe")
        out.append("none")
    return out


def overrides_for(dataset: str, setting: str, dp_recipe: str, extra: Sequence[str]) -> list[str]:
    """The Hydra overrides of one run."""
    base = [*DATASETS[dataset], *extra]
    recipe = [] if dp_recipe == "default" else [f"train={dp_recipe}"]
    if setting == "none":
        return [*base, *NO_DP_EXTRA[dataset]]
    if setting == "none-dp-recipe":
        return [*base, *recipe, "train.dp.epsilon=null"]
    epsilon = setting.removeprefix("eps-")
    if dp_recipe == "default":
        recipe = NO_DP_EXTRA[dataset]
    return [*base, *recipe, f"train.dp.epsilon={epsilon}"]


def dp_available() -> bool:
    """Whether this checkout's config has ``train.dp`` (differentially private training)."""
    cfg = compose_config()
    return "dp" in cfg.train


def relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when below it, else its name (no machine paths)."""
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return path.name


def machine() -> dict[str, Any]:
    """CPUs and load averages: what else ran on the machine while the timings were taken."""
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "load_average_1_5_15": [round(v, LOAD_DECIMALS) for v in load],
    }


def _progress(dataset: str, setting: str, a: Attacked) -> None:
    print(
        f"{dataset} {setting}: inversion {a.numbers['inversion']['prior']['score']:.3f}"
        f", membership AUROC {a.numbers['membership']['auroc']:.3f}"
        f" ({a.numbers['attack_seconds']:.0f}s)",
        flush=True,
    )


def run_privacy(
    settings: PrivacySettings,
    attack: Callable[[Path], Attacked] = attack_run,
    has_dp: Callable[[], bool] = dp_available,
) -> tuple[dict[str, Any], str]:
    """The runs (or the folders of ``settings.attack``), the attacks and every output.

    ``attack`` attacks one run folder (tests pass smaller attacks); ``has_dp`` tells whether
    the config has DP training. Returns the report (``results.json``) and the summary.
    """
    start = time.time()
    report: dict[str, Any] = {"machine_start": machine(), "datasets": {}}
    attacked: dict[str, dict[str, Attacked]] = {}
    if settings.attack:
        for folder in settings.attack:
            a = attack(folder)
            name = folder.name
            report["datasets"].setdefault(a.kind, {})[name] = {
                **a.numbers,
                "run": relative(folder, settings.out),
            }
            attacked.setdefault(a.kind, {})[name] = a
    else:
        dp = has_dp()
        chosen = settings_for(settings.epsilons, settings.dp_recipe, dp)
        if not dp and any(e != "none" for e in settings.epsilons):
            report["skipped"] = "DP settings (this checkout has no train.dp option)"
            print("train.dp is not in conf/train: running the settings without DP only")
        for dataset in settings.datasets:
            report["datasets"][dataset] = {}
            attacked[dataset] = {}
            for setting in chosen:
                folder = settings.out / "runs" / dataset / setting
                overrides = overrides_for(dataset, setting, settings.dp_recipe, settings.extra)
                launch(overrides, folder, reuse=settings.reuse, needs=NEEDS)
                a = attack(folder)
                _progress(dataset, setting, a)
                report["datasets"][dataset][setting] = {
                    **a.numbers,
                    "overrides": overrides,
                    "run": relative(folder, settings.out),
                }
                attacked[dataset][setting] = a
    report["seconds"] = time.time() - start
    report["machine_end"] = machine()
    return report, write_outputs(settings.out, report, attacked)
