"""Evaluate tile configs for one (shape, M): check numerics against the float reference, then time.

Two timing scopes:
- ``gemms``: the two fused_moe_kernel launches (w13, then w2 with routed weights), the
  part a tile config controls. Alignment and quantised inputs are prepared outside.
- ``layer``: the whole expert path as vLLM runs it: activation quantisation, alignment,
  w13, SiLU-and-mul, quantisation, w2, and the sum over top-k. The non-GEMM steps are
  torch implementations (vLLM fuses some of them), so absolute numbers run higher than
  in vLLM; differences between configs are what it shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import launch
from .bench import Timing, measure
from .configs import FIELDS, TileConfig
from .jobs import Failure, FailureKind
from .gpus import GpuSpec
from .inputs import TOLERANCE, Problem, build_problem, quant_groups, reference, relative_error
from .routing import Routing
from .vllm.kernel import Kernel
from .roofline import Roofline, roofline
from .shapes import MoeShape


@dataclass(frozen=True)
class Outcome:
    """What happened to one config: a timing, or the reason it was rejected."""

    config: TileConfig
    timing: Timing | None = None
    error: float | None = None  # relative error against the reference
    failure: Failure | None = None  # None when it ran and passed

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def us(self) -> float:
        return self.timing.median_us if self.timing else float("inf")


class Runner:
    """Inputs built once per (shape, M); every config is checked, then timed, on them."""

    def __init__(self, kernel: Kernel, shape: MoeShape, m: int, gpu: GpuSpec, routing: Routing = Routing(), *,
                 seed: int = 0, scope: str = "gemms"):
        self.kernel, self.shape, self.m, self.gpu, self.scope = kernel, shape, m, gpu, scope
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda") if cuda else torch.device("cpu")
        # Triton's interpreter mishandles bf16 dots on the CPU; fp16 stands in there.
        self.act_dtype = torch.bfloat16 if cuda else torch.float16
        self.capability = launch.capability()
        self.problem: Problem = build_problem(shape, m, routing, seed, self.device, self.act_dtype)
        self._alignments: dict[int, launch.Alignment] = {}
        self._reference: tuple[torch.Tensor, torch.Tensor] | None = None
        local = self.problem.local_ids
        self.roofline: Roofline = roofline(shape, gpu, m, int(torch.unique(local[local >= 0]).numel()),
                                           int((local >= 0).sum()))
        self.flush_bytes = gpu.l2_mb * 2**20 * 4 if self.roofline.bytes < 4 * gpu.l2_mb * 2**20 else 0

    def default_config(self) -> TileConfig:
        """vLLM's own get_default_config for this M (what runs when no file is found)."""
        s = self.shape
        block = list(s.block_shape) if s.block_shape else None
        cfg = self.kernel.default_config(self.m, s.num_experts, s.n, s.k, s.top_k, s.vllm_dtype, block)
        return TileConfig(**{f: int(cfg.get(f, 4 if f == "num_warps" else 3)) for f in FIELDS})

    def alignment(self, block_m: int) -> launch.Alignment:
        if block_m not in self._alignments:
            self._alignments[block_m] = launch.alignment(self.problem, block_m, self.kernel)
        return self._alignments[block_m]

    def gemms(self, config: TileConfig) -> None:
        """Both GEMMs exactly as TritonExperts.apply issues them, on inputs quantised once."""
        launch.both_gemms(self.kernel, self.problem, self.alignment(config.BLOCK_SIZE_M), config, self.capability)

    def layer(self, config: TileConfig) -> torch.Tensor:
        """The whole expert path for a bf16 batch (M, K) -> (M, K): quantise, align, w13, SiLU-and-mul,
        quantise, w2, sum over top-k."""
        p, s = self.problem, self.shape
        a1, a1s = quant_groups(p.hidden, s.block_shape[1]) if s.block_shape else (p.hidden, None)
        al = launch.alignment(p, config.BLOCK_SIZE_M, self.kernel)
        launch.both_gemms(self.kernel, p, al, config, self.capability, first=launch.w13(p, a1, a1s), between=self._act)
        return (p.c3 * p.valid.unsqueeze(-1)).sum(1)

    def _act(self, c1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.shape
        c1 = c1.view(-1, 2 * s.n)
        act = (torch.nn.functional.silu(c1[:, : s.n].float()) * c1[:, s.n:].float()).to(self.act_dtype)
        return quant_groups(act, s.block_shape[1]) if s.block_shape else (act, None)

    def check(self, config: TileConfig) -> float:
        """Relative error of both GEMMs on poisoned outputs; raises nothing, returns inf on garbage."""
        if self._reference is None:
            self._reference = reference(self.problem)
        p = self.problem
        p.c1.fill_(float("nan"))
        p.c3.fill_(float("nan"))
        self.gemms(config)
        ref1, ref3 = self._reference
        return max(relative_error(p.c1, ref1, p.valid), relative_error(p.c3, ref3, p.valid))

    def evaluate(self, config: TileConfig, budget_ms: float = 30.0) -> Outcome:
        try:
            err = self.check(config)
            tol = TOLERANCE["fp8" if self.shape.dtype == "fp8" else "bf16"]
            if not err <= tol:
                return Outcome(config, error=err, failure=Failure(kind=FailureKind.NUMERICS,
                                                                  detail=f"relative error {err:.2e} > {tol:.0e}"))
            fn = (lambda: self.gemms(config)) if self.scope == "gemms" else (lambda: self.layer(config))
            timing = measure(fn, budget_ms=budget_ms, flush_l2_bytes=self.flush_bytes)
            return Outcome(config, timing, err)
        except Exception as exc:  # compile errors, out of resources, launch failures: results, not crashes
            return Outcome(config, failure=classify(exc))


def classify(exc: Exception) -> Failure:
    """A compile, resource or launch error as a result (never a crash of the sweep)."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    if name == "OutOfResources":
        return Failure(kind=FailureKind.RESOURCES, detail=text)
    if "Compilation" in name or "compile" in text.lower():
        return Failure(kind=FailureKind.COMPILE, detail=f"{name}: {text}")
    return Failure(kind=FailureKind.LAUNCH, detail=f"{name}: {text}")
