"""What vLLM 0.33 decides at run time for a Step-3.5-Flash MoE layer: one home for every such rule.

Each rule names the vLLM 0.33 code it mirrors. The mirror answers on nodes where vLLM cannot be
imported; CI (``tests/test_vllm_rules.py``) drives vLLM's own functions through ``vllm_probe`` over
every row of the serve grid and asserts this mirror gives the same answer. Torch-free.

- the accepted ``--moe-backend`` values and their normalisation (``config/kernel.py`` MoEBackend);
- refine or pad an FP8 shard the 128 block does not divide (``oracle/fp8.py``
  ``resolve_fp8_moe_weight_block_shape``);
- the MoE backend per layer kind, SiLU or clamped SwiGLU (``oracle/fp8.py`` ``select_fp8_moe_backend``,
  ``oracle/unquantized.py`` ``select_unquantized_moe_backend`` and each experts class's
  ``is_supported_config``), assuming FlashInfer and DeepGEMM are usable on the serving node;
- DeepGEMM's E8M0 switch and its per-call dispatch (``utils/deep_gemm.py``, ``experts/triton_deep_gemm_moe.py``);
- the naive block assignment threshold and the nearest-batch-key lookup (``fused_moe.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError

VLLM_VERSION = "0.33"

# vllm/config/kernel.py MoEBackend, in vLLM's order.
MOE_BACKENDS = (
    "auto", "triton", "batched_triton", "deep_gemm", "deep_gemm_mega_moe", "cutlass", "flashinfer_trtllm",
    "flashinfer_cutlass", "flashinfer_cutedsl", "flashinfer_moe_ep_cutedsl", "flashinfer_b12x", "b12x",
    "flashinfer_moe_ep_mega_deep_gemm", "marlin", "humming", "triton_unfused", "aiter", "aiter_mega_moe",
    "aiter_triton_mxfp4_bf16", "aiter_triton_mxfp4_mxfp4",
)
ACTIVATIONS = ("silu", "swiglustep")  # step3p5.py: "swiglustep" where swiglu_limits[layer] is set (7.0)
DEEPGEMM_ALIGN = 128  # DeepGEMM's get_mk_alignment_for_contiguous_layout() on sm90 and sm100
DEEPGEMM_MIN_N = 513  # experts/deep_gemm_moe.py _valid_deep_gemm: "DeepGemm disabled for N <= 512"
# Backends that run vLLM's fused_moe_kernel with the tuned file as the file means it: M = tokens.
READS_TUNED_FILE = ("TRITON",)


def normalize_moe_backend(text: str) -> str:
    """vLLM's normalisation of ``--moe-backend`` (lower case, '-' -> '_'); one line for an unknown value."""
    value = text.strip().lower().replace("-", "_")
    if value not in MOE_BACKENDS:
        raise UsageError(f"--moe-backend {text!r}: not a vLLM {VLLM_VERSION} value; use one of {', '.join(MOE_BACKENDS)}")
    return value


@dataclass(frozen=True, kw_only=True)
class ServeFacts:
    """What decides a MoE layer's backend (the same record ``vllm_probe`` hands to vLLM)."""

    arch: str  # "sm90" (H200, H20) or "sm100" (B200)
    dtype: str  # "bf16" or "fp8" (the block-FP8 [128,128] checkpoint)
    tp: int = 1
    dp: int = 1
    ep: bool = False
    moe_backend: str = "auto"
    env: tuple[tuple[str, str], ...] = ()  # VLLM_* variables set for the serve
    num_experts: int = 288
    intermediate: int = 1280
    hidden: int = 4096
    top_k: int = 8

    def var(self, name: str) -> str | None:
        return dict(self.env).get(name)

    def flag(self, name: str, default: bool) -> bool:
        """A boolean vLLM variable as vllm.envs reads it (``bool(int(value))``)."""
        value = self.var(name)
        return default if value is None else bool(int(value))

    @property
    def use_all2all(self) -> bool:  # FusedMoEParallelConfig.use_all2all_kernels
        return self.ep and self.dp > 1


