"""GPU check: 10 users training on CUDA in Ray actors, the filter scored on CUDA, next to the CPU.

Run through ``scripts/gpu_check.sh`` on a machine with an NVIDIA GPU (it refuses to run
without CUDA, exit 2). Steps, each timed:

1. ``docl-flower simulation=gpu`` (10 users; each ClientApp actor holds 0.25 GPU, so four
   train on one GPU at a time) with the peak GPU memory of the whole machine sampled from
   ``nvidia-smi`` while it runs; then the same experiment with ``simulation=cpu``;
2. the GPU run's saved filter scored on the MNIST test and harmless images by the CPU filter
   (:class:`GlobalFilter`) and by a batched float32 PyTorch path on CUDA: images/s, peak CUDA
   memory (``torch.cuda.max_memory_allocated``), and how often the two agree on ``i*``;
3. a synthetic filter of 10,000 autoencoders (D = 784) scored on CUDA: images/s.

Writes ``OUT/gpu_check.json`` and ``OUT/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import torch

from docl_flower.core.filter.global_filter import GlobalFilter, Registration
from docl_flower.core.filter.store import load_filter
from docl_flower.core.pipeline.inputs import server_sets
from docl_flower.federation.components import load_experiment
from docl_flower.operations.runs import launch


class GpuMemory:
    """Peak used GPU memory (MiB, all processes, every GPU) from ``nvidia-smi``, sampled."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._interval = interval_s

    def _loop(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            used = sum(int(v) for v in out.split() if v.strip().isdigit())
            self.peak_mib = max(self.peak_mib, used)
            self._stop.wait(self._interval)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cuda_scores(
    regs: list[Registration], x: torch.Tensor, chunk: int = 1024, device: str = "cuda"
) -> torch.Tensor:
    """Errors of every image under every autoencoder on CUDA (float32, batched over models)."""
    dev = torch.device(device)

    def stack(name: str) -> torch.Tensor:
        return torch.stack([torch.from_numpy(r.params[name]) for r in regs]).to(dev)

    w1, b1 = stack("encoder.weight"), stack("encoder.bias")  # (N, H, D), (N, H)
    w2, b2 = stack("decoder.weight"), stack("decoder.bias")  # (N, D, H), (N, D)
    out = []
    for xb in torch.split(x, chunk):
        xd = xb.to(dev, torch.float32)
        h = torch.relu(torch.einsum("bd,nhd->nbh", xd, w1) + b1[:, None, :])
        y = torch.sigmoid(torch.einsum("nbh,ndh->nbd", h, w2) + b2[:, None, :])
        out.append(((y - xd[None]) ** 2).sum(dim=2).T.cpu())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(out)


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"))
    parser.add_argument("--users", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: this machine has no CUDA device (torch.cuda.is_available() is False)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "runs": {}}
    with GpuMemory() as mem:
        gpu = launch(["simulation=gpu", f"num_users={args.users}"], args.out / "run-gpu")
    report["runs"]["gpu"] = {
        "wall_seconds": gpu.wall_seconds,
        "overall_accuracy": gpu.overall_accuracy,
        "train_seconds": gpu.train_seconds,
        "trained_on_cuda": gpu.trained_on_cuda,
        "peak_gpu_memory_mib": mem.peak_mib,
    }
    cpu = launch(["simulation=cpu", f"num_users={args.users}"], args.out / "run-cpu")
    report["runs"]["cpu"] = {
        "wall_seconds": cpu.wall_seconds,
        "overall_accuracy": cpu.overall_accuracy,
        "train_seconds": cpu.train_seconds,
    }
    # The filter of the GPU run, scored on the CPU and on CUDA.
    regs, _ = load_filter(args.out / "run-gpu" / "filter")
    exp = load_experiment(args.out / "run-gpu" / "experiment.yaml")
    sets = server_sets(exp)
    x = torch.cat([sets.x_test, sets.harmless]) if sets.harmless is not None else sets.x_test
    flt = GlobalFilter(regs, exp.scoring)
    cpu_scores, cpu_s = timed(flt.scores, x)
    cuda_scores(regs, x[:64])  # warm-up (kernels, allocator)
    torch.cuda.reset_peak_memory_stats()
    gpu_scores, gpu_s = timed(cuda_scores, regs, x)
    agree = float((cpu_scores.argmin(1) == gpu_scores.argmin(1)).double().mean())
    report["filter"] = {
        "images": int(x.shape[0]),
        "autoencoders": len(regs),
        "cpu_images_per_s": x.shape[0] / cpu_s,
        "cuda_images_per_s": x.shape[0] / gpu_s,
        "cuda_peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
        "argmin_agreement": agree,
    }
    # A synthetic filter of 10,000 autoencoders on CUDA.
    gen = torch.Generator().manual_seed(0)
    big = [
        Registration(
            u,
            u % 10,
            {
                "encoder.weight": (torch.randn(32, 784, generator=gen) * 0.05).numpy(),
                "encoder.bias": torch.zeros(32).numpy(),
                "decoder.weight": (torch.randn(784, 32, generator=gen) * 0.05).numpy(),
                "decoder.bias": torch.zeros(784).numpy(),
            },
            10.0,
            2.0,
            60,
        )
        for u in range(10_000)
    ]
    xb = x[:2048]
    cuda_scores(big, xb[:64], chunk=64)
    _, big_s = timed(cuda_scores, big, xb, 256)
    report["filter_10000"] = {"images": int(xb.shape[0]), "cuda_images_per_s": xb.shape[0] / big_s}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    g, c, f = report["runs"]["gpu"], report["runs"]["cpu"], report["filter"]
    lines = [
        f"# GPU check on {report['gpu']}",
        "",
        "| | GPU | CPU |",
        "|---|---|---|",
        f"| {args.users} users, wall s | {g['wall_seconds']:.1f} | {c['wall_seconds']:.1f} |",
        f"| overall accuracy | {g['overall_accuracy']:.4f} | {c['overall_accuracy']:.4f} |",
        f"| trained on CUDA | {sum(g['trained_on_cuda'].values())}/{args.users} | 0 |",
        f"| peak GPU memory MiB (nvidia-smi) | {g['peak_gpu_memory_mib']} | - |",
        f"| filter images/s ({f['autoencoders']} AEs) | {f['cuda_images_per_s']:.0f} "
        f"| {f['cpu_images_per_s']:.0f} |",
        f"| filter peak CUDA memory MiB | {f['cuda_peak_memory_mib']:.0f} | - |",
        f"| i* agreement CUDA vs CPU | {f['argmin_agreement']:.5f} | |",
        f"| 10,000 AEs images/s | {report['filter_10000']['cuda_images_per_s']:.0f} | - |",
    ]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
