"""The steps of vLLM 0.33's expert paths that are not GEMMs, launched as vLLM launches them.

Each function names the vLLM 0.33 host function it mirrors (file:line). The kernels are vLLM's own
``@triton.jit`` functions (``vllm_helpers.load_helpers``, passed in as ``h``); the launch arguments, grids
and warps are vLLM's. Where vLLM calls a CUDA op of ``vllm._C`` or ``vllm._moe_C``, the function takes
``ops`` (``vllm_ops.VllmOps``): vLLM's own op where it loaded and passed its check, else the stand-in named
in ``STAND_INS`` with what differs; the bake-off prints which ran.
"""

from __future__ import annotations

import math

import torch
import triton

from .vllm_ops import has

FP8 = torch.float8_e4m3fn
FP8_MIN, FP8_MAX = -448.0, 448.0  # quantization/utils/quant_utils.py:99 get_fp8_min_max (e4m3fn on CUDA)
STAND_INS = {
    "per_token_group_fp8_quant": "vllm._C op (fp8_utils.py:708) -> vLLM's own Triton fallback of the same "
                                 "function (fp8_utils.py:718-760), same math and scale layout",
    "silu_and_mul": "vllm._C op (activation.py:356; one CUDA kernel) -> torch silu(gate) * up (2 kernels)",
    "silu_and_mul_per_block_quant": "vllm._C fused op (experts/triton_moe.py:533, only with E8M0 off and a "
                                    "[128,128] block) -> silu_and_mul stand-in + per-token-group quant (3 kernels)",
    "moe_align_block_size": "vllm._moe_C op (moe_align_block_size.py:153; one CUDA kernel) -> torch ops with the "
                            "same buffers and layout (tuning/launch.py _align_torch; ~15 small kernels)",
    "moe_sum": "vllm._moe_C op (experts/triton_moe.py:651, skipping remote slots with an expert map) -> torch sum "
               "over top-k (remote slots stay zero)",
}


