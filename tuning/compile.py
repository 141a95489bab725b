"""Compile tile configs in parallel processes into Triton's on-disk cache.

Compiling dominates a sweep (each config is two kernels, w13 and w2, and Triton
specialises on some integer arguments), while timing needs the GPU to itself. The
worker process asks this pool to compile a batch of configs on ``meta`` tensors with
the exact launch arguments of the real run; the real launch then finds the kernels
in the cache. A config that fails to compile or exceeds the GPU's resources fails
here, and the search never times it.

Every worker on a node gets a pool as large as the node allows (``processes``), not a
share of its cores: the workers' searches alternate compiling and timing, so one
worker's compile round can use the cores another leaves idle while it times. The
pool's processes run ``NICE`` steps below the worker that starts them (Ray starts its
workers at niceness 15, so there they run at 19): a worker's timing thread is never
starved by compiles, its own or another worker's.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from . import launch
from .configs import TileConfig
from .inputs import build_problem
from .jobs import Failure
from .routing import Routing
from .kernel import Kernel, KernelSource
from .runner import classify
from .shapes import MoeShape

MAX_PROCESSES = 40  # a search round compiles at most 3 configs' 12 neighbours (space.neighbours) plus a few
NICE = 4  # compiles yield the CPU to the timing threads of the node's workers (steps below the worker's)

_kernel: Kernel | None = None


def processes(cpus: int | None = None) -> int:
    """Compile processes of one worker: the node's cores but one (its timing thread), at most MAX_PROCESSES."""
    cpus = (os.cpu_count() or 2) if cpus is None else cpus
    return max(1, min(MAX_PROCESSES, cpus - 1))


def lower_priority() -> None:
    """Run this process NICE steps below the one that started it (the kernel caps niceness at 19)."""
    try:
        os.nice(NICE)
    except OSError:
        pass  # a node that forbids it compiles at the worker's priority


def _init(source: KernelSource) -> None:
    global _kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C or a time limit is the parent's to handle: no tracebacks here
    lower_priority()
    _kernel = source.load()
    torch.cuda.init()


@functools.lru_cache(maxsize=4)
def _meta_problem(shape: MoeShape, m: int):
    return build_problem(shape, m, Routing(), 0, torch.device("meta"))


def _warm(shape: MoeShape, m: int, config: TileConfig) -> Failure | None:
    """Compile both GEMMs of ``config`` for (shape, m), launch arguments exactly as the timed run's."""
    p = _meta_problem(shape, m)
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    try:
        launch.both_gemms(_kernel, p, launch.alignment(p, config.BLOCK_SIZE_M, _kernel), config, sm90,
                          warmup=True)
    except Exception as exc:  # reported to the search as a result
        return classify(exc)
    return None


class Precompiler:
    """``precompiler(shape, m, configs)`` -> {config: failure} for the configs that can never run."""

    def __init__(self, source: KernelSource, workers: int | None = None):
        workers = processes() if workers is None else workers
        ctx = mp.get_context("spawn")
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init, initargs=(source,))
        self.broken = False
        for _ in range(workers):  # start every process now: each imports torch and the kernel while the worker
            self.pool.submit(os.getpid)  # loads its own and the driver plans, not during the first job's compile

    def __call__(self, shape: MoeShape, m: int, configs: list[TileConfig]) -> dict[TileConfig, Failure]:
        if self.broken:
            return {}  # the worker then compiles on first launch, as Triton always can
        try:
            futures = {c: self.pool.submit(_warm, shape, m, c) for c in configs}
            results = {c: f.result() for c, f in futures.items()}
        except BrokenProcessPool:
            self.broken = True
            return {}
        return {c: why for c, why in results.items() if why is not None and why.kind.sticky}

    def all(self, jobs: list[tuple[MoeShape, int, TileConfig]]) -> None:
        """Compile every (shape, m, config) at once (failures show again, as results, when the run launches)."""
        if self.broken:
            return
        try:
            for f in [self.pool.submit(_warm, *job) for job in jobs]:
                f.result()
        except BrokenProcessPool:
            self.broken = True
