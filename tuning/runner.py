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
from .gpus import GpuSpec
from .inputs import TOLERANCE, Problem, Routing, build_problem, quant_groups, reference, relative_error
from .kernel import Kernel
from .roofline import Roofline, roofline
from .shapes import MoeShape


@dataclass(frozen=True)
class Outcome:
    """What happened to one config: a timing, or the reason it was rejected."""

    config: TileConfig
    timing: Timing | None = None
    error: float | None = None  # relative error against the reference
    failure: str = ""  # "" when it ran and passed

    @property
    def ok(self) -> bool:
        return not self.failure

    @property
    def us(self) -> float:
        return self.timing.median_us if self.timing else float("inf")


class Runner:
    """Inputs built once per (shape, M); every config is checked, then timed, on them."""

    def __init__(self, kernel: Kernel, shape: MoeShape, m: int, gpu: GpuSpec, routing: Routing = Routing(),
                 seed: int = 0, scope: str = "gemms"):
        self.kernel, self.shape, self.m, self.gpu, self.scope = kernel, shape, m, gpu, scope
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda") if cuda else torch.device("cpu")
        # Triton's interpreter mishandles bf16 dots on the CPU; fp16 stands in there.
        self.act_dtype = torch.bfloat16 if cuda else torch.float16
        self.sm90 = cuda and torch.cuda.get_device_capability() == (9, 0)
        self.problem: Problem = build_problem(shape, m, routing, seed, self.device, self.act_dtype)
        self.naive = launch.use_naive(m, shape.top_k, shape.global_experts, shape.expert_parallel)
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
            p = self.problem
            self._alignments[block_m] = (
                launch.naive(p.topk_ids, block_m) if self.naive
                else launch.align(p.topk_ids, block_m, self.shape.global_experts, p.expert_map, self.kernel))
        return self._alignments[block_m]

    def gemms(self, config: TileConfig) -> None:
        """Both GEMMs exactly as TritonExperts.apply issues them."""
        p, al, block = self.problem, self.alignment(config.BLOCK_SIZE_M), self.shape.block_shape
        launch.invoke(self.kernel, p.a1, p.w13, p.c1, p.a1_scale, p.w13_scale, None, al, False, self.shape.top_k,
                      config, block, self.sm90)
        launch.invoke(self.kernel, p.a2, p.w2, p.c3, p.a2_scale, p.w2_scale, p.topk_weights, al, True, 1,
                      config, block, self.sm90)

    def layer(self, config: TileConfig) -> torch.Tensor:
        """The whole expert path for a bf16 batch (M, K) -> (M, K)."""
        p, s = self.problem, self.shape
        hidden = p.hidden
        a1, a1s = quant_groups(hidden, s.block_shape[1]) if s.block_shape else (hidden, None)
        al = (launch.naive(p.topk_ids, config.BLOCK_SIZE_M) if self.naive
              else launch.align(p.topk_ids, config.BLOCK_SIZE_M, s.global_experts, p.expert_map, self.kernel))
        launch.invoke(self.kernel, a1, p.w13, p.c1, a1s, p.w13_scale, None, al, False, s.top_k, config,
                      s.block_shape, self.sm90)
        c1 = p.c1.view(-1, 2 * s.n)
        act = (torch.nn.functional.silu(c1[:, : s.n].float()) * c1[:, s.n:].float()).to(self.act_dtype)
        a2, a2s = quant_groups(act, s.block_shape[1]) if s.block_shape else (act, None)
        launch.invoke(self.kernel, a2, p.w2, p.c3, a2s, p.w2_scale, p.topk_weights, al, True, 1, config,
                      s.block_shape, self.sm90)
        return (p.c3 * p.valid.unsqueeze(-1)).sum(1)

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
                return Outcome(config, error=err, failure=f"numerics: relative error {err:.2e} > {tol:.0e}")
            fn = (lambda: self.gemms(config)) if self.scope == "gemms" else (lambda: self.layer(config))
            timing = measure(fn, budget_ms=budget_ms, flush_l2_bytes=self.flush_bytes)
            return Outcome(config, timing, err)
        except Exception as exc:  # compile errors, out of resources, launch failures: results, not crashes
            return Outcome(config, failure=classify(exc))


def classify(exc: Exception) -> str:
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    if name == "OutOfResources":
        return f"resources: {text}"
    if "Compilation" in name or "compile" in text.lower():
        return f"compile: {name}: {text}"
    return f"launch: {name}: {text}"
