"""Measure a feature extractor's raw output range and speed: the provider's scaling constants.

The extractors in :mod:`docl_flower.core.features.extractors` map their raw output to
``[0, 1]`` with fixed ``low``/``high`` constants. This script prints the raw range (minimum,
maximum, percentiles) on the ORL faces and on MNIST test digits, the seconds per image, and (faces)
how many images had no detected face, so that the constants can be chosen and documented
(:mod:`docl_flower.experiments.extractor_ranges`).

Usage::

    python scripts/extractor_ranges.py face
    python scripts/extractor_ranges.py imagenet --mnist 2000
    python scripts/extractor_ranges.py resnet --weights /path/to/resnet18.pth --arch resnet18
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docl_flower.experiments.extractor_ranges import EXTRACTORS, RangeSettings, measure


def main() -> None:
    """Parse arguments and print the statistics."""
    d = RangeSettings("face")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extractor", choices=EXTRACTORS)
    parser.add_argument("--orl", type=Path, default=d.orl)
    parser.add_argument("--mnist-root", type=Path, default=d.mnist_root)
    parser.add_argument("--mnist", type=int, default=d.mnist, help="MNIST test images to add")
    parser.add_argument("--orl-count", type=int, default=d.orl_count, help="ORL images to use")
    parser.add_argument("--arch", default=d.arch)
    parser.add_argument("--weights", default=d.weights, help="resnet weights")
    args = parser.parse_args()
    settings = RangeSettings(**vars(args))
    for text in measure(settings):
        print(text)


if __name__ == "__main__":
    main()
