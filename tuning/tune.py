"""The main job: plan, check the node, sweep on Ray, write vLLM's files, summarise."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

from . import gpus, shapes
from .errors import UsageError
from .inputs import Routing
from .models import DEFAULT_MODEL, load_model
from .plan import Plan, format_plan, make_plan
from .shapes import BATCH_SIZES, DEFAULT_VLLM_VERSION, DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", required=True, help="GPU model to tune for: H200, H20, H20-3e or B200")
    p.add_argument("--dtype", required=True, help="weights: bf16 or fp8 (block FP8, the -FP8 checkpoint)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit; needs no GPU")
    p.add_argument("--num-gpus", type=int, help="GPUs per node for the plan (default: GPUs present, else 8)")
    p.add_argument("--layouts", help="comma list, e.g. TP4,DP4+EP (default: every TP/DP/EP layout the node allows)")
    p.add_argument("--batch-sizes", help="comma list of M (default: vLLM's 18 tuning sizes)")
    p.add_argument("--shapes", help="only these shapes, comma list of 'E=..,N=..' prefixes of the file names")
    p.add_argument("--from-vllm-log", metavar="LOG", help="tune exactly the shapes a vLLM log reports missing")
    p.add_argument("--model", default=None, help=f"config.json path/folder or built-in name (default: {DEFAULT_MODEL}[-FP8])")
    p.add_argument("--vllm-version", help="vLLM whose launch rules to follow (default: the installed one, else "
                   f"{DEFAULT_VLLM_VERSION})")
    p.add_argument("--moe-backend", default="auto", help="vLLM --moe-backend the serve will use (changes FP8 TP shapes)")
    p.add_argument("--out", help="output folder (default: kernels_configs/<device_name>/)")
    p.add_argument("--strategy", default="guided", choices=("guided", "exhaustive"), help="search strategy")
    p.add_argument("--max-evals", type=int, default=120, help="guided search: most configs given a first look per job")
    p.add_argument("--vllm-src", metavar="PATH", help="take the kernel from this vLLM fused_moe.py, wheel or source "
                   "tree instead of the installed vLLM")
    p.add_argument("--routing", default="uniform", help="uniform, or zipf:<s> for skewed what-if tuning")
    p.add_argument("--seed", type=int, default=0, help="routing and weight seed")
    p.add_argument("--scope", default="gemms", choices=("gemms", "layer"),
                   help="time the two GEMM kernels (what the tile config controls) or the whole expert path")
    p.add_argument("--ray-address", help="join this Ray cluster (e.g. auto or ray://head:10001) instead of starting one")
    p.add_argument("--fresh", action="store_true", help="discard saved results of an earlier run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace config files in --out not written by tune-moe")
    p.add_argument("--interpret", action="store_true",
                   help="run the kernels under Triton's CPU interpreter with fake GPUs (tiny models; for testing)")


def installed_vllm_version() -> str | None:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def _batch_sizes(text: str | None) -> tuple[int, ...]:
    if not text:
        return BATCH_SIZES
    try:
        sizes = tuple(int(t) for t in _csv(text))
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r}: write positive integers separated by commas, e.g. 1,16,256") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes {text!r}: write positive integers separated by commas, e.g. 1,16,256")
    return sizes


def build_plan(args: argparse.Namespace, found: list[gpus.DetectedGpu]) -> Plan:
    gpu = gpus.get_gpu(args.gpu)
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: unknown; use one of {', '.join(DTYPES)}")
    model = load_model(args.model or (DEFAULT_MODEL + ("-FP8" if args.dtype == "fp8" else "")))
    if args.dtype == "fp8" and model.weight_block_size is None:
        raise UsageError(f"--model {model.name} has no block-FP8 weights (quantization_config.weight_block_size); "
                         "use the -FP8 checkpoint or --dtype bf16")
    version = args.vllm_version or installed_vllm_version() or DEFAULT_VLLM_VERSION
    shapes.parse_version(version)
    Routing.parse(args.routing)
    if args.max_evals < 1:
        raise UsageError(f"--max-evals {args.max_evals}: must be at least 1")
    num_gpus = args.num_gpus if args.num_gpus is not None else (len(found) or 8)
    if num_gpus < 1:
        raise UsageError(f"--num-gpus {num_gpus}: must be at least 1")
    layouts = [shapes.parse_layout(t) for t in _csv(args.layouts)] or shapes.default_layouts(num_gpus)
    too_big = [lay.name for lay in layouts if lay.gpus > num_gpus]
    if too_big:
        raise UsageError(f"--layouts {','.join(too_big)} need more than the {num_gpus} GPUs of the node; "
                         "raise --num-gpus or pick smaller layouts")
    plan = make_plan(model, gpu, args.dtype, layouts, num_gpus, _batch_sizes(args.batch_sizes), version,
                     args.moe_backend)
    if args.layouts and plan.refusals and not plan.shapes:
        r = plan.refusals[0]
        raise UsageError(f"layout {r.layout.name}: {r.reason}")
    return _select_shapes(plan, args)


def _select_shapes(plan: Plan, args: argparse.Namespace) -> Plan:
    if args.from_vllm_log:
        from .vllm_log import missing_config_files

        names = missing_config_files(Path(args.from_vllm_log))
        logged = shapes.shapes_from_file_names(names, plan.model, plan.gpu.device_name)
        other = sorted({s.dtype for s in logged} - {plan.dtype})
        if other:
            raise UsageError(f"--from-vllm-log names {other[0]} shapes, not {plan.dtype}; re-run with --dtype {other[0]}")
        plan.shapes = {s: plan.shapes.get(s, []) for s in logged}
    wanted = _csv(args.shapes)
    if wanted:
        keep = {s: lay for s, lay in plan.shapes.items() if any(plan.file_name(s).startswith(w) for w in wanted)}
        if not keep:
            raise UsageError(f"--shapes {','.join(wanted)} matches none of the plan's shapes; see --dry-run for their names")
        plan.shapes = keep
    return plan


def run(args: argparse.Namespace) -> int:
    found = [] if args.interpret else gpus.detect_gpus()
    plan = build_plan(args, found)
    print(format_plan(plan))
    if not plan.shapes:
        would = "; would fit: " + ", ".join(plan.alternatives) if plan.alternatives else ""
        raise UsageError(f"no layout of {plan.model.name} {plan.dtype} fits {plan.num_gpus}x{plan.gpu.key}{would}")
    out = Path(args.out) if args.out else Path("kernels_configs") / plan.gpu.device_name
    if args.dry_run:
        print(f"\nDry run: nothing tuned. On a node with {plan.gpu.key} GPUs, drop --dry-run to tune "
              f"(one Ray worker per GPU) and write the files to {out}/.")
        return 0
    if not args.interpret:
        gpus.check_node(plan.gpu, found)
    from .sweep import run_sweep

    return run_sweep(plan, args, out, found)


if __name__ == "__main__":
    from .cli import main

    sys.exit(main())
