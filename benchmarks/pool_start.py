"""What a worker's compile pool costs: its start, a cold round, and two pools on one node at once.

Usage (on a GPU node, vLLM's fused_moe.py at hand):
    python benchmarks/pool_start.py FUSED_MOE_PY [VLLM_VERSION] > pool_start.json

Rounds of 36 tile configs (about a search round: 3 configs' 12 neighbours) of bf16 E=288 N=160 at M=4096, each
Triton cache a fresh folder. One pool of compile.processes() processes: up (each imported torch and the kernel,
compiled FIRST; what the GPU holds then), a cold round (and whether a worker's launch of its first config finds
both kernels in the cache), the same round again (cache hits), N=320's (the same kernels: hits). Then two pools
started at once, as two workers on one node start theirs, in a fresh cache: one cold round in each at once of
the same 36 configs (M=4096 and M=3072: one family, the same kernels), then of 36 different configs each; once
with each process compiling alone (``two_pools_*``), once with the pools sharing their compiles through the
cache's locks (``two_pools_shared_*``, as the sweep's pools do). Prints one JSON object.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

from tuning.compile import Precompiler, processes
from tuning.gpus import get_gpu
from tuning.vllm.kernel import KernelSource
from tuning.shapes import MoeShape
from tuning.space import Context, space

ROUND = 36  # about a search round: 3 configs' 12 neighbours


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def every_process_up(executor, n: int) -> None:
    """Wait until each of the executor's n processes has run a task (so has run its initializer)."""
    pids: set[int] = set()
    while len(pids) < n:
        pids |= {f.result() for f in [executor.submit(pid_after, 0.05) for _ in range(n)]}


def up(pool: Precompiler) -> None:
    """Wait until every process of the pool is up (imported torch and the kernel, compiled FIRST)."""
    every_process_up(pool.pool, processes())  # Precompiler's default size


def gpu_now() -> dict:
    """What the GPU holds now, as nvidia-smi sees it: memory in use and processes with a CUDA context."""
    def query(*args: str) -> list[str]:
        run = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True)
        return [line for line in run.stdout.splitlines() if line.strip()]
    try:
        return {"memory_used_mib": int(query("--query-gpu=memory.used")[0]),
                "processes": len(query("--query-compute-apps=pid"))}
    except (OSError, IndexError, ValueError):
        return {}


def launch_hits(source: KernelSource, shape: MoeShape, m: int, config) -> list[bool]:
    """Launch both GEMMs of ``config`` on the GPU as a worker times them: for each kernel Triton needed, whether
    it found it in the cache (the pool, which never opened the GPU, compiled it)."""
    import torch
    from triton import knobs

    from tuning import launch
    from tuning.inputs import build_problem
    from tuning.routing import Routing

    kernel, hits = source.load(), []
    p = build_problem(shape, m, Routing(), 0, torch.device("cuda"))
    knobs.compilation.listener = lambda *, cache_hit, **_: hits.append(bool(cache_hit))
    try:
        launch.both_gemms(kernel, p, launch.alignment(p, config.BLOCK_SIZE_M, kernel), config,
                          torch.cuda.get_device_capability() == (9, 0))
        torch.cuda.synchronize()
    finally:
        knobs.compilation.listener = None
    return hits


def timed(fn) -> float:
    t = time.monotonic()
    fn()
    return round(time.monotonic() - t, 2)


def _worker_side(task: dict, barrier, results) -> None:
    """One worker's pool, in a process of its own as on a node: up, then the two rounds
    in step with the other worker's."""
    source, share, shape, m, same, other, start = (task[k] for k in ("source", "share", "shape", "m", "same",
                                                                     "other", "start"))
    pool = Precompiler(source, target=task["target"], share=share)
    up(pool)
    out = {"up_s": round(time.monotonic() - start, 2)}
    barrier.wait()
    out["same_configs_s"] = timed(lambda: pool(shape, m, same))
    barrier.wait()
    out["other_configs_s"] = timed(lambda: pool(shape, 4096, other))
    pool.pool.shutdown()
    results.put((m, out))


def two_pools(source: KernelSource, target, share: bool, shape: MoeShape, same: list, other: list) -> dict:
    """Two pools started at once in a fresh cache, each by a process of its own, as two workers on one node
    start theirs; their compiles shared through the cache's locks or not."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"triton-two-{'shared' if share else 'unshared'}-")
    ctx = mp.get_context("spawn")
    barrier, results, start = ctx.Barrier(2), ctx.Queue(), time.monotonic()
    tasks = [{"source": source, "target": target, "share": share, "shape": shape, "m": m, "same": same,
              "other": more, "start": start} for m, more in ((4096, other[0]), (3072, other[1]))]
    procs = [ctx.Process(target=_worker_side, args=(task, barrier, results)) for task in tasks]
    for p in procs:
        p.start()
    each = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return {"up_s": max(each[m]["up_s"] for m in each),
            "same_configs_s": [each[4096]["same_configs_s"], each[3072]["same_configs_s"]],
            "other_configs_s": [each[4096]["other_configs_s"], each[3072]["other_configs_s"]]}


def main(path: str, version: str | None) -> dict:
    gpu, source = get_gpu("H200"), KernelSource(path, version)
    n160, n320 = MoeShape(288, 288, 160, 4096, 8, "bf16"), MoeShape(288, 288, 320, 4096, 8, "bf16")
    configs = space(Context(n160, gpu, 4096))
    same, other = configs[:ROUND], [configs[ROUND:2 * ROUND], configs[2 * ROUND:3 * ROUND]]
    out = {"cpus": os.cpu_count(), "processes": processes(), "configs_at_4096": len(configs)}
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-one-")  # the pool's processes inherit it
    t = time.monotonic()
    pool = Precompiler(source)
    up(pool)
    out["pool_up_s"] = round(time.monotonic() - t, 2)
    out["gpu_pool_up"] = gpu_now()  # the pool's processes compile for the GPU's target without opening it
    out["cold_round_s"] = timed(lambda: pool(n160, 4096, same))
    out["worker_launch_cache_hits"] = launch_hits(source, n160, 4096, same[0])
    out["same_round_again_s"] = timed(lambda: pool(n160, 4096, same))
    out["sibling_round_s"] = timed(lambda: pool(n320, 4096, same))
    pool.pool.shutdown()
    for share, key in ((False, "two_pools"), (True, "two_pools_shared")):
        out.update({f"{key}_{k}": v for k, v in two_pools(source, pool.target, share, n160, same, other).items()})
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("\n".join(__doc__.strip().splitlines()[2:4]))
    print(json.dumps(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None), indent=1))
