"""Launch vLLM's fused_moe_kernel exactly as the target vLLM's TritonExperts does (0.33 and 0.26 checked).

Rules mirrored (vllm/model_executor/layers/fused_moe/fused_moe.py, experts/triton_moe.py):
- naive block assignment (no alignment, one (token, expert) pair per block) when
  ``M * top_k * 4 <= E`` and there is no expert map;
- otherwise ``moe_align_block_size`` pads each expert's rows to BLOCK_SIZE_M over the
  *global* experts and expert ids are local; with an expert map 0.33 drops the slots of remote
  experts (``ignore_invalid_experts``), while 0.26 aligns them too and the kernel writes zeros
  for their blocks (expert id -1): ``vllm_rules.LAUNCH_RULES``;
- EM = the aligned buffer length, capped at ``M * top_k * BLOCK_SIZE_M`` when M < BLOCK_SIZE_M;
- fp8 on sm90 with BLOCK_SIZE_M < 64 and BLOCK_SIZE_N >= 64 swaps A and B (SWAP_AB);
- BLOCK_SIZE_K is clamped to min(block_shape); SPLIT_K = 1; USE_TD follows VLLM_TRITON_USE_TD;
- from 0.34, block-FP8 weights are read through a TMA descriptor on compute capability 9.x and 10.x
  where the tiles divide them (USE_TMA_B, ``tma_weights``);
- w13 without routed weights (top_k = 8), then w2 with routed weights (top_k = 1).
Parameters the loaded kernel does not have are not passed (0.26 has no USE_TD), so the launch
is exactly that version's. ``both_gemms`` is the one place the two launches are
issued: the search times, the precompiler compiles and the layer scope runs exactly the same calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from .configs import TileConfig
from .inputs import Problem
from .vllm.kernel import Kernel
from .vllm.rules import LAUNCH_RULES, LaunchRules, launch_rules, naive_block_assignment


@dataclass(frozen=True)
class Alignment:
    """moe_align_block_size's outputs, or the naive assignment (sorted_token_ids None)."""

    sorted_token_ids: torch.Tensor | None
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    block_m: int


def use_naive(m: int, top_k: int, global_experts: int, expert_parallel: bool) -> bool:
    return naive_block_assignment(m, top_k, global_experts, has_expert_map=expert_parallel)


def rules(kernel: Kernel | None) -> LaunchRules:
    """How the kernel's vLLM release launches it; without a kernel, the newest release's way."""
    return launch_rules(kernel.vllm_version) if kernel is not None else LAUNCH_RULES[0]


def align(topk_ids: torch.Tensor, block_m: int, global_experts: int, expert_map: torch.Tensor | None,
          kernel: Kernel | None = None, ops=None) -> Alignment:
    """Group (token, expert) slots by expert, each expert padded to ``block_m`` rows: vLLM's moe_align_block_size
    (the installed vLLM's, or its CUDA op from ``ops``, a ``vllm_ops.VllmOps``), else the torch stand-in."""
    drop = expert_map is not None and rules(kernel).drop_remote_slots
    op = kernel.align_op if kernel is not None and kernel.align_op is not None and topk_ids.is_cuda else None
    if op is None and ops is not None and ops.has("moe_align_block_size"):
        op = ops.moe_align_block_size
    if op is not None:
        sorted_ids, expert_ids, ntpp = op(topk_ids, block_m, global_experts, expert_map, ignore_invalid_experts=drop)
        return Alignment(sorted_ids, expert_ids, ntpp, block_m)
    return _align_torch(topk_ids, block_m, global_experts, expert_map, drop)


