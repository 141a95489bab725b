"""The search space: vLLM's tile axes, expanded once, filtered by named predicates.

A predicate takes (config, context) and says whether the config is worth timing for
this shape, GPU and M. ``explain`` reports which predicate drops a config.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from .configs import TileConfig
from .gpus import GpuSpec
from .launch import use_naive
from .shapes import MoeShape

# vLLM's benchmark_moe.py axes.
AXES: dict[str, tuple[int, ...]] = {
    "BLOCK_SIZE_M": (16, 32, 64, 128, 256),
    "BLOCK_SIZE_N": (32, 64, 128, 256),
    "BLOCK_SIZE_K": (64, 128, 256),
    "GROUP_SIZE_M": (1, 16, 32, 64),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4, 5),
}

MAX_THREAD_REGISTERS = 255  # a CUDA thread's registers (every compute capability since 3.5)


@dataclass(frozen=True)
class Context:
    shape: MoeShape
    gpu: GpuSpec
    m: int

    @property
    def naive(self) -> bool:
        return use_naive(self.m, self.shape.top_k, self.shape.global_experts, self.shape.expert_parallel)

    @property
    def rows_per_expert(self) -> float:
        """Expected (token, expert) rows per expert: M * top_k spread over the global experts."""
        return self.m * self.shape.top_k / self.shape.global_experts

    def block_k(self, cfg: TileConfig) -> int:
        return min(cfg.BLOCK_SIZE_K, *self.shape.block_shape) if self.shape.block_shape else cfg.BLOCK_SIZE_K


def axes(ctx: Context) -> dict[str, tuple[int, ...]]:
    """AXES for this shape. vLLM clamps BLOCK_SIZE_K to a block-FP8 quant block, so there K takes
    the clamped values: a [32,32] block searches K=32 alone, a [128,128] block 64 and 128."""
    if not ctx.shape.block_shape:
        return AXES
    return {**AXES, "BLOCK_SIZE_K": tuple(sorted({min(k, *ctx.shape.block_shape) for k in AXES["BLOCK_SIZE_K"]}))}


def fits_shared_memory(cfg: TileConfig, ctx: Context) -> bool:
    """Pipelined A and B tiles of every stage fit the block's shared memory."""
    elem = 1 if ctx.shape.dtype == "fp8" else 2
    tile = (cfg.BLOCK_SIZE_M + cfg.BLOCK_SIZE_N) * ctx.block_k(cfg) * elem
    return cfg.num_stages * tile <= ctx.gpu.smem_per_block


def m_tile_not_oversized(cfg: TileConfig, ctx: Context) -> bool:
    """No M tile wider than 4x the rows an average expert gets; one row per block when naive."""
    if ctx.naive:
        return cfg.BLOCK_SIZE_M == 16
    return cfg.BLOCK_SIZE_M <= max(16, 4 * ctx.rows_per_expert)


def group_has_blocks(cfg: TileConfig, ctx: Context) -> bool:
    """GROUP_SIZE_M > 1 reorders M blocks; pointless beyond the M blocks there are."""
    if cfg.GROUP_SIZE_M == 1:
        return True
    experts_hit = min(ctx.shape.num_experts, ctx.m * ctx.shape.top_k * ctx.shape.num_experts / ctx.shape.global_experts)
    m_blocks = experts_hit * max(1.0, ctx.rows_per_expert / cfg.BLOCK_SIZE_M)
    return m_blocks >= cfg.GROUP_SIZE_M


def warps_have_work(cfg: TileConfig, ctx: Context) -> bool:
    """8 warps on a tile of fewer than 64x64 outputs leaves warps idle."""
    return cfg.num_warps == 4 or cfg.BLOCK_SIZE_M * cfg.BLOCK_SIZE_N >= 64 * 64


def accumulator_fits_registers(cfg: TileConfig, ctx: Context) -> bool:
    """On Hopper (sm90: H200, H20) vLLM's kernel keeps its BLOCK_M x BLOCK_N float32 accumulator in the
    registers of the block's 32 x num_warps threads; at 256 or more a thread it cannot fit, so it spills in
    every K step (ptxas: 255 registers and kilobytes of spill stores), and such a config compiles for about
    14x longer than the rest (13.2 s median against 0.93 s; benchmarks/README.md section 2g). On the H200 the
    rule took an FP8 sweep from 160 to 129 s with the same 18 winners. Blackwell's tensor cores (sm100) accumulate
    in tensor memory: no limit there."""
    if ctx.gpu.capability[0] >= 10:
        return True
    return cfg.BLOCK_SIZE_M * cfg.BLOCK_SIZE_N < 32 * cfg.num_warps * (MAX_THREAD_REGISTERS + 1)


PREDICATES: tuple[Callable[[TileConfig, Context], bool], ...] = (
    fits_shared_memory, m_tile_not_oversized, group_has_blocks, warps_have_work, accumulator_fits_registers,
)


def explain(cfg: TileConfig, ctx: Context) -> list[str]:
    """Names of the predicates that reject ``cfg`` (empty: it is in the space)."""
    return [p.__name__ for p in PREDICATES if not p(cfg, ctx)]


def candidates(ctx: Context) -> list[TileConfig]:
    """Every config on this shape's axes, before the predicates."""
    return [TileConfig(*values) for values in itertools.product(*axes(ctx).values())]


def space(ctx: Context) -> list[TileConfig]:
    return [c for c in candidates(ctx) if all(p(c, ctx) for p in PREDICATES)]


def neighbours(cfg: TileConfig, ctx: Context) -> list[TileConfig]:
    """Configs one step away along one axis, inside the space."""
    out = []
    for axis, values in axes(ctx).items():
        i = values.index(getattr(cfg, axis)) if getattr(cfg, axis) in values else None
        if i is None:
            continue
        for j in (i - 1, i + 1):
            if 0 <= j < len(values):
                cand = TileConfig(**{**cfg.to_dict(), axis: values[j]})
                if all(p(cand, ctx) for p in PREDICATES):
                    out.append(cand)
    return out
