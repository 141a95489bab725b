"""N processes ask for one kernel at once, as a starting pool's processes ask for compile.FIRST: on the CPU.

Usage (no GPU needed; vLLM's fused_moe.py at hand):
    python benchmarks/lock_convoy_cpu.py FUSED_MOE_PY OUT_DIR [N] [REPEATS] > OUT_DIR/summary.json

Triton compiles vLLM's fused_moe_kernel for sm90 without a GPU through the pool's own driver
(``compile.CompileOnly``, as a worker on an H200 hands it over: the kernel, Triton's compile and its cache are
real). N fresh processes, each with torch and the kernel loaded, start ``compile._warm(*compile.FIRST)`` at the
same moment in one fresh cache:
- ``none``: no hooks, every process compiles on its own (Triton alone);
- ``exclusive``: one lock per kernel, every process waits for it exclusively (a waiter loads the kernel from
  the cache holding it, so waiters load one after another): the first form of ``compile.share_compiles``;
- ``shared``: ``compile.share_compiles`` as it is (waiters wait on a shared lock and load side by side).
Per run: each process's seconds in ``_warm``, from the first kernel request to the last process done, kernels
compiled (misses) and the lock waits. Variants alternate within each repeat. One JSON line per run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

VLLM = "0.33.0"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_for_sm90() -> None:
    from triton.backends.compiler import GPUTarget

    from tuning import compile as pool

    pool.compile_for(GPUTarget("cuda", 90, 32))  # the pool's own driver, as a worker on an H200 hands it over


def _exclusive_before_compile(*, compile: dict, **_) -> bool:
    from tuning import compile as pool

    fd = pool._lock_file(compile)
    fcntl.flock(fd, fcntl.LOCK_EX)
    pool._held.append(fd)
    return False


def child(src: str, run: str, variant: str, idx: int) -> None:
    _compile_for_sm90()
    from triton import knobs

    from tuning import compile as pool
    from tuning.vllm.kernel import KernelSource

    pool._kernel = KernelSource(src, VLLM).load()  # as compile._init
    kernels: list[dict] = []
    now: dict = {}
    knobs.compilation.listener = lambda *, cache_hit, **_: now.update(hit=bool(cache_hit))
    if variant != "none":
        if variant == "exclusive":
            pool._before_compile = _exclusive_before_compile  # share_compiles installs the module's function
        pool.share_compiles()
        before = knobs.runtime.jit_cache_hook

        def timed(**kw):
            t = time.time()
            answer = before(**kw)
            now["wait"] = time.time() - t
            return answer

        knobs.runtime.jit_cache_hook = timed
    do_compile = pool._kernel.fn._do_compile

    def recorded(*a, **kw):
        now["requested"] = time.time()
        try:
            return do_compile(*a, **kw)
        finally:
            kernels.append({**now, "done": time.time()})
            now.clear()

    pool._kernel.fn._do_compile = recorded
    open(f"{run}/ready{idx}", "w").close()
    while not os.path.exists(f"{run}/go"):
        time.sleep(0.005)
    start = float(open(f"{run}/go").read())
    while time.time() < start:
        time.sleep(0.001)
    pool._warm(*pool.FIRST)
    with open(f"{run}/child{idx}.json", "w") as f:
        json.dump({"warm_s": time.time() - start, "end": time.time(), "kernels": kernels}, f)


def run_once(src: str, run: str, variant: str, n: int) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    env = {**os.environ, "TRITON_CACHE_DIR": f"{run}/triton", "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, __file__, "child", src, run, variant, str(i)], env=env)
             for i in range(n)]
    while sum(os.path.exists(f"{run}/ready{i}") for i in range(n)) < n:
        if any(p.poll() not in (None, 0) for p in procs):
            sys.exit(f"a {variant} process failed; see its output above")
        time.sleep(0.05)
    time.sleep(1.0)
    with open(f"{run}/go.tmp", "w") as f:
        f.write(repr(time.time() + 0.5))
    os.rename(f"{run}/go.tmp", f"{run}/go")
    if any(p.wait() != 0 for p in procs):
        sys.exit(f"a {variant} process failed; see its output above")
    kids = [json.load(open(f"{run}/child{i}.json")) for i in range(n)]
    kernels = [k for c in kids for k in c["kernels"]]
    warm = sorted(c["warm_s"] for c in kids)
    return {"variant": variant, "processes": n,
            "warm_s": [round(warm[0], 2), round(warm[n // 2], 2), round(warm[-1], 2)],
            "first_request_to_all_done_s": round(max(c["end"] for c in kids) - min(k["requested"] for k in kernels), 2),
            "compiled": sum(not k["hit"] for k in kernels), "kernels": len(kernels),
            "lock_wait_s": [round(max((k.get("wait", 0) for k in kernels)), 2),
                            round(sum(k.get("wait", 0) for k in kernels), 2)]}


def main(src: str, out: str, n: int, repeats: int) -> None:
    for rep in range(repeats):
        order = ("none", "exclusive", "shared") if rep % 2 == 0 else ("shared", "exclusive", "none")
        for variant in order:
            print(json.dumps({"repeat": rep, **run_once(src, f"{out}/{variant}-{rep}", variant, n)}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif len(sys.argv) < 3:
        sys.exit("\n".join(__doc__.strip().splitlines()[2:4]))
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 6,
             int(sys.argv[4]) if len(sys.argv) > 4 else 3)
