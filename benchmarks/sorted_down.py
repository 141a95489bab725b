"""vLLM 0.34's sorted-activation path of the down projection against the path it runs without a `_down.json` file:
TritonExperts on one block-FP8 [128,128] layout's SiLU layers, per M, w13 with the committed config, w2 with each
down tile of a small grid.

    python benchmarks/sorted_down.py --gpu H200 --vllm-src DIR [--vllm-ops DIR] [--layout TP2]
        [--configs kernels_configs/vllm-0.34/NVIDIA_H200] [--batch-sizes 16,64,256,1024,2048,4096] [--parts]
        [--shape E,N,K,TOPK --up-file FILE.json --down-file FILE_down.json] --json out.json

``--shape`` times another model's shape instead (a control: vLLM 0.34 ships `_down.json` files for DeepSeek-V3's
E=256 N=256 and N=512 on the H200), w13 with ``--up-file``'s entries, and adds ``--down-file``'s entry nearest to M
(where it says "USE_TMA": true) to the grid. ``--up-block-m 16,32,64`` runs the sorted path's w13 with each of
those BLOCK_SIZE_M (a `_down.json` entry takes w13's; the plain path keeps the committed config). ``--parts``
also times w13, the activation and w2 of each path alone.

DIR holds vLLM 0.34's sources (``benchmarks/gpu_stage.sh pack-sources`` with VLLM_PKG=<0.34's vllm/>): its
fused_moe_kernel and its ``_silu_mul_quant_sorted_kernel``. vLLM 0.34 reads a layer's `_down.json` entry nearest to
M and takes the sorted path where it says "USE_TMA": true and ``vllm_rules.sorted_down_runs`` holds (SiLU, no EP,
DeepGEMM's E8M0 in use, sm90): w13 writes its rows in slot order, one Triton kernel applies SiLU and quantises
them, and w2 reads them through a TMA descriptor with the entry's tiles and w13's BLOCK_SIZE_M. Without the file
it runs the plain path: w13, vLLM's silu_and_mul and per-token-group quantisation (UE8M0), w2 with w13's config.

Each path is checked against the float reference before it is timed (``bench.measure``: CUDA graph, L2 flushed).
The grid is screened with a short budget; the plain path and the three fastest down tiles are then timed in
interleaved rounds. Prints per M: the plain path's µs, the best sorted path's µs and tile, plain/sorted (above 1:
the sorted path is faster). The JSON keeps every row and is rewritten after each M.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from tuning import launch
from tuning.bakeoff import moe_ops, vllm_ops
from tuning.bakeoff.compare import MODEL
from tuning.bakeoff.layer import default_tile, down_entry, tuned_tile
from tuning.bench import measure
from tuning.configs import read_config_file
from tuning.gpus import get_gpu
from tuning.vllm.kernel import KernelSource
from tuning.bakeoff.layer_inputs import batch, errors, float_weights, quantised, reference
from tuning.models import load_model
from tuning.bakeoff.path_triton import TritonPath
from tuning.shapes import MoeShape, parse_batch_sizes, parse_layout, shape_for
from tuning.bakeoff.vllm_helpers import VllmSource, load_helpers
from tuning.vllm.rules import nearest_key

TOLERANCE = 0.1  # bakeoff.TOLERANCE: a whole FP8 layer against float
GRID = {"BLOCK_SIZE_N": (64, 128, 256), "GROUP_SIZE_M": (1, 64), "warps_stages": ((4, 3), (4, 4), (8, 4))}


def downs(block_m: int) -> list[dict]:
    """The down tiles tried: BLOCK_SIZE_K is the block (128); BLOCK_SIZE_M is w13's (vLLM overrides it)."""
    return [{"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": g, "num_warps": w,
             "num_stages": s, "USE_TMA": True}
            for n, g, (w, s) in itertools.product(GRID["BLOCK_SIZE_N"], GRID["GROUP_SIZE_M"], GRID["warps_stages"])]


def short(d: dict) -> str:
    return (f"M{d['BLOCK_SIZE_M']}-N{d['BLOCK_SIZE_N']}-K{d['BLOCK_SIZE_K']}-G{d['GROUP_SIZE_M']}-w{d['num_warps']}"
            f"-s{d['num_stages']}")


