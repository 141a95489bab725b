"""The main job: plan, check the node and its Triton, sweep on Ray, write vLLM's files.

Everything here runs without torch until the sweep starts, so ``--dry-run`` works on any machine.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from functools import partial
from pathlib import Path

from . import gpus, shapes
from .configs import CONFIGS_ROOT, default_folder
from .errors import UsageError
from .vllm.kernel import KernelSource, installed_fused_moe, installed_vllm_version, target_release
from .models import DEFAULT_MODEL, load_model
from .plan import Plan, format_plan, make_plan
from .provenance import Target
from .routing import Routing
from .shapes import DEFAULT_VLLM_VERSION, DTYPES
from .vllm.triton_pins import compiling_triton, mismatch, target_triton
from .vllm.source import read_signature
from .vllm.rules import normalize_moe_backend


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", required=True, help="GPU model to tune for: H200, H20, H20-3e or B200")
    p.add_argument("--dtype", required=True, help="weights: bf16 or fp8 (block FP8, the -FP8 checkpoint)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit; needs no GPU")
    p.add_argument("--num-gpus", type=int, help="GPUs per node for the plan (default: GPUs present, else 8)")
    p.add_argument("--layouts", help="comma list, e.g. TP4,DP4+EP (default: every TP/DP/EP layout the node allows)")
    p.add_argument("--batch-sizes", help="comma list of M; 'vllm' stands for vLLM's 18 tuning sizes "
                   "(default), so vllm,32768 adds a size a serve reaches (see tune-moe preflight)")
    p.add_argument("--shape", action="append", default=[], metavar="E=..,N=..",
                   help="only this shape of the plan, e.g. --shape E=72,N=1280 (repeatable)")
    p.add_argument("--from-vllm-log", metavar="LOG", help="tune exactly the shapes a vLLM log reports missing")
    p.add_argument("--model", default=None, help=f"config.json path/folder or built-in name (default: {DEFAULT_MODEL}[-FP8])")
    p.add_argument("--vllm-version", help="vLLM whose launch rules to follow (default: the installed one, else "
                   f"{DEFAULT_VLLM_VERSION})")
    p.add_argument("--moe-backend", default="auto", help="vLLM --moe-backend the serve will use (changes FP8 TP shapes)")
    p.add_argument("--out", help=f"output folder (default: {CONFIGS_ROOT}/vllm-<major.minor of the target vLLM>/"
                                         "<device_name>/)")
    p.add_argument("--strategy", default="guided", choices=("guided", "exhaustive"), help="search strategy")
    p.add_argument("--max-evals", type=int, default=120, help="guided search: most configs given a first look per job")
    p.add_argument("--vllm-src", metavar="PATH", help="take the kernel from this vLLM fused_moe.py, wheel or source "
                   "tree instead of the installed vLLM")
    p.add_argument("--routing", default="uniform", help="uniform, or zipf:<s> for skewed what-if tuning")
    p.add_argument("--seed", type=int, default=0, help="routing and weight seed")
    p.add_argument("--scope", default="gemms", choices=("gemms", "layer"),
                   help="time the two GEMM kernels (what the tile config controls) or the whole expert path")
    p.add_argument("--ray-address", help="join this Ray cluster (auto, or the head's HOST:6379) instead of starting one "
                   "(default: $RAY_ADDRESS when set, as under `ray job submit`)")
    p.add_argument("--workers", type=int, help="start at most this many Ray workers (default: one per GPU)")
    p.add_argument("--fresh", action="store_true", help="discard saved results of an earlier run in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace config files in --out that tune-moe did not write or tuned under other software")
    p.add_argument("--allow-triton-mismatch", action="store_true",
                   help="tune although this node's Triton is not the one the target vLLM runs (recorded in provenance)")
    p.add_argument("--interpret", action="store_true",
                   help="run the kernels under Triton's CPU interpreter with fake GPUs (tiny models; for testing)")


def _csv(text: str | None, option: str = "--layouts") -> list[str]:
    words = [t.strip() for t in text.split(",")] if text else []
    if any(not w for w in words) and any(words):
        raise UsageError(f"{option} {text!r}: an empty item between commas; write e.g. TP4,DP4+EP")
    return [w for w in words if w]


def build_plan(args: argparse.Namespace, found: list[gpus.DetectedGpu]) -> Plan:
    gpu = gpus.get_gpu(args.gpu)
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: unknown; use one of {', '.join(DTYPES)}")
    model = load_model(args.model or (DEFAULT_MODEL + ("-FP8" if args.dtype == "fp8" else "")))
    if args.dtype == "fp8" and model.weight_block_size is None:
        raise UsageError(f"--model {model.name} has no block-FP8 weights (quantization_config.weight_block_size); "
                         "use the -FP8 checkpoint or --dtype bf16")
    version = target_release(args.vllm_version, args.vllm_src)
    shapes.parse_version(version)
    Routing.parse(args.routing)
    backend = normalize_moe_backend(args.moe_backend)
    if args.max_evals < 1:
        raise UsageError(f"--max-evals {args.max_evals}: must be at least 1")
    if os.environ.get("VLLM_TRITON_USE_TD") not in (None, ""):
        raise UsageError("VLLM_TRITON_USE_TD is set: tune-moe times vLLM's pointer path of fused_moe_kernel, not the "
                         "tensor-descriptor path (unquantized, sm100, needs Triton's allocator); unset it to tune")
    if args.out is not None and not args.out.strip():
        raise UsageError("--out is empty (an unset variable?); pass the output folder, or drop --out for "
                         f"{CONFIGS_ROOT}/vllm-<major.minor>/<device_name>")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be at least 1")
    num_gpus = args.num_gpus if args.num_gpus is not None else (len(found) or 8)
    if num_gpus < 1:
        raise UsageError(f"--num-gpus {num_gpus}: must be at least 1")
    if args.layouts is not None and not _csv(args.layouts):
        raise UsageError(f"--layouts {args.layouts!r}: names no layout; write e.g. TP4,DP4+EP, or drop it for all")
    layouts = [shapes.parse_layout(t) for t in _csv(args.layouts)] or shapes.default_layouts(num_gpus)
    too_big = [lay.name for lay in layouts if lay.gpus > num_gpus]
    if too_big:
        raise UsageError(f"--layouts {','.join(too_big)} need more than the {num_gpus} GPUs of the node; "
                         "raise --num-gpus or pick smaller layouts")
    plan = make_plan(model, gpu, args.dtype, layouts, num_gpus, shapes.parse_batch_sizes(args.batch_sizes),
                     vllm_version=version, moe_backend=backend)
    if args.layouts and plan.refusals and not plan.shapes:
        r = plan.refusals[0]
        raise UsageError(f"layout {r.layout.name}: {r.reason}")
    return _select_shapes(plan, args)


_SHAPE = re.compile(r"^E=(\d+),N=(\d+)$")


def _select_shapes(plan: Plan, args: argparse.Namespace) -> Plan:
    if args.from_vllm_log:
        from .vllm.log import missing_config_files

        if args.layouts:
            raise UsageError("--from-vllm-log takes the shapes the log names, whatever their layout; drop --layouts "
                             "(or drop --from-vllm-log to tune those layouts)")
        names = missing_config_files(Path(args.from_vllm_log))
        logged = shapes.shapes_from_file_names(names, plan.model, plan.gpu.device_name)
        other = sorted({s.dtype for s in logged} - {plan.dtype})
        if other and not any(s.dtype == plan.dtype for s in logged):
            raise UsageError(f"--from-vllm-log names {other[0]} shapes, not {plan.dtype}; re-run with --dtype {other[0]}")
        if other:  # the log of two serves (bf16 and fp8): this run tunes the --dtype ones
            skipped = sum(s.dtype != plan.dtype for s in logged)
            print(f"--from-vllm-log: the log also names {skipped} {other[0]} shape{'s' * (skipped > 1)}, not tuned "
                  f"here; tune {'them' if skipped > 1 else 'it'} with --dtype {other[0]}\n")
            names, logged = zip(*((n, s) for n, s in zip(names, logged) if s.dtype == plan.dtype))
        runs = shapes.layouts_of(plan.model, plan.dtype, plan.vllm_version, plan.moe_backend)
        foreign = [name for name, s in zip(names, logged) if s not in runs]
        if foreign:
            raise UsageError(f"--from-vllm-log names {foreign[0]}, which no TP/DP/EP layout of {plan.model.name} runs "
                             f"under vLLM {plan.vllm_version}; pass the log of a {plan.model.name} serve (or --model)")
        plan.shapes = {s: plan.shapes.get(s) or runs[s] for s in logged}
    wanted = []
    for text in args.shape:
        m = _SHAPE.match(text.replace(" ", ""))
        if not m:
            raise UsageError(f"--shape {text!r}: write E=<experts>,N=<width>, e.g. --shape E=72,N=1280")
        wanted.append((int(m.group(1)), int(m.group(2))))
    if wanted:
        keep = {s: lay for s, lay in plan.shapes.items() if (s.num_experts, s.n) in wanted}
        if not keep:
            raise UsageError(f"--shape {' '.join(args.shape)} matches none of the plan's shapes "
                             f"({', '.join(f'E={s.num_experts},N={s.n}' for s in plan.shapes)}); see --dry-run")
        plan.shapes = keep
    return plan


def triton_target(plan: Plan, source: KernelSource, allow: bool) -> Target | None:
    """The Triton the target vLLM runs against the one this node compiles with; one line when they differ."""
    wheel = source.path if source.path and source.path.endswith(".whl") else None
    pin = target_triton(plan.vllm_version, wheel)
    if pin is None:
        return None
    compiling = compiling_triton() or "none"
    drift = mismatch(pin, compiling)
    if drift and not allow:
        raise UsageError(f"{drift}: configs tuned here would be for another compiler; install Triton {pin.triton} "
                         "(or run with PYTHONPATH pointing at it), or pass --allow-triton-mismatch to tune anyway")
    if drift:
        print(f"warning: {drift}; tuning anyway (--allow-triton-mismatch, recorded in provenance)", file=sys.stderr)
    return Target(vllm=pin.vllm, torch=pin.torch, triton=pin.triton, how=pin.how, mismatch_allowed=bool(drift))


def target_lines(plan: Plan, args: argparse.Namespace) -> list[str]:
    """What a dry run tells of the target without torch: the Triton the target vLLM runs against this node's,
    and, with --vllm-src, the kernel's parameters as the launcher's check reads them."""
    wheel = args.vllm_src if args.vllm_src and args.vllm_src.endswith(".whl") else None
    pin = target_triton(plan.vllm_version, wheel)
    compiling = compiling_triton() or "none"
    if pin is None:
        lines = [f"Triton: which Triton vLLM {plan.vllm_version} runs is not known here; a tune records this "
                 f"node's ({compiling})"]
    else:
        drift = mismatch(pin, compiling)
        here = (f"this node compiles with Triton {compiling}, so a tune here needs Triton {pin.triton} or "
                "--allow-triton-mismatch" if drift else "this node compiles with the same")
        lines = [f"Triton: vLLM {pin.vllm} runs Triton {pin.triton} (torch {pin.torch} pins it; {pin.how}); {here}"]
    if args.vllm_src:
        lines.append("Kernel: " + read_signature(Path(args.vllm_src), args.vllm_version).describe())
    else:
        installed = installed_vllm_version()
        if installed is None:
            lines.append(f"Kernel: no vLLM is installed here; a tune needs vLLM {plan.vllm_version} installed "
                         f"(install/install-vllm.sh) or --vllm-src with its fused_moe.py or wheel")
        elif shapes.parse_version(installed) != shapes.parse_version(plan.vllm_version):
            lines.append(f"Kernel: the installed vLLM is {installed}, not {plan.vllm_version}; a tune needs --vllm-src "
                         f"with vLLM {plan.vllm_version}'s fused_moe.py or wheel")
    return lines


def run(args: argparse.Namespace) -> int:
    found = [] if args.interpret else gpus.detect_gpus()  # the node's GPUs: the plan's default --num-gpus
    plan = build_plan(args, found)
    told = target_lines(plan, args) if args.dry_run else []  # a refused --vllm-src: one line, before the plan
    print(format_plan(plan))
    if plan.backend_refused and plan.moe_backend == "auto":
        raise UsageError(f"with --moe-backend auto vLLM {plan.vllm_version} runs no MoE layer of these layouts on Triton "
                         f"on {plan.gpu.key} (above), so no tuned file would be read; pass --moe-backend triton to tune "
                         "for a serve that passes it")
    if plan.backend_refused:
        raise UsageError(f"with --moe-backend {plan.moe_backend} no layout reads a Triton tuned file (above); tune for "
                         "a backend that runs vLLM's Triton kernel: auto, triton or deep_gemm")
    if not plan.shapes:
        would = "; would fit: " + ", ".join(plan.alternatives) if plan.alternatives else ""
        which = f"none of --layouts {args.layouts} fits" if args.layouts else "no layout fits"
        raise UsageError(f"{which} {plan.model.name} {plan.dtype} on {plan.num_gpus}x{plan.gpu.key}{would}")
    out = Path(args.out) if args.out else default_folder(plan.gpu.device_name, plan.vllm_version)
    from .files import output_folder

    output_folder(out, "--out")
    if args.dry_run:
        print("\n" + "\n".join(told))
        print(f"\nDry run: nothing tuned. On a node with {plan.gpu.key} GPUs, drop --dry-run to tune "
              f"(one Ray worker per GPU) and write the files to {out}/.")
        return 0
    src = args.vllm_src or (str(installed_fused_moe() or "") if args.interpret else None) or None
    source = KernelSource(src, args.vllm_version)
    target = None if args.interpret else triton_target(plan, source, args.allow_triton_mismatch)
    from .store import has_results

    # a cluster to join: --ray-address, or the one `ray job submit` (or the user) names in RAY_ADDRESS
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    # the GPUs a Ray this run starts may hand its workers (joining a cluster, its nodes decide)
    usable = [] if address else gpus.visible(found, os.environ.get("CUDA_VISIBLE_DEVICES"))
    deferred = None  # no GPU here, and the results in --out may be all the run needs: checked once jobs are left
    if not args.interpret and not address:  # joining a cluster: the driver may sit on a node without GPUs
        # (a CPU head node); each worker's GPU is checked where it runs (sweep.Driver._check_worker)
        if found or args.fresh or not has_results(out):
            gpus.check_node(plan.gpu, usable)
        else:
            deferred = partial(gpus.check_node, plan.gpu, usable)
    from .jobs import Settings
    from .sweep import Outputs, RayOptions, run_sweep

    settings = Settings(gpu=plan.gpu.key, source=source, strategy=args.strategy, routing=args.routing,
                        seed=args.seed, scope=args.scope, max_evals=args.max_evals)
    ray_options = RayOptions(address=address, address_from="--ray-address" if args.ray_address else "RAY_ADDRESS",
                             interpret=args.interpret,
                             local_gpus=(args.num_gpus or 1) if args.interpret else len(usable),
                             max_workers=args.workers)
    outs = Outputs(out=out, fresh=args.fresh, overwrite=args.overwrite, target=target)
    code = run_sweep(plan, settings, ray_options, outs, deferred)
    from .advice import serve_lines

    for line in serve_lines(plan, out):
        print(f"\nServe with the tuned configs:\n  {line}")
    return code


if __name__ == "__main__":
    from .cli import main

    sys.exit(main())
