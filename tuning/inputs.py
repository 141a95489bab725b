"""Inputs for one (shape, M), built once and reused for every config; the float reference.

Weights are random (never zeros). Block FP8 follows the -FP8 checkpoint: e4m3 weights
with one fp32 scale per [bn, bk] block, activations quantised per token and group of
``bk`` columns at run time. Routing picks top-k distinct experts per token over the
GLOBAL experts; on an expert-parallel shape this GPU holds experts [0, E_local) and
the expert map marks the others -1, as vLLM's default all2all presents them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .routing import Routing
from .shapes import MoeShape

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


LOCAL_TOLERANCE = 0.02  # an expert-parallel rank's slots: within 2% of their expectation (exact for < 25)
MAX_DRAWS = 10_000


def route(m: int, shape: MoeShape, routing: Routing, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k distinct experts per token (Gumbel top-k over popularity), and their weights.

    On an expert-parallel shard the draw is a typical rank's: its local slots (token, expert pairs routed to the
    experts this GPU holds) are their expectation, M x top_k x local / global experts, within
    ``LOCAL_TOLERANCE`` (and exactly, below 25). A free draw can leave a rank empty at small M (at M = 1 on
    DP8+EP, 36 of 288 experts, one draw in three routes nothing here): a config tuned on that is tuned on a
    launch that does no work. Draws are repeated (same generator, so deterministic) until one is typical."""
    e = shape.global_experts
    target = m * shape.top_k * shape.num_experts / e
    best = None
    for _ in range(MAX_DRAWS if shape.expert_parallel else 1):
        ids = _draw(m, shape, routing, gen)
        off = abs(int((ids < shape.num_experts).sum()) - target)
        if best is None or off < best[0]:
            best = (off, ids)
        if off <= max(0.5, LOCAL_TOLERANCE * target):
            break
    weights = torch.rand(m, shape.top_k, generator=gen) + 0.1
    weights = weights / weights.sum(1, keepdim=True)
    return best[1].to(device=device, dtype=torch.int32), weights.to(device=device, dtype=torch.float32)


def _draw(m: int, shape: MoeShape, routing: Routing, gen: torch.Generator) -> torch.Tensor:
    e = shape.global_experts
    logits = torch.zeros(e)
    if routing.kind == "zipf":
        ranks = torch.randperm(e, generator=gen).float() + 1
        logits = -routing.zipf_s * torch.log(ranks)
    gumbel = -torch.log(-torch.log(torch.rand(m, e, generator=gen).clamp_(1e-20, 1 - 1e-7)))
    return (logits + gumbel).topk(shape.top_k, dim=1).indices


def expert_map(shape: MoeShape, device) -> torch.Tensor | None:
    if not shape.expert_parallel:
        return None
    emap = torch.full((shape.global_experts,), -1, dtype=torch.int32, device=device)
    emap[: shape.num_experts] = torch.arange(shape.num_experts, dtype=torch.int32, device=device)
    return emap


