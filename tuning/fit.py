"""Which layouts hold the model's weights on a GPU with room left for the KV cache.

Routed experts are split over TP (their width) or EP (their count); the rest of the
model is split by TP and replicated by DP. A layout fits when the weights leave at
least ``MIN_KV_GB`` for the KV cache inside vLLM's default memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gpus import GpuSpec
from .models import ModelGeometry
from .shapes import DEFAULT_VLLM_VERSION, Layout, Refusal, default_layouts, shape_for

GPU_MEMORY_UTILIZATION = 0.92  # vLLM 0.33 CacheConfig.gpu_memory_utilization default
RESERVED_GB = 6.0  # activations, CUDA graphs, NCCL buffers
MIN_KV_GB = 10.0  # less than this and the server holds only a few long requests
BYTES_PER_PARAM = {"bf16": 2.0, "fp8": 1.0}


@dataclass(frozen=True)
class Fit:
    layout: Layout
    weights_gb: float  # per GPU
    kv_gb: float  # left for the KV cache per GPU
    fits: bool

    def why(self, gpu: GpuSpec) -> str:
        budget = gpu.hbm_gb * GPU_MEMORY_UTILIZATION
        verdict = "fits" if self.fits else "does not fit"
        return (f"{self.layout.name} on {self.layout.gpus}x{gpu.key}: {self.weights_gb:.0f} GB weights per GPU "
                f"of a {budget:.0f} GB budget, {self.kv_gb:.0f} GB left for KV cache: {verdict} "
                f"(needs >= {MIN_KV_GB:.0f} GB)")


def weights_per_gpu_gb(model: ModelGeometry, layout: Layout, dtype: str) -> float:
    experts = model.expert_params
    rest = max(model.total_params - experts, 0.0)
    expert_split = layout.gpus  # EP splits the experts, otherwise DP x TP splits their width
    params = experts / expert_split + rest / layout.tp
    return params * BYTES_PER_PARAM[dtype] / 1e9


def fit(model: ModelGeometry, layout: Layout, dtype: str, gpu: GpuSpec) -> Fit:
    weights = weights_per_gpu_gb(model, layout, dtype)
    kv = gpu.hbm_gb * GPU_MEMORY_UTILIZATION - RESERVED_GB - weights
    return Fit(layout, weights, kv, kv >= MIN_KV_GB)


def alternatives(model: ModelGeometry, dtype: str, gpu: GpuSpec, num_gpus: int,
                 vllm_version: str = DEFAULT_VLLM_VERSION, moe_backend: str = "auto") -> list[str]:
    """What would fit when none of the layouts asked for does: first the other layouts of this node
    (when --layouts left them out), else more GPUs; for bf16 also the FP8 checkpoint."""
    out = []
    here = [lay.name for lay in default_layouts(num_gpus) if _usable(model, lay, dtype, gpu, vllm_version, moe_backend)]
    if here:
        out.append(f"{dtype} on this node ({num_gpus}x{gpu.key}) with --layouts {','.join(here)}")
    else:
        for n in (2, 4, 8, 16):
            if n > num_gpus and fit(model, Layout(tp=n), dtype, gpu).fits:
                out.append(f"{dtype} on {n}x{gpu.key} (TP{n} or DP{n}+EP)")
                break
    if dtype == "bf16":
        for n in (1, 2, 4, 8):
            if n <= num_gpus and any(fit(model, lay, "fp8", gpu).fits for lay in (Layout(tp=n), Layout(dp=n, ep=n > 1))):
                out.append(f"fp8 ({_fp8_name(model)}) on {n}x{gpu.key}")
                break
    return out


def _usable(model: ModelGeometry, layout: Layout, dtype: str, gpu: GpuSpec, vllm_version: str,
            moe_backend: str) -> bool:
    """vLLM runs ``layout`` and the weights leave room for the KV cache."""
    return (not isinstance(shape_for(model, layout, dtype, vllm_version, moe_backend), Refusal)
            and fit(model, layout, dtype, gpu).fits)


def _fp8_name(model: ModelGeometry) -> str:
    from .models import BUILTIN

    name = f"{model.name}-FP8"
    return name if name in BUILTIN else f"a block-FP8 checkpoint of {model.name}"
