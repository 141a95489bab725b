"""Compile tile configs in parallel processes into Triton's on-disk cache.

Compiling dominates a sweep (each config is two kernels, w13 and w2, and Triton
specialises on some integer arguments), while timing needs the GPU to itself. The
worker process asks this pool to compile a batch of configs on ``meta`` tensors with
the exact launch arguments of the real run; the real launch then finds the kernels
in the cache. A config that fails to compile fails here, and the search never times it.

A compile needs the GPU's target (architecture, warp size), not the GPU: the worker
reads its target from Triton's driver and hands it to the pool, whose processes answer
Triton's driver lookup with it (``CompileOnly``). No pool process opens a CUDA context:
none takes GPU memory beside the timed run, or start-up time from the driver.

Every worker on a node gets a pool as large as the node allows (``processes``), not a
share of its cores: the workers' searches alternate compiling and timing, so one
worker's compile round can use the cores another leaves idle while it times. The
pool's processes run ``NICE`` steps below the worker that starts them (Ray starts its
workers at niceness 15, so there they run at 19): a worker's timing thread is never
starved by compiles, its own or another worker's.

Each process compiles one small kernel (``FIRST``) as it starts: a process's first compile costs seconds
of set-up (Triton's key and IR set-up; before the alignment on meta became sizes only, torch's meta-tensor
machinery too), and on an H200 those seconds fell in the first aligned job's first round (pool_start.py:
11.6 s for a round of 36 configs, 2.7 s once paid at start; benchmarks/README 2f).

The pools of one node share their compiles: two workers whose searches reach the same
kernel at once (neighbouring batch sizes of one kernel family compile the same
kernels) would each compile it. Triton's JIT hooks take a lock per kernel in its
cache folder before compiling and release it after: the first process compiles, the
others wait and load it from the cache, all at once. A process that dies loses its locks with it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import torch

from triton.backends.compiler import GPUTarget

from . import launch
from .configs import TileConfig
from .inputs import build_problem
from .jobs import Failure
from .routing import Routing
from .vllm.kernel import Kernel, KernelSource
from .runner import classify
from .shapes import MoeShape

MAX_PROCESSES = 40  # a search round compiles at most 3 configs' 12 neighbours (space.neighbours) plus a few
NICE = 4  # compiles yield the CPU to the timing threads of the node's workers (steps below the worker's)
LOCKS = "tune-moe-locks"  # beside the kernels in Triton's cache folder: processes that share a cache share locks

# the kernel each process compiles as it starts (see above): pays its first compile's imports and set-up
FIRST = (MoeShape(8, 8, 64, 128, 2, "bf16"), 16, TileConfig(16, 32, 64, 1, 4, 3))  # M=16: aligned, as most jobs

_kernel: Kernel | None = None
_target: GPUTarget | None = None  # the worker's GPU, whose kernels this process compiles
_held: list[int] = []  # this process's lock files, open while it compiles


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


class CompileOnly:
    """Triton's driver in a pool process: the worker's target, device 0, no stream. Triton asks a driver
    only these while it compiles (``JITFunction.run`` with ``warmup``, 3.6-3.8); loading and launching, which
    need the GPU, happen in the worker."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def compile_for(target: GPUTarget) -> None:
    """From now on Triton in this process compiles for ``target`` without touching a GPU."""
    global _target
    from triton.runtime.driver import driver

    driver.set_active(CompileOnly(target))
    _target = target


def current_target() -> GPUTarget:
    """The target of this process's GPU (the worker's), as Triton's driver reads it."""
    from triton.runtime.driver import driver

    return driver.active.get_current_target()


def share_compiles() -> None:
    """From now on this process compiles a kernel only while no other process of its cache compiles it."""
    from triton import knobs

    knobs.runtime.jit_cache_hook = _before_compile
    knobs.runtime.jit_post_compile_hook = _after_compile


