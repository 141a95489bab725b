"""The FP8 GEMMs DeepGEMM is checked on: quantisation, layouts, correctness and timing.

Three GEMMs are run against a float reference of the unquantized inputs: dense
``fp8_gemm_nt``, grouped ``m_grouped_fp8_gemm_nt_contiguous`` and
``m_grouped_fp8_gemm_nt_masked``, at the w13 (N=2560, K=4096) and w2 (N=4096, K=1280)
shapes of Step-3.5-Flash on one EP rank (``GEMM_CASES``). Inputs are cast to FP8 the
way DeepGEMM's own tests do (1x128 activation groups, 128x128 weight blocks, UE8M0
scales on sm100), compared by DeepGEMM's ``calc_diff`` (passing below ``PASS_DIFF``)
and timed by ``tuning.bench.measure``: after the first (JIT) call, one launch is captured
in a CUDA graph and replayed ``reps`` times, L2 flushed before each, and the median
taken. The quantizers and layouts run on the CPU; only ``gemm_checks`` needs a GPU.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from .env import Check, one_line, verdict

try:
    import torch
except ImportError:  # reported as a failed check by deepgemm_check.run()
    torch = None

PASS_DIFF = 1e-3  # DeepGEMM's own bar for FP8 against a float reference
FP8_MAX = 448.0  # largest float8_e4m3fn
QUANT_BLOCK = 128  # 1x128 activation groups, 128x128 weight blocks
FLUSH_L2_BYTES = 256 * 2**20  # more than the L2 of any GPU DeepGEMM runs on, so every timed launch starts cold


@dataclass(frozen=True)
class GemmCase:
    name: str
    kind: str  # dense | contiguous | masked
    n: int
    k: int


# Step-3.5-Flash MoE: w13 is [2*1280, 4096], w2 is [4096, 1280]
GEMM_CASES = (
    GemmCase("gemm.dense", "dense", 2560, 4096),
    GemmCase("gemm.contiguous.w13", "contiguous", 2560, 4096),
    GemmCase("gemm.contiguous.w2", "contiguous", 4096, 1280),
    GemmCase("gemm.masked.w13", "masked", 2560, 4096),
    GemmCase("gemm.masked.w2", "masked", 4096, 1280),
)


# -------------------------------------------------------- numerics (torch)

def calc_diff(x: "torch.Tensor", y: "torch.Tensor") -> float:
    """DeepGEMM's metric: 1 - 2*sum(x*y) / sum(x*x + y*y); 0 for identical tensors."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if float(denominator) == 0.0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def ceil_to_ue8m0(x: "torch.Tensor") -> "torch.Tensor":
    """Round each positive scale up to a power of two (UE8M0), as sm100 requires."""
    bits = x.abs().float().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) + (bits & 0x7FFFFF).bool().int()
    return (exponent.clamp(1, 254) << 23).view(torch.float32)


