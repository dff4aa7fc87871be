"""The same DOCL experiment without Flower: a plain PyTorch loop (the overhead reference).

:func:`run_plain` trains every user's autoencoder(s) exactly as the ClientApp does (same data
rows, features, recipe and seeds: both call :func:`.device.fit_user`), in a pool of as many
worker processes as the simulation runs clients at once (CPUs / ``simulation.num_cpus``, each
with the threads a Ray actor gets), then composes the global filter and evaluates it as the
ServerApp does. What a Flower run costs on top of this (start-up, messages, Ray) is what
``scripts/bench_scale.py`` measures. No Flower here.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from docl_flower.core.data.base import load_cached
from docl_flower.core.data.partitions import owner_shards
from docl_flower.core.evaluation.metrics import ALPHA_GRID, Evaluation, evaluate
from docl_flower.core.filter.global_filter import GlobalFilter, Registration
from docl_flower.core.pipeline.client_spec import ClientSpec
from docl_flower.core.pipeline.config import Experiment
from docl_flower.core.pipeline.inputs import server_sets
from docl_flower.core.pipeline.user_fit import fit_user
from docl_flower.core.training.autoencoder import state_to_numpy


@dataclass(frozen=True)
class UserFit:
    """One user's autoencoders as the ClientApp would upload them, and its own timings."""

    user: int
    registrations: list[Registration]
    load_seconds: float
    train_seconds: float


def train_user(spec: ClientSpec, user: int) -> UserFit:
    """Train ``user``'s autoencoder(s) as the ClientApp does (:func:`.device.fit_user`)."""
    start = time.perf_counter()
    dataset = spec.dataset
    images, labels = load_cached(dataset, "train")
    loaded = time.perf_counter()
    regs = [
        Registration(
            user,
            one.label,
            state_to_numpy(one.fit.model),
            one.fit.err_mean,
            one.fit.err_std,
            int(one.rows.size),
        )
        for one in fit_user(spec, user, dataset, images, labels, torch.device("cpu"))
    ]
    return UserFit(user, regs, loaded - start, time.perf_counter() - loaded)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _train_in_worker(spec_json: str, user: int) -> UserFit:
    return train_user(ClientSpec.from_json(spec_json), user)


@dataclass
class PlainRun:
    """What the plain loop measured."""

    evaluation: Evaluation
    registrations: list[Registration]
    workers: int
    #: ``startup`` (worker pool), ``training`` (first task to last result), ``evaluation``
    #: (test sets, filter, metrics); ``total``.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    #: Per user: seconds loading data in its worker, seconds training.
    load_seconds: dict[int, float] = field(default_factory=dict)
    train_seconds: dict[int, float] = field(default_factory=dict)


def concurrency(exp: Experiment, cpus: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) of a simulation of ``exp`` on this machine's CPUs."""
    cpus = cpus or os.cpu_count() or 1
    per_client = max(1, int(exp.simulation.num_cpus))
    return max(1, cpus // per_client), per_client


def run_plain(exp: Experiment, users: Sequence[int] | None = None) -> PlainRun:
    """Train ``users`` (default: all) in a process pool, then compose and evaluate the filter."""
    began = time.perf_counter()
    chosen = sorted(exp.assignment) if users is None else list(users)
    workers, threads = concurrency(exp)
    workers = min(workers, max(1, len(chosen)))
    spec_json = exp.client_spec.to_json()
    context = multiprocessing.get_context("spawn")  # no fork of a process with OpenMP threads
    fits: list[UserFit] = []
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        # Start the workers before the clock of the training phase.
        list(pool.map(_init_worker, [threads] * workers))
        started = time.perf_counter()
        for fit in pool.map(_train_in_worker, [spec_json] * len(chosen), chosen, chunksize=1):
            fits.append(fit)
        trained = time.perf_counter()
    regs = [r for fit in fits for r in fit.registrations]
    sets = server_sets(exp)
    flt = GlobalFilter(sorted(regs, key=lambda r: (r.label, r.user_id)), exp.scoring)
    owners = None
    if exp.partition.sharded_classes:
        owners = torch.from_numpy(
            owner_shards(sets.y_test.numpy(), exp.assignment, exp.partition.shards, exp.seed)
        )
    ev = evaluate(flt, exp.guard, sets.x_test, sets.y_test, sets.harmless, ALPHA_GRID, owners)
    done = time.perf_counter()
    return PlainRun(
        evaluation=ev,
        registrations=regs,
        workers=workers,
        phase_seconds={
            "startup": started - began,
            "training": trained - started,
            "evaluation": done - trained,
            "total": done - began,
        },
        load_seconds={f.user: f.load_seconds for f in fits},
        train_seconds={f.user: f.train_seconds for f in fits},
    )