def parts(tp: TritonPath, flush: int, budget_ms: float) -> dict[str, float]:
    """µs of w13, the activation (with the quantisation) and w2 of one path alone, as ``TritonPath.run`` issues them."""
    al, w, b, n = tp._assignment(), tp.w, tp.b, tp.w.n
    sorted_ = tp.down is not None
    c1 = tp.c1.new_empty((al.sorted_token_ids.numel(), 1, 2 * n)) if sorted_ else tp.c1
    first = launch.Gemm(a=tp.a1q, a_scale=tp.a1s, b=w.w13, b_scale=w.w13_scale, c=c1, topk_weights=None,
                        top_k=tp.shape.top_k)

    def w13():
        launch.invoke(tp.kernel, first, al, tp.config, block_shape=w.block, capability=tp.capability, c_sorted=sorted_)

    def act():
        if sorted_:
            return moe_ops.silu_mul_quant_sorted(tp.h, c1, al.num_tokens_post_padded, n)
        moe_ops.silu_and_mul(tp.c2, c1.view(-1, 2 * n), tp.ops)
        return moe_ops.group_quant(tp.h, tp.c2, 128, use_ue8m0=True, ops=tp.ops)

    w13()
    a2q, a2s = act()
    second = launch.Gemm(a=a2q, a_scale=a2s, b=w.w2, b_scale=w.w2_scale, c=tp.c3, topk_weights=b.topk_weights, top_k=1)

    def w2():
        launch.invoke(tp.kernel, second, al, tp.down or tp.config, block_shape=w.block, capability=tp.capability,
                      a_sorted=sorted_)

    return {name: measure(fn, budget_ms=budget_ms, flush_l2_bytes=flush).median_us
            for name, fn in (("w13", w13), ("activation", act), ("w2", w2))}