def group_quant(h, x: torch.Tensor, group: int, *, use_ue8m0: bool, column_major: bool = False,
                out_q: torch.Tensor | None = None, out_s: torch.Tensor | None = None,
                eps: float = 1e-10, ops=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_utils.py:632 per_token_group_quant_fp8: (T, K) -> e4m3, fp32 scales; vLLM's CUDA op for a contiguous
    ``x`` (lines 704-719) where ``ops`` has it, else the Triton path (lines 721-760).
    ``out_s`` (row-major) is this harness's: the prepare step writes a slice of the gathered batch's scales."""
    x_q = torch.empty(x.shape, device=x.device, dtype=FP8) if out_q is None else out_q
    if out_s is not None:
        x_s = out_s
    elif column_major:  # fp8_utils.py:690-694
        x_s = torch.empty(x.shape[:-2] + (x.shape[-1] // group, x.shape[-2]), device=x.device,
                          dtype=torch.float32).permute(-1, -2)
    else:
        x_s = torch.empty(x.shape[:-1] + (x.shape[-1] // group,), device=x.device, dtype=torch.float32)
    if has(ops, "per_token_group_fp8_quant") and x.is_contiguous():
        ops.per_token_group_fp8_quant(x, x_q, x_s, group_size=group, eps=eps, fp8_min=FP8_MIN, fp8_max=FP8_MAX,
                                      use_ue8m0=use_ue8m0, column_major_scales=column_major, tma_aligned_scales=False)
        return x_q, x_s
    rows = x.numel() // group
    block = triton.next_power_of_2(group)
    warps = min(max(block // 256, 1), 8)
    common = dict(fp8_min=FP8_MIN, fp8_max=FP8_MAX, use_ue8m0=use_ue8m0, BLOCK=block, num_warps=warps, num_stages=1)
    if column_major:
        h._per_token_group_quant_fp8_colmajor[(rows,)](x, x_q, x_s, group, x.shape[1], x.stride(0), x_s.stride(1),
                                                       eps, **common)
    else:
        h._per_token_group_quant_fp8[(rows,)](x, x_q, x_s, group, x.shape[1], x.stride(0), eps, **common)
    return x_q, x_s


def silu_mul_quant_colmajor(h, inp: torch.Tensor, out: torch.Tensor, *, use_ue8m0: bool, group: int = 128,
                            expert_ends: torch.Tensor | None = None, expert_alignment: int = 0):
    """fp8_utils.py:472 silu_mul_per_token_group_quant_fp8_colmajor (clamp None, alpha 1, beta 0)."""
    m, n = inp.size()
    n_2 = n // 2
    scales = torch.empty(((n_2 // group), m), dtype=torch.float32, device=inp.device).transpose(0, 1)
    block_m, block_n = 8, group
    assert m % block_m == 0 and n_2 % block_n == 0
    grid: tuple[int, ...] = (m // block_m, n_2 // block_n)
    if expert_ends is not None:  # fp8_utils.py:530-539
        assert expert_alignment > 0 and expert_alignment % block_m == 0
        experts = expert_ends.numel()
        grid_m = min(triton.cdiv(m, block_m * experts), max(1, triton.cdiv(8192, grid[1] * experts)))
        grid = (grid_m, grid[1], experts)
    h._silu_mul_per_token_group_quant_fp8_colmajor[grid](
        inp, out, scales, expert_ends, m, n, scales.stride(-1), 1e-10, 0.0, 1.0, 0.0, FP8_MIN, FP8_MAX, use_ue8m0,
        False, group, block_m, block_n, expert_alignment)
    return out, scales


def swiglustep_and_mul(h, out: torch.Tensor, inp: torch.Tensor, limit: float = 7.0) -> None:
    """activation.py:50 swiglustep_and_mul_triton (apply_moe_activation, fused_moe/activation.py:393, passes no
    limit: 7.0, the one step3p5.py:368 allows)."""
    b, n = inp.shape
    d = n // 2
    h._swiglustep_and_mul_kernel[(b, triton.cdiv(d, 1024))](out, out.stride(0), inp, inp.stride(0), limit=limit,
                                                           d=d, BLOCK_SIZE=1024)


def silu_and_mul(out: torch.Tensor, inp: torch.Tensor, ops=None) -> None:
    """torch.ops._C.silu_and_mul (fused_moe/activation.py:356) where ``ops`` has it; else its stand-in,
    silu(gate) * up."""
    if has(ops, "silu_and_mul"):
        ops.silu_and_mul(out, inp)
        return
    d = inp.shape[-1] // 2
    torch.mul(torch.nn.functional.silu(inp[:, :d]), inp[:, d:], out=out)


def silu_mul_quant_sorted(h, inp: torch.Tensor, num_tokens_post_padded: torch.Tensor,
                          n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.34 experts/triton_moe.py:615-635: SiLU-and-mul and the UE8M0 group quantisation in one kernel
    (``_silu_mul_quant_sorted_kernel``) over w13's output in slot order, ``inp`` (rows, 1, 2n); rows past
    num_tokens_post_padded are left unwritten."""
    rows = inp.size(0)
    q = torch.empty((rows, n), device=inp.device, dtype=FP8)
    scale = torch.empty((rows, n // 128), device=inp.device, dtype=torch.float32)
    h._silu_mul_quant_sorted_kernel[(triton.cdiv(rows, 16), n // 128)](
        inp, q, scale, num_tokens_post_padded, n, BLOCK_M=16, GROUP_K=128)
    return q, scale


def silu_and_mul_per_block_quant(h, inp: torch.Tensor, scratch: torch.Tensor,
                                 ops=None) -> tuple[torch.Tensor, torch.Tensor]:
    """experts/triton_moe.py:533 ops.silu_and_mul_per_block_quant(inp, group_size=128, quant_dtype=fp8) where
    ``ops`` has it; else its stand-in: silu_and_mul into ``scratch``, then per-token-group quant (E8M0 off)."""
    if has(ops, "silu_and_mul_per_block_quant"):
        return ops.silu_and_mul_per_block_quant(inp, 128, FP8)
    silu_and_mul(scratch, inp, ops)
    return group_quant(h, scratch, 128, use_ue8m0=False, ops=ops)


def moe_sum(inp: torch.Tensor, out: torch.Tensor, topk_ids: torch.Tensor, expert_map: torch.Tensor | None,
            ops=None) -> None:
    """experts/triton_moe.py:641-653 TritonExperts.moe_sum, (M, top_k, K) -> (M, K): vLLM's op where ``ops`` has it
    (skipping the slots of other ranks' experts with an expert map); else its stand-in, a torch sum over top-k
    (those slots must hold zeros)."""
    if has(ops, "moe_sum"):
        if expert_map is not None:
            ops.moe_sum(inp, out, topk_ids, expert_map)
        else:
            ops.moe_sum(inp, out)
        return
    torch.sum(inp, dim=1, out=out)


def count_expert_num_tokens(h, topk_ids: torch.Tensor, local_experts: int, expert_map) -> torch.Tensor:
    """fused_moe/utils.py:202 count_expert_num_tokens."""
    counts = torch.empty((local_experts,), device=topk_ids.device, dtype=torch.int32)
    block = triton.next_power_of_2(min(topk_ids.numel(), 1024))
    h._count_expert_num_tokens[(local_experts,)](topk_ids, counts, local_experts, topk_ids.numel(), expert_map,
                                                 HAS_EXPERT_MAP=expert_map is not None, BLOCK_SIZE=block)
    return counts


def aligned_m(m: int, top_k: int, local_experts: int, alignment: int, theoretical=None) -> tuple[int, int]:
    """deep_gemm_utils.py:27 compute_aligned_M_and_alignment without expert_tokens_meta: (M_sum, alignment)."""
    expected = m * top_k
    if theoretical is not None:  # lines 61-77: DeepGEMM's per-call alignment when it is smaller
        try:
            per_call = theoretical(expected, local_experts)
            if per_call and per_call <= alignment:
                alignment = per_call
        except Exception:
            pass
    m_sum = expected + min(expected, local_experts) * (alignment - 1)
    return -(-m_sum // alignment) * alignment, alignment


def ep_scatter(h, *, recv_x, recv_x_scale, recv_topk, counts, expert_map, start_loc, out, out_scale, m_indices,
               out_index, align_m: int, block_size: int, use_psum_layout: bool) -> None:
    """deep_gemm_utils.py:277 ep_scatter (fp32 scales: pack_ue8m0 False)."""
    experts = counts.shape[0]
    hidden = recv_x.shape[1]
    h._fwd_kernel_ep_scatter_1[(experts,)](counts, start_loc, m_indices, num_experts=experts, num_warps=8, BLOCK_E=128,
                                           BLOCK_EXPERT_NUM=triton.next_power_of_2(experts), ALIGN_M=align_m,
                                           USE_PSUM_LAYOUT=use_psum_layout)
    scale_k = hidden // block_size
    h._fwd_kernel_ep_scatter_2[(min(recv_topk.shape[0], 1024 * 8),)](
        recv_topk.shape[0], start_loc, recv_x, recv_x.stride(0), recv_x.stride(1), recv_x_scale,
        recv_x_scale.stride(0), recv_x_scale.stride(1), recv_topk, recv_topk.stride(0), recv_topk.stride(1), out,
        out.stride(0), out.stride(1), out_scale, out_scale.stride(0), out_scale.stride(1), out_index,
        out_index.stride(0), out_index.stride(1), topk_num=recv_topk.shape[1], expert_map=expert_map,
        HAS_EXPERT_MAP=expert_map is not None, num_warps=8, HIDDEN_SIZE=hidden,
        HIDDEN_SIZE_PAD=triton.next_power_of_2(hidden), SCALE_HIDDEN_SIZE=scale_k,
        SCALE_HIDDEN_SIZE_PAD=triton.next_power_of_2(scale_k), PACK_UE8M0=False, SCALE_PACKED_SIZE=1,
        SCALE_PACKED_SIZE_PAD=1)


def ep_gather(h, *, inp, topk_ids, topk_weights, inp_index, expert_map, out) -> None:
    """deep_gemm_utils.py:426 ep_gather (deepgemm_unpermute_and_reduce, line 562): weighted sum over top-k."""
    tokens, hidden = out.shape[0], inp.shape[1]
    block_d = math.gcd(hidden, 1024)
    grid = (triton.cdiv(hidden, block_d), min(tokens, 1024))
    h._fwd_kernel_ep_gather[grid](tokens, inp, inp.stride(0), inp.stride(1), topk_ids, topk_ids.stride(0),
                                  topk_ids.stride(1), topk_weights, topk_weights.stride(0), topk_weights.stride(1),
                                  inp_index, inp_index.stride(0), inp_index.stride(1), out, out.stride(0),
                                  out.stride(1), topk_num=topk_ids.shape[1], expert_map=expert_map,
                                  HAS_EXPERT_MAP=expert_map is not None, num_warps=2, BLOCK_D=block_d)


def deepgemm_permute(h, *, aq, aq_scale, topk_ids, local_experts: int, expert_map, aq_out, m_sum: int, align: int,
                     use_psum_layout: bool, block_k: int = 128):
    """deep_gemm_utils.py:467 deepgemm_moe_permute: (rows, scales, grouped_layout, inv_perm), M_sum precomputed."""
    device = aq.device
    start_loc = torch.empty((local_experts,), device=device, dtype=torch.int32)
    scale_out = torch.zeros((m_sum, aq.size(1) // block_k), device=device, dtype=torch.float32)
    if use_psum_layout:  # lines 521-529
        layout = torch.empty((local_experts,), device=device, dtype=torch.int32)
    else:
        layout = torch.full((m_sum,), fill_value=-1, device=device, dtype=torch.int32)
    inv_perm = torch.empty(topk_ids.shape, device=device, dtype=torch.int32)
    counts = count_expert_num_tokens(h, topk_ids, local_experts, expert_map)
    ep_scatter(h, recv_x=aq, recv_x_scale=aq_scale, recv_topk=topk_ids, counts=counts, expert_map=expert_map,
               start_loc=start_loc, out=aq_out, out_scale=scale_out, m_indices=layout, out_index=inv_perm,
               align_m=align, block_size=block_k, use_psum_layout=use_psum_layout)
    return aq_out, scale_out, layout, inv_perm
