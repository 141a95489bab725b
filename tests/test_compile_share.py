"""Compile pools of one node share their compiles through Triton's own JIT hooks.

Two real processes compile one real Triton kernel for sm90 (Triton compiles without a GPU through the pool's
own driver, ``compile.CompileOnly``) through Triton's ``JITFunction._do_compile``, the method that calls the hooks around the
compile, on one cache folder. The first holds the kernel's lock for a while before it compiles; Triton's
compilation listener says which process compiled and which loaded the kernel from the cache.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HOLD_S = 3  # the first process waits this long after its lock is taken, before it compiles

CHILD = r'''
import json, os, sys, time
import triton, triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from tuning import compile as pool

@triton.jit
def double(x_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) * 2, mask=o < n)

role, share, sync, hold = sys.argv[1], sys.argv[2] == "1", sys.argv[3], float(sys.argv[4])
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
double.device_caches[0] = ({}, {}, target, backend, None)  # what create_binder builds from the active driver
double.compile, double.ASTSource = triton.compile, ASTSource
hits = []
knobs.compilation.listener = lambda *, cache_hit, **_: hits.append((cache_hit, len(pool._held)))
if share:
    pool.share_compiles()
if role == "first":
    while not os.path.exists(f"{sync}/second-ready"):
        time.sleep(0.01)
    before = knobs.runtime.jit_cache_hook
    def hold_then_compile(**kw):
        answer = before(**kw) if before else False
        open(f"{sync}/first-started", "w").close()
        time.sleep(hold)
        return answer
    knobs.runtime.jit_cache_hook = hold_then_compile
else:
    open(f"{sync}/second-ready", "w").close()
    while not os.path.exists(f"{sync}/first-started"):
        time.sleep(0.01)
signature = {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
key = ("double", (("*fp32", "D"), ("i32", ""), ("constexpr", 128)))
double._do_compile(key, signature, 0, {(2,): 128}, backend.parse_options({}), {}, True)
print(json.dumps({"hits": hits, "locks_left": len(pool._held)}))
'''


def _race(tmp_path: Path, share: bool) -> dict[str, dict]:
    cache, sync = tmp_path / f"cache-{share}", tmp_path / f"sync-{share}"
    sync.mkdir()
    child = tmp_path / "child.py"  # Triton reads a kernel's source from its file
    child.write_text(CHILD)
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("TRITON_INTERPRET", None)
    procs = {role: subprocess.Popen([sys.executable, str(child), role, "1" if share else "0", str(sync),
                                     str(HOLD_S)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role in ("first", "second")}
    out = {}
    for role, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        out[role] = json.loads(stdout.strip().splitlines()[-1])
    return out


def test_a_kernel_compiled_by_another_process_is_waited_for_and_loaded(tmp_path):
    """Shared: the second process waits for the first's lock, then loads the kernel it compiled, without a lock
    of its own (an exclusive one would make a node's waiters load one after another). Unshared (Triton
    alone), the second compiles it while the first waits, and the first loads the second's."""
    shared = _race(tmp_path, share=True)
    assert shared["first"]["hits"] == [[False, 1]]  # compiled, holding the kernel's lock
    assert shared["second"]["hits"] == [[True, 0]]  # loaded, holding no lock: waiters load side by side
    assert shared["first"]["locks_left"] == 0 and shared["second"]["locks_left"] == 0  # released after compiling
    alone = _race(tmp_path, share=False)
    assert alone["second"]["hits"] == [[False, 0]] and alone["first"]["hits"] == [[True, 0]]


def _spec(text: str) -> dict:
    return {"compile": {"specialization_data": text}, "key": None, "repr": ""}