def _us(p: dict) -> str:
    return ", ".join(f"{v:.1f}" for v in p.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", default="H200")
    p.add_argument("--vllm-src", required=True)
    p.add_argument("--vllm-ops")
    p.add_argument("--layout", default="TP2")
    p.add_argument("--configs", default="kernels_configs/vllm-0.34/NVIDIA_H200")
    p.add_argument("--batch-sizes", default="16,64,256,1024,2048,4096")
    p.add_argument("--screen-ms", type=float, default=8.0)
    p.add_argument("--budget-ms", type=float, default=40.0)
    p.add_argument("--shape", help="E,N,K,TOPK: a shape not of Step-3.5-Flash, block-FP8 [128,128], no EP")
    p.add_argument("--up-file", help="with --shape: the w13 configs (a vLLM config file)")
    p.add_argument("--down-file", help="a vLLM `_down.json` file whose entry nearest to M joins the grid")
    p.add_argument("--up-block-m", type=parse_batch_sizes,
                   help="w13 with these BLOCK_SIZE_M in the sorted path (the rest of its committed config kept): does "
                        "any w13 tile make the sorted path pay? (the plain path keeps the committed config)")
    p.add_argument("--parts", action="store_true", help="also time w13, the activation and w2 of each path alone")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    gpu, sizes, layout = get_gpu(args.gpu), parse_batch_sizes(args.batch_sizes), parse_layout(args.layout)
    src = VllmSource(args.vllm_src)
    kernel = KernelSource(src.fused_moe, src.version()).load()
    helpers = load_helpers(src)
    if not hasattr(helpers, "_silu_mul_quant_sorted_kernel"):
        sys.exit(f"sorted_down: {args.vllm_src} is vLLM {kernel.vllm_version}'s source, which has no sorted path "
                 "(vLLM 0.34's experts/triton_moe.py has it)")
    model = load_model(MODEL)
    shape = shape_for(model, layout, "fp8", kernel.vllm_version, moe_backend="triton")
    if args.shape:
        e, n, k, top_k = (int(x) for x in args.shape.split(","))
        shape = MoeShape(e, e, n, k, top_k, "fp8", (128, 128))
    up_table = read_config_file(Path(args.up_file)) if args.up_file else None
    ops, why = vllm_ops.load(args.vllm_ops, helpers=helpers, experts=model.num_experts, top_k=model.top_k)
    cap, dev, flush = launch.capability(), torch.device("cuda"), gpu.l2_mb * 2**20 * 4
    print(f"{kernel.describe}; capability {cap}; {shape.label} ({args.layout}); "
          f"vLLM's CUDA ops: {'loaded from ' + ops.folder if ops else why}")
    w = float_weights(shape, 0, dev, torch.bfloat16)
    q = quantised(w, shape.block_shape)
    out = {"layout": args.layout, "shape": shape.label, "kernel": kernel.describe, "capability": cap,
           "vllm_ops": vllm_ops.record(ops, why), "grid": GRID, "rows": []}
    print(f"  {'M':>5} {'w13 config':<24} {'plain us':>9} {'sorted us':>10} {'plain/sorted':>12}  down tile")
    for m in sizes:
        b = batch(shape, m, layout.dp, 0, dev, torch.bfloat16)
        ref = reference(w, b, "silu")
        up = (up_table[nearest_key(up_table, m)] if up_table else tuned_tile(Path(args.configs), shape,
                                                                               gpu.device_name, m)) \
            or default_tile(kernel, shape, m)

        def path(down=None, b=b, up=up):
            if down is not None and down["BLOCK_SIZE_M"] != up.BLOCK_SIZE_M:  # a w13 variant (--up-block-m)
                up = replace(up, BLOCK_SIZE_M=down["BLOCK_SIZE_M"])
            return TritonPath(kernel, helpers, shape, q, b, config=up, activation="silu", e8m0=True, capability=cap,
                              ops=ops, down=down)

        row = {"m": m, "w13": up.short, "screened": {}}
        plain = path()
        row["plain_rel_error"], _ = errors(plain.run(), ref)
        if path(downs(up.BLOCK_SIZE_M)[0]).down is None:
            row["note"] = "vLLM takes the plain path at this M (naive assignment, or BLOCK_SIZE_M not a multiple of 16)"
            print(f"  {m:>5} {up.short:<24} {row['note']}")
            out["rows"].append(row)
            continue
        screened, grid = [], [d for bm in (args.up_block_m or [up.BLOCK_SIZE_M]) for d in downs(bm)]
        if args.down_file:
            entry = down_entry(Path(args.down_file), m)
            row["down_file"] = entry
            if entry and entry.get("USE_TMA"):
                grid.insert(0, {**entry, "BLOCK_SIZE_M": up.BLOCK_SIZE_M})
        for d in grid:
            try:
                s = path(d)
                rel, _ = errors(s.run(), ref)
                if not rel <= TOLERANCE:
                    row["screened"][short(d)] = f"numerics: relative error {rel:.3f}"
                    continue
                us = measure(s.run, budget_ms=args.screen_ms, flush_l2_bytes=flush).median_us
                row["screened"][short(d)] = round(us, 2)
                screened.append((us, d))
            except Exception as exc:  # a tile that does not compile or launch is a row, not a crash
                row["screened"][short(d)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            finally:
                torch.cuda.empty_cache()
        top = [d for _, d in sorted(screened, key=lambda t: t[0])[:3]]
        runs = {"plain": plain, **{short(d): path(d) for d in top}}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(3):  # interleaved rounds: drift between the contenders cancels
            for k, r in runs.items():
                times[k].append(measure(r.run, budget_ms=args.budget_ms, flush_l2_bytes=flush).median_us)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = min((k for k in med if k != "plain"), key=med.get, default=None)
        row.update(plain_us=med["plain"], timed=med, best=best, sorted_us=med.get(best),
                   speedup=med["plain"] / med[best] if best else None)
        if best:
            row["sorted_rel_error"], _ = errors(runs[best].run(), ref)
            if args.parts:
                row["parts"] = {"plain": parts(plain, flush, args.budget_ms),
                                "sorted": parts(runs[best], flush, args.budget_ms)}
                print(f"        steps (w13, activation, w2) plain {_us(row['parts']['plain'])}, "
                      f"sorted {_us(row['parts']['sorted'])}")
        print(f"  {m:>5} {up.short:<24} {med['plain']:>9.1f} {med.get(best, math.nan):>10.1f} "
              f"{row['speedup'] or math.nan:>12.3f}  {best}", flush=True)
        out["rows"].append(row)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        del plain, runs
        torch.cuda.empty_cache()
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
