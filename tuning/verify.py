"""``tune-moe verify``: load tuned files the way vLLM does, then re-time tuned vs default.

The loader is vLLM's own ``get_moe_configs`` when vLLM is importable (with the device
name it would look up), else this project's mirror of it (tuning.configs). Each batch
size is re-timed head to head on the same kernel and inputs; a tuned config more than
2% slower than vLLM's default fails the check.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import configs
from .errors import UsageError
from .gpus import get_gpu
from .routing import Routing
from .kernel import KernelSource
from .models import DEFAULT_MODEL, load_model
from .runner import Runner
from .search import head_to_head
from .shapes import MoeShape, shapes_from_file_names

REGRESSION = 0.98


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", required=True, help="H200, H20, H20-3e or B200")
    p.add_argument("--configs", help="folder of tuned files (default: kernels_configs/<device_name>)")
    p.add_argument("--files", action="append", default=[], metavar="PREFIX",
                   help="only files whose names start with PREFIX (repeatable; names hold commas)")
    p.add_argument("--batch-sizes", help="comma list of M to re-time (default: every batch size in each file)")
    p.add_argument("--model", help=f"config.json or built-in name (default: {DEFAULT_MODEL}[-FP8] by file dtype)")
    p.add_argument("--vllm-src", help="kernel from this vLLM fused_moe.py or wheel (default: installed vLLM)")
    p.add_argument("--vllm-version", help="vLLM version of --vllm-src when it cannot tell")
    p.add_argument("--interpret", action="store_true", help="Triton interpreter on the CPU (tiny models; testing)")


def load_with_vllm(folder: Path, shape: MoeShape, device_name: str) -> tuple[dict, str]:
    """What vLLM's loader returns for ``shape`` from ``folder`` (or the mirror when vLLM is absent)."""
    path = folder / shape.file_name(device_name)
    try:
        from vllm.model_executor.layers.fused_moe import fused_moe
    except ImportError:
        return configs.read_config_file(path), "tune-moe's mirror of vLLM's loader (vLLM not importable)"
    os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(folder.resolve())
    real = fused_moe.get_device_name_as_file_name
    fused_moe.get_device_name_as_file_name = lambda *a, **k: device_name
    try:
        fused_moe.get_moe_configs.cache_clear()
        block = shape.block_shape or (0, 0)
        found = fused_moe.get_moe_configs(shape.num_experts, shape.n, shape.vllm_dtype, block[0], block[1])
    finally:
        fused_moe.get_device_name_as_file_name = real
        fused_moe.get_moe_configs.cache_clear()
    if not found:
        raise UsageError(f"vLLM's loader did not find {path.name} in {folder}; check the folder and --gpu")
    return {m: configs.TileConfig.from_dict(c) for m, c in found.items()}, "vLLM's get_moe_configs"


def run(args: argparse.Namespace) -> int:
    gpu = get_gpu(args.gpu)
    folder = Path(args.configs or Path("kernels_configs") / gpu.device_name)
    names = sorted(p.name for p in folder.glob("E=*.json") if not p.name.endswith(configs.PROVENANCE_SUFFIX))
    prefixes = args.files
    names = [n for n in names if not prefixes or any(n.startswith(p) for p in prefixes)]
    if not names:
        raise UsageError(f"{folder}: no tuned config files{' matching --files' if prefixes else ''}; run tune-moe first")
    kernel = KernelSource(args.vllm_src, args.vllm_version).load()
    failures = 0
    for name in names:
        failures += _verify_file(folder, name, gpu, kernel, args)
    print(f"\n{len(names)} files, {failures} failed")
    return 1 if failures else 0


def _verify_file(folder: Path, name: str, gpu, kernel, args) -> int:
    model = load_model(args.model or (DEFAULT_MODEL + ("-FP8" if "dtype=fp8" in name else "")))
    shape = shapes_from_file_names([name], model, gpu.device_name)[0]
    loaded, loader = load_with_vllm(folder, shape, gpu.device_name)
    ours = configs.read_config_file(folder / name)
    print(f"\n{name}\n  loaded by {loader}: {len(loaded)} batch sizes")
    if loaded != ours:
        print("  FAIL: the loader returns other configs than the file holds")
        return 1
    sizes = [int(t) for t in args.batch_sizes.split(",")] if args.batch_sizes else sorted(loaded)
    bad = 0
    print(f"  {'M':>5} {'default us':>11} {'tuned us':>9} {'speedup':>8}  tuned")
    for m in sizes:
        tuned = loaded[min(loaded, key=lambda k: abs(k - m))]  # vLLM's nearest-key rule
        runner = Runner(kernel, shape, m, gpu, Routing(), seed=0)
        t, d = head_to_head(runner, tuned, runner.default_config())
        if not t.ok:
            print(f"  {m:>5} tuned config fails: {t.failure}")
            bad += 1
            continue
        speedup = d.us / t.us
        flag = "  REGRESSION" if speedup < REGRESSION else ""
        bad += bool(flag)
        print(f"  {m:>5} {d.us:>11.1f} {t.us:>9.1f} {speedup:>7.3f}x  {tuned.short}{flag}")
        del runner
    return int(bad > 0)
