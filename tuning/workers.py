"""The Ray actor: pin one GPU, load the kernel, run (shape, M) jobs, return results as plain data."""

from __future__ import annotations

import gc
import os
import platform
import socket
import time

from . import clocks
from .configs import TileConfig
from .gpus import GpuSpec, get_gpu, vllm_device_name
from .jobs import Failure, Job, JobResult, Settings
from .vllm.kernel import Kernel
from .outputs import now

KERNEL_CACHE_LIMIT = 512  # compiled kernels kept in memory per worker; Triton's disk cache keeps the rest


class TuneWorker:
    """One per GPU (``num_gpus=1``). Ray restarts nothing itself; the driver replaces dead workers."""

    def __init__(self, settings: Settings, device_name: str, precompile: bool = True):
        import torch

        self.settings, self.device_name = settings, device_name
        self.gpu = get_gpu(settings.gpu)
        self.kernel = settings.source.load()
        self.failures: dict[str, dict[TileConfig, Failure]] = {}
        self.precompile = None
        if torch.cuda.is_available() and precompile:
            from .compile import Precompiler

            self.precompile = Precompiler(settings.source)  # sized on this worker's node (compile.processes)
        # What start-up loaded (torch, Triton, the kernel: some 200,000 objects) lives as long as the worker; the
        # collection that bounds its memory after every job would walk it all each time (about 0.1 s a job)
        gc.collect()
        gc.freeze()

    def info(self) -> dict:
        """Who this worker is and what it runs on (checked by the driver, kept in provenance)."""
        import torch
        import triton

        cuda = torch.cuda.is_available()
        name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
        free, total = torch.cuda.mem_get_info() if cuda else (0, 0)
        return {
            "pid": os.getpid(), "host": socket.gethostname(), "gpu_ids": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "name": name, "device_name": vllm_device_name(name) if cuda else None,
            # str(): torch's version is its own str subclass, and unpickling it would import torch in the driver
            "free_gb": free / 1e9, "total_gb": total / 1e9, "cuda": torch.version.cuda or "", "torch": str(torch.__version__),
            "triton": triton.__version__, "python": platform.python_version(), "kernel": self.kernel.describe,
            "kernel_sha256": self.kernel.source_sha256, "vllm": self.kernel.vllm_version, "driver": _driver_version(),
        }

    def run(self, job: Job, seeds: list[TileConfig], known_failures: dict[TileConfig, Failure],
            incumbent: TileConfig | None = None) -> JobResult:
        import torch

        failures = self.failures.setdefault(job.shape.file_name(self.device_name), {})
        failures.update(known_failures)
        worker = f"{socket.gethostname()}:{os.environ.get('CUDA_VISIBLE_DEVICES', 'cpu')}"
        try:
            return run_job(self.kernel, self.gpu, job, self.settings, device_name=self.device_name, worker=worker,
                           seeds=seeds, failures=failures, incumbent=incumbent, precompile=self.precompile)
        finally:
            self._bound_memory(torch)

    def _bound_memory(self, torch) -> None:
        """After every job: what it left in reference cycles is freed, and the GPU memory torch caches with it."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        caches = getattr(self.kernel.fn, "device_caches", {})
        for entry in list(caches.values()):
            if len(entry[0]) > KERNEL_CACHE_LIMIT:
                entry[0].clear()


def run_job(kernel: Kernel, gpu: GpuSpec, job: Job, settings: Settings, *, device_name: str, worker: str,
            seeds: list[TileConfig], failures: dict[TileConfig, Failure], incumbent: TileConfig | None = None,
            precompile=None) -> JobResult:
    """Search ``job``'s tile configs on this GPU; vLLM's default, and the ``incumbent`` (the entry the file in --out
    holds), are always timed head to head with the winner."""
    from .routing import Routing
    from .runner import Runner
    from .search import STRATEGIES
    from .space import Context

    t0 = time.monotonic()
    runner = Runner(kernel, job.shape, job.m, gpu, Routing.parse(settings.routing), seed=settings.seed,
                    scope=settings.scope)
    default = runner.default_config()
    waited = [0.0]

    def pre(cfgs: list[TileConfig]):
        """The pool's configs as their compiles end; ``waited`` counts the time the search had none to time."""
        compiled = precompile.stream(job.shape, job.m, cfgs)
        while True:
            t = time.monotonic()
            try:
                item = next(compiled)
            except StopIteration:
                return
            finally:
                waited[0] += time.monotonic() - t
            yield item

    result = STRATEGIES[settings.strategy](runner, Context(job.shape, gpu, job.m), default, seeds=seeds,
                                           incumbent=incumbent, failures=failures,
                                           precompile=pre if precompile else None, seed=settings.seed,
                                           max_evals=settings.max_evals)
    if not result.default.ok:
        raise RuntimeError(f"vLLM's default config {default.short} fails at M={job.m}: {result.default.failure}")
    best, rl = result.best, runner.roofline
    state = clocks.sample()
    return JobResult(file=job.shape.file_name(device_name), m=job.m, default=default, default_us=result.default.us,
                     tuned=best.config, tuned_us=best.us, tuned_p20_us=best.timing.p20_us,
                     tuned_p80_us=best.timing.p80_us, roofline_us=rl.bound_us, bound=rl.bound,
                     error=best.error or 0.0, evaluated=result.evaluated, failed=len(result.failed),
                     seconds=time.monotonic() - t0, compile_seconds=round(waited[0], 3), worker=worker,
                     finished=now(),
                     failures={o.config.short: o.failure for o in result.failed[:8]}, incumbent=incumbent,
                     incumbent_us=result.incumbent.us if result.incumbent and result.incumbent.ok else 0.0,
                     looks={o.config.short: round(o.us, 2) for o in result.outcomes if o.ok},
                     gpu_state=state.to_json() if state else {}, rechecked=result.rechecked)


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        import subprocess

        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            return ""