def test_a_lock_is_held_from_before_the_compile_until_released(tmp_path, monkeypatch):
    """Held between the hooks (flock conflicts between two opens even in one process), released by the hook
    after the compile or, when the compile raised, by the pool's task. A process that finds it held waits
    for it, then holds nothing."""
    from tuning import compile as pool

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert pool._before_compile(**_spec("kernel A")) is False  # False: Triton compiles (from the cache or not)
    (lock,) = list((tmp_path / pool.LOCKS).iterdir())
    probe = os.open(lock, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        pool._after_compile(**_spec("kernel A"))
        fcntl.flock(probe, fcntl.LOCK_SH)  # another process loading the kernel; the lock is not free...
        assert pool._before_compile(**_spec("kernel A")) is False and pool._held == []  # ...so it waits, holds none
        fcntl.flock(probe, fcntl.LOCK_UN)
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now
        fcntl.flock(probe, fcntl.LOCK_UN)
        pool._before_compile(**_spec("kernel A"))
        pool.release_locks()  # what _warm's finally does when the compile raised
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)
        pool.release_locks()
    pool._before_compile(**_spec("kernel B"))
    pool.release_locks()
    assert len(list((tmp_path / pool.LOCKS).iterdir())) == 2  # one lock per kernel


def test_a_cache_folder_that_cannot_be_written_compiles_unshared(tmp_path, monkeypatch):
    from tuning import compile as pool

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(blocker))
    assert pool._before_compile(**_spec("kernel A")) is False
    assert pool._held == []


def test_a_triton_whose_hook_arguments_differ_compiles_unshared(tmp_path, monkeypatch):
    """The hook never raises into Triton's compile (that would fail every config): without the kernel's
    description it takes no lock."""
    from tuning import compile as pool

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert pool._before_compile(key=None, repr="") is False
    assert pool._before_compile(compile={}, key=None) is False
    assert pool._held == [] and not (tmp_path / pool.LOCKS).exists()


def test_each_process_first_compile_takes_the_aligned_path_most_jobs_take():
    """The kernel a pool process compiles as it starts pays what the first aligned job would otherwise pay in
    its first round (Triton's key and IR set-up, the aligned path's arguments): so it must not take the naive
    path."""
    from tuning import compile as pool
    from tuning.launch import alignment, use_naive

    shape, m, config = pool.FIRST
    assert not use_naive(m, shape.top_k, shape.global_experts, shape.expert_parallel)
    assert alignment(pool._meta_problem(shape, m), config.BLOCK_SIZE_M, None) is not None  # runs on meta tensors


WARM_CHILD = r'''
import json, os, sys, time
from triton import knobs
from triton.backends.compiler import GPUTarget
from tuning import compile as pool
from tuning.vllm.kernel import KernelSource

pool.compile_for(GPUTarget("cuda", 90, 32))  # the pool's own driver: an H200's target, no GPU
src, sync, idx = sys.argv[1], sys.argv[2], sys.argv[3]
pool._kernel = KernelSource(src).load()
hits = []
knobs.compilation.listener = lambda *, cache_hit, **_: hits.append(cache_hit)
pool.share_compiles()
open(f"{sync}/ready{idx}", "w").close()
while len([f for f in os.listdir(sync) if f.startswith("ready")]) < 2:
    time.sleep(0.01)
failure = pool._warm(*pool.FIRST)
print(json.dumps({"hits": hits, "failure": None if failure is None else str(failure), "locks_left": len(pool._held)}))
'''


def test_two_pool_processes_warming_vllms_kernel_at_once_compile_each_gemm_once(tmp_path, fused_moe_py):
    """The pool's own task (``_warm``: both GEMMs of vLLM's kernel on meta tensors, launch arguments as timed)
    in two processes at once on one cache: vLLM's kernel compiled for sm90, each GEMM's kernel once."""
    sync = tmp_path / "sync"
    sync.mkdir()
    child = tmp_path / "warm_child.py"
    child.write_text(WARM_CHILD)
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, str(child), str(fused_moe_py), str(sync), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert all(o["failure"] is None and o["locks_left"] == 0 and len(o["hits"]) == 2 for o in outs)  # w13, w2
    hits = [h for o in outs for h in o["hits"]]
    assert hits.count(False) == 2 and hits.count(True) == 2  # each GEMM's kernel compiled by one process
    assert len(list((tmp_path / "cache" / "tune-moe-locks").iterdir())) == 2


