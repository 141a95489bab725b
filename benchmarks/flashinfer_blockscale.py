"""Build FlashInfer 0.7.2's SM90 CUTLASS fused-MoE module for the one path vLLM runs on a block-FP8 serve, then check it.

Usage (on the GPU machine, through benchmarks/gpu_stage.sh, whose environment puts FlashInfer, its cache and this
checkout in place: flashinfer-build, flashinfer-check; or ``build`` on a machine without a GPU through
benchmarks/build_flashinfer_aot.sh, which packs the result for ``gpu_stage.sh flashinfer-aot``):
    python3 benchmarks/flashinfer_blockscale.py build     compile, link, install as FlashInfer's AOT module
    python3 benchmarks/flashinfer_blockscale.py check     DP8+EP calls against the float reference (never builds)

Why a trimmed build. FlashInfer's own ``gen_cutlass_fused_moe_sm90_module`` compiles 248 files; 220 of them are
generated CUTLASS grouped-GEMM instantiations (``*.generated.cu``, one per dtype x tile x schedule) and did not
finish in a 30-minute session on 16 cores. vLLM's FlashInferExperts on block-FP8 weights calls FlashInfer with
``use_deepseek_fp8_block_scale=True``; on that path ``CutlassMoeFCRunner::gemm1``/``gemm2``
(fused_moe/cutlass_backend/cutlass_fused_moe_kernels.cuh) return through ``BlockScaleFC1``/``BlockScaleFC2``, which
run the DeepSeek block-scale GEMM (fp8_blockscale_gemm.cu) and never reach the grouped-GEMM launchers, and the
binding fixes that path's tactic (setRunnerProfiles: CtaShape128x16x128B; runGemmProfile returns at once). So this
build compiles every other source of the module with FlashInfer's own flags and build file, leaves the generated
files out, and makes the references to their launchers weak (``objcopy --weaken-symbols``): the library loads,
those pointers are null, and the block-scale path is the same code as in the full module. Anything else would
call a null launcher and crash, so ``check`` runs one real call first, in its own process.

Provenance lands next to the library (BUILD.json), and compare-backends records it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

LAUNCHER_MARK = "kernelLauncher"  # tma_warp_specialized_generic_moe_gemm_kernelLauncher, sm90_generic_mixed_...
DRIVER = re.compile(r"cu[A-Z]\w*")  # the CUDA driver API (cudart's are cuda*): libcuda.so.1 must be NEEDED
STUB_VAR = "FLASHINFER_BLOCKSCALE_CUDA_STUB"  # where to write libcuda.so for the link, on a machine without a driver


def cuda_stub(path: Path, functions: list[str]) -> None:
    """A link-time libcuda.so (soname libcuda.so.1) defining ``functions``: the linker records libcuda.so.1 as
    needed only when it resolves something from it (an empty stub is dropped, and the module then fails to
    load: undefined symbol cuLibraryLoadData). The driver supplies the real functions at load time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    source = path.with_suffix(".c")
    source.write_text("".join(f"int {name}(void) {{ return 999; }}\n" for name in functions))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(path), "-Wl,-soname,libcuda.so.1", str(source)], check=True)


def _symbols(objects: list[Path], *flags: str) -> set[str]:
    names: set[str] = set()
    for obj in objects:
        out = subprocess.run(["nm", "-P", *flags, str(obj)], check=True, capture_output=True, text=True).stdout
        names.update(line.split()[0] for line in out.splitlines() if line.strip())
    return names


def ninja(spec, *args: str, capture: bool = False) -> str:
    """FlashInfer's own build file (with ninja's progress lines in the log: run_ninja hides them)."""
    return subprocess.run(["ninja", "-C", str(spec.build_dir), "-f", str(spec.ninja_path), *args], check=True,
                          capture_output=capture, text=True).stdout


