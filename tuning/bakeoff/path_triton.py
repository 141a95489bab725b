"""vLLM 0.33's TritonExperts for block FP8, one call: what runs between routing and the final reduce.

Mirrors, in order (vllm/model_executor/layers/fused_moe/...):
1. the prepare step's activation quantisation: prepare_finalize/no_dp_ep.py:82 (TP) or naive_dp_ep.py:192
   (DP+EP, each rank quantises its own M/DP rows before the all-gather) -> utils.py:464
   moe_kernel_quantize_input -> per_token_group_quant_fp8 (use_ue8m0 None: is_deep_gemm_e8m0_used());
2. experts/triton_moe.py:322 try_get_optimal_moe_config (the tuned file's nearest key, or vLLM's default);
3. triton_moe.py:382 _prepare_expert_assignment (fused_moe.py:1549): naive assignment, or moe_align_block_size
   over the global experts dropping remote slots (ignore_invalid_experts with an expert map);
4. triton_moe.py:436 w13 launch (invoke_fused_moe_triton_kernel, no routed weights);
5. triton_moe.py:525-550 the activation and re-quantisation: with SiLU, a [128,128] block and E8M0 off vLLM
   calls the fused ops.silu_and_mul_per_block_quant; else activation (SiLU: _C silu_and_mul; SwiGLU-step:
   activation.py:50 swiglustep_and_mul_triton) then moe_kernel_quantize_input;
6. triton_moe.py:557 w2 launch with the routed weights (top_k 1);
7. triton_moe.py:641 moe_sum over top-k.
With a `_down.json` entry (``down``, vLLM 0.34) where ``vllm_rules.sorted_down_runs`` holds, steps 4-6 are
0.34's sorted-activation path (experts/triton_moe.py:455-485, 615-635, 678-708): w13 writes its rows in slot order
(C_is_sorted), one Triton kernel applies SiLU and quantises them (UE8M0), and w2 reads them through a TMA
descriptor (A_is_sorted) with the entry's tiles and w13's BLOCK_SIZE_M.
The tensors are allocated once (vLLM takes them from its workspace manager). Where vLLM calls a CUDA op
(the quantisations, moe_align_block_size, silu_and_mul or the fused op, moe_sum), vLLM's own runs when
``ops`` has it (``vllm_ops``), else the stand-in of ``moe_ops.STAND_INS``.
"""

from __future__ import annotations

import torch

from .. import launch
from . import moe_ops
from ..configs import FIELDS, TileConfig
from ..vllm.kernel import Kernel
from .layer_inputs import Batch, QuantWeights
from ..shapes import MoeShape
from .vllm_ops import has
from ..vllm.rules import sorted_down_runs


