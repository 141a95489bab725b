"""Tuned FP8 files under vLLM 0.34's kernel, whose weights it reads through a TMA descriptor: each entry and vLLM's
default timed head to head with the weights through TMA (what 0.34 runs) and by pointer (what a config's
"USE_TMA": false asks for, and what 0.33 runs), on one runner per (file, M).

    python benchmarks/tma_pair.py --gpu H200 --vllm-src fused_moe_v034.py [--configs DIR] [--files PREFIX]
        [--batch-sizes 1,16,128,1024,4096] --json out.json

Prints, per file and M: the µs of the tuned entry and of the default, each with TMA and without, and
pointer/TMA (above 1: TMA is faster). The JSON keeps every row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tuning import launch
from tuning.gpus import get_gpu
from tuning.vllm.kernel import KernelSource
from tuning.routing import Routing
from tuning.runner import Runner
from tuning.search import head_to_head
from tuning.shapes import parse_batch_sizes
from tuning.verify import tuned_files


def timed(runner: Runner, configs, tma: bool) -> list[float]:
    """µs of each config, head to head, with the weights through TMA (vLLM's decision) or by pointer."""
    decide = launch.tma_weights
    launch.tma_weights = decide if tma else (lambda *a, **k: False)
    try:
        return [o.us if o.ok else math.inf for o in head_to_head(runner, *configs, rounds=3)]
    finally:
        launch.tma_weights = decide


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", default="H200")
    p.add_argument("--vllm-src", required=True)
    p.add_argument("--configs", default="kernels_configs/vllm-0.33/NVIDIA_H200")
    p.add_argument("--files", action="append", default=["E="])
    p.add_argument("--batch-sizes", default="1,16,128,1024,4096")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    gpu, sizes = get_gpu(args.gpu), parse_batch_sizes(args.batch_sizes)
    kernel = KernelSource(args.vllm_src).load()
    if not launch.rules(kernel).tma_weights:
        sys.exit(f"tma_pair: {args.vllm_src} is vLLM {kernel.vllm_version}'s kernel, which reads no weights through TMA")
    rows = []
    files = [f for f in tuned_files(Path(args.configs), args.files, gpu, None) if f.shape.block_shape]
    print(f"{kernel.describe}; capability {launch.capability()}")
    for f in files:
        print(f"\n{f.name}\n  {'M':>5} {'tuned TMA':>10} {'tuned ptr':>10} {'ptr/TMA':>8} {'default TMA':>12} "
              f"{'default ptr':>12} {'ptr/TMA':>8}  tuned")
        for m in sizes:
            tuned = f.configs[min(f.configs, key=lambda k: abs(k - m))]
            runner = Runner(kernel, f.shape, m, gpu, Routing(), seed=0)
            default = runner.default_config()
            t_tma, d_tma = timed(runner, (tuned, default), True)
            t_ptr, d_ptr = timed(runner, (tuned, default), False)
            rows.append({"file": f.name, "m": m, "tuned": tuned.short, "default": default.short,
                         "tuned_tma_us": t_tma, "tuned_ptr_us": t_ptr, "default_tma_us": d_tma, "default_ptr_us": d_ptr})
            print(f"  {m:>5} {t_tma:>10.1f} {t_ptr:>10.1f} {t_ptr / t_tma:>7.3f}x {d_tma:>12.1f} {d_ptr:>12.1f} "
                  f"{d_ptr / d_tma:>7.3f}x  {tuned.short}", flush=True)
            del runner
    ratios = [r["tuned_ptr_us"] / r["tuned_tma_us"] for r in rows if math.isfinite(r["tuned_ptr_us"] / r["tuned_tma_us"])]
    if ratios:
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"\ntuned entries, pointer/TMA: geomean {geo:.3f}x over {len(ratios)}, range {min(ratios):.3f}-{max(ratios):.3f}")
    Path(args.json).write_text(json.dumps({"kernel": kernel.describe, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