def _lock_file(compile: dict | None) -> int | None:
    """The kernel's lock file, open; None when Triton does not describe the kernel as 3.6-3.8 do, or the
    cache folder cannot be written (the kernel then compiles unshared, as Triton does)."""
    import triton
    from triton import knobs

    spec = (compile or {}).get("specialization_data")
    if not spec:
        return None
    folder = os.path.join(knobs.cache.dir, LOCKS)
    name = hashlib.sha256(f"{triton.__version__}\n{spec}".encode()).hexdigest()[:32]
    try:
        os.makedirs(folder, exist_ok=True)
        return os.open(os.path.join(folder, name), os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        return None


def _before_compile(*, compile: dict | None = None, **_) -> bool:
    """Triton calls this before it compiles a kernel that is not in the process. The first process to ask
    for a kernel holds its lock while Triton compiles it; one that finds the lock held waits for it and
    then lets Triton load the kernel from the cache."""
    fd = _lock_file(compile)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another process compiles it: wait until it is done, then load it, unlocked,
        fcntl.flock(fd, fcntl.LOCK_SH)  # beside the other waiters (an exclusive wait would load one at a time)
        os.close(fd)
        return False
    _held.append(fd)
    return False  # False: compile (True would tell Triton to skip the kernel)


def _after_compile(**_) -> None:
    release_locks()


def release_locks() -> None:
    """Release this process's kernel locks (after a compile, or when it raised)."""
    while _held:
        os.close(_held.pop())


def _init(source: KernelSource, target: GPUTarget, share: bool) -> None:
    global _kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C or a time limit is the parent's to handle: no tracebacks here
    lower_priority()
    compile_for(target)
    if share:
        share_compiles()
    _kernel = source.load()
    _warm(*FIRST)  # shared: one process of the node compiles it, the others load it


@functools.lru_cache(maxsize=4)
def _meta_problem(shape: MoeShape, m: int):
    return build_problem(shape, m, Routing(), 0, torch.device("meta"))


def _warm(shape: MoeShape, m: int, config: TileConfig) -> Failure | None:
    """Compile both GEMMs of ``config`` for (shape, m), launch arguments exactly as the timed run's."""
    p = _meta_problem(shape, m)
    capability = _target.arch if _target.backend == "cuda" else 0
    try:
        launch.both_gemms(_kernel, p, launch.alignment(p, config.BLOCK_SIZE_M, _kernel), config, capability,
                          warmup=True)
    except Exception as exc:  # reported to the search as a result
        return classify(exc)
    finally:
        release_locks()  # a compile that raised never reached the hook after it
    return None


class Precompiler:
    """``precompiler.stream(shape, m, configs)``: each config as its compile ends, with the failure that rules
    it out; ``precompiler(shape, m, configs)`` -> {config: failure} once all are compiled."""

    def __init__(self, source: KernelSource, target: GPUTarget | None = None, workers: int | None = None,
                 share: bool = True):
        """``target``: the GPU the kernels are for, by default this process's (Triton's driver reads it)."""
        workers = processes() if workers is None else workers
        ctx = mp.get_context("spawn")
        self.target = current_target() if target is None else target
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init,
                                        initargs=(source, self.target, share))
        self.broken = False
        for _ in range(workers):  # start every process now: each imports torch and the kernel and compiles FIRST
            self.pool.submit(os.getpid)  # while the worker loads its own and the driver plans, not in the first job

    def stream(self, shape: MoeShape, m: int, configs: list[TileConfig]) -> Iterator[tuple[TileConfig, Failure | None]]:
        """Every config once, first compiled first: with its failure when it can never run, else None. The
        worker times each as it comes while the pool compiles the rest. A broken pool yields the rest with
        None: the worker then compiles on first launch, as Triton always can."""
        done: set[TileConfig] = set()
        try:
            if not self.broken:
                futures = {self.pool.submit(_warm, shape, m, c): c for c in configs}
                for f in as_completed(futures):
                    why = f.result()
                    done.add(futures[f])
                    yield futures[f], why if why is not None and why.kind.sticky else None
        except BrokenProcessPool:
            self.broken = True
        yield from ((c, None) for c in configs if c not in done)

    def __call__(self, shape: MoeShape, m: int, configs: list[TileConfig]) -> dict[TileConfig, Failure]:
        return {c: why for c, why in self.stream(shape, m, configs) if why is not None}

    def all(self, jobs: list[tuple[MoeShape, int, TileConfig]]) -> None:
        """Compile every (shape, m, config) at once (failures show again, as results, when the run launches)."""
        if self.broken:
            return
        try:
            for f in [self.pool.submit(_warm, *job) for job in jobs]:
                f.result()
        except BrokenProcessPool:
            self.broken = True