def quant_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantisation, (T, K) -> e4m3 (T, K) and fp32 scales (T, K/group)."""
    t, k = x.shape
    if x.is_meta:  # the compile pool's inputs: sizes and dtypes only, without torch's meta kernels' imports
        return torch.empty(t, k, dtype=FP8, device=x.device), torch.empty(t, k // group, device=x.device)
    g = x.float().reshape(t, k // group, group)
    scale = g.abs().amax(-1).clamp_(min=1e-10) / FP8_MAX
    q = (g / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(t, k), scale


def quant_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 weights, (E, R, C) -> e4m3 and fp32 scales (E, ceil(R/bn), ceil(C/bk))."""
    e, r, c = w.shape
    bn, bk = block
    pr, pc = -(-r // bn) * bn, -(-c // bk) * bk
    if w.is_meta:  # as quant_groups
        return torch.empty(e, r, c, dtype=FP8, device=w.device), torch.empty(e, pr // bn, pc // bk, device=w.device)
    padded = torch.nn.functional.pad(w.float(), (0, pc - c, 0, pr - r))
    g = padded.reshape(e, pr // bn, bn, pc // bk, bk)
    scale = g.abs().amax(dim=(2, 4)).clamp_(min=1e-10) / FP8_MAX
    q = (g / scale[:, :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(e, pr, pc)[:, :r, :c].contiguous(), scale


def dequant_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    bn, bk = block
    s = scale.repeat_interleave(bn, 1).repeat_interleave(bk, 2)
    return q.float() * s[:, : q.shape[1], : q.shape[2]]


@dataclass(kw_only=True)
class Problem:
    """Everything one (shape, M) needs; tensors shaped as vLLM's TritonExperts sees them."""

    shape: MoeShape
    m: int
    hidden: torch.Tensor  # (M, K) unquantised activations
    a1: torch.Tensor  # (M, K) activations in the kernel's input dtype
    a1_scale: torch.Tensor | None  # (M, K/bk)
    w13: torch.Tensor  # (E, 2N, K)
    w13_scale: torch.Tensor | None
    a2: torch.Tensor  # (M*top_k, N) input of the second GEMM
    a2_scale: torch.Tensor | None
    w2: torch.Tensor  # (E, K, N)
    w2_scale: torch.Tensor | None
    topk_ids: torch.Tensor  # (M, top_k) global expert ids
    topk_weights: torch.Tensor  # (M, top_k) fp32
    expert_map: torch.Tensor | None  # (global E,) -> local id or -1
    c1: torch.Tensor  # (M, top_k, 2N) output of w13
    c3: torch.Tensor  # (M, top_k, K) output of w2

    @property
    def local_ids(self) -> torch.Tensor:
        ids = self.topk_ids.long()
        return self.expert_map[ids].long() if self.expert_map is not None else ids

    @property
    def valid(self) -> torch.Tensor:
        """(M, top_k) mask of the slots this GPU computes."""
        return self.local_ids >= 0


def build_problem(shape: MoeShape, m: int, routing: Routing, seed: int, device, act_dtype=torch.bfloat16) -> Problem:
    """Random inputs; on the ``meta`` device only shapes, dtypes and strides (for precompiling)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + m)
    dgen = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    E, N, K, k = shape.num_experts, shape.n, shape.k, shape.top_k
    w13 = random_weights((E, 2 * N, K), dgen, device, act_dtype)
    w2 = random_weights((E, K, N), dgen, device, act_dtype)
    hidden = _randn((m, K), dgen, device).to(act_dtype)
    inter = _randn((m * k, N), dgen, device).to(act_dtype)
    ids, weights = route(m, shape, routing, gen, device)
    a1, s13, s2, a1s, a2s = hidden, None, None, None, None
    if shape.dtype == "fp8":
        w13, s13 = quant_chunked(w13, shape.block_shape)
        w2, s2 = quant_chunked(w2, shape.block_shape)
        a1, a1s = quant_groups(hidden, shape.block_shape[1])
        inter, a2s = quant_groups(inter, shape.block_shape[1])
    return Problem(shape=shape, m=m, hidden=hidden, a1=a1, a1_scale=a1s, w13=w13, w13_scale=s13, a2=inter,
                   a2_scale=a2s, w2=w2, w2_scale=s2, topk_ids=ids, topk_weights=weights,
                   expert_map=expert_map(shape, device),
                   c1=torch.empty(m, k, 2 * N, device=device, dtype=act_dtype),
                   c3=torch.empty(m, k, K, device=device, dtype=act_dtype))


def random_weights(size, gen, device, dtype) -> torch.Tensor:
    """N(0, 1/fan_in) weights, generated one expert at a time to bound peak memory."""
    out = torch.empty(size, device=device, dtype=dtype)
    if device.type != "meta":
        for e in range(size[0]):
            out[e] = _randn(size[1:], gen, device).mul_(size[2] ** -0.5)
    return out


def _randn(size, gen, device) -> torch.Tensor:
    if device.type == "meta":
        return torch.empty(size, device=device)
    return torch.randn(size, generator=gen, device=device, dtype=torch.float32)


def quant_chunked(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    if w.is_meta:
        return quant_blocks(w, block)
    parts = [quant_blocks(w[e: e + 8], block) for e in range(0, w.shape[0], 8)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _dequant_acts(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return q.float()
    group = q.shape[1] // scale.shape[1]
    return q.float() * scale.repeat_interleave(group, 1)


def reference(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 results of both GEMMs on the (dequantised) inputs, for the slots this GPU computes."""
    block = p.shape.block_shape
    a1 = _dequant_acts(p.a1, p.a1_scale)
    a2 = _dequant_acts(p.a2, p.a2_scale).reshape(p.m, p.shape.top_k, -1)
    ref1 = torch.zeros(p.c1.shape, device=p.c1.device)
    ref3 = torch.zeros(p.c3.shape, device=p.c3.device)
    local = p.local_ids
    for e in torch.unique(local[local >= 0]).tolist():
        tok, slot = (local == e).nonzero(as_tuple=True)
        w13 = p.w13[e: e + 1] if block is None else dequant_blocks(p.w13[e: e + 1], p.w13_scale[e: e + 1], block)
        w2 = p.w2[e: e + 1] if block is None else dequant_blocks(p.w2[e: e + 1], p.w2_scale[e: e + 1], block)
        ref1[tok, slot] = a1[tok] @ w13[0].float().T
        ref3[tok, slot] = (a2[tok, slot] @ w2[0].float().T) * p.topk_weights[tok, slot, None]
    return ref1, ref3


TOLERANCE = {"bf16": 1e-2, "fp16": 1e-2, "fp8": 2e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the computed slots; inf when any of them is not finite."""
    o, r = out[valid].float(), ref[valid]
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp(min=1e-30))
