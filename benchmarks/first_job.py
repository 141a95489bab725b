"""Where a worker's first job goes: its compile pool's start, each config's compile, each timing.

Usage (on a GPU node, vLLM's fused_moe.py at hand):
    python benchmarks/first_job.py FUSED_MOE_PY [NAME,...] > first_job.json   (NAME of SHAPES; default all)

A sweep's first job waits longer for FP8 than for bf16 (benchmarks/README 2g: 21.7 s of 25 s for FP8 E=288
N=320 [64,64] at M=1, 11.6 s for N=160 [32,32], 7.6 s for bf16 N=160). This runs that first job as a worker
does, without Ray: a compile pool started as ``TuneWorker`` starts it (``compile.Precompiler``), then
``workers.run_job`` at M=1 at once, in a fresh Triton cache per shape, and again with the pool up first
(``up``). Per run: when the pool was created, when the job's inputs were built, and for each config of the
job when its compile arrived and how long its timing took (seconds from the pool's creation), and the job's
``compile_seconds`` as results.jsonl records it. Then a pool of one process, up, in a fresh cache: what
building the job's problem on ``meta`` and compiling each of the job's first two configs cost there.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from pool_start import every_process_up  # this script's folder is on the path when it runs

from tuning import compile as pool
from tuning.configs import TileConfig
from tuning.gpus import get_gpu
from tuning.jobs import Job, Settings
from tuning.vllm.kernel import KernelSource
from tuning.runner import Runner
from tuning.shapes import MoeShape
from tuning.workers import run_job

SHAPES = {"bf16-N160": MoeShape(288, 288, 160, 4096, 8, "bf16"),
          "fp8-N160": MoeShape(288, 288, 160, 4096, 8, "fp8", (32, 32)),
          "fp8-N320": MoeShape(288, 288, 320, 4096, 8, "fp8", (64, 64))}


def _in_process(shape: MoeShape, configs: list[TileConfig]) -> list[dict]:
    """In a pool process: the meta problem's build and each config's compile, seconds."""
    out = []
    for c in configs:
        t = time.monotonic()
        pool._meta_problem(shape, 1)
        t1 = time.monotonic()
        why = pool._warm(shape, 1, c)
        out.append({"config": c.short, "meta_problem_s": round(t1 - t, 3), "compile_s": round(time.monotonic() - t1, 3),
                    "failure": why.kind.value if why else None})
    return out


def first_job(source: KernelSource, shape: MoeShape, up_first: bool) -> dict:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="first-job-")  # the pool's processes inherit it
    kernel, gpu = source.load(), get_gpu("H200")
    settings = Settings(gpu="H200", source=source)
    t0 = time.monotonic()
    pre = pool.Precompiler(source)
    if up_first:
        every_process_up(pre.pool, pool.processes())
    up = time.monotonic() - t0
    events: list[dict] = []
    stream, evaluate, init = pre.stream, Runner.evaluate, Runner.__init__

    def traced_stream(shape_, m, configs):
        for c, why in stream(shape_, m, configs):
            events.append({"arrived": round(time.monotonic() - t0, 2), "config": c.short})
            yield c, why

    def traced_evaluate(self, config, budget_ms=30.0):
        t = time.monotonic()
        o = evaluate(self, config, budget_ms)
        events.append({"timed": config.short, "s": round(time.monotonic() - t, 2), "us": round(o.us, 1)})
        return o

    def traced_init(self, *a, **kw):
        init(self, *a, **kw)
        events.append({"inputs_built": round(time.monotonic() - t0, 2)})

    pre.stream, Runner.evaluate, Runner.__init__ = traced_stream, traced_evaluate, traced_init
    try:
        r = run_job(kernel, gpu, Job(shape, 1), settings, device_name="NVIDIA_H200", worker="first_job",
                    seeds=[], failures={}, precompile=pre)
    finally:
        Runner.evaluate, Runner.__init__ = evaluate, init
    pre.pool.shutdown()
    looked = [e["config"] for e in events if "config" in e]
    return {"pool_up_waited_s": round(up, 2) if up_first else None, "job_s": round(r.seconds, 2),
            "compile_seconds": r.compile_seconds, "evaluated": r.evaluated, "events": events,
            "one_process": one_process(source, pre.target, shape, [TileConfig.from_short(s) for s in looked[:2]])}


def one_process(source: KernelSource, target, shape: MoeShape, configs: list[TileConfig]) -> list[dict]:
    """A pool of one process, up, in a fresh cache: the job's first two configs compiled there in turn."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="first-job-one-")
    pre = pool.Precompiler(source, target, workers=1)
    every_process_up(pre.pool, 1)
    try:
        return pre.pool.submit(_in_process, shape, configs).result()
    finally:
        pre.pool.shutdown()


def main(path: str, names: list[str]) -> dict:
    source = KernelSource(path, "0.33.0")
    out = {"cpus": os.cpu_count(), "processes": pool.processes()}
    for name in names:
        shape = SHAPES[name]
        for up_first in (False, True):
            out[f"{name}{'-up' if up_first else ''}"] = first_job(source, shape, up_first)
            print(name, up_first, out[f"{name}{'-up' if up_first else ''}"]["compile_seconds"], file=sys.stderr)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("\n".join(__doc__.strip().splitlines()[2:4]))
    print(json.dumps(main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else list(SHAPES)), indent=1))
