"""Where a compile pool's first round goes: every kernel it compiles or loads, timed, in two pools at once.

Usage (on a GPU node, vLLM's fused_moe.py at hand):
    python benchmarks/pool_trace.py FUSED_MOE_PY OUT_DIR > OUT_DIR/pool_trace.json

Two pools of compile.processes() processes each, started as the sweep's workers start theirs (compile._init:
FIRST included), all processes up, then one round each at once of the same 36 tile configs of bf16 E=288
N=160 (M=4096 and M=3072: the same kernels), in a fresh Triton cache; once with each process compiling
alone, once with the pools sharing their compiles (the sweep's way). Prints, per pool, the round's seconds
and each config's; writes one line per kernel to OUT_DIR/kernels-{False,True}.jsonl: when Triton finished
it (seconds into the round), how long its process waited for the kernel's lock, how long Triton's compile
took, and whether it was a cache hit; and one line per process: when its initializer started (it had
imported torch, Triton and the pool) and ended (kernel loaded, FIRST compiled), after the pools' start.
Clocks are ``time.monotonic()``, one clock for every process of the node.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from pool_start import every_process_up  # this script's folder is on the path when it runs

from tuning import compile as pool
from tuning.gpus import get_gpu
from tuning.vllm.kernel import KernelSource
from tuning.shapes import MoeShape
from tuning.space import Context, space

SHAPE = MoeShape(288, 288, 160, 4096, 8, "bf16")


def _init(source: KernelSource, target, share: bool, log: str) -> None:
    start = time.monotonic()  # this process has imported torch, Triton and the pool's module
    pool._init(source, target, share)
    with open(log, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "init_start": start, "init_end": time.monotonic()}) + "\n")
    from triton import knobs

    state: dict = {}
    before, after = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook

    def timed_before(**kw):
        t = time.monotonic()
        answer = before(**kw) if before else False
        state["start"], state["wait"] = time.monotonic(), time.monotonic() - t
        return answer

    def listen(*, cache_hit, **_):
        with open(log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "t": time.monotonic(), "wait": round(state["wait"], 3),
                                "compile": round(time.monotonic() - state["start"], 3), "hit": cache_hit}) + "\n")

    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = timed_before, after
    knobs.compilation.listener = listen


def _timed_warm(m: int, config) -> float:
    t = time.monotonic()
    pool._warm(SHAPE, m, config)
    return round(time.monotonic() - t, 2)


def main(path: str, out: str) -> dict:
    source, n, target = KernelSource(path, "0.33.0"), pool.processes(), pool.current_target()
    configs = space(Context(SHAPE, get_gpu("H200"), 4096))[:36]
    result = {}
    for share in (False, True):
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
        log = os.path.join(out, f"kernels-{share}.jsonl")
        with open(log, "a") as f:
            f.write(json.dumps({"pools_start": time.monotonic()}) + "\n")
        pools = [ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_init,
                                     initargs=(source, target, share, log)) for _ in range(2)]
        for p in pools:
            every_process_up(p, n)
        with open(log, "a") as f:
            f.write(json.dumps({"round_start": time.monotonic()}) + "\n")

        def round_(a):
            t = time.monotonic()
            each = [f.result() for f in [a[0].submit(_timed_warm, a[1], c) for c in configs]]
            return {"m": a[1], "round_s": round(time.monotonic() - t, 2), "per_config_s": each}

        with ThreadPoolExecutor(2) as ex:
            result["shared" if share else "unshared"] = list(ex.map(round_, [(pools[0], 4096), (pools[1], 3072)]))
        for p in pools:
            p.shutdown()
    return result


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("\n".join(__doc__.strip().splitlines()[2:4]))
    print(json.dumps(main(sys.argv[1], sys.argv[2]), indent=1))
