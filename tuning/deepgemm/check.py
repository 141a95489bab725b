"""``tune-moe check-deepgemm``: is DeepGEMM usable on this GPU, correct at
Step-3.5-Flash's MoE shapes, and how fast.

Checks, in order: the environment (compute capability, nvcc, cuobjdump, a
writable JIT cache), which DeepGEMM is imported and from where, then three
FP8 GEMMs against a float reference of the unquantized inputs: dense
``fp8_gemm_nt``, grouped ``m_grouped_fp8_gemm_nt_contiguous`` and
``m_grouped_fp8_gemm_nt_masked`` at the w13 (N=2560, K=4096) and w2 (N=4096,
K=1280) shapes of one EP rank (72 experts, ~128 rows each).

This module is the command: its arguments, the run, and the report assembled
from the checks. The environment checks and locating DeepGEMM live in
``deepgemm_env``, the GEMMs (calc_diff, the quantizers, layouts, timing) in
``deepgemm_gemms``. All but ``deepgemm_gemms.gemm_checks`` need no GPU.
Without a supported GPU the GEMM checks are skipped, not failed, and the run
ends "DeepGEMM check incomplete": DeepGEMM was not verified.
Exit status: 0 when every check passed; 1 otherwise (a check failed, or the
GEMM checks could not run here); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .env import (
    Check, DeepGemmSource, count_cached_kernels, environment_checks, import_deep_gemm, locate_deep_gemm, parse_version,
)
from .gemms import GEMM_CASES, PASS_DIFF, gemm_checks, use_ue8m0
from ..errors import UsageError
from ..files import atomic_write_json, output_file
from ..gpus import spec_for_name

try:
    import torch
except ImportError:  # reported as a failed check by run()
    torch = None


# ------------------------------------------------------------------ report

SUPPORTED_GPUS = "compute capability 9.0 or 10.x: H200, B200..."


def assemble_report(checks: list[Check], context: dict[str, Any], incomplete: str = "") -> dict[str, Any]:
    """Every check with its value; ok only when there is at least one check and all passed. ``incomplete``: why
    the GEMM checks could not run on this node (no supported GPU), where they were skipped for that."""
    failed = [c.name for c in checks if c.status == "fail"]
    skipped = [c.name for c in checks if c.status == "skip"]
    return {
        "tool": "tune-moe check-deepgemm",
        "ok": bool(checks) and all(c.ok for c in checks),
        "failed": failed,
        "skipped": skipped,
        "incomplete": incomplete or None,
        **context,
        "checks": [asdict(c) for c in checks],
    }


def format_check(check: dict[str, Any]) -> str:
    value = check["value"]
    if isinstance(value, dict) and "calc_diff" in value:
        pct = f"{value['pct_of_peak']:3.0f}% of {value['peak_tflops']:.0f}" if value["pct_of_peak"] else "peak n/a"
        shape = f"m={value['m']} n={value['n']} k={value['k']}" + (
            f" x{value['groups']}" if value["groups"] > 1 else "")
        text = (f"{shape:<26} diff {value['calc_diff']:.1e} {value['time_us']:8.1f} us "
                f"{value['tflops']:6.0f} TFLOP/s ({pct}) first {value['first_call_s']:.2f} s, "
                f"cached {value['cached_call_s'] * 1e3:.2f} ms")
        text += f"  {check['detail']}" if check["detail"] else ""
    else:
        text = " ".join(str(p) for p in (value, check["detail"]) if p not in (None, ""))
    return f"{check['status'].upper():<4} {check['name']:<20} {text}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    return [format_check(c) for c in report["checks"]] + [verdict_line(report)]


def verdict_line(report: dict[str, Any]) -> str:
    """Passed; incomplete where the GEMM checks need a GPU this node lacks (with what failed besides); FAILED with
    the checks that failed, and those skipped for them."""
    if report["ok"]:
        return "DeepGEMM check passed"
    failed, skipped = report["failed"], report.get("skipped", [])
    if report.get("incomplete"):
        others = [name for name in failed if name != "gpu.capability"]
        return (f"DeepGEMM check incomplete: the GEMM checks need a supported GPU ({SUPPORTED_GPUS}), and "
                f"{report['incomplete']}; run it on the GPU node" + (f" (failed here too: {', '.join(others)})"
                                                                      if others else ""))
    if not failed:
        return f"DeepGEMM check incomplete: not run: {', '.join(skipped)}" if skipped else \
            "DeepGEMM check FAILED: no check ran"
    return f"DeepGEMM check FAILED: {', '.join(failed)}" + (f"; not run: {', '.join(skipped)}" if skipped else "")


# --------------------------------------------------------------------- CLI

def _probe_gpu() -> tuple[tuple[int, int] | None, str]:
    if torch is None:
        return None, "torch is not importable; install torch with CUDA"
    if not torch.cuda.is_available():
        return None, "no CUDA device visible to torch"
    return tuple(torch.cuda.get_device_capability()), torch.cuda.get_device_name()


def no_gpu_reason(capability: tuple[int, int] | None, device: str) -> str:
    """Why this node cannot run the GEMM checks: no GPU torch can use, or one DeepGEMM does not run on."""
    if capability is None:
        return f"this node has none ({device or 'no CUDA device visible to torch'})"
    return f"this node's {device} is sm{capability[0]}{capability[1]}"


def _context(source: DeepGemmSource | None, capability: tuple[int, int] | None, device: str,
             args: argparse.Namespace) -> dict[str, Any]:
    return {
        "gpu": {"name": device, "capability": list(capability) if capability else None,
                "scale_format": ("ue8m0" if use_ue8m0(capability) else "fp32") if capability else None},
        "deep_gemm": asdict(source) if source else None,
        "versions": {"python": sys.version.split()[0], "torch": getattr(torch, "__version__", None),
                     "torch_cuda": getattr(getattr(torch, "version", None), "cuda", None)},
        "inputs": {"experts": args.experts, "rows_per_expert": args.rows_per_expert,
                   "dense_m": args.dense_m, "reps": args.reps, "seed": args.seed, "pass_diff": PASS_DIFF},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deep-gemm-path", metavar="DIR",
                        help="put DIR (the folder holding deep_gemm/, e.g. a copy of vllm/third_party) first on sys.path")
    parser.add_argument("--json-out", metavar="FILE", help="write the full report (every check and value) as JSON")
    parser.add_argument("--jit-cache-dir", metavar="DIR", help="set DG_JIT_CACHE_DIR for this run")
    parser.add_argument("--experts", type=int, default=72, help="experts per GPU for the grouped GEMMs (default 72: EP4)")
    parser.add_argument("--rows-per-expert", type=int, default=128, help="mean rows (tokens) per expert (default 128)")
    parser.add_argument("--dense-m", type=int, default=4096, help="M of the dense GEMM (default 4096)")
    parser.add_argument("--reps", type=int, default=20,
                        help="timed launches per GEMM (CUDA-graph replays, L2 flushed); the median is reported")
    parser.add_argument("--seed", type=int, default=0)


def _validate(args: argparse.Namespace) -> None:
    for flag, value, top in (("--experts", args.experts, 288), ("--rows-per-expert", args.rows_per_expert, 65536),
                             ("--dense-m", args.dense_m, 65536), ("--reps", args.reps, 10000)):
        if not 1 <= value <= top:
            raise UsageError(f"{flag} {value}: out of range; use 1..{top}")
    if args.json_out:  # refused before any check runs, not after minutes of JIT
        output_file(args.json_out, "--json-out")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    if args.jit_cache_dir:
        os.environ["DG_JIT_CACHE_DIR"] = str(Path(args.jit_cache_dir).resolve())
    source = locate_deep_gemm(args.deep_gemm_path)
    capability, device = _probe_gpu()
    dg_version = parse_version(source.version if source else "")
    checks, cache = environment_checks(dict(os.environ), capability, device, dg_version)
    cached_before = count_cached_kernels(cache)
    module, import_check = import_deep_gemm(source)
    checks.append(import_check)
    gpu_ok = next(c.ok for c in checks if c.name == "gpu.capability")
    incomplete = "" if gpu_ok else no_gpu_reason(capability, device)
    if module is not None and gpu_ok:
        spec = spec_for_name(device)
        checks += gemm_checks(module, capability, spec.fp8_tflops if spec else None, args)
    else:
        why = f"needs a supported GPU; {incomplete}" if incomplete else \
            "needs an importable DeepGEMM (deep_gemm.import failed)"
        checks += [Check(case.name, "skip", None, why) for case in GEMM_CASES]
    context = _context(source, capability, device, args)
    context["jit_cache"] = {"dir": cache, "kernels_before": cached_before, "kernels_after": count_cached_kernels(cache)}
    report = assemble_report(checks, context, incomplete)
    print("\n".join(summary_lines(report)))
    if args.json_out:
        atomic_write_json(args.json_out, report, indent=2)
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tuning.deepgemm.check",
                                     description="verify DeepGEMM on this GPU: environment, correctness, speed")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except UsageError as exc:
        sys.stderr.write(f"tune-moe: error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