@dataclass(frozen=True, kw_only=True)
class LayerRuntime:
    backend: str | None  # vLLM's backend enum value, e.g. "TRITON"; None when the serve fails
    experts: str | None  # the FusedMoEExperts class vLLM picks
    error: str | None  # the start-up failure: "ExceptionType: first line"
    n: int | None  # per-GPU expert width the fused MoE runs
    block: tuple[int, int] | None  # weight block the kernels see (refined, or the checkpoint's)
    e8m0: bool  # is_deep_gemm_e8m0_used()

    @property
    def reads_tuned_file(self) -> bool:
        """vLLM's fused_moe_kernel runs with the tuned file (TritonExperts, or DeepGEMM's Triton fallback)."""
        return self.backend in READS_TUNED_FILE or (self.backend == "DEEPGEMM" and not self.e8m0)


# ---- FP8: the shard, the block and the quantisation key ------------------------------------------

def fp8_shard(s: ServeFacts, block: tuple[int, int] = (128, 128)) -> tuple[int, tuple[int, int], bool]:
    """(per-GPU width, block the kernels see, refined?) as resolve_fp8_moe_weight_block_shape decides."""
    tp = 1 if s.ep else s.tp * s.dp
    n = s.intermediate // tp
    bn, bk = block
    if n % bn == 0 and (tp == 1 or n % bk == 0):
        return n, block, False
    refine = math.gcd(bn, bk, n, s.hidden)
    refined = (refine, refine) if refine >= 32 else None
    if s.moe_backend != "auto" and not (refined and _fp8_request(s) in _REFINABLE):
        return -(-n // bn) * bn, block, False  # pad_tp_shard_to_weight_blocks
    return (n, refined, True) if refined else (n, block, False)


# ---- which experts class supports what (modular_kernel.is_supported_config, per class) ----------

def _triton(s, act, refined, batched=False):
    return "Standard activation format" if batched else None


def _deep_gemm(s, act, refined, batched=False):
    if not s.flag("VLLM_USE_DEEP_GEMM", True):
        return "current device (VLLM_USE_DEEP_GEMM=0)"
    return "a refined block" if refined else None


def _fi_cutlass(s, act, refined, batched=False):
    if act != "silu":
        return f"{act} activation"
    if s.dtype == "fp8" and (s.arch != "sm90" or refined):
        return "the quantization scheme"
    return None


def _trtllm(s, act, refined, batched=False):
    if s.arch != "sm100":
        return "current device"
    if act != "silu":
        return f"{act} activation"
    return "the quantization scheme" if refined else None


EXPERTS = {  # backend -> [(class, unsupported-reason function)], vLLM's order
    "TRITON": [("TritonExperts", _triton)],
    "DEEPGEMM": [("TritonOrDeepGemmExperts", _deep_gemm)],
    "FLASHINFER_CUTLASS": [("FlashInferExperts", _fi_cutlass)],
    "FLASHINFER_TRTLLM": [("TrtLlmFp8ExpertsMonolithic", _trtllm), ("TrtLlmFp8ExpertsModular", _trtllm)],
    "FlashInfer CUTLASS": [("FlashInferExperts", _fi_cutlass)],
    "FlashInfer TRTLLM": [("TrtLlmBf16ExpertsMonolithic", _trtllm), ("TrtLlmBf16ExpertsModular", _trtllm)],
}
FP8_REQUEST = {"triton": "TRITON", "deep_gemm": "DEEPGEMM", "flashinfer_trtllm": "FLASHINFER_TRTLLM",
               "flashinfer_cutlass": "FLASHINFER_CUTLASS"}
_REFINABLE = ("TRITON",)  # oracle/fp8.py: only Triton-based kernels consume a refined block
BF16_REQUEST = {"triton": "TRITON", "flashinfer_trtllm": "FlashInfer TRTLLM", "flashinfer_cutlass": "FlashInfer CUTLASS"}


def _fp8_request(s: ServeFacts) -> str | None:
    return FP8_REQUEST.get(s.moe_backend)


def _pick(s: ServeFacts, act: str, order: list[str], refined: bool) -> tuple[str, str] | None:
    for backend in order:
        for cls, unsupported in EXPERTS[backend]:
            if unsupported(s, act, refined) is None:
                return backend, cls
    return None


def _fp8_order(s: ServeFacts) -> list[str]:
    """oracle/fp8.py _get_priority_backends for block FP8 on CUDA, after the DeepGEMM variables."""
    order = ["FLASHINFER_TRTLLM", "FLASHINFER_CUTLASS", "DEEPGEMM", "TRITON"]
    if s.arch == "sm90":
        first = "FLASHINFER_CUTLASS" if s.ep and s.tp * s.dp > 1 else "TRITON"
        order.insert(0, order.pop(order.index(first)))
    return order


def e8m0_used(s: ServeFacts) -> bool:
    """utils/deep_gemm.py is_deep_gemm_e8m0_used: DeepGEMM usable and VLLM_USE_DEEP_GEMM_E8M0 (default on)."""
    return s.flag("VLLM_USE_DEEP_GEMM", True) and s.flag("VLLM_USE_DEEP_GEMM_E8M0", True)


def _fp8_layer(s: ServeFacts, act: str) -> tuple[str | None, str | None, str | None]:
    n, block, refined = fp8_shard(s)
    order = _fp8_order(s)
    if s.moe_backend != "auto":
        backend = _fp8_request(s)
        if backend is None:
            return None, None, f"ValueError: moe_backend='{s.moe_backend}' is not supported for FP8 MoE"
        order = [backend]
    elif s.var("VLLM_USE_DEEP_GEMM") is not None or s.var("VLLM_MOE_USE_DEEP_GEMM") is not None:
        if s.flag("VLLM_USE_DEEP_GEMM", True) and s.flag("VLLM_MOE_USE_DEEP_GEMM", True):
            order = ["DEEPGEMM"]
        else:
            order.remove("DEEPGEMM")
    found = _pick(s, act, order, refined)
    if found is None:
        name = order[0] if len(order) == 1 else None
        why = EXPERTS[name][-1][1](s, act, refined) if name else None
        text = (f"ValueError: FP8 MoE backend {name} does not support the deployment configuration since kernel "
                f"does not support {why}." if name else
                "NotImplementedError: No FP8 MoE backend supports the deployment configuration.")
        return None, None, text
    return found[0], found[1], None


def _bf16_layer(s: ServeFacts, act: str) -> tuple[str | None, str | None, str | None]:
    """oracle/unquantized.py select_unquantized_moe_backend on CUDA."""
    order = ["FlashInfer TRTLLM", "FlashInfer CUTLASS", "TRITON"]
    if s.arch == "sm90":
        order = ["TRITON", "FlashInfer TRTLLM", "FlashInfer CUTLASS"]
    if s.dp > 1:
        order.append(order.pop(order.index("FlashInfer CUTLASS")))
    if s.moe_backend not in ("auto", "humming", "marlin"):
        backend = BF16_REQUEST.get(s.moe_backend)
        if backend is None:
            return None, None, f"ValueError: moe_backend='{s.moe_backend}' is not supported for unquantized MoE"
        order = [backend]
    found = _pick(s, act, order, refined=False)
    if found is None:
        return None, None, f"ValueError: Unquantized MoE backend {order[0]} does not support the deployment configuration"
    return found[0], found[1], None


def layer_runtime(s: ServeFacts, activation: str) -> LayerRuntime:
    """The backend and shard vLLM runs one MoE layer of ``activation`` with (the mirror)."""
    if s.dtype == "fp8":
        n, block, _ = fp8_shard(s)
        backend, experts, error = _fp8_layer(s, activation)
    else:
        n, block = s.intermediate // (1 if s.ep else s.tp * s.dp), None
        backend, experts, error = _bf16_layer(s, activation)
    return LayerRuntime(backend=backend, experts=experts, error=error, n=n, block=block, e8m0=e8m0_used(s))


# ---- per call: DeepGEMM or its Triton fallback, naive assignment, the batch key -------------------

def deepgemm_runs(m: int, n: int, k: int, e8m0: bool) -> bool:
    """TritonOrDeepGemmExperts._select_experts_impl: DeepGEMM when E8M0 is used, else for aligned M >= 128
    and N > 512 (M is the tokens of the call, N the per-GPU expert width)."""
    return e8m0 or (m >= DEEPGEMM_ALIGN and n % DEEPGEMM_ALIGN == 0 and k % DEEPGEMM_ALIGN == 0
                    and n >= DEEPGEMM_MIN_N)


def naive_block_assignment(m: int, top_k: int, global_experts: int, has_expert_map: bool) -> bool:
    """fused_moe.py: one (token, expert) pair per block, no moe_align, when M * top_k * 4 <= E and no expert map."""
    return not has_expert_map and m * top_k * 4 <= global_experts


def nearest_key(keys, m: int) -> int:
    """fused_moe.py try_get_optimal_moe_config: the config whose batch key is nearest to M."""
    return min(keys, key=lambda k: abs(k - m))