class TritonPath:
    """One (shape, M) of TritonExperts with one tile config; ``run`` is the timed call."""

    def __init__(self, kernel: Kernel, helpers, shape: MoeShape, w: QuantWeights, b: Batch, *, config: TileConfig,
                 activation: str, e8m0: bool, capability: int, ops=None, down: dict | None = None):
        self.kernel, self.h, self.shape, self.w, self.b, self.ops = kernel, helpers, shape, w, b, ops
        self.config, self.activation, self.e8m0, self.capability = config, activation, e8m0, capability
        self.naive = launch.use_naive(b.m, shape.top_k, shape.global_experts, shape.expert_parallel)
        self.down = None  # the w2 tiles of the sorted path, when vLLM takes it
        if sorted_down_runs(down=down, activation=activation, e8m0=e8m0, expert_parallel=shape.expert_parallel,
                            naive=self.naive, capability=capability, block_shape=w.block,
                            block_m=config.BLOCK_SIZE_M, hidden=shape.k, n=w.n):
            self.down = TileConfig(**{**{f: int(down[f]) for f in FIELDS}, "BLOCK_SIZE_M": config.BLOCK_SIZE_M})
        m, k, n, top_k, dev = b.m, shape.k, w.n, shape.top_k, b.hidden.device
        self.group = w.block[1]
        act_dtype = b.hidden.dtype
        # the other ranks' rows arrive quantised by the all-gather: quantise them once here
        self.a1q, self.a1s = moe_ops.group_quant(helpers, b.hidden, self.group, use_ue8m0=e8m0, ops=ops)
        self.c1 = torch.empty(m, top_k, 2 * n, device=dev, dtype=act_dtype)
        self.c2 = torch.empty(m * top_k, n, device=dev, dtype=act_dtype)
        self.c3 = torch.zeros(m, top_k, k, device=dev, dtype=act_dtype)  # the stand-in sums remote slots: zeros
        self.out = torch.empty(m, k, device=dev, dtype=act_dtype)
        self.stand_ins = tuple(op for op in self.cuda_ops if not has(ops, op))
        # the torch stand-ins timed on their own: alignment, silu_and_mul (alone or inside the fused op's), moe_sum
        self._timed = [op for op in ("moe_align_block_size", "silu_and_mul", "moe_sum") if op in self.stand_ins]
        if self.fused_silu_quant and "silu_and_mul_per_block_quant" in self.stand_ins and not has(ops, "silu_and_mul"):
            self._timed.append("silu_and_mul")
        self.stand_in_ops = self._stand_in_ops if self._timed else None

    @property
    def fused_silu_quant(self) -> bool:
        """triton_moe.py:526-532: the fused _C op (clamp_limit is None for Step-3.5, no LoRA)."""
        return self.activation == "silu" and self.w.block == (128, 128) and not self.e8m0

    @property
    def cuda_ops(self) -> tuple[str, ...]:
        """The CUDA ops vLLM calls in this call (the naive assignment calls no moe_align_block_size)."""
        act = None if self.down is not None else "silu_and_mul_per_block_quant" if self.fused_silu_quant else (
            "silu_and_mul" if self.activation == "silu" else None)
        return tuple(op for op in ("per_token_group_fp8_quant", None if self.naive else "moe_align_block_size", act,
                                   "moe_sum") if op)

    def _assignment(self) -> launch.Alignment:
        s, b = self.shape, self.b
        if self.naive:
            return launch.naive(b.topk_ids, self.config.BLOCK_SIZE_M)
        return launch.align(b.topk_ids, self.config.BLOCK_SIZE_M, s.global_experts, b.expert_map, self.kernel,
                            self.ops)

    def _stand_in_ops(self) -> None:
        """Only the torch stand-ins this call runs in place of vLLM's CUDA ops, on the same tensors: their time is
        inside ``run``'s, where vLLM spends one CUDA kernel on each. The quantisations' stand-in is vLLM's own
        Triton path, not timed here."""
        if "moe_align_block_size" in self._timed:
            self._assignment()
        if "silu_and_mul" in self._timed:
            moe_ops.silu_and_mul(self.c2, self.c1.view(-1, 2 * self.w.n))
        if "moe_sum" in self._timed:
            moe_ops.moe_sum(self.c3, self.out, self.b.topk_ids, self.b.expert_map)

    def run(self) -> torch.Tensor:
        b, w, cfg, rows = self.b, self.w, self.config, self.b.local_rows
        moe_ops.group_quant(self.h, b.hidden[:rows], self.group, use_ue8m0=self.e8m0, out_q=self.a1q[:rows],
                            out_s=self.a1s[:rows], ops=self.ops)
        al = self._assignment()
        if self.down is not None:
            return self._sorted(al)
        first = launch.Gemm(a=self.a1q, a_scale=self.a1s, b=w.w13, b_scale=w.w13_scale, c=self.c1,
                            topk_weights=None, top_k=self.shape.top_k)
        launch.invoke(self.kernel, first, al, cfg, block_shape=w.block, capability=self.capability)
        flat = self.c1.view(-1, 2 * w.n)
        if self.fused_silu_quant:
            a2q, a2s = moe_ops.silu_and_mul_per_block_quant(self.h, flat, self.c2, self.ops)
        else:
            if self.activation == "silu":
                moe_ops.silu_and_mul(self.c2, flat, self.ops)
            else:
                moe_ops.swiglustep_and_mul(self.h, self.c2, flat)
            a2q, a2s = moe_ops.group_quant(self.h, self.c2, self.group, use_ue8m0=self.e8m0, ops=self.ops)
        second = launch.Gemm(a=a2q, a_scale=a2s, b=w.w2, b_scale=w.w2_scale, c=self.c3,
                             topk_weights=b.topk_weights, top_k=1)
        launch.invoke(self.kernel, second, al, cfg, block_shape=w.block, capability=self.capability)
        moe_ops.moe_sum(self.c3, self.out, b.topk_ids, b.expert_map, self.ops)
        return self.out

    def _sorted(self, al: launch.Alignment) -> torch.Tensor:
        """Steps 4-7 as vLLM 0.34 runs them with a `_down.json` entry: C and A in slot order."""
        b, w, cfg = self.b, self.w, self.config
        rows = al.sorted_token_ids.numel()
        c1 = self.c1.new_empty((rows, 1, 2 * w.n))  # experts/triton_moe.py:482, a new buffer per call
        first = launch.Gemm(a=self.a1q, a_scale=self.a1s, b=w.w13, b_scale=w.w13_scale, c=c1,
                            topk_weights=None, top_k=self.shape.top_k)
        launch.invoke(self.kernel, first, al, cfg, block_shape=w.block, capability=self.capability, c_sorted=True)
        a2q, a2s = moe_ops.silu_mul_quant_sorted(self.h, c1, al.num_tokens_post_padded, w.n)
        second = launch.Gemm(a=a2q, a_scale=a2s, b=w.w2, b_scale=w.w2_scale, c=self.c3,
                             topk_weights=b.topk_weights, top_k=1)
        launch.invoke(self.kernel, second, al, self.down, block_shape=w.block, capability=self.capability,
                      a_sorted=True)
        moe_ops.moe_sum(self.c3, self.out, b.topk_ids, b.expert_map, self.ops)
        return self.out
