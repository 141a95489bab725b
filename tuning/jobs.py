"""A unit of tuning work, the settings that decide its result, and what comes back: plain data, no torch.

The driver, the store, the report and the tests use these records on machines without a GPU; the
worker (``workers``) is the only place that turns a ``Job`` into a ``JobResult``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

from .configs import TileConfig
from .vllm.kernel import KernelSource
from .shapes import MoeShape

KEEP_WITHIN = 0.01  # a file's entry stays unless beaten by more than 1% (benchmarks §2k: one config re-timed, ±1%)
CLEAR_WIN = 0.05  # a first head to head won by more than this, samples apart, needs no second (search.clear_win)


@dataclass(frozen=True)
class Job:
    """The best tile config for ``shape`` at ``m`` tokens."""

    shape: MoeShape
    m: int

    @property
    def key(self) -> str:
        return f"{self.shape.label} M={self.m}"


class FailureKind(str, Enum):
    RESOURCES = "resources"  # out of shared memory or registers: the same at every M
    COMPILE = "compile"  # Triton cannot compile it: the same at every M
    LAUNCH = "launch"  # the launch failed
    NUMERICS = "numerics"  # it ran, and its result is wrong

    @property
    def sticky(self) -> bool:
        """Whether a config that failed so will fail at every M (never worth retrying)."""
        return self in (FailureKind.RESOURCES, FailureKind.COMPILE)


@dataclass(frozen=True, kw_only=True)
class Failure:
    kind: FailureKind
    detail: str

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}"

    def to_json(self) -> dict:
        return {"kind": self.kind.value, "detail": self.detail}

    @classmethod
    def from_json(cls, d: dict) -> Failure:
        return cls(kind=FailureKind(d["kind"]), detail=str(d["detail"]))


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything besides the job and the software that decides its result."""

    gpu: str
    source: KernelSource
    strategy: str = "guided"
    routing: str = "uniform"
    seed: int = 0
    scope: str = "gemms"
    max_evals: int = 120


def fingerprint(settings: Settings, shape: MoeShape, *, device_name: str, vllm: str, kernel_sha256: str,
                triton: str) -> dict:
    """Everything that changes a timing of ``shape``: results under another fingerprint are never reused."""
    return {
        "shape": {"num_experts": shape.num_experts, "global_experts": shape.global_experts, "n": shape.n,
                  "k": shape.k, "top_k": shape.top_k, "dtype": shape.dtype,
                  "block_shape": list(shape.block_shape) if shape.block_shape else None},
        "device_name": device_name, "vllm": vllm, "kernel_sha256": kernel_sha256, "triton": triton,
        "strategy": settings.strategy, "routing": settings.routing, "seed": settings.seed,
        "scope": settings.scope, "max_evals": settings.max_evals,
    }


@dataclass(frozen=True, kw_only=True)
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
    compile_seconds: float = 0.0  # of ``seconds``, waiting on the compile pool with no compiled config to time
    # (0 in results from before it was kept; before the search timed configs as their compiles ended, the whole
    # wait for each round's compiles)
    failures: dict[str, Failure] = field(default_factory=dict)  # config (short form) -> why (first few)
    incumbent: TileConfig | None = None  # the entry vLLM runs for this M from the file in --out (kept unless beaten
    # by more than KEEP_WITHIN: search): the file's own for M, else that of its key nearest to M, as vLLM picks
    incumbent_key: int | None = None  # the file's key ``incumbent`` is the entry of (None: ``m``, in results
    # from before it was kept); a key other than ``m`` means this job adds M to the file
    incumbent_us: float = 0.0  # its head-to-head µs beside ``tuned`` (0: it failed, or was not timed to the end)
    looks: dict[str, float] = field(default_factory=dict)  # config (short form) -> first-look µs, every config
    # the search timed that ran (the landscape it saw: benchmarks/replay_search.py replays searches on it)
    gpu_state: dict = field(default_factory=dict)  # clocks.GpuState after the job's last timing ({}: no NVML)
    rechecked: str = ""  # search.SearchResult.rechecked: what a second head to head made of a replacement
    finished: str = ""  # UTC, to the second, when the job finished ("": results from before it was kept)

    @property
    def adds_key(self) -> bool:
        """Whether the file held no entry of its own for ``m``: the incumbent is its nearest key's."""
        return self.incumbent is not None and self.incumbent_key not in (None, self.m)

    @property
    def speedup(self) -> float:
        return self.default_us / self.tuned_us if self.tuned_us > 0 else 1.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["default"], d["tuned"] = self.default.to_dict(), self.tuned.to_dict()
        d["incumbent"] = self.incumbent.to_dict() if self.incumbent else None
        d["failures"] = {c: f.to_json() for c, f in self.failures.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> JobResult:
        incumbent = d.get("incumbent")
        return cls(**{**d, "default": TileConfig.from_dict(d["default"]), "tuned": TileConfig.from_dict(d["tuned"]),
                      "incumbent": TileConfig.from_dict(incumbent) if incumbent else None,
                      "failures": {c: Failure.from_json(f) for c, f in d.get("failures", {}).items()}})