def test_the_pool_compiles_vllms_kernel_for_an_h200_in_processes_that_touch_no_gpu(tmp_path, monkeypatch,
                                                                                    fused_moe_py):
    """``Precompiler`` as a worker on an H200 starts it, handed the H200's target: real processes, vLLM's kernel,
    Triton's compile to sm90 cubins in the cache. A second round of the same configs finds them all there,
    and a config Triton cannot compile comes back as a failure the search never times."""
    import time

    from triton.backends.compiler import GPUTarget

    from tuning.compile import FIRST, Precompiler
    from tuning.configs import TileConfig
    from tuning.vllm.kernel import KernelSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shape = FIRST[0]
    configs = [TileConfig(16, 64, 64, 1, 4, 3), TileConfig(32, 64, 64, 8, 4, 4)]
    pool = Precompiler(KernelSource(fused_moe_py), target=GPUTarget("cuda", 90, 32), workers=2)
    try:
        assert pool(shape, 64, configs) == {}
        cubins = sorted(tmp_path.rglob("*.cubin"))
        assert len(cubins) == 2 * 2 + 2  # w13 and w2 of each config, and of FIRST (both processes: one compile)
        t = time.monotonic()
        assert pool(shape, 64, configs) == {}
        assert time.monotonic() - t < 5 and sorted(tmp_path.rglob("*.cubin")) == cubins
        bad = TileConfig(16, 64, 48, 1, 4, 3)  # BLOCK_SIZE_K not a power of two: tl.arange refuses it
        (failure,) = pool(shape, 64, [bad]).values()
        assert failure.kind.sticky
        more = [TileConfig(16, 128, 64, 1, 4, 3), TileConfig(64, 64, 64, 1, 4, 3)]
        streamed = list(pool.stream(shape, 64, [*more, bad]))  # as each compile ends
        assert sorted(c.short for c, _ in streamed) == sorted(c.short for c in [*more, bad])
        assert {c: why is None for c, why in streamed} == {more[0]: True, more[1]: True, bad: False}
    finally:
        pool.pool.shutdown()


def test_a_pools_processes_see_the_environment_it_started_in(tmp_path, monkeypatch, fused_moe_py):
    """A pool's processes see the environment of the pool's start (its Triton cache folder): a pool started
    later, after the environment changed, sees the new one, and the first keeps its own."""
    from triton.backends.compiler import GPUTarget

    from tuning.compile import Precompiler
    from tuning.vllm.kernel import KernelSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pools = []
    try:
        for name in ("first", "second"):
            monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / name))
            pools.append(Precompiler(KernelSource(fused_moe_py), target=GPUTarget("cuda", 90, 32), workers=1))
        for pool, name in zip(pools, ("first", "second")):
            assert pool.pool.submit(os.getenv, "TRITON_CACHE_DIR").result() == str(tmp_path / name)
            assert list((tmp_path / name).rglob("*.cubin"))  # FIRST, compiled into its own pool's cache
    finally:
        for pool in pools:
            pool.pool.shutdown()


VARIANT_CHILD = r'''
import json, sys
from triton import knobs
from triton.backends.compiler import GPUTarget
from tuning import compile as pool
from tuning import launch
from tuning.configs import TileConfig
from tuning.vllm.kernel import KernelSource
from tuning.shapes import MoeShape

pool.compile_for(GPUTarget("cuda", 90, 32))  # Triton's lookups answered as on an H200; the launch is a worker's
shape, m, config = MoeShape(8, 8, 128, 256, 2, "fp8", (128, 128)), 16, TileConfig.from_short(sys.argv[2])
kernel, hits = KernelSource(sys.argv[1]).load(), []
knobs.compilation.listener = lambda *, cache_hit, **_: hits.append(bool(cache_hit))
p = pool._meta_problem(shape, m)
for capability in (90, 0):
    launch.both_gemms(kernel, p, launch.alignment(p, config.BLOCK_SIZE_M, kernel), config, capability, warmup=True)
print(json.dumps(hits))
'''


