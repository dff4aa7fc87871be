"""GPU check: 10 users training on CUDA in Ray actors, the filter scored on CUDA, next to the CPU.

Run through ``scripts/gpu_check.sh`` on a machine with an NVIDIA GPU (it refuses to run
without CUDA, exit 2). The steps are in :mod:`docl_flower.experiments.gpu`: ``docl-flower
simulation=gpu`` with the peak GPU memory sampled, the same with ``simulation=cpu``, the GPU
run's filter scored on CUDA and on the CPU, and a synthetic filter of 10,000 autoencoders on
CUDA.

Writes ``OUT/gpu_check.json`` and ``OUT/summary.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from docl_flower.experiments.gpu import GpuSettings, run_gpu_check, summary

#: Exit status without a CUDA device.
NO_CUDA = 2


def main(argv: list[str] | None = None) -> int:
    defaults = GpuSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument("--users", type=int, default=defaults.users)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: this machine has no CUDA device (torch.cuda.is_available() is False)")
        return NO_CUDA
    settings = GpuSettings(args.out, args.users)
    print(summary(run_gpu_check(settings), settings.users), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