def build() -> int:
    from flashinfer import __version__ as fi_version
    from flashinfer.jit import env as jit_env
    from flashinfer.jit.cpp_ext import get_cuda_version
    from flashinfer.jit.fused_moe import gen_cutlass_fused_moe_sm90_module

    start = time.time()
    full = gen_cutlass_fused_moe_sm90_module()
    kept = [s for s in full.sources if not s.name.endswith(".generated.cu")]
    spec = dataclasses.replace(full, sources=kept)
    print(f"{spec.name}: {len(kept)} of {len(full.sources)} sources "
          f"({len(full.sources) - len(kept)} generated grouped-GEMM instantiations left out)", flush=True)
    spec.write_ninja()
    rules = [line.rsplit(": ", 1) for line in ninja(spec, "-t", "targets", "all", capture=True).splitlines()]
    objects = [Path(target) for target, rule in rules if rule in ("compile", "cuda_compile")]
    objects = [o if o.is_absolute() else spec.build_dir / o for o in objects]
    todo = [str(o) for o in objects if not o.exists()]
    if todo:  # only the objects not there yet: ninja rebuilds the ones weakened below (objcopy rewrote them)
        ninja(spec, "-j", os.environ.get("MAX_JOBS") or str(os.cpu_count()), *todo)
    print(f"{spec.name}: {len(objects) - len(todo)} objects were already built, {len(todo)} compiled", flush=True)
    missing = _symbols(objects, "--undefined-only") - _symbols(objects, "--defined-only")
    weak = sorted(s for s in missing if LAUNCHER_MARK in s)
    weak_list = spec.build_dir / "weakened.txt"
    weak_list.write_text("".join(s + "\n" for s in weak))
    for obj in objects:  # idempotent: a reference already weak stays weak
        subprocess.run(["objcopy", f"--weaken-symbols={weak_list}", str(obj)], check=True)
    driver = sorted(s for s in missing if DRIVER.fullmatch(s))
    if os.environ.get(STUB_VAR):
        cuda_stub(Path(os.environ[STUB_VAR]), driver)
    link = ninja(spec, "-t", "commands", str(spec.jit_library_path), capture=True).splitlines()[-1]
    spec.jit_library_path.unlink(missing_ok=True)
    subprocess.run(link, shell=True, check=True, cwd=spec.build_dir)  # the link step alone, never through ninja
    strong = [line for line in subprocess.run(["nm", "-D", "--undefined-only", str(spec.jit_library_path)],
                                              check=True, capture_output=True, text=True).stdout.splitlines()
              if LAUNCHER_MARK in line and " U " in f" {line}"]
    if strong:
        print(f"flashinfer_blockscale: {len(strong)} launcher references are still strong; not installed")
        return 1
    needed = subprocess.run(["readelf", "-d", str(spec.jit_library_path)], check=True, capture_output=True,
                            text=True).stdout
    if driver and "[libcuda.so.1]" not in needed:
        print(f"flashinfer_blockscale: the library calls the CUDA driver ({driver[0]}, ...) but does not need "
              f"libcuda.so.1, so it would not load; link against a libcuda that defines them (set {STUB_VAR}); "
              "not installed")
        return 1
    dest = Path(jit_env.FLASHINFER_AOT_DIR) / spec.name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.jit_library_path, dest / f"{spec.name}.so")
    record = {"module": spec.name, "flashinfer": fi_version, "build": "block-scale path only",
              "sources_built": len(kept), "sources_left_out": len(full.sources) - len(kept),
              "weakened_launcher_references": len(weak),
              "why": "use_deepseek_fp8_block_scale returns through BlockScaleFC1/FC2 before any grouped-GEMM "
                     "launcher (cutlass_fused_moe_kernels.cuh); benchmarks/flashinfer_blockscale.py",
              "build_seconds": round(time.time() - start), "objects_already_built": len(objects) - len(todo),
              "max_jobs": os.environ.get("MAX_JOBS"),
              "nvcc": str(get_cuda_version()), "arch": os.environ.get("FLASHINFER_CUDA_ARCH_LIST") or "this GPU's"}
    (dest / "BUILD.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{spec.name}: built in {record['build_seconds']} s, {len(weak)} launcher references weak; "
          f"installed as FlashInfer's AOT module {dest / (spec.name + '.so')}", flush=True)
    print(f"built {spec.name}")
    return 0


def check() -> int:
    os.environ["FLASHINFER_DISABLE_JIT"] = "1"  # a missing module is an error here, never a 248-file build
    import torch
    from flashinfer.fused_moe import cutlass_fused_moe

    from tuning.bakeoff.layer_inputs import batch, errors, float_weights, quantised, reference
    from tuning.bakeoff.compare import MODEL
    from tuning.models import load_model
    from tuning.bakeoff.path_flashinfer import FlashInferPath, flashinfer_weights
    from tuning.shapes import parse_layout, shape_for

    layout = parse_layout("DP8+EP")
    shape = shape_for(load_model(MODEL), layout, "fp8", moe_backend="triton")
    w = float_weights(shape, 0, "cuda")
    q = flashinfer_weights(quantised(w, (128, 128)))
    worst = 0.0
    for m in (1, 64, 512):
        b = batch(shape, m, layout.dp, 0, "cuda")
        out = FlashInferPath(cutlass_fused_moe, shape, q, b, layout).run()
        torch.cuda.synchronize()
        rel, _ = errors(out, reference(w, b, "silu"))
        print(f"  {shape.label} M={m}: relative error {rel:.4f} against the float reference")
        worst = max(worst, rel)
    ok = worst <= 0.1
    print(f"FlashInfer block-scale fused MoE: {'passes' if ok else 'FAILS'} (worst relative error {worst:.4f}, "
          f"limit 0.1)")
    return 0 if ok else 1


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("build", "check"):
        print("usage: flashinfer_blockscale.py build|check")
        sys.exit(2)
    sys.exit(build() if what == "build" else check())
