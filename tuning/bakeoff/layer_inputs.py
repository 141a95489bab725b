"""Inputs of one MoE layer for the backend bake-off, and its float reference.

Float weights are built once per layout at the shard's true width; every backend gets them quantised the
way its serve holds them: the refined block of a Triton serve ([64,64] for TP4), or the shard padded with
zeros to whole 128 blocks (N=384 for TP4) as ``pad_tp_shard_to_weight_blocks`` (oracle/fp8.py:324) does for
DeepGEMM. One routed batch per M (the same for all backends). The reference is the whole expert computation
in float32 on the unquantised weights and activations: both GEMMs, the activation, the routed weights and
the sum over top-k; activation and weight quantisation are part of each backend's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..inputs import expert_map, quant_chunked, random_weights, route
from ..routing import Routing
from ..shapes import MoeShape

SWIGLUSTEP_LIMIT = 7.0  # step3p5.py:368 (the only limit vLLM 0.33 accepts for the fused MoE)
HIDDEN_SCALE = 3.0  # activations of a few units, so the SwiGLU-step clamps act on some values


@dataclass(frozen=True)
class FloatWeights:
    """One layer's expert weights on this GPU, unquantised: w13 (E, 2N, K), w2 (E, K, N)."""

    w13: torch.Tensor
    w2: torch.Tensor

    @property
    def n(self) -> int:
        return self.w2.shape[2]


@dataclass(frozen=True)
class QuantWeights:
    """Block-FP8 weights and fp32 block scales as a serve holds them (maybe padded to ``n``)."""

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    block: tuple[int, int]

    @property
    def n(self) -> int:
        return self.w2.shape[2]


@dataclass(frozen=True)
class Batch:
    """One fused-MoE call: M tokens (all DP ranks' with EP), top-k over the global experts."""

    hidden: torch.Tensor  # (M, K)
    topk_ids: torch.Tensor  # (M, top_k) int32, global expert ids
    topk_weights: torch.Tensor  # (M, top_k) fp32
    expert_map: torch.Tensor | None  # (global E,) -> local id or -1
    local_rows: int  # rows this GPU quantises itself before the all-gather (M / DP with EP)

    @property
    def m(self) -> int:
        return self.hidden.shape[0]


def float_weights(shape: MoeShape, seed: int, device, dtype=torch.bfloat16) -> FloatWeights:
    gen = None if torch.device(device).type == "meta" else torch.Generator(device=device).manual_seed(seed)
    e, n, k = shape.num_experts, shape.n, shape.k
    return FloatWeights(random_weights((e, 2 * n, k), gen, torch.device(device), dtype),
                        random_weights((e, k, n), gen, torch.device(device), dtype))


def padded(w: FloatWeights, n: int) -> FloatWeights:
    """Gate and up each padded with zero rows to ``n``, w2 with zero columns (the padded TP shard)."""
    extra = n - w.n
    if extra <= 0:
        return w
    gate, up = w.w13.split(w.n, dim=1)
    w13 = torch.cat([F.pad(gate, (0, 0, 0, extra)), F.pad(up, (0, 0, 0, extra))], dim=1)
    return FloatWeights(w13, F.pad(w.w2, (0, extra)))


def quantised(w: FloatWeights, block: tuple[int, int], n: int | None = None) -> QuantWeights:
    w = padded(w, n or w.n)
    w13, s13 = quant_chunked(w.w13, block)
    w2, s2 = quant_chunked(w.w2, block)
    return QuantWeights(w13, s13, w2, s2, tuple(block))


def batch(shape: MoeShape, m: int, dp: int, seed: int, device, dtype=torch.bfloat16) -> Batch:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + m)
    hidden = (torch.randn(m, shape.k, generator=gen) * HIDDEN_SCALE).to(device=device, dtype=dtype)
    ids, weights = route(m, shape, Routing(), gen, device)
    return Batch(hidden, ids, weights, expert_map(shape, device), -(-m // dp) if shape.expert_parallel else m)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The gated activation on (rows, 2N) gate|up in float32: SiLU, or Step-3.5's SwiGLU-step
    (activation.py:22: silu(gate) clamped above at 7, up clamped to [-7, 7])."""
    gate, up = h.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    return F.silu(gate).clamp(max=SWIGLUSTEP_LIMIT) * up.clamp(-SWIGLUSTEP_LIMIT, SWIGLUSTEP_LIMIT)


def reference(w: FloatWeights, b: Batch, activation: str) -> torch.Tensor:
    """(M, K) float32: sum over the slots this GPU holds of weight * act(x @ w13.T) @ w2.T."""
    ids = b.topk_ids.long()
    local = b.expert_map[ids].long() if b.expert_map is not None else ids
    out = torch.zeros(b.m, w.w13.shape[2], device=b.hidden.device)
    x = b.hidden.float()
    for e in torch.unique(local[local >= 0]).tolist():
        tok, slot = (local == e).nonzero(as_tuple=True)
        y = activate(x[tok] @ w.w13[e].float().T, activation) @ w.w2[e].float().T
        out.index_add_(0, tok, y * b.topk_weights[tok, slot, None])
    return out


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative error, DeepGEMM's calc_diff) of a backend's (M, K) output; inf when any value is not finite."""
    o = out.float()
    if not torch.isfinite(o).all():
        return float("inf"), float("inf")
    rel = float((o - ref).norm() / ref.norm().clamp(min=1e-30))
    x, y = o.double(), ref.double()
    den = float((x * x + y * y).sum())
    return rel, (0.0 if den == 0 else float(1 - 2 * (x * y).sum() / den))
