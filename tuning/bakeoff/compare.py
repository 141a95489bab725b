"""``tune-moe compare-backends``: the block-FP8 MoE backend bake-off as vLLM runs it (see ``bakeoff``; 0.33 and 0.34).

Per layout and batch size it times one MoE layer's whole expert computation (activation quantisation,
permutation/alignment, both GEMMs, the activation, the weighted reduce) for tuned and default Triton,
DeepGEMM with UE8M0 and with float32 scales, the E8M0-off hybrid, and FlashInfer-CUTLASS where vLLM runs it,
on both layer kinds; then, per serve configuration (``backend_advice.SERVE_CONFIGS``), the time of a layer
of each kind, the fastest per range of M, and the exact serve command. ``--write-advice`` turns the result
into the data file of the release it ran, which preflight and serve read. bf16 needs no bake-off (vLLM runs Triton on Hopper).
vLLM's own CUDA ops (moe_align_block_size, silu_and_mul, moe_sum, the quantisations) run where its compiled
libraries load (``--vllm-ops``, ``vllm_ops``) and agree with the stand-ins; the header says which ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

from ..vllm import backend_advice as adv
from .. import gpus
from ..configs import default_folder
from ..errors import UsageError
from ..files import atomic_write_json, output_file
from ..models import DEFAULT_MODEL, load_model
from ..shapes import DEFAULT_VLLM_VERSION, Refusal, parse_batch_sizes, parse_layout, shape_for
from .vllm_ops import check_folder
from ..vllm.rules import ACTIVATIONS
from ..vllm.source import KNOWN_SOURCES

DEFAULT_LAYOUTS = "TP2,TP4,TP8,DP2+EP,DP4+EP,DP8+EP"
MODEL = DEFAULT_MODEL + "-FP8"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", required=True, help="H200 (Hopper: the backends vLLM picks there)")
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"FP8 layouts (default: {DEFAULT_LAYOUTS})")
    p.add_argument("--batch-sizes", help="comma list of M (default: vLLM's 18 tuning sizes)")
    p.add_argument("--configs", help="tuned Triton configs (default: kernels_configs/vllm-<major.minor of the "
                   "sources' vLLM>/<device_name>)")
    p.add_argument("--vllm-src", help="folder holding vllm/ (benchmarks/gpu_stage.sh pack-sources) or a vLLM wheel; "
                                      "default: the installed vLLM's files")
    p.add_argument("--vllm-version", help="vLLM version of --vllm-src when it cannot tell")
    p.add_argument("--deep-gemm-path", help="folder holding deep_gemm/ to import first (e.g. a copy of vllm/third_party)")
    p.add_argument("--vllm-ops", metavar="DIR", help="folder holding the _C_stable_libtorch.abi3.so and "
                   "_moe_C_stable_libtorch.abi3.so of the sources' vLLM release (benchmarks/gpu_stage.sh pack-ops, "
                   "setup-ops); default: the installed vLLM's; without them the stand-ins run")
    p.add_argument("--kinds", default="silu,swiglustep", help="MoE layer kinds to time (default: both)")
    p.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer-CUTLASS")
    p.add_argument("--flashinfer-jit", action="store_true", help="let FlashInfer's first call JIT-build its fused "
                   "MoE module when it is not built (all 248 files; default: FlashInfer is not timed then)")
    p.add_argument("--budget-ms", type=float, default=50.0, help="timing budget per measurement (default 50)")
    p.add_argument("--json-out", help="write every measurement and the per-configuration table here")
    p.add_argument("--write-advice", metavar="FILE", help="write the backend-advice data file here: FILE (when it "
                   "exists, else the committed advice of the release the bake-off ran, tuning/data/backend_advice/"
                   "vllm-X.Y.json, or a new file) with the measured layouts replaced")
    p.add_argument("--from-json", metavar="JSON", nargs="+", help="no GPU: re-read the rows of earlier --json-out files "
                   "and print their tables (and --write-advice) with the current rule")


def check_args(args: argparse.Namespace) -> tuple[list[str], list[int], tuple[str, ...]]:
    """Everything checkable before torch is imported; one line per refusal."""
    gpus.get_gpu(args.gpu)
    model = load_model(MODEL)
    names = [t.strip() for t in args.layouts.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--layouts {args.layouts!r}: names no layout; write e.g. DP4+EP,TP4")
    for name in names:
        refused = untimeable(model, parse_layout(name))
        if refused:
            raise UsageError(f"layout {name}: {refused.reason}")
    if not args.budget_ms > 0 or args.budget_ms > 10_000:
        raise UsageError(f"--budget-ms {args.budget_ms}: give milliseconds between 0 and 10000")
    if args.json_out:
        output_file(args.json_out, "--json-out")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or any(k not in ACTIVATIONS for k in kinds):
        raise UsageError(f"--kinds {args.kinds!r}: write {' or '.join(ACTIVATIONS)}, separated by commas")
    if args.vllm_src and not Path(args.vllm_src).exists():
        raise UsageError(f"--vllm-src {args.vllm_src}: no such file or folder")
    _check_advice_target(args, {name: parse_batch_sizes(args.batch_sizes) for name in names}, {"": kinds},
                         sources_release(args))
    if args.vllm_ops:
        check_folder(args.vllm_ops)
    return names, list(parse_batch_sizes(args.batch_sizes)), kinds


def untimeable(model, layout) -> Refusal | None:
    """Why the bake-off cannot time ``layout``: vLLM refuses its FP8 shape for Triton or for DeepGEMM."""
    shapes = (shape_for(model, layout, "fp8", moe_backend=backend) for backend in ("triton", "deep_gemm"))
    return next((s for s in shapes if isinstance(s, Refusal)), None)


def sources_release(args: argparse.Namespace) -> str:
    """The release whose expert paths the bake-off runs: --vllm-version, else what the sources tell (the installed
    vLLM's without --vllm-src), else the default."""
    from .vllm_helpers import VllmSource

    return adv.series(args.vllm_version or VllmSource(args.vllm_src).version() or DEFAULT_VLLM_VERSION)


def recorded_release(args: argparse.Namespace, prov: dict) -> str:
    """The release a recorded bake-off ran (its "vllm", else its kernel's sha256), or --vllm-version."""
    version = args.vllm_version or prov.get("vllm") or KNOWN_SOURCES.get(prov.get("kernel_sha256", ""))
    return adv.series(version or DEFAULT_VLLM_VERSION)


def advice_base(args: argparse.Namespace, release: str) -> Path | None:
    """What --write-advice merges into: FILE where it exists, else the committed advice of ``release`` (None where
    there is none: a new file); refused where that file holds another release's advice."""
    path = Path(args.write_advice)
    base = path if path.exists() else adv.data_file(release) if adv.data_file(release).is_file() else None
    if base is not None and adv.release_of(base) not in (None, release):
        raise UsageError(f"--write-advice {args.write_advice}: {base} holds vLLM {adv.release_of(base)}'s advice, and "
                         f"this bake-off ran vLLM {release}'s expert paths; write to {adv.data_file(release)} or a "
                         "new file")
    return base


def _check_advice_target(args: argparse.Namespace, timed: dict[str, tuple[int, ...]],
                         kinds: dict[str, tuple[str, ...] | set[str]], release: str) -> None:
    """--write-advice: a writable file, an advice file when it exists (the new entries are merged into it),
    ``kinds`` (where, as a prefix of its --kinds -> the layer kinds timed there) holding every kind a serve
    configuration's time weighs (without one no configuration has a time, and the entry would lose its advice),
    and ``timed`` (layout -> the batch sizes this run times) covering every M of each entry it replaces."""
    if not args.write_advice:
        return
    output_file(args.write_advice, "--write-advice")
    base = advice_base(args, release)
    if base is not None:
        adv.load(base)
    for where, got in kinds.items():
        left = adv.kinds_left_out(got)
        if left:
            raise UsageError(f"--write-advice: the advice weighs one layer of each kind per serve configuration, and "
                             f"{' and '.join(adv.KIND_NAMES[k] for k in left)} layers were not timed "
                             f"({where}{adv.kinds_flag(got)}); time them all (--kinds {','.join(adv.KIND_WEIGHTS)}) "
                             "or leave out --write-advice")
    gpu = gpus.get_gpu(args.gpu).key
    for name, ms in timed.items():
        left = adv.uncovered(gpu, name, ms, base)
        if left:
            every = ",".join(map(str, sorted({*ms, *left})))
            raise UsageError(f"--write-advice: {name}'s entry in {base} was also timed at "
                             f"M={','.join(map(str, left))}, and a new entry replaces the whole layout (its pick "
                             f"weighs every M); time them all (--batch-sizes {every}) or leave out --write-advice")


def serve_command(layout_name: str, config: str, folder: Path) -> str:
    """The exact serve line of one configuration (the tuned folder where a layer kind reads it)."""
    layout = parse_layout(layout_name)
    backend, env = adv.SERVE_CONFIGS[config]
    if adv.reads_tuned_file(layout, config):
        env = {**env, adv.TUNED_VAR: str(folder.resolve())}
    words = [f"{k}={v}" for k, v in env.items()] + ["vllm", "serve", MODEL, *layout.vllm_flags()]
    return " ".join(words + (["--moe-backend", backend] if backend != "auto" else []))


def load_backends(args, ctx_missing: dict):
    """DeepGEMM and FlashInfer, each or the reason it is missing."""
    from ..deepgemm.env import import_deep_gemm, locate_deep_gemm

    dg, check = import_deep_gemm(locate_deep_gemm(args.deep_gemm_path))
    if dg is None:
        ctx_missing["deepgemm"] = f"DeepGEMM not importable ({check.detail})"
    fi = None
    if args.no_flashinfer:
        ctx_missing["flashinfer"] = "skipped (--no-flashinfer)"
    else:
        try:
            from flashinfer.fused_moe import cutlass_fused_moe as fi

            from .path_flashinfer import missing_module
            why = None if args.flashinfer_jit else missing_module()
        except Exception as exc:  # not installed, or an import-time failure of its dependencies
            fi, why = None, f"FlashInfer not importable ({type(exc).__name__}: {str(exc)[:120]})"
        if why:
            fi, ctx_missing["flashinfer"] = None, why
    return dg, fi


def provenance(args, ctx, kernel, names, ms) -> dict:
    import torch
    import triton

    from . import path_flashinfer, vllm_ops

    def version(mod):
        return getattr(sys.modules.get(mod), "__version__", None)
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "gpu_name": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "vllm": kernel.vllm_version, "kernel": kernel.describe,
            "kernel_sha256": kernel.source_sha256,
            "helpers_sha256": ctx.helpers.SOURCE_SHA256, "deep_gemm": getattr(ctx.dg, "__version__", None),
            "flashinfer": version("flashinfer"), "flashinfer_build": path_flashinfer.build_record() if ctx.fi else None,
            "layouts": names, "batch_sizes": ms, "budget_ms": args.budget_ms,
            "seed": ctx.seed, "kind_weights": adv.KIND_WEIGHTS, "missing": ctx.missing,
            "vllm_ops": vllm_ops.record(ctx.ops, ctx.ops_why),
            "command": " ".join(["tune-moe", *sys.argv[1:]])}


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        return replay(args)
    names, ms, kinds = check_args(args)
    gpu = gpus.get_gpu(args.gpu)
    if not gpus.detect_gpus():
        raise UsageError("compare-backends times the MoE backends on the GPU, and this node has none; run it on a GPU node")
    import torch

    if not torch.cuda.is_available():
        raise UsageError("compare-backends needs torch with CUDA; torch sees no GPU here")
    from .. import launch
    from . import vllm_ops
    from .layer import BACKENDS, Bench, run_layout
    from ..vllm.kernel import KernelSource
    from .moe_ops import STAND_INS
    from .vllm_helpers import VllmSource, load_helpers

    src = VllmSource(args.vllm_src)
    version = args.vllm_version or src.version()
    kernel = KernelSource(src.fused_moe, version).load()
    ctx = Bench(kernel=kernel, helpers=load_helpers(src), model=load_model(MODEL),
                folder=Path(args.configs or default_folder(gpu.device_name, kernel.vllm_version or DEFAULT_VLLM_VERSION)),
                device_name=gpu.device_name,
                flush_bytes=gpu.l2_mb * 2**20 * 4, budget_ms=args.budget_ms,
                capability=launch.capability())
    ctx.ops, ctx.ops_why = vllm_ops.load(args.vllm_ops, helpers=ctx.helpers, experts=ctx.model.num_experts,
                                         top_k=ctx.model.top_k)
    ctx.dg, ctx.fi = load_backends(args, ctx.missing)

    from ..compile import Precompiler

    ctx.precompile = Precompiler(KernelSource(src.fused_moe, version))
    _header(ctx, kernel, BACKENDS, STAND_INS)
    rows, done = [], []
    try:
        for name in names:
            print(f"\n{name}:")
            run_layout(ctx, name, ms, kinds=kinds, into=rows)
            done.append(name)
            _summary(name, rows, ctx.folder)
    except KeyboardInterrupt:  # the call's time limit: keep what was measured
        print(f"\ninterrupted: finished {', '.join(done) or 'no layout'}; the rows measured so far are kept")
    prov = {**provenance(args, ctx, kernel, names, ms), "finished_layouts": done}
    return finish(args, rows, done, prov, gpu.key, adv.series(kernel.vllm_version or DEFAULT_VLLM_VERSION))


