"""vLLM's default config on Step-3.5-Flash shapes: numerical error, median µs, % of roofline.

    python benchmarks/kernel_default.py --gpu H200 [--vllm-src fused_moe.py --vllm-version 0.33.0] [--json out.json]

Runs vLLM's exact fused_moe_kernel through tuning.runner (both GEMMs, CUDA graph,
L2 flushed where it matters) and compares with the H200 table in facts.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from tuning.gpus import get_gpu
from tuning.routing import Routing
from tuning.vllm.kernel import KernelSource
from tuning.runner import Runner
from tuning.shapes import MoeShape

MS = (1, 16, 64, 256, 1024, 4096)
SHAPES = {
    "bf16 E=288 N=1280": MoeShape(288, 288, 1280, 4096, 8, "bf16"),
    "bf16 E=288 N=320 (TP4)": MoeShape(288, 288, 320, 4096, 8, "bf16"),
    "fp8 E=72 N=1280 [128,128], top-8 over the 72": MoeShape(72, 72, 1280, 4096, 8, "fp8", (128, 128)),
    "fp8 E=72 N=1280 [128,128], faithful EP (top-8 over 288)": MoeShape(72, 288, 1280, 4096, 8, "fp8", (128, 128)),
}
# facts.md, "Measured on an H200 (vLLM 0.33 kernel, default config, both GEMMs, µs)".
FACTS = {
    "bf16 E=288 N=1280": (74, 748, 1700, 2100, 2460, 3070),
    "bf16 E=288 N=320 (TP4)": (30, 211, 489, 581, 720, 986),
    "fp8 E=72 N=1280 [128,128], top-8 over the 72": (41, 238, 281, 343, 600, 2020),
    "fp8 E=72 N=1280 [128,128], faithful EP (top-8 over 288)": (None, 108, 248, 342, 381, 711),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", default="H200")
    p.add_argument("--vllm-src")
    p.add_argument("--vllm-version")
    p.add_argument("--budget-ms", type=float, default=300.0)
    p.add_argument("--json")
    p.add_argument("--scope", default="gemms", choices=("gemms", "layer"))
    p.add_argument("--shapes", help="only shapes whose names start with one of these ';'-separated prefixes")
    p.add_argument("--ms", help="comma list of M (default: 1,16,64,256,1024,4096)")
    p.add_argument("--no-flush", action="store_true", help="keep L2 warm between samples")
    args = p.parse_args()
    wanted = [w for w in (args.shapes or "").split(";") if w]
    ms = {int(t) for t in args.ms.split(",")} if args.ms else set(MS)
    kernel = KernelSource(args.vllm_src, args.vllm_version).load()
    gpu = get_gpu(args.gpu)
    print(f"# {kernel.describe} on {gpu.torch_name}\n")
    print(f"scope: {args.scope}; L2 {'kept warm' if args.no_flush else 'flushed where the data fits in 4x L2'}\n")
    print("| shape | M | default config | rel. error | median µs | p20–p80 µs | % roofline (bound) | facts.md µs | Δ |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, shape in SHAPES.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        for m, fact in zip(MS, FACTS[name]):
            if m not in ms:
                continue
            runner = Runner(kernel, shape, m, gpu, Routing(), seed=0, scope=args.scope)
            if args.no_flush:
                runner.flush_bytes = 0
            cfg = runner.default_config()
            out = runner.evaluate(cfg, budget_ms=args.budget_ms)
            row = {"shape": name, "m": m, "config": cfg.to_dict(), "error": out.error, "failure": out.failure,
                   "median_us": out.us, "p20_us": out.timing.p20_us if out.timing else None,
                   "p80_us": out.timing.p80_us if out.timing else None, "roofline_us": runner.roofline.bound_us,
                   "bound": runner.roofline.bound, "facts_us": fact}
            rows.append(row)
            delta = f"{100 * (out.us / fact - 1):+.0f}%" if fact and out.ok else "—"
            err = f"{out.error:.1e}" if out.error is not None else out.failure
            spread = f"{row['p20_us']:.0f}–{row['p80_us']:.0f}" if out.timing else "—"
            print(f"| {name} | {m} | {cfg.short} | {err} | {out.us:.1f} | {spread} | "
                  f"{runner.roofline.percent(out.us):.0f}% ({runner.roofline.bound}) | {fact or '—'} | {delta} |",
                  flush=True)
            del runner
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kernel": kernel.describe, "gpu": gpu.torch_name, "rows": rows}, f, indent=2)
    return 0 if all(not r["failure"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
