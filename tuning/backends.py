"""``tune-moe compare-backends``: DeepGEMM's grouped FP8 GEMM against the tuned Triton kernel.

Same routed batch, same block-FP8 weights. Triton: vLLM's two fused_moe_kernel launches
(the gather and the routed-weight scatter are fused into them). DeepGEMM: what vLLM's
DeepGemmExperts runs around its two ``m_grouped_fp8_gemm_nt_contiguous`` calls: rows
gathered into per-expert blocks aligned to DeepGEMM's M alignment, then scattered back
with the routed weights (torch gathers here; vLLM uses fused kernels for these). The
activation between the GEMMs is the same work for both and is left out.

DeepGEMM needs 128x128 blocks: where vLLM refines the block for Triton (TP4: [64,64]),
``--moe-backend deep_gemm`` makes vLLM pad the shard instead (N=384), so that is the
shape DeepGEMM is timed on. What a deep_gemm serve runs per call is ``vllm_rules.deepgemm_runs``:
DeepGEMM at every M while E8M0 is on (vLLM 0.33's default, sm90 too), and with
``VLLM_USE_DEEP_GEMM_E8M0=0`` only for aligned M >= 128 and N > 512; the last column gives both.
DeepGEMM is timed here with float32 scales (``disable_ue8m0_cast=True``), not the UE8M0-cast
scales vLLM 0.33 uses by default.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import configs, gpus
from .errors import UsageError
from .files import atomic_write_json, output_file
from .gpus import get_gpu
from .routing import Routing
from .kernel import KernelSource
from .models import DEFAULT_MODEL, load_model
from .shapes import MoeShape, Refusal, parse_layout, shape_for
from .vllm_rules import deepgemm_runs

if TYPE_CHECKING:  # torch is imported where the GPU work starts, so bad arguments are refused at once
    import torch

    from .inputs import Problem

DEFAULT_MS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096)
SELECTION = {  # what vLLM 0.33 runs for block FP8 on Hopper, per MoE layer kind (vllm_rules, proven in CI)
    "tp": "vLLM runs Triton (TritonExperts) on both layer kinds with EP=1; the tuned configs are used",
    "ep": "with EP>1 vLLM runs FlashInfer-CUTLASS on the SiLU layers and DeepGEMM on the SwiGLU-step layers; "
          "neither reads the tuned Triton file (--moe-backend triton makes both Triton)",
}
FLAGS = ("--moe-backend triton | deep_gemm (a set VLLM_USE_DEEP_GEMM=1 with VLLM_MOE_USE_DEEP_GEMM=1 also forces "
         "DeepGEMM, and fails at start-up on the refined TP4/TP8 blocks); tune-moe preflight -- vllm serve ... "
         "says what each MoE layer kind will run")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", required=True, help="H200 or H20 (DeepGEMM: sm90/sm100)")
    p.add_argument("--layouts", default="DP4+EP,TP4", help="FP8 layouts to compare (default: the recipe's)")
    p.add_argument("--batch-sizes", help=f"comma list of M (default: {','.join(map(str, DEFAULT_MS))})")
    p.add_argument("--configs", help="tuned Triton configs (default: kernels_configs/<device_name>)")
    p.add_argument("--deep-gemm-path", help="folder holding deep_gemm/ to import first (e.g. a copy of vllm/third_party)")
    p.add_argument("--vllm-src", help="kernel from this vLLM fused_moe.py or wheel (default: installed vLLM)")
    p.add_argument("--vllm-version", help="vLLM version of --vllm-src when it cannot tell")
    p.add_argument("--json-out", help="write the measurements here")


@dataclass(frozen=True)
class Row:
    layout: str
    m: int
    triton_default_us: float
    triton_tuned_us: float
    deepgemm_gemms_us: float
    deepgemm_total_us: float
    deepgemm_error: float
    faster: str
    vllm_runs: str  # what a --moe-backend deep_gemm serve runs at this M: E8M0 on (default) / off


class DeepGemmMoe:
    """DeepGEMM's contiguous grouped layout for one routed batch, built once; ``run`` is timed."""

    def __init__(self, dg, p: Problem):
        import torch

        self.dg, self.p = dg, p
        self.alignment = align = int(dg.get_mk_alignment_for_contiguous_layout())
        local = p.local_ids.reshape(-1)
        pairs = (local >= 0).nonzero().squeeze(1)
        experts = local[pairs]
        order = torch.argsort(experts, stable=True)
        self.pairs, experts = pairs[order], experts[order]
        counts = torch.bincount(experts, minlength=p.shape.num_experts)
        aligned = (counts + align - 1) // align * align
        rank = torch.arange(experts.numel(), device=local.device) - (torch.cumsum(counts, 0) - counts)[experts]
        self.rows = (torch.cumsum(aligned, 0) - aligned)[experts] + rank
        m_sum, k, n = int(aligned.sum()), p.shape.k, p.shape.n
        self.m_indices = torch.full((m_sum,), -1, dtype=torch.int32, device=local.device)
        self.m_indices[self.rows] = experts.to(torch.int32)
        self.tokens = self.pairs // p.shape.top_k
        self.a1 = torch.zeros(m_sum, k, dtype=torch.uint8, device=local.device)
        self.a1s = torch.ones(m_sum, k // 128, dtype=torch.float32, device=local.device)
        self.a2 = torch.zeros(m_sum, n, dtype=torch.uint8, device=local.device)
        self.a2s = torch.ones(m_sum, n // 128, dtype=torch.float32, device=local.device)
        self.a2[self.rows] = p.a2.view(torch.uint8)[self.pairs]  # vLLM's activation writes it in this order
        self.a2s[self.rows] = p.a2_scale[self.pairs]
        self.mm1 = torch.empty(m_sum, 2 * n, dtype=torch.bfloat16, device=local.device)
        self.mm2 = torch.empty(m_sum, k, dtype=torch.bfloat16, device=local.device)
        self.out = torch.zeros(p.m * p.shape.top_k, k, dtype=torch.bfloat16, device=local.device)
        self.weights = p.topk_weights.reshape(-1)[self.pairs].unsqueeze(1)

    def gemms(self) -> None:
        import torch

        fp8 = torch.float8_e4m3fn
        self.dg.m_grouped_fp8_gemm_nt_contiguous((self.a1.view(fp8), self.a1s), (self.p.w13, self.p.w13_scale),
                                                 self.mm1, self.m_indices, disable_ue8m0_cast=True)
        self.dg.m_grouped_fp8_gemm_nt_contiguous((self.a2.view(fp8), self.a2s), (self.p.w2, self.p.w2_scale),
                                                 self.mm2, self.m_indices, disable_ue8m0_cast=True)

    def run(self) -> None:
        """Gather rows per expert, both GEMMs, scatter back with the routed weights."""
        import torch

        self.a1[self.rows] = self.p.a1.view(torch.uint8)[self.tokens]
        self.a1s[self.rows] = self.p.a1_scale[self.tokens]
        self.gemms()
        self.out[self.pairs] = (self.mm2[self.rows].float() * self.weights).to(torch.bfloat16)

    def error(self) -> float:
        from .inputs import reference

        self.run()
        ref1, ref3 = reference(self.p)
        e1 = _rel(self.mm1[self.rows], ref1.reshape(-1, ref1.shape[-1])[self.pairs])
        e3 = _rel(self.out[self.pairs], ref3.reshape(-1, ref3.shape[-1])[self.pairs])
        return max(e1, e3)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    import torch

    out = out.float()
    return float("inf") if not torch.isfinite(out).all() else float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def compare(dg, kernel, gpu, model, layout_text: str, *, ms, folder: Path) -> list[Row]:
    layout = parse_layout(layout_text)
    tri = shape_for(model, layout, "fp8")
    dgs = shape_for(model, layout, "fp8", moe_backend="deep_gemm")
    if isinstance(tri, Refusal) or isinstance(dgs, Refusal):
        raise UsageError(f"layout {layout_text}: {(tri if isinstance(tri, Refusal) else dgs).reason}")
    tuned_file = folder / tri.file_name(gpu.device_name)
    tuned = configs.read_config_file(tuned_file) if tuned_file.exists() else {}
    print(f"\n{layout.name}: Triton on {tri.label} ({'tuned' if tuned else 'NOT tuned: default only'}), "
          f"DeepGEMM on {dgs.label}. {SELECTION['ep' if layout.ep else 'tp']}.")
    print(f"  {'M':>5} {'Triton default':>15} {'Triton tuned':>13} {'DeepGEMM GEMMs':>15} {'DeepGEMM total':>15}  "
          f"{'faster':<9} {'deep_gemm runs (E8M0 on / off)':<29}")
    rows = []
    for m in ms:
        rows.append(_one(dg, kernel, gpu, layout.name, tri=tri, dgs=dgs, m=m, tuned=tuned))
        r = rows[-1]
        print(f"  {m:>5} {r.triton_default_us:>15.1f} {r.triton_tuned_us:>13.1f} {r.deepgemm_gemms_us:>15.1f} "
              f"{r.deepgemm_total_us:>15.1f}  {r.faster:<9} {r.vllm_runs:<29} (DeepGEMM rel. error {r.deepgemm_error:.1e})")
    return rows


def _one(dg, kernel, gpu, layout: str, *, tri: MoeShape, dgs: MoeShape, m: int, tuned: dict) -> Row:
    import torch

    from .bench import measure
    from .inputs import build_problem
    from .runner import Runner

    runner = Runner(kernel, tri, m, gpu, Routing(), seed=0)
    default = runner.evaluate(runner.default_config(), 100).us
    best = runner.evaluate(tuned[min(tuned, key=lambda k: abs(k - m))], 100).us if tuned else default
    del runner
    deep = DeepGemmMoe(dg, build_problem(dgs, m, Routing(), 0, torch.device("cuda")))
    err = deep.error()
    gemms = measure(deep.gemms, budget_ms=100).median_us
    total = measure(deep.run, budget_ms=100).median_us
    faster = "DeepGEMM" if total < best else "Triton"
    without = "DeepGEMM" if deepgemm_runs(m, dgs.n, dgs.k, e8m0=False) else f"Triton on {dgs.label}"
    runs = f"DeepGEMM / {without}"  # E8M0 on (vLLM's default) / VLLM_USE_DEEP_GEMM_E8M0=0
    return Row(layout, m, default, best, gemms, total, err, faster, runs)


def _layouts(text: str, model) -> list[str]:
    """The --layouts list, each one vLLM runs for the FP8 checkpoint under both backends; one line otherwise."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--layouts {text!r}: names no layout; write e.g. DP4+EP,TP4")
    for name in names:
        layout = parse_layout(name)
        for backend in ("auto", "deep_gemm"):
            shape = shape_for(model, layout, "fp8", moe_backend=backend)
            if isinstance(shape, Refusal):
                raise UsageError(f"layout {name}: {shape.reason}")
    return names


def run(args: argparse.Namespace) -> int:
    from .shapes import parse_batch_sizes as batch_sizes

    gpu = get_gpu(args.gpu)
    model = load_model(DEFAULT_MODEL + "-FP8")
    layouts = _layouts(args.layouts, model)
    ms = list(batch_sizes(args.batch_sizes)) if args.batch_sizes is not None else list(DEFAULT_MS)
    if args.json_out:
        output_file(args.json_out, "--json-out")
    if not gpus.detect_gpus():
        raise UsageError("compare-backends times DeepGEMM and Triton on the GPU, and this node has none; run it on a GPU node")
    import torch

    if not torch.cuda.is_available():
        raise UsageError("compare-backends times DeepGEMM and Triton on the GPU, and torch sees none here; "
                         "install torch with CUDA support or run it on a GPU node")
    from .deepgemm_env import import_deep_gemm, locate_deep_gemm

    dg, check = import_deep_gemm(locate_deep_gemm(args.deep_gemm_path))
    if dg is None:
        raise UsageError(f"DeepGEMM is not importable ({check.detail})")
    kernel = KernelSource(args.vllm_src, args.vllm_version).load()
    folder = Path(args.configs or Path("kernels_configs") / gpu.device_name)
    print(f"DeepGEMM {getattr(dg, '__version__', '?')} vs {kernel.describe} on {torch.cuda.get_device_name()}")
    rows = [r for lay in layouts for r in compare(dg, kernel, gpu, model, lay, ms=ms, folder=folder)]
    print(f"\nSelecting a backend: {FLAGS}.")
    if args.json_out:
        atomic_write_json(Path(args.json_out), {"gpu": torch.cuda.get_device_name(), "kernel": kernel.describe,
                                                "deep_gemm": getattr(dg, "__version__", None),
                                                "rows": [asdict(r) for r in rows]})
    bad = [r for r in rows if not r.deepgemm_error < 2e-2]
    return 1 if bad else 0