def test_the_pool_compiles_the_variant_an_h200_worker_launches(tmp_path, monkeypatch, fused_moe_py):
    """On an H200 vLLM swaps A and B for FP8 tiles of BLOCK_SIZE_M < 64 (``SWAP_AB``, another kernel): the
    pool, told only the target, must compile the kernels the worker's sm90 launch asks for. That launch
    (arguments as the timed run's, on meta tensors) then finds both in the cache; the other variant does not."""
    assert_the_pool_compiles_the_h200_variant(tmp_path, monkeypatch, fused_moe_py)


def assert_the_pool_compiles_the_h200_variant(tmp_path, monkeypatch, fused_moe_py) -> None:
    """The pool's compile for an H200 target, then a child's launch of both GEMMs as an H200 (compute capability
    90) and as no GPU (0): the first finds both kernels in the cache, the second neither (test_vllm_034: 0.34's
    sm90 launch also reads the weights through TMA descriptors)."""
    from triton.backends.compiler import GPUTarget

    from tuning import compile as pool
    from tuning import launch
    from tuning.configs import TileConfig
    from tuning.vllm.kernel import KernelSource
    from tuning.shapes import MoeShape

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shape, m, config = MoeShape(8, 8, 128, 256, 2, "fp8", (128, 128)), 16, TileConfig(16, 64, 128, 1, 4, 3)
    assert launch.swap_ab(True, config, 90) and not launch.swap_ab(True, config, 0)
    workers = pool.Precompiler(KernelSource(fused_moe_py), target=GPUTarget("cuda", 90, 32), workers=1)
    try:
        assert workers(shape, m, [config]) == {}
    finally:
        workers.pool.shutdown()
    child = tmp_path / "variant_child.py"
    child.write_text(VARIANT_CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, str(child), str(fused_moe_py), config.short], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [True, True, False, False]  # the other: compiled there


def test_a_pool_whose_process_died_hands_every_config_over_unfailed(tmp_path, monkeypatch, fused_moe_py):
    """A pool process killed (out of memory, say) breaks the pool: the search still gets every config, none
    ruled out, and the worker compiles each on its first launch, as Triton always can."""
    import signal as sig

    from triton.backends.compiler import GPUTarget

    from tuning.compile import FIRST, Precompiler
    from tuning.configs import TileConfig
    from tuning.vllm.kernel import KernelSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pool = Precompiler(KernelSource(fused_moe_py), target=GPUTarget("cuda", 90, 32), workers=1)
    try:
        (pid,) = {pool.pool.submit(os.getpid).result()}
        os.kill(pid, sig.SIGKILL)
        configs = [TileConfig(16, 64, 64, 1, 4, 3), TileConfig(32, 64, 64, 1, 4, 3)]
        assert list(pool.stream(FIRST[0], 64, configs)) == [(c, None) for c in configs]
        assert pool.broken and pool(FIRST[0], 64, configs) == {}
    finally:
        pool.pool.shutdown()


def test_a_job_times_what_a_real_pool_hands_over(tmp_path, monkeypatch, fused_moe_py):
    """``run_job`` as a worker runs it, with a real pool compiling vLLM's kernel for an H200's target (its
    processes without the interpreter) and the search timing on Triton's interpreter here: every config of
    the job went through the pool, and the job's wait on it is part of its time."""
    from triton.backends.compiler import GPUTarget

    from tuning.compile import FIRST, Precompiler
    from tuning.gpus import get_gpu
    from tuning.jobs import Job, Settings
    from tuning.vllm.kernel import KernelSource
    from tuning.workers import run_job

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pool = Precompiler(KernelSource(fused_moe_py), target=GPUTarget("cuda", 90, 32), workers=2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    settings = Settings(gpu="H200", source=KernelSource(fused_moe_py), max_evals=4)
    try:
        result = run_job(settings.source.load(), get_gpu("H200"), Job(FIRST[0], 2), settings,
                         device_name="NVIDIA_H200", worker="here", seeds=[], failures={}, precompile=pool)
    finally:
        pool.pool.shutdown()
    cubins = len(list(tmp_path.rglob("*.cubin"))) - 2  # FIRST's two
    assert result.evaluated == 4 and cubins == 2 * (result.evaluated - result.failed)
    assert 0 < result.compile_seconds < result.seconds
