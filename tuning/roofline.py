"""Roofline of the two expert GEMMs for one routed batch.

Bytes: the weights (and block scales) of the experts actually routed to on this GPU,
read once, plus activations read and outputs written once. FLOPs: 2 per multiply-add
of every local (token, expert) pair through w13 (2N x K) and w2 (K x N). The bound is
the larger of bytes / HBM bandwidth and FLOPs / dense peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gpus import GpuSpec
from .shapes import MoeShape


@dataclass(frozen=True)
class Roofline:
    bytes: float
    flops: float
    memory_us: float
    compute_us: float

    @property
    def bound_us(self) -> float:
        return max(self.memory_us, self.compute_us)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_us >= self.compute_us else "compute"

    def percent(self, measured_us: float) -> float:
        return 100.0 * self.bound_us / measured_us if measured_us > 0 else 0.0


def roofline(shape: MoeShape, gpu: GpuSpec, m: int, touched_experts: int, pairs: int) -> Roofline:
    n, k = shape.n, shape.k
    wbytes = 1 if shape.dtype == "fp8" else 2
    weights = touched_experts * 3 * n * k * wbytes
    if shape.block_shape:
        bn, bk = shape.block_shape
        weights += touched_experts * 4 * (-(-2 * n // bn) * -(-k // bk) + -(-k // bn) * -(-n // bk))
    acts = m * k * wbytes + pairs * n * wbytes  # A of w13, A of w2
    if shape.block_shape:
        acts += 4 * (m * k // shape.block_shape[1] + pairs * n // shape.block_shape[1])
    outs = pairs * (2 * n + k) * 2  # bf16 outputs of both GEMMs
    total = weights + acts + outs
    flops = 2.0 * pairs * 3 * n * k
    return Roofline(total, flops, total / (gpu.bandwidth_tbs * 1e12) * 1e6,
                    flops / (gpu.peak_tflops(shape.dtype) * 1e12) * 1e6)