def replay(args: argparse.Namespace) -> int:
    """--from-json: the tables and advice of recorded bake-offs, each file with its own provenance."""
    gpu = gpus.get_gpu(args.gpu)
    if args.json_out:
        raise UsageError("--from-json re-reads --json-out files; give --write-advice alone")
    if args.write_advice:
        output_file(args.write_advice, "--write-advice")
    model = load_model(MODEL)
    loaded = [read_recorded(name, model) for name in args.from_json]
    check_recorded_gpu(gpu, {file: prov["gpu_name"] for file, (_, _, prov) in zip(args.from_json, loaded)})
    ran = {file: recorded_release(args, prov) for file, (_, _, prov) in zip(args.from_json, loaded)}
    if args.write_advice and len(set(ran.values())) > 1:
        raise UsageError("--from-json: these bake-offs ran different vLLM releases ("
                         + ", ".join(f"{f}: {r}" for f, r in ran.items()) + "); write each release's advice alone")
    if args.write_advice:
        _check_advice_target(args, {name: {r.m for r in rows if r.layout == name} for rows, done, _ in loaded
                                    for name in done},
                             {f"{name} in {file}: ": {r.activation for r in rows if r.layout == name}
                              for file, (rows, done, _) in zip(args.from_json, loaded) for name in done},
                             next(iter(ran.values())))
    status = 0
    for file, (rows, done, prov) in zip(args.from_json, loaded):  # each bake-off's serve lines name its release's folder
        folder = Path(args.configs or default_folder(gpu.device_name, ran[file]))
        for name in done:
            print(f"\n{name} (measured {prov.get('date', '?')}, {prov.get('command', '')}):")
            _summary(name, rows, folder)
        status = max(status, finish(args, rows, done, prov, gpu.key, ran[file]))
    return status


