"""GPU check: 10 users training on CUDA in Ray actors, the filter scored on CUDA, next to the CPU.

Steps (``scripts/gpu_check.sh`` on a machine with an NVIDIA GPU), each timed:

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

import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from docl_flower.core.filter.global_filter import GlobalFilter, Registration
from docl_flower.experiments.tables import write_json

T = TypeVar("T")

#: ``nvidia-smi`` is read twice a second: a Flower run lasts minutes, its peak lasts seconds.
GPU_SAMPLE_S = 0.5
#: Images per CUDA batch of the trained filter (10 autoencoders: small intermediates).
CUDA_CHUNK = 1024
#: Images of the warm-up call (CUDA kernels and allocator) before a timed one.
WARMUP_IMAGES = 64
#: The synthetic filter: 10,000 autoencoders of the paper's shape on MNIST pixels...
BIG_FILTER = 10_000
BIG_DIM, BIG_HIDDEN, BIG_CLASSES = 784, 32, 10
#: ... with weights ~ N(0, 0.05^2) (sigmoid outputs near 0.5: no overflow, like trained ones),
BIG_WEIGHT_SCALE = 0.05
#: ... registered with these error statistics and sizes (scoring does not read them),
BIG_MU, BIG_SIGMA, BIG_EXAMPLES = 10.0, 2.0, 60
#: ... scored on this many test images, in batches of this many (N x batch x D floats on CUDA).
BIG_IMAGES, BIG_CHUNK = 2048, 256


@dataclass(frozen=True)
class GpuSettings:
    """The command line of ``scripts/gpu_check.py``."""

    out: Path = Path("gpu_check")
    #: The default experiment's users (one MNIST class each).
    users: int = 10


class GpuMemory:
    """Peak used GPU memory (MiB, all processes, every GPU) from ``nvidia-smi``, sampled."""

    def __init__(self, interval_s: float = GPU_SAMPLE_S) -> None:
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
    regs: list[Registration], x: torch.Tensor, chunk: int = CUDA_CHUNK, device: str = "cuda"
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


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """``fn(*args)`` and its seconds."""
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def synthetic_filter(n: int = BIG_FILTER, seed: int = 0) -> list[Registration]:
    """``n`` random autoencoders ``784 -> 32 -> 784`` (seeded; classes 0-9 in turn)."""
    gen = torch.Generator().manual_seed(seed)

    def weights(*shape: int) -> Any:
        return (torch.randn(*shape, generator=gen) * BIG_WEIGHT_SCALE).numpy()

    return [
        Registration(
            u,
            u % BIG_CLASSES,
            {
                "encoder.weight": weights(BIG_HIDDEN, BIG_DIM),
                "encoder.bias": torch.zeros(BIG_HIDDEN).numpy(),
                "decoder.weight": weights(BIG_DIM, BIG_HIDDEN),
                "decoder.bias": torch.zeros(BIG_DIM).numpy(),
            },
            BIG_MU,
            BIG_SIGMA,
            BIG_EXAMPLES,
        )
        for u in range(n)
    ]


def summary(report: dict[str, Any], users: int) -> str:
    """``summary.md`` of a report."""
    g, c, f = report["runs"]["gpu"], report["runs"]["cpu"], report["filter"]
    lines = [
        f"# GPU check on {report['gpu']}",
        "",
        "| | GPU | CPU |",
        "|---|---|---|",
        f"| {users} users, wall s | {g['wall_seconds']:.1f} | {c['wall_seconds']:.1f} |",
        f"| overall accuracy | {g['overall_accuracy']:.4f} | {c['overall_accuracy']:.4f} |",
        f"| trained on CUDA | {sum(g['trained_on_cuda'].values())}/{users} | 0 |",
        f"| peak GPU memory MiB (nvidia-smi) | {g['peak_gpu_memory_mib']} | - |",
        f"| filter images/s ({f['autoencoders']} AEs) | {f['cuda_images_per_s']:.0f} "
        f"| {f['cpu_images_per_s']:.0f} |",
        f"| filter peak CUDA memory MiB | {f['cuda_peak_memory_mib']:.0f} | - |",
        f"| i* agreement CUDA vs CPU | {f['argmin_agreement']:.5f} | |",
        f"| 10,000 AEs images/s | {report['filter_10000']['cuda_images_per_s']:.0f} | - |",
    ]
    return "\n".join(lines) + "\n"


def run_gpu_check(settings: GpuSettings) -> dict[str, Any]:
    """The three steps; writes ``gpu_check.json`` and ``summary.md``, returns the report.

    Needs CUDA (``RuntimeError`` without).
    """
    from docl_flower.core.filter.store import load_filter
    from docl_flower.core.pipeline.inputs import server_sets
    from docl_flower.federation.components import load_experiment
    from docl_flower.operations.runs import launch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False)")
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "runs": {}}
    with GpuMemory() as mem:
        gpu = launch(["simulation=gpu", f"num_users={settings.users}"], out / "run-gpu")
    report["runs"]["gpu"] = {
        "wall_seconds": gpu.wall_seconds,
        "overall_accuracy": gpu.overall_accuracy,
        "train_seconds": gpu.train_seconds,
        "trained_on_cuda": gpu.trained_on_cuda,
        "peak_gpu_memory_mib": mem.peak_mib,
    }
    cpu = launch(["simulation=cpu", f"num_users={settings.users}"], out / "run-cpu")
    report["runs"]["cpu"] = {
        "wall_seconds": cpu.wall_seconds,
        "overall_accuracy": cpu.overall_accuracy,
        "train_seconds": cpu.train_seconds,
    }
    # The filter of the GPU run, scored on the CPU and on CUDA.
    regs, _ = load_filter(out / "run-gpu" / "filter")
    exp = load_experiment(out / "run-gpu" / "experiment.yaml")
    sets = server_sets(exp)
    x = torch.cat([sets.x_test, sets.harmless]) if sets.harmless is not None else sets.x_test
    flt = GlobalFilter(regs, exp.scoring)
    cpu_scores, cpu_s = timed(flt.scores, x)
    cuda_scores(regs, x[:WARMUP_IMAGES])
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
    big = synthetic_filter()
    xb = x[:BIG_IMAGES]
    cuda_scores(big, xb[:WARMUP_IMAGES], WARMUP_IMAGES)
    _, big_s = timed(cuda_scores, big, xb, BIG_CHUNK)
    report["filter_10000"] = {"images": int(xb.shape[0]), "cuda_images_per_s": xb.shape[0] / big_s}
    write_json(out / "gpu_check.json", report, default=str)
    (out / "summary.md").write_text(summary(report, settings.users))
    return report
