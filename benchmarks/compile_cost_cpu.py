"""What a config costs to compile, and what ptxas makes of it: on the CPU, for an H200.

Usage (no GPU needed; vLLM's fused_moe.py at hand):
    python benchmarks/compile_cost_cpu.py FUSED_MOE_PY DTYPE M [PER_GROUP | CONFIG,CONFIG...] > OUT.jsonl

Triton compiles vLLM's fused_moe_kernel for sm90 through the compile pool's own driver
(``compile.CompileOnly``), exactly as a pool process does (``compile._warm``: both GEMMs of a config, launch
arguments as the timed run's), in a fresh cache, one config at a time in this one process. The shape is
Step-3.5-Flash's E=288 N=320 (TP4; FP8 with its [64,64] blocks). PER_GROUP configs (default 6) are drawn, with a
fixed seed, from each of two groups: ``over``, the configs that only ``space.accumulator_fits_registers`` keeps out
of the search (a float32 BLOCK_M x BLOCK_N accumulator of 256 or more registers a thread, more than the 255 a
thread has), and ``under``, the search space. Per config one JSON line: the
seconds of its compile, and for each of its kernels the registers and spill bytes ptxas reports (Triton's own
ptxas, run again with ``-v`` on the PTX the compile left in the cache). Then one summary line per group. Given
configs (short form, ``M256-N128-K64-G1-w4-s3``) instead of PER_GROUP, it compiles those, each in its group.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VLLM = "0.33.0"


def accumulator_registers(c) -> int:
    """Registers a thread needs for vLLM's kernel's float32 BLOCK_M x BLOCK_N accumulator (32 x num_warps threads)."""
    return c.BLOCK_SIZE_M * c.BLOCK_SIZE_N // (32 * c.num_warps)


def ptxas_report(ptx: Path) -> dict:
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", "/dev/null"], capture_output=True,
                         text=True).stderr
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", out)]
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", out)]
    return {"registers": max(regs, default=None), "spill_store_bytes": max(spills, default=None)}


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    src, dtype, m = argv[0], argv[1], int(argv[2])
    chosen = argv[3] if len(argv) > 3 else "6"
    cache = Path(tempfile.mkdtemp(prefix="compile-cost-"))
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    from triton.backends.compiler import GPUTarget

    from tuning import compile as pool
    from tuning.configs import TileConfig
    from tuning.gpus import get_gpu
    from tuning.vllm.kernel import KernelSource
    from tuning.shapes import MoeShape
    from tuning.space import Context, accumulator_fits_registers, candidates, explain, space

    pool.compile_for(GPUTarget("cuda", 90, 32))  # an H200's target, as its worker hands it to the pool
    pool._kernel = KernelSource(src, VLLM).load()
    shape = MoeShape(288, 288, 320, 4096, 8, dtype, (64, 64) if dtype == "fp8" else None)
    ctx = Context(shape, get_gpu("H200"), m)
    searched = space(ctx)

    def group_of(c) -> str:
        return "under" if accumulator_fits_registers(c, ctx) else "over"

    in_space = {"over": [c for c in candidates(ctx) if explain(c, ctx) == ["accumulator_fits_registers"]],
                "under": searched}
    rng = random.Random(f"compile-cost-{dtype}-{m}")
    if chosen.isdigit():
        groups = {g: rng.sample(configs, min(int(chosen), len(configs))) for g, configs in in_space.items()}
    else:
        given = [TileConfig.from_short(c) for c in chosen.split(",")]
        groups = {g: [c for c in given if group_of(c) == g] for g in in_space}
    pool._warm(*pool.FIRST)  # the process's first compile pays Triton's set-up: not part of any config's cost
    seconds: dict[str, list[float]] = {}
    for group, configs in groups.items():
        for c in configs:
            seen = set(cache.iterdir())
            t = time.monotonic()
            why = pool._warm(shape, m, c)
            took = time.monotonic() - t
            kernels = [ptxas_report(ptx) for d in sorted(set(cache.iterdir()) - seen) for ptx in d.glob("*.ptx")]
            seconds.setdefault(group, []).append(took)
            print(json.dumps({"group": group, "config": c.short, "accumulator_registers": accumulator_registers(c),
                              "compile_s": round(took, 2),
                              "failure": None if why is None else why.kind.name, "kernels": kernels}), flush=True)
    for group, configs in in_space.items():
        s = seconds.get(group, [])
        print(json.dumps({"summary": group, "dtype": dtype, "m": m, "space": len(searched),
                          "in_group": len(configs), "compiled": len(s),
                          "compile_s_median": round(statistics.median(s), 2) if s else None,
                          "compile_s_max": round(max(s), 2) if s else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
