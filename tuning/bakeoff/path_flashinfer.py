"""vLLM 0.33's FlashInferExperts (FlashInfer-CUTLASS fused MoE, DeepSeek-style FP8 blocks), one call.

vLLM runs it on the SiLU layers of a block-FP8 serve with expert parallelism on Hopper (oracle/fp8.py,
``vllm_rules._fp8_order``); it does not take Step-3.5's SwiGLU-step (experts/flashinfer_cutlass_moe.py:184).

Weights (quantization/utils/flashinfer_utils.py:547 prepare_fp8_moe_layer_for_fi, block-quantised branch):
w13 and its block scales swapped to [w3; w1] (swap_w13_to_w31, line 69; lines 623-627), and the block scales
clamped to >= 1e-10 (lines 648-650).
One call (experts/flashinfer_cutlass_moe.py:245 FlashInferExperts.apply): the prepare step does not quantise
(expects_unquantized_inputs, line 124), so the bf16 activations go in; quant_scales = [w1_scale, w2_scale],
input_sf None, use_deepseek_fp8_block_scale True (lines 350-358); then flashinfer_cutlass_fused_moe
(lines 365-389; vllm/utils/flashinfer.py:290 -> flashinfer.fused_moe.cutlass_fused_moe) with tp/ep size and
rank from FusedMoEParallelConfig (config.py:1198-1244: with EP, tp_size 1 and ep_size = TP x DP).
This GPU is EP rank 0 (it holds global experts [0, E/EP), as ``inputs.expert_map`` builds them).
FlashInfer's autotuner has nothing to choose on this path: its block-scale runner takes a fixed tactic
(flashinfer_cutlass_fused_moe_binding.cu: runGemmProfile returns at once, setRunnerProfiles fixes
CtaShape128x16x128B), so vLLM's warm-up autotune (model_executor/warmup/kernel_warmup.py:272) changes nothing here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .layer_inputs import Batch, QuantWeights
from ..shapes import Layout, MoeShape

FI_MIN_BLOCK_SCALE = 1e-10  # flashinfer_utils.py:648 _FI_CUTLASS_MIN_BLOCK_SCALE


def swap_w13_to_w31(x: torch.Tensor) -> torch.Tensor:
    """flashinfer_utils.py:69: the two halves of dim -2 swapped (gate|up -> up|gate)."""
    return x.reshape(-1, 2, x.shape[-2] // 2, x.shape[-1]).flip(dims=[1]).reshape(x.shape)


def flashinfer_weights(w: QuantWeights) -> QuantWeights:
    return QuantWeights(swap_w13_to_w31(w.w13), swap_w13_to_w31(w.w13_scale).clamp(min=FI_MIN_BLOCK_SCALE),
                        w.w2, w.w2_scale.clamp(min=FI_MIN_BLOCK_SCALE), w.block)


def module_name() -> str:
    """The SM90 CUTLASS fused-MoE module FlashInfer 0.7.2 loads on this GPU (jit/fused_moe.py:163-181: H20's 78
    SMs get a variant of their own)."""
    try:
        from flashinfer.jit.fused_moe import _should_enable_sm90_moe_prebuilt_d_descriptor as h20
    except ImportError:
        return "fused_moe_90"
    return "fused_moe_90_h20_prebuilt_d" if h20() else "fused_moe_90"


def missing_module() -> str | None:
    """None when FlashInfer can load the module without compiling it (an AOT module, or a JIT build already in
    its cache), else why it cannot: its first call would build 248 files, half an hour on 16 cores, inside the
    bake-off."""
    from flashinfer.jit import env

    name = module_name()
    if env.get_aot_artifacts(name) or (Path(env.FLASHINFER_JIT_DIR) / name / f"{name}.so").exists():
        return None
    return (f"FlashInfer's {name} is not built (no AOT module, no JIT cache entry): build the block-scale path "
            "with benchmarks/flashinfer_blockscale.py build, or pass --flashinfer-jit to let the first call build "
            "all of it")


def build_record() -> dict | None:
    """BUILD.json beside the module FlashInfer loads ahead of any JIT build (written by
    benchmarks/flashinfer_blockscale.py for its block-scale-path build), or None: a stock build."""
    try:
        from flashinfer.jit import env

        path = Path(env.get_aot_path(module_name())).parent / "BUILD.json"
        return json.loads(path.read_text()) if path.exists() else None
    except Exception:  # FlashInfer missing or of another layout: nothing to record
        return None


def parallel(layout: Layout) -> dict[str, int]:
    """FusedMoEParallelConfig.make (fused_moe/config.py:1198-1244) for rank 0 of ``layout``."""
    if layout.ep:
        return {"tp_size": 1, "tp_rank": 0, "ep_size": layout.tp * layout.dp, "ep_rank": 0}
    return {"tp_size": layout.tp * layout.dp, "tp_rank": 0, "ep_size": 1, "ep_rank": 0}


class FlashInferPath:
    """One (shape, M) of FlashInferExperts on the SiLU layers; ``w`` from ``flashinfer_weights``."""

    def __init__(self, fused_moe, shape: MoeShape, w: QuantWeights, b: Batch, layout: Layout):
        from flashinfer.fused_moe.core import ActivationType  # flashinfer_utils.py:31 SILU -> Swiglu

        self.fn, self.shape, self.w, self.b = fused_moe, shape, w, b
        self.activation_type = ActivationType.Swiglu
        self.parallel = parallel(layout)
        self.out = torch.empty(b.m, shape.k, device=b.hidden.device, dtype=b.hidden.dtype)
        self.stand_ins: tuple[str, ...] = ()

    def run(self) -> torch.Tensor:
        b, w = self.b, self.w
        self.fn(input=b.hidden, token_selected_experts=b.topk_ids.to(torch.int), token_final_scales=b.topk_weights,
                fc1_expert_weights=w.w13, fc2_expert_weights=w.w2, fc1_expert_biases=None, fc2_expert_biases=None,
                swiglu_alpha=None, swiglu_beta=None, swiglu_limit=None, output=self.out, output_dtype=b.hidden.dtype,
                quant_scales=[w.w13_scale, w.w2_scale], input_sf=None, **self.parallel,
                activation_type=self.activation_type, use_deepseek_fp8_block_scale=True,
                use_mxfp8_act_scaling=False, use_w4_group_scaling=False)
        return self.out
