"""The fused MoE's share of a serving step, and the whole-step gain the tuned configs predict from it.

``measure`` reads the traces vLLM's torch profiler writes (``--profiler-config`` with ``torch_profiler_dir``,
driven by ``vllm bench serve --profile``; both in vLLM 0.26 and 0.33): the share of GPU kernel time spent in
``fused_moe_kernel``, the kernel whose tile configs the tuned files choose. ``estimate`` is a weights-only
roofline of one step (every linear layer at max(bytes / bandwidth, FLOPs / peak); attention over the KV cache,
norms and communication left out), labelled as an estimate wherever it is shown. ``predict`` takes the kernel
speedup at the step's M from the tuned file's provenance (tuned against vLLM's default, at the nearest tuned
batch size) and applies it to that share (``ab.predicted_gain``).
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import provenance
from .ab import predicted_gain
from ..errors import UsageError
from ..gpus import GpuSpec
from ..models import geometry_from_config
from ..roofline import roofline
from ..shapes import MoeShape
from ..vllm.rules import nearest_key

TUNED_KERNEL = "fused_moe_kernel"


@dataclass(frozen=True)
class Share:
    value: float
    measured: bool
    how: str
    moe_us: float | None = None  # measured per step of the workload's kind: the fused MoE's kernel time,
    busy_us: float | None = None  # all GPU kernel time,
    span_us: float | None = None  # and the step's wall time on the GPU's clock (profiled: the profiler adds to it)
    steps: int = 0  # the steps those are the mean of


@dataclass(frozen=True)
class _Step:
    grid: tuple  # the launch grid of the step's first fused-MoE call: the same for steps of the same M
    moe_us: float
    busy_us: float
    span_us: float


def measure(folder: Path, moe_calls_per_step: int | None = None) -> Share | None:
    """``fused_moe_kernel``'s share of the GPU kernel time in the traces under ``folder``; None without kernels.

    Given the fused-MoE calls one step makes (two per MoE layer: the gate-up and the down GEMM), the trace is cut
    into steps, each from one step's first fused-MoE call to the next step's, and the share is over the steps of
    the window's most common kind (their first call's launch grid, which follows M): a window that catches the
    last prefill chunks of a decode workload still measures decode. The step's span against its kernel time
    shows how long the GPU waited on the host."""
    traces = [kernels for kernels in map(_kernels, _trace_files(folder)) if kernels]
    total = sum(e["dur"] for kernels in traces for e in kernels)
    moe = sum(e["dur"] for kernels in traces for e in kernels if _is_moe(e))
    if total <= 0:
        return None
    steps = [s for kernels in traces for s in _steps(kernels, moe_calls_per_step)] if moe_calls_per_step else []
    if steps:
        kind = Counter(s.grid for s in steps).most_common(1)[0][0]
        same = [s for s in steps if s.grid == kind]
        n = len(same)
        moe_us, busy_us, span_us = (sum(getattr(s, f) for s in same) / n for f in ("moe_us", "busy_us", "span_us"))
        return Share(moe_us / busy_us, True, f"measured: {TUNED_KERNEL}'s share of GPU kernel time in {n} steps of "
                                             f"vLLM's torch-profiler trace ({moe_us / 1e3:.2f} of {busy_us / 1e3:.2f} "
                                             f"ms a step; the step spans {span_us / 1e3:.2f} ms, the GPU idle "
                                             f"{1 - busy_us / span_us:.0%} of it)", moe_us, busy_us, span_us, n)
    return Share(moe / total, True, f"measured: {TUNED_KERNEL}'s share of GPU kernel time in vLLM's torch-profiler "
                                    f"trace ({moe / 1e3:.1f} of {total / 1e3:.1f} ms, {len(traces)} trace file(s))")


def _is_moe(event: dict) -> bool:
    return str(event.get("name", "")).startswith(TUNED_KERNEL)


def _trace_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.name.endswith((".json", ".json.gz")))


def _kernels(path: Path) -> list[dict]:
    """A trace's GPU kernels, by start time."""
    return sorted((e for e in _events(path) if isinstance(e, dict) and e.get("cat") == "kernel"
                   and isinstance(e.get("dur"), (int, float)) and isinstance(e.get("ts"), (int, float))),
                  key=lambda e: e["ts"])


def _steps_of(folder: Path, calls: int) -> list[_Step]:
    """Every whole step in the traces under ``folder``."""
    return [s for path in _trace_files(folder) for s in _steps(_kernels(path), calls)]


