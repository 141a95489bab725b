"""One (shape, M) job: build its inputs, search, and report the result as plain data."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .configs import TileConfig
from .gpus import GpuSpec
from .inputs import Routing
from .kernel import Kernel, KernelSource
from .plan import Job
from .runner import Runner
from .search import STRATEGIES
from .space import Context


@dataclass(frozen=True)
class Settings:
    """Everything besides the job that decides its result (part of the resume fingerprint)."""

    gpu: str
    source: KernelSource
    strategy: str = "guided"
    routing: str = "uniform"
    seed: int = 0
    scope: str = "gemms"
    max_evals: int = 120

    def fingerprint(self) -> dict:
        return {"gpu": self.gpu, "kernel_path": self.source.path, "vllm_version": self.source.vllm_version,
                "strategy": self.strategy, "routing": self.routing, "seed": self.seed, "scope": self.scope,
                "max_evals": self.max_evals}


@dataclass(frozen=True)
class JobResult:
    file: str  # the vLLM config file this batch size belongs to
    m: int
    default: TileConfig
    default_us: float
    tuned: TileConfig
    tuned_us: float
    tuned_p20_us: float
    tuned_p80_us: float
    roofline_us: float
    bound: str
    error: float  # tuned config's relative error against the reference
    evaluated: int
    failed: int
    seconds: float
    worker: str
    failures: dict[str, str] = field(default_factory=dict)  # config -> reason (first few)

    @property
    def speedup(self) -> float:
        return self.default_us / self.tuned_us if self.tuned_us > 0 else 1.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["default"], d["tuned"] = self.default.to_dict(), self.tuned.to_dict()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "JobResult":
        return cls(**{**d, "default": TileConfig.from_dict(d["default"]), "tuned": TileConfig.from_dict(d["tuned"])})


def run_job(kernel: Kernel, gpu: GpuSpec, job: Job, settings: Settings, device_name: str, worker: str,
            seeds: list[TileConfig], failures: dict[TileConfig, str], precompile=None) -> JobResult:
    t0 = time.monotonic()
    runner = Runner(kernel, job.shape, job.m, gpu, Routing.parse(settings.routing), settings.seed, settings.scope)
    default = runner.default_config()
    ctx = Context(job.shape, gpu, job.m)
    pre = (lambda cfgs: precompile(job.shape, job.m, cfgs)) if precompile else None
    result = STRATEGIES[settings.strategy](runner, ctx, default, seeds=seeds, failures=failures,
                                           precompile=pre, seed=settings.seed, max_evals=settings.max_evals)
    if not result.default.ok:
        raise RuntimeError(f"vLLM's default config {default.short} fails at M={job.m}: {result.default.failure}")
    best, rl = result.best, runner.roofline
    bad = {o.config.short: o.failure for o in result.failed[:8]}
    return JobResult(job.shape.file_name(device_name), job.m, default, result.default.us, best.config, best.us,
                     best.timing.p20_us, best.timing.p80_us, rl.bound_us, rl.bound, best.error or 0.0,
                     result.evaluated, len(result.failed), time.monotonic() - t0, worker, bad)

