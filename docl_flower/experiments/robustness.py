"""Edited re-uploads: what the filter blocks when a registered user's photos come back edited.

Hash matching (PDQ, as StopNCII uses it) catches exact and lightly edited re-uploads and misses
crops, rotations and flips; DOCL is meant to catch new photos of a registered person. This
experiment measures DOCL itself on edited re-uploads. For each setting (ORL faces with the face
descriptor, the ImageNet CNN, or plain pixels) one ``docl-flower`` run trains 10 registered
people and calibrates the Guard to a stated acceptance rate (``guard.target_acceptance``, on
half of the unregistered people). Then every registered user's own training photos and held-out
photos are edited (:data:`EDITS`: JPEG, resizing, crops, rotations, a flip, brightness, noise)
and decided by the saved filter exactly as ``filter check`` decides a third party's upload
(:func:`~docl_flower.operations.deciding.decide`, uploader ``-1``); the share blocked is
reported per edit, next to the acceptance of the unregistered people's photos (unedited).
Writes ``robustness.json`` and ``summary.md``.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageEnhance

from docl_flower.federation.components import load_experiment
from docl_flower.operations import deciding

from .launch import Runner, runs_per_seed
from .tables import fmt, markdown_table

#: The settings: Hydra overrides of each one's run (faces, 10 of the 40 people per seed).
SETTINGS: dict[str, tuple[str, ...]] = {
    "face": ("dataset=att_faces", "features=face", "partition=random_classes"),
    "imagenet": ("dataset=att_faces", "features=imagenet", "partition=random_classes"),
    "pixels": ("dataset=att_faces", "features=identity", "partition=random_classes"),
}
#: The Guard's stated acceptance rate (``guard.target_acceptance``) of every run.
DEFAULT_TARGET = 0.98
DEFAULT_SEEDS = (0,)

Edit = Callable[[Image.Image], Image.Image]


def _jpeg(quality: int) -> Edit:
    def edit(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert(img.mode)

    return edit


def _resize(factor: float) -> Edit:
    def edit(img: Image.Image) -> Image.Image:
        size = (max(1, round(img.size[0] * factor)), max(1, round(img.size[1] * factor)))
        return img.resize(size, Image.Resampling.BILINEAR)

    return edit


def _crop(percent: float) -> Edit:
    """Cut ``percent`` of each side's length off, centred (what remains: a closer shot)."""

    def edit(img: Image.Image) -> Image.Image:
        w, h = img.size
        dx, dy = round(w * percent / 200), round(h * percent / 200)
        return img.crop((dx, dy, w - dx, h - dy))

    return edit


def _rotate(degrees: float) -> Edit:
    def edit(img: Image.Image) -> Image.Image:
        return img.rotate(degrees, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=0)

    return edit


def _brightness(factor: float) -> Edit:
    def edit(img: Image.Image) -> Image.Image:
        return ImageEnhance.Brightness(img).enhance(factor)

    return edit


def _noise(sigma: float, seed: int = 0) -> Edit:
    def edit(img: Image.Image) -> Image.Image:
        pixels = np.asarray(img, dtype=np.float64)
        rng = np.random.default_rng([seed, int(pixels.sum()) % 2**31])
        noisy = np.clip(pixels + rng.normal(0.0, sigma, pixels.shape), 0, 255)
        return Image.fromarray(noisy.round().astype(np.uint8), img.mode)

    return edit


def _flip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _same(img: Image.Image) -> Image.Image:
    return img


#: The edits of the issue (ORL photos are grey, so grey/colour conversion changes nothing and is
#: left out). Every edited photo is then read at the filter's image shape, as an upload is.
EDITS: dict[str, Edit] = {
    "none": _same,
    "jpeg q75": _jpeg(75),
    "jpeg q50": _jpeg(50),
    "resize 0.5x": _resize(0.5),
    "crop 2%": _crop(2),
    "crop 5%": _crop(5),
    "crop 10%": _crop(10),
    "crop 20%": _crop(20),
    "rotate 1 deg": _rotate(1),
    "rotate 5 deg": _rotate(5),
    "rotate 15 deg": _rotate(15),
    "horizontal flip": _flip,
    "brightness +20%": _brightness(1.2),
    "brightness -20%": _brightness(0.8),
    "noise sigma 8": _noise(8.0),
}


def edited(images: NDArray[np.uint8], edit: Edit, shape: tuple[int, ...]) -> NDArray[np.uint8]:
    """``images`` after ``edit``, each read back at ``shape`` (``(H, W)`` grey or RGB)."""
    mode = "RGB" if len(shape) == 3 else "L"
    out = []
    for pixels in images:
        img = edit(Image.fromarray(pixels).convert(mode))
        if img.size != (shape[1], shape[0]):
            img = img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
        out.append(np.asarray(img.convert(mode), dtype=np.uint8))
    return np.stack(out) if out else np.zeros((0, *shape), np.uint8)