def _steps(kernels: list[dict], calls: int) -> list[_Step]:
    """The whole steps in one trace (a rank's): from each step's first fused-MoE call to the next step's; none
    when the trace's fused-MoE calls are no whole number of steps (another model, or a cut window)."""
    calls_at = [i for i, e in enumerate(kernels) if _is_moe(e)]
    if len(calls_at) % calls:
        return []
    firsts = calls_at[::calls]
    out = []
    for a, b in zip(firsts, firsts[1:]):
        seg = kernels[a:b]
        out.append(_Step(tuple(seg[0].get("args", {}).get("grid") or ()), sum(e["dur"] for e in seg if _is_moe(e)),
                         sum(e["dur"] for e in seg), kernels[b]["ts"] - kernels[a]["ts"]))
    return out


def _events(path: Path) -> list:
    try:
        with (gzip.open(path, "rt") if path.name.endswith(".gz") else path.open()) as f:
            data = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, ValueError):
        return []
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    return events if isinstance(events, list) else []


def estimate(cfg: dict, shape: MoeShape, gpu: GpuSpec, *, m: int, logit_rows: int, tp: int = 1) -> Share:
    """A weights-only roofline of one step of ``cfg`` on one GPU: M tokens through every layer, ``logit_rows``
    through the LM head, attention and dense layers split over ``tp``, the fused MoE running ``shape``."""
    geometry = geometry_from_config(cfg, "config")
    h, moe_layers = cfg["hidden_size"], set(geometry.moe_layers)
    wbytes = 1 if shape.dtype == "fp8" else 2
    rest = _linear_us(cfg["vocab_size"] * h / tp, logit_rows, 2, gpu)
    for i in range(cfg["num_hidden_layers"]):
        ffn = 3 * h * (cfg["share_expert_dim"] if i in moe_layers else cfg["intermediate_size"])
        rest += _linear_us((_attention_params(cfg, i) + ffn) / tp, m, wbytes, gpu, shape.dtype)
        rest += _linear_us(h * geometry.num_experts, m, 4, gpu) if i in moe_layers else 0.0  # the fp32 router
    local = shape.num_experts / shape.global_experts
    expected = shape.num_experts * (1 - (1 - shape.top_k / shape.global_experts) ** m)  # distinct experts routed to
    touched = min(shape.num_experts, math.ceil(expected - 1e-9))
    moe = roofline(shape, gpu, m, touched, max(1, round(m * shape.top_k * local))).bound_us * len(moe_layers)
    return Share(moe / (moe + rest), False, f"estimate (not measured): weights-only roofline of one step at M={m} on "
                                            f"{gpu.key}, {len(moe_layers)} MoE of {cfg['num_hidden_layers']} layers")


def _attention_params(cfg: dict, layer: int) -> float:
    """q, k, v, o and the head-wise gate of one layer (sliding layers have their own head count)."""
    other = cfg.get("attention_other_setting") or {}
    sliding = cfg["layer_types"][layer] == other.get("attention_type")
    heads = other["num_attention_heads"] if sliding else cfg["num_attention_heads"]
    d, kv, h = cfg["head_dim"], cfg["num_attention_groups"], cfg["hidden_size"]
    return h * d * (2 * heads + 2 * kv) + (h * heads if cfg.get("use_head_wise_attn_gate") else 0)


def _linear_us(params: float, rows: int, wbytes: float, gpu: GpuSpec, dtype: str = "bf16") -> float:
    memory = params * wbytes / (gpu.bandwidth_tbs * 1e12)
    compute = 2.0 * rows * params / (gpu.peak_tflops(dtype) * 1e12)
    return max(memory, compute) * 1e6


@dataclass(frozen=True)
class Prediction:
    file: str
    m: int
    key: int  # the tuned batch size vLLM picks for M
    kernel_speedup: float  # vLLM's default config time / tuned config time at that key (provenance)
    share: Share
    gain: float  # predicted whole-step speedup

    def as_dict(self) -> dict:
        return {**asdict(self), "share": asdict(self.share)}


def predict(tuned_file: Path, m: int, share: Share) -> Prediction | None:
    """The whole-step gain the tuned file predicts at M, or None when it has no provenance."""
    try:
        prov = provenance.read(tuned_file)
    except UsageError:  # a corrupt sidecar: no prediction; the A/B still runs
        return None
    if prov is None or not prov.rows:
        return None
    key = nearest_key([row.m for row in prov.rows], m)
    speedup = next(row.speedup for row in prov.rows if row.m == key)
    return Prediction(tuned_file.name, m, key, speedup, share, predicted_gain(share.value, speedup))