def per_token_cast_to_fp8(x: "torch.Tensor", use_ue8m0: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    """[m, k] -> fp8 [m, k] and fp32 scales [m, k/128] (one per 1x128 group)."""
    m, k = x.shape
    _require_multiple("k", k)
    groups = x.view(m, k // QUANT_BLOCK, QUANT_BLOCK).float()
    scale = groups.abs().amax(dim=2).clamp(min=1e-4) / FP8_MAX
    scale = ceil_to_ue8m0(scale) if use_ue8m0 else scale
    return (groups / scale.unsqueeze(2)).to(torch.float8_e4m3fn).view(m, k), scale


def per_block_cast_to_fp8(x: "torch.Tensor", use_ue8m0: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    """[n, k] -> fp8 [n, k] and fp32 scales [n/128, k/128] (one per 128x128 block)."""
    n, k = x.shape
    _require_multiple("n", n)
    _require_multiple("k", k)
    blocks = x.view(n // QUANT_BLOCK, QUANT_BLOCK, k // QUANT_BLOCK, QUANT_BLOCK).float()
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4) / FP8_MAX
    scale = ceil_to_ue8m0(scale) if use_ue8m0 else scale
    fp8 = (blocks / scale).to(torch.float8_e4m3fn).view(n, k)
    return fp8, scale.view(n // QUANT_BLOCK, k // QUANT_BLOCK)


def _require_multiple(name: str, value: int) -> None:
    if value % QUANT_BLOCK:
        raise ValueError(f"{name}={value} is not a multiple of {QUANT_BLOCK}")


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def expert_rows(num_experts: int, mean_rows: int, seed: int) -> list[int]:
    """Rows per expert, uniform in [0.7, 1.3] x mean (DeepGEMM's own test spread), at least 1."""
    rng = random.Random(seed)
    return [max(1, int(mean_rows * rng.uniform(0.7, 1.3))) for _ in range(num_experts)]


def contiguous_layout(rows: list[int], alignment: int) -> list[int]:
    """m_indices: expert id for each real row, -1 for the padding that aligns each expert."""
    layout: list[int] = []
    for expert, count in enumerate(rows):
        layout += [expert] * count + [-1] * (align_up(count, alignment) - count)
    return layout


def use_ue8m0(capability: tuple[int, int]) -> bool:
    """sm100 kernels take power-of-two (UE8M0) scale factors; sm90 takes fp32."""
    return capability[0] == 10


# ------------------------------------------------------------- GEMMs (GPU)

@dataclass(frozen=True)
class Prepared:
    call: Callable[[], Any]  # one launch
    result: Callable[[], tuple[Any, Any]]  # (output, float reference) over the valid rows
    m: int  # rows that carry data
    groups: int
    flops: int


def _bf16(*shape: int) -> "torch.Tensor":
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def _grouped_weights(g: int, n: int, k: int, ue8m0: bool) -> tuple["torch.Tensor", tuple]:
    b = _bf16(g, n, k)
    fp8, scale = per_block_cast_to_fp8(b.view(g * n, k), ue8m0)
    return b, (fp8.view(g, n, k), scale.view(g, n // QUANT_BLOCK, k // QUANT_BLOCK))


def _prepare_dense(dg: Any, case: GemmCase, m: int, rows: list[int], ue8m0: bool) -> Prepared:
    a, b = _bf16(m, case.k), _bf16(case.n, case.k)
    d = torch.empty(m, case.n, device="cuda", dtype=torch.bfloat16)
    ref = a.float() @ b.float().t()
    a8, b8 = per_token_cast_to_fp8(a, ue8m0), per_block_cast_to_fp8(b, ue8m0)
    return Prepared(lambda: dg.fp8_gemm_nt(a8, b8, d, disable_ue8m0_cast=not ue8m0),
                    lambda: (d, ref), m, 1, 2 * m * case.n * case.k)


def _prepare_contiguous(dg: Any, case: GemmCase, m: int, rows: list[int], ue8m0: bool) -> Prepared:
    alignment = int(dg.get_mk_alignment_for_contiguous_layout())
    m_indices = torch.tensor(contiguous_layout(rows, alignment), device="cuda", dtype=torch.int32)
    valid = m_indices >= 0
    a = _bf16(m_indices.numel(), case.k) * valid.unsqueeze(1)  # padding rows are zero
    b, b8 = _grouped_weights(len(rows), case.n, case.k, ue8m0)
    d = torch.empty(m_indices.numel(), case.n, device="cuda", dtype=torch.bfloat16)
    ref = torch.zeros(m_indices.numel(), case.n, device="cuda", dtype=torch.float32)
    start = 0
    for expert, count in enumerate(rows):  # [rows_e, k] @ [k, n] per expert
        ref[start:start + count] = a[start:start + count].float() @ b[expert].float().t()
        start += align_up(count, alignment)
    a8 = per_token_cast_to_fp8(a, ue8m0)
    return Prepared(lambda: dg.m_grouped_fp8_gemm_nt_contiguous(a8, b8, d, m_indices, disable_ue8m0_cast=not ue8m0),
                    lambda: (d[valid], ref[valid]), sum(rows), len(rows), 2 * sum(rows) * case.n * case.k)


def _prepare_masked(dg: Any, case: GemmCase, m: int, rows: list[int], ue8m0: bool) -> Prepared:
    g, max_m = len(rows), align_up(max(rows), QUANT_BLOCK)
    a = _bf16(g, max_m, case.k)
    b, b8 = _grouped_weights(g, case.n, case.k, ue8m0)
    d = torch.empty(g, max_m, case.n, device="cuda", dtype=torch.bfloat16)
    ref = torch.einsum("gmk,gnk->gmn", a.float(), b.float())
    masked_m = torch.tensor(rows, device="cuda", dtype=torch.int32)
    valid = torch.arange(max_m, device="cuda").unsqueeze(0) < masked_m.unsqueeze(1)
    fp8, scale = per_token_cast_to_fp8(a.view(g * max_m, case.k), ue8m0)
    a8 = (fp8.view(g, max_m, case.k), scale.view(g, max_m, case.k // QUANT_BLOCK))
    expected_m = round(sum(rows) / g)
    return Prepared(lambda: dg.m_grouped_fp8_gemm_nt_masked(a8, b8, d, masked_m, expected_m, disable_ue8m0_cast=not ue8m0),
                    lambda: (d[valid], ref[valid]), sum(rows), g, 2 * sum(rows) * case.n * case.k)


PREPARE = {"dense": _prepare_dense, "contiguous": _prepare_contiguous, "masked": _prepare_masked}


def _wall(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(case: GemmCase, prepared: Prepared, peak_tflops: float | None, reps: int) -> Check:
    from ..bench import measure as timed  # bench needs torch; this module imports without it

    first_s = _wall(prepared.call)  # JIT compile, or a load from the disk cache
    cached_s = _wall(prepared.call)
    diff = calc_diff(*prepared.result())
    # compiled and loaded by now, so the launch can be captured in a CUDA graph; exactly ``reps`` samples
    timing = timed(prepared.call, min_samples=reps, max_samples=reps, flush_l2_bytes=FLUSH_L2_BYTES)
    seconds = timing.median_us / 1e6
    tflops = prepared.flops / seconds / 1e12
    n, k = case.n, case.k
    value = {
        "m": prepared.m, "n": n, "k": k, "groups": prepared.groups, "calc_diff": diff,
        "time_us": seconds * 1e6, "tflops": tflops, "peak_tflops": peak_tflops,
        "pct_of_peak": 100 * tflops / peak_tflops if peak_tflops else None,
        "first_call_s": first_s, "cached_call_s": cached_s,
    }
    ok = diff < PASS_DIFF  # NaN fails too
    return verdict(case.name, ok, value, "" if ok else f"calc_diff {diff:.2e} is not below {PASS_DIFF:g}")


def gemm_checks(dg: Any, capability: tuple[int, int], peak: float | None, args: argparse.Namespace) -> list[Check]:
    ue8m0 = use_ue8m0(capability)
    rows = expert_rows(args.experts, args.rows_per_expert, args.seed)
    checks = []
    for case in GEMM_CASES:
        torch.manual_seed(args.seed)
        try:
            prepared = PREPARE[case.kind](dg, case, args.dense_m, rows, ue8m0)
            checks.append(measure(case, prepared, peak, args.reps))
        except Exception as exc:  # a kernel that fails to build or launch is a result
            checks.append(verdict(case.name, False, None, one_line(exc)))
        finally:
            prepared = None
            torch.cuda.empty_cache()
    return checks