def read_recorded(name: str, model) -> tuple[list, list[str], dict]:
    """The rows, finished layouts and provenance of a --json-out file, every row checked: a file that is not one, or
    one with a malformed row or a layout compare-backends cannot time, is refused in one line naming the first
    problem."""
    from .layer import measured_row

    def refuse(problem: str) -> UsageError:
        return UsageError(f"--from-json {name}: {problem}; give the --json-out file a bake-off wrote, as it wrote it")

    try:
        data = json.loads(Path(name).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than Python reads
        raise UsageError(f"--from-json {name}: not a compare-backends --json-out file ({type(exc).__name__}: "
                         f"{str(exc)[:80]}); give the JSON a bake-off wrote") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or \
            not isinstance(data.get("provenance"), dict):
        raise UsageError(f"--from-json {name}: not a compare-backends --json-out file (it needs \"rows\", a list, and "
                         "\"provenance\", an object); give the JSON a bake-off wrote")
    prov = data["provenance"]
    done = prov.get("finished_layouts")
    if not isinstance(done, list) or not all(isinstance(n, str) for n in done):
        raise refuse('its provenance has no "finished_layouts" (a list of the layouts measured at every M)')
    if not isinstance(prov.get("gpu_name"), str) or not prov["gpu_name"].strip():
        raise refuse('its provenance has no "gpu_name" (the GPU it was measured on)')
    version = prov.get("vllm")
    if version is not None and not (isinstance(version, str) and re.match(r"^v?\d+\.\d+", version.strip())):
        raise refuse(f'its provenance\'s "vllm" is {version!r}, not a vLLM version such as 0.34.0')
    if not isinstance(prov.get("kernel_sha256"), (str, type(None))):
        raise refuse(f'its provenance\'s "kernel_sha256" is {prov["kernel_sha256"]!r}, not a sha256')
    layouts = prov.get("layouts") or []
    if not isinstance(layouts, list):
        raise refuse(f'its provenance\'s "layouts" is {layouts!r}, not a list of layouts')
    known: dict[str, str | None] = {}
    for n in [*layouts, *done]:
        problem = _layout_problem(n, model, known)
        if problem:
            raise refuse(f"its provenance lists the layout {n!r}, {problem}")
    rows = []
    for i, r in enumerate(data["rows"]):
        try:
            row = measured_row(r)
        except ValueError as exc:
            raise refuse(f"row {i} {exc}") from None
        problem = _layout_problem(row.layout, model, known)
        if problem:
            raise refuse(f"row {i} 'layout' is {row.layout!r}, {problem}")
        rows.append(row)
    empty = next((n for n in done if not any(r.layout == n for r in rows)), None)
    if empty is not None:
        raise refuse(f"its provenance says {empty} finished, and no row measured it")
    return rows, list(done), prov


def _layout_problem(name, model, known: dict[str, str | None]) -> str | None:
    """Why ``name`` is not an FP8 layout the bake-off times (None where it is), as ``check_args`` decides."""
    if not isinstance(name, str):
        return "not a layout name"
    if name not in known:
        try:
            layout = parse_layout(name)
        except UsageError:
            known[name] = "not a layout name such as TP4 or DP4+EP"
        else:
            refused = untimeable(model, layout)
            known[name] = (f"written {layout.name} by compare-backends" if layout.name != name else
                           f"which compare-backends cannot time ({refused.reason.split(';')[0]})" if refused else None)
    return known[name]


def check_recorded_gpu(gpu: gpus.GpuSpec, measured: dict[str, str]) -> None:
    """The GPU the --from-json files were measured on (file -> its provenance's gpu_name) is --gpu's: one GPU for
    all, by vLLM's device name (every H200-family board is an H200)."""
    names = {file: gpus.vllm_device_name(n) for file, n in measured.items()}
    if len(set(names.values())) > 1:
        raise UsageError("--from-json: these bake-offs ran on different GPUs ("
                         + ", ".join(f"{f}: {measured[f]}" for f in measured) + "); give each GPU's files alone, "
                         "with its --gpu")
    for file, name in names.items():
        if name != gpu.device_name:
            spec = gpus.spec_for_name(measured[file])
            fix = f"give --gpu {spec.key}" if spec else f"give files measured on {gpu.torch_name}"
            raise UsageError(f"--from-json {file}: measured on {measured[file]}, not on --gpu {gpu.key} "
                             f"({gpu.torch_name}); {fix}")


def finish(args, rows, done: list[str], prov: dict, gpu_key: str, release: str) -> int:
    """Write the measurements and the advice (only from layouts measured at every M); 1 when a backend failed
    its numerical check."""
    from .layer import BACKENDS
    from .moe_ops import STAND_INS

    if args.json_out:
        layouts = sorted({r.layout for r in rows})
        atomic_write_json(Path(args.json_out), {"provenance": prov, "stand_ins": STAND_INS, "backends": BACKENDS,
                                                "rows": [asdict(r) for r in rows],
                                                "configs": {n: adv.costs(rows, n) for n in layouts}})
    if args.write_advice:
        finished = [r for r in rows if r.layout in done]
        atomic_write_json(Path(args.write_advice), adv.merged(adv.entries_from(finished, gpu_key, prov),
                                                              advice_base(args, release), release), indent=1)
    bad = [r for r in rows if r.failure and r.failure.startswith("numerics")]
    return 1 if bad else 0


def _header(ctx, kernel, backends: dict, stand_ins: dict) -> None:
    print(f"{kernel.describe}; DeepGEMM {getattr(ctx.dg, '__version__', 'missing')}; FlashInfer "
          f"{'loaded' if ctx.fi else ctx.missing.get('flashinfer')}")
    print(adv.BF16 + ".")
    for name, what in backends.items():
        print(f"  {name:<15} {what}{' -- ' + ctx.missing[name.split('_')[0]] if name.split('_')[0] in ctx.missing else ''}")
    _ops_table(ctx, stand_ins)
    print("Communication (DP all-gather, reduce-scatter) is not timed; with EP each rank quantises its M/DP rows.")


def _ops_table(ctx, stand_ins: dict) -> None:
    """Which of vLLM's CUDA ops ran as vLLM's own, and for each other one its stand-in and why."""
    from .vllm_ops import status

    table = status(ctx.ops, ctx.ops_why)
    where = f"from {ctx.ops.folder}" if ctx.ops else f"not loaded: {ctx.ops_why}"
    print(f"vLLM's CUDA ops ({where}):")
    for op, why in table.items():
        print(f"  {op}: vLLM's own" if why is None else f"  {op}: stand-in, {stand_ins[op]}"
              + (f" -- {why}" if ctx.ops else ""))


def _summary(name: str, rows, folder: Path) -> None:
    mine = [r for r in rows if r.layout == name]
    errors = {}
    for r in mine:
        if r.rel_error is not None:
            errors.setdefault(r.backend, []).append(r.rel_error)
    print("  numerics, worst relative error against float over M and kinds (UE8M0 vs float32 scales): "
          + ", ".join(f"{b} {max(e):.3f}" for b, e in errors.items()))
    for r in (r for r in mine if r.failure and not r.failure.startswith("no tuned file")):
        print(f"  not timed: {r.backend} {r.activation} M={r.m}: {r.failure}")
    kinds = {r.activation for r in mine}
    if adv.kinds_left_out(kinds):  # no configuration has a time: one line, not a table of "--"
        print(f"  {adv.not_compared(kinds)}")
        return
    table = adv.costs(rows, name)
    print(f"  per serve configuration, µs of one SiLU + one SwiGLU-step layer (weights {adv.KIND_WEIGHTS}):")
    print("  " + f"{'M':>6}" + "".join(f"{c:>20}" for c in adv.SERVE_CONFIGS) + "   fastest")
    for m, per_m in table.items():
        cells = "".join(f"{v:>20.1f}" if v is not None else f"{'--':>20}" for v in per_m.values())
        print(f"  {m:>6}{cells}   {adv.fastest(per_m) or '--'}")
    for r in adv.ranges(table):
        print(f"  M {r['m_min']}-{r['m_max']}: fastest {r['fastest'] or 'none, no configuration timed'}")
    pick, bare = adv.overall(table), adv.overall(adv.costs(rows, name, standins=False))
    print(f"  overall (geometric mean over M; within {adv.TIE:.0%}, vLLM's default first): "
          f"{pick or 'none, no batch size timed every configuration'}"
          + (f"; without the stand-ins' time: {bare}" if bare and bare != pick else ""))
    for config in adv.SERVE_CONFIGS:
        print(f"    {config:<20} {serve_command(name, config, folder)}")
