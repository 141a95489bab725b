"""vLLM 0.33's DeepGemmExperts on Hopper (contiguous layout), one call, and the weights as its serve holds them.

Weights (oracle/fp8.py:600 convert_to_fp8_moe_kernel_format -> quantization/utils/fp8_utils.py:1256
prepare_fp8_moe_layer_for_deepgemm): with E8M0 on, each block re-quantised to power-of-two scales
(fp8_utils.py:1096 requant_weight_ue8m0_inplace: dequantise, DeepGEMM's per_block_cast_to_fp8 with
use_ue8m0); then the scales go through DeepGEMM's transform_sf_into_required_layout (fp8_utils.py:1169).

One call mirrors experts/deep_gemm_moe.py DeepGemmExperts.apply (line 317), in order:
1. prepare: per_token_group_quant_fp8 of the activations (as in path_triton; UE8M0 scales with E8M0 on);
2. line 350 compute_aligned_M_and_alignment (deep_gemm_utils.py:27) with DeepGEMM's per-call alignment;
3. line 362 use_psum_layout: sm90 and SiLU (the SwiGLU-step layers take m_indices);
4. line 374 deepgemm_moe_permute (deep_gemm_utils.py:467): count_expert_num_tokens, ep_scatter;
5. line 403 mk_alignment_scope, line 405 m_grouped_fp8_gemm_nt_contiguous (disable_ue8m0_cast=not E8M0,
   vllm/utils/deep_gemm.py:560);
6. line 417 _act_mul_quant (line 246): Hopper scale format FLOAT32_CEIL_UE8M0 with E8M0 on, else FLOAT32
   (utils/deep_gemm.py:75-91); SiLU: silu_mul_per_token_group_quant_fp8_colmajor with the psum expert ends;
   SwiGLU-step: swiglustep_and_mul_triton then per_token_group_quant_fp8 with column-major scales (line 313);
7. line 426 the second grouped GEMM; line 437 deepgemm_unpermute_and_reduce (ep_gather with the routed weights).
The quantisations call vLLM's CUDA op (fp8_utils.py:708) when ``ops`` has it (``vllm_ops``), else vLLM's Triton path.
"""

from __future__ import annotations

import torch

from . import moe_ops
from .layer_inputs import Batch, QuantWeights
from ..shapes import MoeShape
from .vllm_ops import has

DG_BLOCK = (128, 128)