def _align_torch(topk_ids, block_m, global_experts, expert_map, drop_remote: bool = True) -> Alignment:
    """The same layout from torch ops that need no host sync, so CUDA graphs can capture it. ``drop_remote``:
    remote slots are left out (0.33); otherwise they are aligned too and their blocks map to expert -1 (0.26)."""
    device, numel, E = topk_ids.device, topk_ids.numel(), global_experts
    max_padded = padded_rows(numel, E, block_m)
    if device.type == "meta":  # a compile needs the sizes, not the values (and meta's cumsum imports torch._dynamo)
        return Alignment(torch.empty(max_padded, dtype=torch.int32, device=device),
                         torch.empty(triton.cdiv(max_padded, block_m), dtype=torch.int32, device=device),
                         torch.empty(1, dtype=torch.int32, device=device), block_m)
    flat = topk_ids.reshape(-1).long()
    drop = expert_map is not None and drop_remote
    key = torch.where(expert_map[flat] >= 0, flat, E) if drop else flat  # dropped slots -> bucket E
    counts = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:E] + block_m - 1) // block_m * block_m
    starts = torch.cat([torch.cumsum(padded, 0) - padded, padded.sum().reshape(1)])
    first = torch.cumsum(counts, 0) - counts
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    rank = torch.arange(numel, device=device) - first[sorted_key]
    pos = torch.where(sorted_key < E, starts[sorted_key] + rank, max_padded)
    buf = torch.full((max_padded + 1,), numel, dtype=torch.int32, device=device)
    buf[pos] = order.to(torch.int32)
    cum_blocks = torch.cumsum(padded // block_m, 0)
    blocks = torch.arange(triton.cdiv(max_padded, block_m), device=device)
    block_expert = torch.searchsorted(cum_blocks, blocks, right=True).clamp_(max=E - 1)
    if expert_map is not None:
        block_expert = expert_map[block_expert]
    total = padded.sum().to(torch.int32).reshape(1)
    return Alignment(buf[:max_padded], block_expert.to(torch.int32), total, block_m)


def padded_rows(numel: int, global_experts: int, block_m: int) -> int:
    """Rows of sorted_token_ids exactly as vLLM allocates them (they set EM and the launch grid)."""
    rows = numel + global_experts * (block_m - 1)
    return min(numel * block_m, rows) if numel < global_experts else rows


def naive(topk_ids: torch.Tensor, block_m: int) -> Alignment:
    ntpp = torch.full((1,), topk_ids.numel() * block_m, dtype=torch.int32, device=topk_ids.device)
    return Alignment(None, topk_ids.reshape(-1), ntpp, block_m)


def capability() -> int:
    """This process's GPU as a compute capability (90 for an H200, 100 for a B200); 0 without CUDA."""
    if not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def swap_ab(fp8: bool, config: TileConfig, capability: int) -> bool:
    return fp8 and capability == 90 and config.BLOCK_SIZE_M < 64 and config.BLOCK_SIZE_N >= 64


def tma_weights(rule: LaunchRules, fp8: bool, b: torch.Tensor, *, block_shape, config: TileConfig, block_k: int,
                capability: int) -> bool:
    """Whether the release loads the block-FP8 weights ``b`` through a TMA descriptor (``LaunchRules.tma_weights``;
    a tuned file never says "USE_TMA": false, so vLLM's default holds)."""
    return (rule.tma_weights and fp8 and block_shape is not None and all(block_shape)
            and capability // 10 in (9, 10) and b.is_contiguous()
            and b.size(1) % config.BLOCK_SIZE_N == 0 and b.size(2) % block_k == 0)


def use_td(quantized: bool) -> bool:
    return os.environ.get("VLLM_TRITON_USE_TD") == "1" and not quantized


@dataclass(frozen=True, kw_only=True)
class Gemm:
    """The tensors of one launch: ``c[slot] = a[token] @ b[expert].T`` for every routed slot."""

    a: torch.Tensor  # (M, K) for w13, (M * top_k, N) for w2
    a_scale: torch.Tensor | None
    b: torch.Tensor  # (E, N_out, K_in) weights
    b_scale: torch.Tensor | None
    c: torch.Tensor  # (M, top_k, N_out)
    topk_weights: torch.Tensor | None  # multiplied in (w2) or not (w13)
    top_k: int  # slots per row of ``a``: top_k for w13, 1 for w2


def w13(p: Problem, a: torch.Tensor | None = None, a_scale: torch.Tensor | None = None) -> Gemm:
    return Gemm(a=p.a1 if a is None else a, a_scale=p.a1_scale if a is None else a_scale, b=p.w13,
                b_scale=p.w13_scale, c=p.c1, topk_weights=None, top_k=p.shape.top_k)


def w2(p: Problem, a: torch.Tensor | None = None, a_scale: torch.Tensor | None = None) -> Gemm:
    return Gemm(a=p.a2 if a is None else a, a_scale=p.a2_scale if a is None else a_scale, b=p.w2,
                b_scale=p.w2_scale, c=p.c3, topk_weights=p.topk_weights, top_k=1)


def alignment(p: Problem, block_m: int, kernel: Kernel | None = None) -> Alignment:
    """The slot layout vLLM builds for ``p`` and this M tile: naive, or aligned per expert."""
    s = p.shape
    if use_naive(p.m, s.top_k, s.global_experts, s.expert_parallel):
        return naive(p.topk_ids, block_m)
    return align(p.topk_ids, block_m, s.global_experts, p.expert_map, kernel)


def both_gemms(kernel: Kernel, p: Problem, al: Alignment, config: TileConfig, capability: int, *,
               first: Gemm | None = None, between=None, warmup: bool = False) -> None:
    """w13, then w2 with the routed weights, as TritonExperts.apply issues them on a GPU of compute
    ``capability`` (90 for sm90, 100 for sm100; 0 where the kernel runs off CUDA, under Triton's interpreter).

    ``first`` replaces w13's inputs (the layer scope quantises them per call); ``between`` maps w13's
    output to w2's input and scale (the activation); without it w2 reads the inputs prepared once.
    """
    invoke(kernel, first or w13(p), al, config, block_shape=p.shape.block_shape, capability=capability,
           warmup=warmup)
    second = w2(p, *between(p.c1)) if between else w2(p)
    invoke(kernel, second, al, config, block_shape=p.shape.block_shape, capability=capability, warmup=warmup)


def invoke(kernel: Kernel, g: Gemm, al: Alignment, config: TileConfig, *, block_shape, capability: int,
           warmup: bool = False, a_sorted: bool = False, c_sorted: bool = False) -> None:
    """One fused_moe_kernel launch, argument for argument as invoke_fused_moe_triton_kernel.

    ``warmup`` compiles into Triton's cache without launching (tensors may be on ``meta``). ``c_sorted`` and
    ``a_sorted`` are 0.34's C_is_sorted and A_is_sorted (the sorted-activation path of a ``_down.json`` file,
    ``sorted_down``): w13 writes its rows in slot order, and w2 reads them so through a TMA descriptor.
    """
    A, B, C, A_scale, B_scale, topk_weights, top_k = g.a, g.b, g.c, g.a_scale, g.b_scale, g.topk_weights, g.top_k
    mul_routed_weight = topk_weights is not None
    fp8 = B_scale is not None
    m = A.size(0)
    num_tokens = C.size(0) * C.size(1) if a_sorted else m * top_k
    if al.sorted_token_ids is not None:
        em = al.sorted_token_ids.size(0)
        if not a_sorted and m < config.BLOCK_SIZE_M:
            em = min(em, m * top_k * config.BLOCK_SIZE_M)
    else:
        em = num_tokens * config.BLOCK_SIZE_M
    block_k = config.BLOCK_SIZE_K if block_shape is None else min(config.BLOCK_SIZE_K, *block_shape)
    grid = (triton.cdiv(em, config.BLOCK_SIZE_M) * triton.cdiv(B.size(1), config.BLOCK_SIZE_N),)
    tma = tma_weights(rules(kernel), fp8, B, block_shape=block_shape, config=config, block_k=block_k,
                      capability=capability)
    b_desc = _weights_descriptor(B, config.BLOCK_SIZE_N, block_k) if tma else None
    tma_a = (a_sorted and tma and A.is_contiguous() and A.size(0) == em and A.size(1) % block_k == 0
             and A_scale is not None and A_scale.ndim == 2 and A_scale.size(0) == em)
    if a_sorted and not tma_a:
        raise ValueError("Sorted MoE activation requires a valid A TMA descriptor")
    a_desc = _descriptor(A, [config.BLOCK_SIZE_M, block_k]) if tma_a else None
    values = {
        "a_ptr": A, "b_ptr": B, "c_ptr": C, "b_bias_ptr": None, "a_scale_ptr": A_scale, "b_scale_ptr": B_scale,
        "topk_weights_ptr": topk_weights, "sorted_token_ids_ptr": al.sorted_token_ids,
        "expert_ids_ptr": al.expert_ids, "num_tokens_post_padded_ptr": al.num_tokens_post_padded,
        "N": B.size(1), "K": B.size(2), "EM": em, "num_valid_tokens": num_tokens,
        "stride_am": A.stride(0), "stride_ak": A.stride(1), "stride_be": B.stride(0), "stride_bk": B.stride(2),
        "stride_bn": B.stride(1), "stride_cm": C.stride(1), "stride_cn": C.stride(2),
        "stride_asm": A_scale.stride(0) if A_scale is not None and A_scale.ndim == 2 else 0,
        "stride_ask": A_scale.stride(1) if A_scale is not None and A_scale.ndim == 2 else 0,
        "stride_bse": B_scale.stride(0) if fp8 else 0,
        "stride_bsk": B_scale.stride(2) if fp8 and B_scale.ndim == 3 else 0,
        "stride_bsn": _stride_bsn(B_scale, rules(kernel)),
        "stride_bbe": 0, "stride_bbn": 0,
        "group_n": 0 if block_shape is None else block_shape[0],
        "group_k": 0 if block_shape is None else block_shape[1],
        "naive_block_assignment": al.sorted_token_ids is None,
        "BLOCK_SIZE_M": config.BLOCK_SIZE_M, "BLOCK_SIZE_N": config.BLOCK_SIZE_N, "BLOCK_SIZE_K": block_k,
        "GROUP_SIZE_M": config.GROUP_SIZE_M, "SPLIT_K": 1, "MUL_ROUTED_WEIGHT": mul_routed_weight, "top_k": top_k,
        "compute_type": _compute_type(C.dtype), "use_fp8_w8a8": fp8, "use_int8_w8a8": False,
        "use_int8_w8a16": False, "per_channel_quant": False, "HAS_BIAS": False,
        "SWAP_AB": swap_ab(fp8, config, capability),
        "USE_TD": use_td(fp8) and A.size(1) % block_k == 0, "even_Ks": B.size(2) % block_k == 0, "filter_expert": False,
        "b_desc": b_desc, "a_desc": a_desc, "USE_TMA_B": tma, "USE_TMA_A": tma_a, "C_IS_SORTED": c_sorted,
    }
    args = {name: values[name] for name in kernel.params}
    if warmup:
        kernel.fn.warmup(grid=grid, **args, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        kernel.fn[grid](**args, num_warps=config.num_warps, num_stages=config.num_stages)


def _weights_descriptor(b: torch.Tensor, block_n: int, block_k: int):
    """The TMA descriptor of the weights, as invoke_fused_moe_triton_kernel builds it after set_triton_allocator."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device=b.device, dtype=torch.int8))
    return _descriptor(b, [1, block_n, block_k])


def _descriptor(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def _stride_bsn(scale: torch.Tensor | None, rule: LaunchRules) -> int:
    """The weight scales' N stride; 0 for a single N block where the release passes 0."""
    if scale is None or scale.ndim < 2 or (scale.size(1) == 1 and rule.zero_bsn_for_one_block):
        return 0
    return scale.stride(1)


def _compute_type(dtype: torch.dtype):
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