def blocked_share(loaded: deciding.LoadedFilter, images: NDArray[np.uint8]) -> float:
    """Share of ``images`` that the filter blocks when a third party uploads them."""
    decisions = deciding.decide(loaded, images, -1)
    return sum(d.block for d in decisions) / max(1, len(decisions))


def measure_run(folder: Path, edits: Sequence[str] = tuple(EDITS)) -> dict[str, Any]:
    """One saved run: per edit, the share blocked of the registered users' photos."""
    exp = load_experiment(folder / "experiment.yaml")
    loaded = deciding.load(folder / "filter")
    shape = loaded.image_shape
    if shape is None:
        raise ValueError(f"{folder}: the filter has no image shape")
    registered = sorted({c for classes in exp.assignment.values() for c in classes})
    train_x, train_y = exp.dataset.load("train")
    test_x, test_y = exp.dataset.load("test")
    own = train_x[np.isin(train_y, registered)]
    held_out = test_x[np.isin(test_y, registered)]
    others = np.concatenate(
        [train_x[~np.isin(train_y, registered)], test_x[~np.isin(test_y, registered)]]
    )
    rows = []
    for name in edits:
        rows.append(
            {
                "edit": name,
                "own_blocked": blocked_share(loaded, edited(own, EDITS[name], shape)),
                "held_out_blocked": blocked_share(loaded, edited(held_out, EDITS[name], shape)),
            }
        )
    return {
        "alpha": loaded.alpha,
        "guard": loaded.guard_name,
        "extractor": loaded.extractor,
        "own_photos": int(own.shape[0]),
        "held_out_photos": int(held_out.shape[0]),
        "other_people_photos": int(others.shape[0]),
        # unedited photos of people nobody registered: the harmless uploads
        "other_people_accepted": 1.0 - blocked_share(loaded, others),
        "edits": rows,
    }


@dataclass(frozen=True)
class RobustnessSettings:
    """What ``scripts/robustness.py`` measures."""

    out: Path
    settings: tuple[str, ...] = tuple(SETTINGS)
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    target: float = DEFAULT_TARGET
    extra: tuple[str, ...] = ()
    reuse: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; choose from {sorted(SETTINGS)}")
        if not self.seeds:
            raise ValueError("at least one seed")
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"target must lie in (0, 1), got {self.target}")


def run_robustness(
    settings: RobustnessSettings, runner: Runner | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Train (or reuse) every run, measure it, write ``robustness.json`` and ``summary.md``."""
    found = runs_per_seed(
        settings.out,
        settings.settings,
        settings.seeds,
        lambda name, seed: [
            *SETTINGS[name],
            f"seed={seed}",
            f"guard.target_acceptance={settings.target}",
            *settings.extra,
        ],
        lambda folder, seed: [{"seed": seed, **measure_run(folder)}],
        "robustness.json",
        runner,
        settings.reuse,
    )
    (settings.out / "summary.md").write_text(summary(found, settings.target))
    return found


def summary(found: dict[str, list[dict[str, Any]]], target: float) -> str:
    """One table: per edit, the share blocked of own and held-out photos for each setting."""
    names = list(found)
    lines = [
        "# Edited re-uploads of registered users' photos",
        "",
        f"Share blocked when a third party uploads a registered user's photo after the edit "
        f"(mean over seeds); the Guard calibrated to acceptance {target:g} on half of the "
        "unregistered people. 'own': the user's training photos (what a hash list would "
        "hold); 'new': their held-out photos. Last row: the share accepted of the unedited "
        "photos of the people nobody registered (harmless; all of them, so half of them are "
        "the ones the Guard was calibrated on).",
        "",
    ]
    header = ["edit"] + [f"{n}: own / new" for n in names]
    table = []
    edits = [r["edit"] for r in found[names[0]][0]["edits"]] if names and found[names[0]] else []
    for i, edit in enumerate(edits):
        row = [edit]
        for n in names:
            own = statistics.mean(run["edits"][i]["own_blocked"] for run in found[n])
            new = statistics.mean(run["edits"][i]["held_out_blocked"] for run in found[n])
            row.append(f"{fmt(own, '.3f')} / {fmt(new, '.3f')}")
        table.append(row)
    table.append(
        ["others accepted"]
        + [
            fmt(statistics.mean(run["other_people_accepted"] for run in found[n]), ".3f")
            for n in names
        ]
    )
    lines += [markdown_table(header, table), ""]
    for n in names:
        alphas = ", ".join(fmt(run["alpha"], ".3f") for run in found[n])
        lines.append(f"- {n}: alpha {alphas}; {found[n][0]['extractor']}")
    return "\n".join(lines) + "\n"