def requant_ue8m0(w: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_utils.py:1096 requant_weight_ue8m0_inplace, on copies: (E, R, C) e4m3 and (E, R/128, C/128) scales."""
    from ..deepgemm.gemms import per_block_cast_to_fp8
    from ..inputs import dequant_blocks

    wq, sq = torch.empty_like(w), torch.empty_like(s)
    for e in range(w.shape[0]):
        wq[e], sq[e] = per_block_cast_to_fp8(dequant_blocks(w[e:e + 1], s[e:e + 1], DG_BLOCK)[0], use_ue8m0=True)
    return wq, sq


def deepgemm_weights(dg, w: QuantWeights, e8m0: bool) -> QuantWeights:
    """prepare_fp8_moe_layer_for_deepgemm (fp8_utils.py:1256) for the 128-block weights of a DeepGEMM serve."""
    if w.block != DG_BLOCK:
        raise ValueError(f"DeepGEMM takes [128,128] blocks, not {list(w.block)}")
    w13, s13, w2, s2 = w.w13, w.w13_scale, w.w2, w.w2_scale
    if e8m0:
        (w13, s13), (w2, s2) = requant_ue8m0(w13, s13), requant_ue8m0(w2, s2)

    def layout(wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:  # fp8_utils.py:1169-1192
        return dg.transform_sf_into_required_layout(ws, mn=wq.size(1), k=wq.size(2), recipe=(1, *DG_BLOCK),
                                                    num_groups=wq.size(0), is_sfa=False,
                                                    disable_ue8m0_cast=not e8m0)
    return QuantWeights(w13, layout(w13, s13), w2, layout(w2, s2), DG_BLOCK)


def theoretical_alignment(dg):
    """utils/deep_gemm.py:371 get_theoretical_mk_alignment_for_contiguous_layout(expected_m, num_groups)."""
    fn = getattr(dg, "get_theoretical_mk_alignment_for_contiguous_layout", None)
    if fn is None:
        return None

    def call(expected_m: int, groups: int):
        try:
            return fn(expected_m, groups)
        except TypeError:
            return fn(-(-expected_m // groups))
    return call


class DeepGemmPath:
    """One (shape, M) of DeepGemmExperts; ``w`` from ``deepgemm_weights``; ``run`` is the timed call."""

    def __init__(self, dg, helpers, shape: MoeShape, w: QuantWeights, b: Batch, *, activation: str, e8m0: bool,
                 ops=None):
        self.dg, self.h, self.shape, self.w, self.b, self.activation, self.e8m0 = dg, helpers, shape, w, b, \
            activation, e8m0
        self.ops = ops
        m, k, n, dev = b.m, shape.k, w.n, b.hidden.device
        align = int(dg.get_mk_alignment_for_contiguous_layout())
        self.m_sum, self.align = moe_ops.aligned_m(m, shape.top_k, shape.num_experts, align, theoretical_alignment(dg))
        self.psum = activation == "silu"  # deep_gemm_moe.py:362-372 on sm90 (not MXFP8)
        self.a1q, self.a1s = moe_ops.group_quant(helpers, b.hidden, DG_BLOCK[1], use_ue8m0=e8m0, ops=ops)
        self.a1_perm = torch.empty(self.m_sum, k, device=dev, dtype=moe_ops.FP8)
        self.mm1 = torch.empty(self.m_sum, 2 * n, device=dev, dtype=b.hidden.dtype)
        self.quant_out = torch.empty(self.m_sum, n, device=dev, dtype=moe_ops.FP8)
        self.act_out = torch.empty(self.m_sum, n, device=dev, dtype=b.hidden.dtype)
        self.mm2 = torch.empty(self.m_sum, k, device=dev, dtype=b.hidden.dtype)
        self.out = torch.empty(m, k, device=dev, dtype=b.hidden.dtype)
        self.stand_ins = () if has(ops, "per_token_group_fp8_quant") else ("per_token_group_fp8_quant",)

    def _gemm(self, a, a_s, w, w_s, out, layout) -> None:
        extra = {"use_psum_layout": True} if self.psum else {}
        self.dg.m_grouped_fp8_gemm_nt_contiguous((a, a_s), (w, w_s), out, layout, disable_ue8m0_cast=not self.e8m0,
                                                 **extra)

    def _act_mul_quant(self, layout) -> tuple[torch.Tensor, torch.Tensor]:
        if self.activation == "silu":  # deep_gemm_moe.py:294-305
            return moe_ops.silu_mul_quant_colmajor(self.h, self.mm1, self.quant_out, use_ue8m0=self.e8m0,
                                                   expert_ends=layout if self.psum else None,
                                                   expert_alignment=self.align if self.psum else 0)
        moe_ops.swiglustep_and_mul(self.h, self.act_out, self.mm1)  # deep_gemm_moe.py:307-315
        return moe_ops.group_quant(self.h, self.act_out, DG_BLOCK[1], use_ue8m0=self.e8m0, column_major=True,
                                   out_q=self.quant_out, ops=self.ops)

    def run(self) -> torch.Tensor:
        b, w, rows = self.b, self.w, self.b.local_rows
        moe_ops.group_quant(self.h, b.hidden[:rows], DG_BLOCK[1], use_ue8m0=self.e8m0, out_q=self.a1q[:rows],
                            out_s=self.a1s[:rows], ops=self.ops)
        a1, a1s, layout, inv_perm = moe_ops.deepgemm_permute(
            self.h, aq=self.a1q, aq_scale=self.a1s, topk_ids=b.topk_ids, local_experts=self.shape.num_experts,
            expert_map=b.expert_map, aq_out=self.a1_perm, m_sum=self.m_sum, align=self.align,
            use_psum_layout=self.psum)
        previous = int(self.dg.get_mk_alignment_for_contiguous_layout())
        self.dg.set_mk_alignment_for_contiguous_layout(self.align)  # utils/deep_gemm.py:419 mk_alignment_scope
        try:
            self._gemm(a1, a1s, w.w13, w.w13_scale, self.mm1, layout)
            a2, a2s = self._act_mul_quant(layout)
            self._gemm(a2, a2s, w.w2, w.w2_scale, self.mm2, layout)
        finally:
            self.dg.set_mk_alignment_for_contiguous_layout(previous)
        moe_ops.ep_gather(self.h, inp=self.mm2, topk_ids=b.topk_ids, topk_weights=b.topk_weights, inp_index=inv_perm,
                          expert_map=b.expert_map, out=self.out)
        return self.out
