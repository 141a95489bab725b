"""The check vLLM's CUDA ops pass before the bake-off uses them: each runs once on small inputs, beside the
stand-in the harness would run in its place (``moe_ops.STAND_INS``), and must agree with it.

- moe_align_block_size: per expert the same set of (token, expert) slots, the same padded total and the same
  expert per block (the order of the slots inside an expert's rows is free: fused_moe_kernel reads them through
  sorted_token_ids); with and without an expert map (ignore_invalid_experts, as 0.33 runs EP), the model's
  global experts and top-k, two BLOCK_SIZE_M and M from 1 to 300;
- silu_and_mul and moe_sum (with the expert map: remote slots skipped, where the stand-in reads zeros): allclose;
- per_token_group_fp8_quant (groups 128, 64, 32; UE8M0 on and off; row- and column-major scales) and
  silu_and_mul_per_block_quant: the same scales, and dequantised values within one e4m3 step.

The comparisons are plain torch on any device; ``gate`` runs them where the ops run.
"""

from __future__ import annotations

import torch

from .. import launch
from . import moe_ops
from .vllm_ops import VllmOps

E4M3_STEP = 2.0 ** -3  # e4m3 keeps 3 mantissa bits: neighbouring values differ by at most 1/8 of the larger
E4M3_TINY = 2.0 ** -9  # e4m3's smallest subnormal (times the group's scale)
TOKENS = 13


def alignment_mismatch(got: launch.Alignment, want: launch.Alignment, numel: int) -> str | None:
    """None when ``got`` assigns every expert the same slots, padded total and blocks as ``want``; else what differs.
    Entries below ``numel`` are slots (fused_moe_kernel's ``offs_token < num_valid_tokens``), the rest padding."""
    total, got_total = int(want.num_tokens_post_padded.reshape(-1)[0]), int(got.num_tokens_post_padded.reshape(-1)[0])
    if got_total != total:
        return f"padded total {got_total}, the stand-in's {total}"
    if got.sorted_token_ids.numel() != want.sorted_token_ids.numel():
        return f"sorted_token_ids of {got.sorted_token_ids.numel()} entries, the stand-in's " \
               f"{want.sorted_token_ids.numel()} (they set EM)"
    blocks = total // want.block_m
    got_experts, want_experts = got.expert_ids[:blocks].cpu().long(), want.expert_ids[:blocks].cpu().long()
    if not torch.equal(got_experts, want_experts):
        b = int((got_experts != want_experts).nonzero()[0])
        return f"block {b} goes to expert {int(got_experts[b])}, the stand-in's to {int(want_experts[b])}"
    keys = [_slots_by_expert(a.sorted_token_ids[:total].cpu().long(), experts, a.block_m, numel)
            for a, experts in ((got, got_experts), (want, want_experts))]
    if not torch.equal(*keys):
        return "an expert's set of token slots differs from the stand-in's"
    return None


def _slots_by_expert(ids: torch.Tensor, experts: torch.Tensor, block_m: int, numel: int) -> torch.Tensor:
    """The (expert, slot) pairs of a layout, sorted: equal for layouts that differ only in order within experts."""
    per_entry = experts.repeat_interleave(block_m)
    valid = ids < numel
    return torch.sort(per_entry[valid] * (numel + 1) + ids[valid]).values


def close_mismatch(got: torch.Tensor, want: torch.Tensor, *, rtol: float, atol: float) -> str | None:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, the stand-in's {tuple(want.shape)}"
    g, w = got.float(), want.float()
    if torch.allclose(g, w, rtol=rtol, atol=atol):
        return None
    bad = ~torch.isclose(g, w, rtol=rtol, atol=atol)
    i = tuple(int(v) for v in bad.nonzero()[0])
    return f"{int(bad.sum())} of {bad.numel()} values differ beyond rtol {rtol:g}, atol {atol:g} " \
           f"(at {list(i)}: {float(g[i]):.4g}, the stand-in's {float(w[i]):.4g})"


def quant_mismatch(got_q: torch.Tensor, got_s: torch.Tensor, want_q: torch.Tensor, want_s: torch.Tensor, group: int,
                   *, scale_rtol: float) -> str | None:
    """Per-token-group e4m3 values with fp32 scales (T, K/group): the same scales within ``scale_rtol``, and the
    dequantised values within one e4m3 step of the stand-in's."""
    if got_q.shape != want_q.shape or got_s.shape != want_s.shape or got_q.dtype != want_q.dtype:
        return f"outputs {tuple(got_q.shape)} {got_q.dtype} and scales {tuple(got_s.shape)}, the stand-in's " \
               f"{tuple(want_q.shape)} {want_q.dtype} and {tuple(want_s.shape)}"
    gs, ws = got_s.float(), want_s.float()
    if not torch.allclose(gs, ws, rtol=scale_rtol, atol=0.0):
        worst = float(((gs - ws).abs() / ws.abs().clamp(min=1e-30)).max())
        return f"scales differ (worst relative difference {worst:.3g} > {scale_rtol:g})"
    got_dq, want_dq = _dequant(got_q, gs, group), _dequant(want_q, ws, group)
    tol = E4M3_STEP * torch.maximum(got_dq.abs(), want_dq.abs()) + E4M3_TINY * ws.repeat_interleave(group, dim=-1)
    bad = (got_dq - want_dq).abs() > tol
    if bad.any():
        return f"{int(bad.sum())} of {bad.numel()} dequantised values differ by more than one e4m3 step"
    return None


