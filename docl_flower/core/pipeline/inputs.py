"""What the autoencoders see: a data set's images through the provider's extractor.

Features of an expensive extractor (faces, ImageNet CNNs) are computed once per data set,
extractor and split and kept in the on-disk feature cache (:mod:`.feature_cache`); a client
reads only its own rows. Pixel extractors (identity, deskew) run directly on the rows asked.
The server's test and harmless sets come from here too, with the number of images for which
the extractor fell back (faces: no face detected, the whole image was used).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from docl_flower.core.data.base import ImageDataset, Split
from docl_flower.core.features.cache import FeatureCache
from docl_flower.core.features.extractors import Extraction, FeatureExtractor
from docl_flower.core.pipeline.config import Experiment


def split_features(
    dataset: ImageDataset,
    extractor: FeatureExtractor,
    split: Split,
    rows: NDArray[np.int64] | None = None,
    images: NDArray[np.uint8] | None = None,
    cache: FeatureCache | None = None,
) -> Extraction:
    """Features of ``rows`` of a split (all rows if None), through the feature cache.

    ``images`` are the split's images when the caller has loaded them already.
    """

    def load() -> NDArray[np.uint8]:
        return images if images is not None else dataset.load(split)[0]

    return (cache or FeatureCache()).extract(dataset.fingerprint(), extractor, split, load, rows)


@dataclass(frozen=True)
class ServerSets:
    """The server's evaluation data: test images of every class, and harmless images."""

    x_test: torch.Tensor
    y_test: torch.Tensor
    harmless: torch.Tensor | None
    #: Images per set for which the extractor fell back (faces: no face detected).
    fallbacks: dict[str, int]
    #: The class (person) of each harmless image where they are unregistered classes of the
    #: data set (faces); None for a harmless data set of its own.
    harmless_labels: torch.Tensor | None = None


def server_sets(exp: Experiment) -> ServerSets:
    """Test features and labels, and the harmless features of ``exp``."""
    images, labels = exp.dataset.load("test")
    test = split_features(exp.dataset, exp.features, "test", images=images)
    fallbacks = {"test": int(test.fallback.sum())}
    harmless: torch.Tensor | None = None
    if exp.harmless is not None:
        found = split_features(exp.harmless, exp.features, "test")
        harmless, fallbacks["harmless"] = found.features, int(found.fallback.sum())
    elif exp.harmless_unregistered:
        owned = {c for cs in exp.assignment.values() for c in cs}
        parts, part_labels, missed = [], [], 0
        for split in ("train", "test"):
            split_images, split_labels = exp.dataset.load(split)
            rows = np.flatnonzero(~np.isin(split_labels, sorted(owned))).astype(np.int64)
            if rows.size:
                found = split_features(exp.dataset, exp.features, split, rows, split_images)
                parts.append(found.features)
                part_labels.append(torch.as_tensor(split_labels[rows]))
                missed += int(found.fallback.sum())
        harmless = torch.cat(parts) if parts else None
        fallbacks["harmless"] = missed
        harmless_labels = torch.cat(part_labels) if part_labels else None
        return ServerSets(
            test.features, torch.as_tensor(labels), harmless, fallbacks, harmless_labels
        )
    return ServerSets(test.features, torch.as_tensor(labels), harmless, fallbacks)