def _dequant(q: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    return q.float() * s.repeat_interleave(group, dim=-1)


def gate(ops: VllmOps, helpers, *, device, experts: int, top_k: int) -> None:
    """Run each loaded op against its stand-in; refuse (keeping the reason) every op that fails or disagrees."""
    checks = {"moe_align_block_size": check_align, "moe_sum": check_moe_sum, "silu_and_mul": check_silu_and_mul,
              "per_token_group_fp8_quant": check_group_quant,
              "silu_and_mul_per_block_quant": check_silu_and_mul_per_block_quant}
    for name in [n for n in checks if ops.has(n)]:
        try:
            why = checks[name](ops, helpers, device, experts, top_k)
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            if why:
                ops.refuse(name, f"disagrees with its stand-in: {why}")
        except Exception as exc:  # a refused launch, a dtype the op does not take: the stand-in runs instead
            text = str(exc).strip()
            ops.refuse(name, f"failed on a small input ({type(exc).__name__}: "
                             f"{text.splitlines()[0][:200] if text else ''})")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _topk_ids(m: int, experts: int, top_k: int, gen, device) -> torch.Tensor:
    return torch.rand(m, experts, generator=gen).topk(top_k, dim=1).indices.to(device=device, dtype=torch.int32)


def _expert_map(experts: int, device) -> torch.Tensor:
    """A middle rank of four: global experts [E/4, E/2) are local 0..E/4-1, the others -1."""
    local = max(1, experts // 4)
    emap = torch.full((experts,), -1, dtype=torch.int32)
    emap[local:2 * local] = torch.arange(local, dtype=torch.int32)
    return emap.to(device)


def check_align(ops: VllmOps, helpers, device, experts: int, top_k: int) -> str | None:
    gen, emap = _gen(1), _expert_map(experts, device)
    for m in (1, 40, 300):
        ids = _topk_ids(m, experts, top_k, gen, device)
        for block_m in (16, 64):
            for em in (None, emap):
                got = launch.Alignment(*ops.moe_align_block_size(ids, block_m, experts, em,
                                                                 ignore_invalid_experts=em is not None), block_m)
                want = launch.align(ids, block_m, experts, em)  # the stand-in: torch ops
                why = alignment_mismatch(got, want, ids.numel())
                if why:
                    return f"M={m} BLOCK_SIZE_M={block_m}{' with an expert map' if em is not None else ''}: {why}"
    return None


def check_moe_sum(ops: VllmOps, helpers, device, experts: int, top_k: int) -> str | None:
    gen, emap = _gen(2), _expert_map(experts, device)
    ids = _topk_ids(TOKENS, experts, top_k, gen, device)
    x = torch.randn(TOKENS, top_k, 256, generator=gen).to(device=device, dtype=torch.bfloat16)
    for em in (None, emap):
        got = torch.empty(TOKENS, 256, device=device, dtype=x.dtype)
        moe_ops.moe_sum(x, got, ids, em, ops=ops)
        remote = torch.zeros_like(ids, dtype=torch.bool) if em is None else em[ids.long()] < 0
        want = torch.empty_like(got)
        moe_ops.moe_sum(x.masked_fill(remote[..., None], 0), want, ids, em)  # remote rows are zeros there
        why = close_mismatch(got, want, rtol=2 ** -6, atol=2 ** -6)
        if why:
            return f"{'with' if em is not None else 'without'} an expert map: {why}"
    return None


def check_silu_and_mul(ops: VllmOps, helpers, device, experts: int, top_k: int) -> str | None:
    x = (torch.randn(TOKENS, 640, generator=_gen(3)) * 2).to(device=device, dtype=torch.bfloat16)
    got, want = (torch.empty(TOKENS, 320, device=device, dtype=x.dtype) for _ in range(2))
    moe_ops.silu_and_mul(got, x, ops=ops)
    moe_ops.silu_and_mul(want, x)
    return close_mismatch(got, want, rtol=2 ** -6, atol=2 ** -12)


def check_group_quant(ops: VllmOps, helpers, device, experts: int, top_k: int) -> str | None:
    x = (torch.randn(TOKENS, 512, generator=_gen(4)) * 3).to(device=device, dtype=torch.bfloat16)
    cases = [(g, e8m0, False) for g in (128, 64, 32) for e8m0 in (False, True)] + \
            [(128, e8m0, True) for e8m0 in (False, True)]
    for group, e8m0, column_major in cases:
        got = moe_ops.group_quant(helpers, x, group, use_ue8m0=e8m0, column_major=column_major, ops=ops)
        want = moe_ops.group_quant(helpers, x, group, use_ue8m0=e8m0, column_major=column_major)
        why = quant_mismatch(*got, *want, group, scale_rtol=1e-6)
        if why:
            return f"group {group}{', UE8M0' if e8m0 else ''}{', column-major scales' if column_major else ''}: {why}"
    return None


def check_silu_and_mul_per_block_quant(ops: VllmOps, helpers, device, experts: int, top_k: int) -> str | None:
    """The fused op keeps silu(gate) * up in float32; the stand-in rounds it to bf16 first (scales within 2^-6)."""
    x = (torch.randn(TOKENS, 512, generator=_gen(5)) * 2).to(device=device, dtype=torch.bfloat16)
    got = ops.silu_and_mul_per_block_quant(x, 128, moe_ops.FP8)
    scratch = torch.empty(TOKENS, 256, device=device, dtype=x.dtype)
    want = moe_ops.silu_and_mul_per_block_quant(helpers, x, scratch)  # the stand-in: silu_and_mul, then quant
    return quant_mismatch(*got, *want, 128, scale_rtol=2 ** -6)
