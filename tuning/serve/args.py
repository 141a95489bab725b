"""validate-serve's arguments, and what they build: the serve, the benchmark, the reduced model, the A/B.

Everything here is checked before anything is written or started; bad input is one ``UsageError`` line.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .. import gpus
from . import reduced as rd
from ..configs import CONFIGS_ROOT, default_folder
from .envfile import ENV_FILE, env_file, read_env_file
from ..errors import UsageError
from ..fit import MIN_KV_GB, RESERVED_GB, weights_per_gpu_gb
from ..models import ModelGeometry
from .recipe import CHECKPOINTS, BenchSpec, ServeSpec
from .checks import check_checkpoint, check_serve_args, no_gpu
from ..vllm.serve_command import serve_release
from ..shapes import DEFAULT_VLLM_VERSION, DTYPES, Layout, parse_layout
from ..vllm.log import JIT_VERBOSE
from ..vllm.rules import normalize_moe_backend
from .workloads import MAX_WARMUP_PASSES, STEADY, WORKLOADS, Workload, profiler_config

DEFAULT_PAIRS = 5
PAIR_ORDER = (("default", "tuned"), ("tuned", "default"))  # alternated pair by pair: drift cancels within pairs
MIN_PAIRS = 3
AB_SERVERS = ("resident", "fresh")  # both arms' servers up at once, or a fresh server for every run
ARMS = ("default", "tuned")  # resident: started in this order, on --port and --port + 1
RESIDENT_MEMORY = 0.45  # --gpu-memory-utilization of each resident server: both fit on the GPUs
GMU = "--gpu-memory-utilization"
RESIDENT_FIX = "pass --ab-servers fresh (one server at a time, at the memory vLLM chooses)"
BENCH_SIZES = ("random_input", "random_output", "max_concurrency", "num_prompts")
BENCH_FIELDS = dict(zip(BENCH_SIZES, ("input_len", "output_len", "max_concurrency", "num_prompts")))


@dataclass(frozen=True, kw_only=True)
class Setup:
    """One validate-serve run, built from the arguments."""

    gpu: gpus.GpuSpec
    version: str  # the vLLM the serve runs
    spec: ServeSpec  # the served command (a reduced serve: one GPU, the written folder)
    layout: Layout  # the layout validated (a reduced serve emulates it)
    bench: BenchSpec | None
    workload: Workload
    reduced: rd.Reduced | None
    out: Path
    pairs: int  # 0: no A/B
    measure_share: bool
    ab_servers: str = "resident"  # with pairs: "resident" (two servers up at once) or "fresh" (one per run)
    servers_note: str = ""  # why an A/B without --ab-servers runs fresh servers
    warmup_passes: int = MAX_WARMUP_PASSES  # at most, per server: until two in a row agree (1: one, unchecked)

    @property
    def resident(self) -> bool:
        return bool(self.pairs) and self.ab_servers == "resident"

    def arm_spec(self, arm: str) -> ServeSpec:
        """The server of an A/B arm: the default arm without the tuned folder; resident, on --port (default) or
        --port + 1 (tuned), each with ``RESIDENT_MEMORY`` of the GPU memory, and with --measure-moe-share vLLM's
        profiler configured (idle until the profiled pass that ends the run)."""
        spec = self.spec if arm == "tuned" else replace(self.spec, tuned_folder=None)
        if not self.resident:
            return spec
        profiler = ("--profiler-config", profiler_config(self.profile_folder(arm), self.workload)) \
            if self.measure_share else ()
        return replace(spec, port=self.spec.port + ARMS.index(arm), model_args=(*spec.model_args, *profiler),
                       extra_args=(*spec.extra_args, GMU, str(RESIDENT_MEMORY)))

    def profile_folder(self, arm: str) -> Path:
        """Where the profiled pass of an arm's server writes its trace (--measure-moe-share)."""
        return self.out / (f"profile-{arm}" if self.resident else "profile")

    @property
    def moe_calls_per_step(self) -> int:
        """Fused-MoE kernel calls in one step of the served model: the gate-up and the down GEMM per MoE layer."""
        return 2 * len(_geometry(self).moe_layers)

    @property
    def full_spec(self) -> ServeSpec:
        """The multi-GPU serve the run validates (a reduced run emulates it), without the variables only the
        reduced servers get (``reduced.env``)."""
        if not self.reduced:
            return self.spec
        return ServeSpec(model=CHECKPOINTS[self.spec.dtype], layout=self.layout, dtype=self.spec.dtype,
                         moe_backend=self.spec.moe_backend, tuned_folder=self.spec.tuned_folder, port=self.spec.port,
                         env=tuple(pair for pair in self.spec.env if pair not in self.reduced.env))


def pick_gpu(key: str | None, found: list[gpus.DetectedGpu] | None = None) -> gpus.GpuSpec:
    """--gpu, else the GPU of this node (``found``: its GPUs, detected when not given)."""
    if key:
        return gpus.get_gpu(key)
    found = gpus.detect_gpus() if found is None else found
    spec = gpus.spec_for_name(found[0].name) if found else None
    if spec is None:
        known = ", ".join(g.key for g in gpus.CATALOGUE.values())
        raise UsageError(f"--gpu: cannot tell the GPU ({gpus.describe(found)} found); pass --gpu, one of {known}")
    return spec


def build(args: argparse.Namespace, installed_version: str | None) -> Setup:
    """The run the arguments ask for; a run that starts servers on a node with no GPU and no --gpu is refused
    here, as it is with --gpu once its input is checked (``serve_checks.check_gpus``)."""
    detected = None if args.gpu or args.print_command else gpus.detect_gpus()
    if detected == []:
        raise no_gpu(None)
    gpu = pick_gpu(args.gpu, detected)
    version = args.vllm_version or installed_version or DEFAULT_VLLM_VERSION
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: unknown; use one of {', '.join(DTYPES)}")
    layout = parse_layout(args.layout)
    _check_modes(args)
    given = check_serve_args(_split(args.serve_args, "--serve-args"), args, layout, serve_release(version))
    if args.model:
        check_checkpoint(args.model, args.dtype)
    out = Path(args.out or Path("serve-runs") / _run_name(args, gpu, layout))
    found = env_file(args.env_file)
    file_env = read_env_file(found, dict(os.environ)) if found else ()
    reduced = _reduced(args, layout, out, version, file_env) if args.reduced else None
    workload = WORKLOADS[args.workload].sized(**{BENCH_FIELDS[name]: _size(args, name) for name in BENCH_SIZES})
    spec = build_spec(args, gpu, file_env, reduced, version)
    setup = Setup(gpu=gpu, version=version, spec=spec, layout=layout, bench=build_bench(args, workload, reduced),
                  workload=workload, reduced=reduced, out=out, pairs=(args.pairs or DEFAULT_PAIRS) if args.ab else 0,
                  measure_share=args.measure_moe_share, ab_servers=args.ab_servers or "resident",
                  warmup_passes=MAX_WARMUP_PASSES if args.warmup_passes is None else args.warmup_passes)
    if not setup.resident:
        return setup
    conflict = _resident_conflict(spec, given)
    if args.ab_servers is None:  # resident where both servers fit as asked, else fresh, and the run says why
        why = conflict or resident_shortfall(setup, _geometry(setup))
        return replace(setup, ab_servers="fresh", servers_note=f"fresh A/B servers, one at a time: {why}") if why \
            else setup
    if conflict:
        raise UsageError(f"{conflict}, or {RESIDENT_FIX}")
    return setup


def _geometry(setup: Setup) -> ModelGeometry:
    from ..models import load_model
    from .checks import geometry_name

    return setup.reduced.geometry() if setup.reduced else load_model(geometry_name(setup.spec.model, setup.spec.dtype))


def _check_modes(args: argparse.Namespace) -> None:
    """Options that need another option, or exclude one."""
    if args.reduced and args.model:
        raise UsageError("--model with --reduced: the reduced run serves the folder it writes (Step-3.5-Flash's "
                         "published config with dummy weights); drop --model")
    if args.reduced and args.mtp:
        raise UsageError("--mtp with --reduced: the reduced model has no MTP layers; drop --mtp")
    if args.reduced_layers is not None and not args.reduced:
        raise UsageError("--reduced-layers needs --reduced")
    if args.pairs is not None and not args.ab:
        raise UsageError("--pairs needs --ab")
    if args.ab_servers is not None and not args.ab:
        raise UsageError("--ab-servers needs --ab")
    if args.ab and args.pairs is not None and args.pairs < MIN_PAIRS:
        raise UsageError(f"--pairs {args.pairs}: an A/B needs at least {MIN_PAIRS} pairs for a confidence interval "
                         f"(default {DEFAULT_PAIRS})")
    if args.ab and args.no_bench:
        raise UsageError("--ab with --no-bench: the A/B compares benchmarks; drop --no-bench")
    if args.measure_moe_share and args.no_bench:
        raise UsageError("--measure-moe-share with --no-bench: the share is measured on a benchmark; drop --no-bench")
    if args.warmup_passes is not None and not 1 <= args.warmup_passes <= 10:
        raise UsageError(f"--warmup-passes {args.warmup_passes}: use 1 to 10 (default {MAX_WARMUP_PASSES}; 1 runs one "
                         "warm-up pass and does not check that the server is warm)")
    if args.warmup_passes is not None and args.no_bench:
        raise UsageError("--warmup-passes with --no-bench: there is no benchmark to warm up for; drop one")


def _resident_conflict(spec: ServeSpec, given: dict[str, str]) -> str | None:
    """Resident A/B servers take --port and --port + 1 and set --gpu-memory-utilization themselves; ``given``:
    the options of --serve-args, by vLLM's destination."""
    if spec.port + 1 > 65535:
        return f"--port {spec.port}: --ab-servers resident also serves on --port + 1; pass a lower --port"
    if "gpu_memory_utilization" in given:
        return (f"--serve-args sets {GMU}, which --ab-servers resident sets ({RESIDENT_MEMORY} for each of its two "
                f"servers); drop it from --serve-args")
    return None


def resident_shortfall(setup: Setup, model: ModelGeometry) -> str | None:
    """Why the two resident servers do not both fit on the GPUs at ``RESIDENT_MEMORY`` each (None: they fit); the
    fix is ``RESIDENT_FIX``."""
    if not setup.resident:
        return None
    layout, gpu = setup.spec.layout, setup.gpu
    weights = weights_per_gpu_gb(model, layout, setup.spec.dtype)
    kv = gpu.hbm_gb * RESIDENT_MEMORY - RESERVED_GB - weights
    if kv >= MIN_KV_GB:
        return None
    return (f"--ab-servers resident: two servers at {GMU} {RESIDENT_MEMORY} each do not fit: {layout.name} on "
            f"{layout.gpus}x{gpu.key}: {weights:.0f} GB weights per GPU of a {gpu.hbm_gb * RESIDENT_MEMORY:.0f} GB "
            f"budget, {kv:.0f} GB left for KV cache (needs >= {MIN_KV_GB:.0f} GB)")


def _reduced(args: argparse.Namespace, layout: Layout, out: Path, version: str,
             file_env: tuple[tuple[str, str], ...]) -> rd.Reduced:
    layers = rd.DEFAULT_LAYERS if args.reduced_layers is None else args.reduced_layers
    return rd.plan(layout, args.dtype, layers=layers, folder=out / "reduced-model", version=version,
                   moe_backend=normalize_moe_backend(args.moe_backend), given={**os.environ, **dict(file_env)})


def build_spec(args: argparse.Namespace, gpu: gpus.GpuSpec, file_env: tuple[tuple[str, str], ...],
               reduced: rd.Reduced | None = None, version: str = DEFAULT_VLLM_VERSION) -> ServeSpec:
    """The served command; ``file_env``: the node env file's variables; ``version``: the vLLM it runs, whose
    release folder of tuned files it is given unless --configs names one. A run that benchmarks has vLLM log every
    kernel compiled while serving (``--jit-monitor-verbose``): each pass reports the compiles it caused."""
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: not a TCP port; pass 1-65535")
    if args.configs and Path(args.configs).exists() and not Path(args.configs).is_dir():
        raise UsageError(f"--configs {args.configs}: is a file, not a folder; pass the folder of tuned files "
                         "(kernels_configs/vllm-<major.minor>/<device>)")
    env = file_env
    served = {"model": args.model or CHECKPOINTS[args.dtype], "layout": parse_layout(args.layout)}
    if reduced:
        served = {"model": str(reduced.folder), "layout": Layout(), "model_args": reduced.model_args()}
        env = tuple((k, v) for k, v in env if k not in dict(reduced.env)) + reduced.env
    return ServeSpec(**served, dtype=args.dtype, port=args.port, mtp=args.mtp,
                     moe_backend=normalize_moe_backend(args.moe_backend),
                     tuned_folder=Path(args.configs or default_folder(gpu.device_name, version)).absolute(), env=env,
                     extra_args=(*(() if args.no_bench else (JIT_VERBOSE,)), *_split(args.serve_args, "--serve-args")))


def build_bench(args: argparse.Namespace, workload: Workload = WORKLOADS["recipe"],
                reduced: rd.Reduced | None = None) -> BenchSpec | None:
    """The benchmark of the workload (sized by the explicit size options). A reduced serve ignores EOS (random
    weights)."""
    if args.no_bench:
        return None
    return BenchSpec(backend=args.bench_backend, endpoint=args.endpoint, dataset=args.dataset_name,
                     **{field: getattr(workload, field) for field in BENCH_FIELDS.values()},
                     ignore_eos=workload.ignore_eos or reduced is not None,
                     extra_args=tuple(_split(args.bench_args, "--bench-args")))


def _size(args: argparse.Namespace, name: str) -> int | None:
    value = getattr(args, name)
    if value is not None and value < 1:
        raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    return value


def _split(text: str | None, option: str) -> list[str]:
    try:
        return shlex.split(text or "")
    except ValueError as exc:
        raise UsageError(f"{option} {text!r}: {exc}; quote it as sh would") from None


def _run_name(args: argparse.Namespace, gpu: gpus.GpuSpec, layout: Layout) -> str:
    name = layout.name.lower().replace("+", "-")
    mode = ("-mtp" if args.mtp else "") + ("-reduced" if args.reduced else "") + ("-ab" if args.ab else "")
    return f"{gpu.device_name}-{args.dtype}-{name}{mode}-{time.strftime('%Y%m%d-%H%M%S')}"


def seconds(text: str) -> float:
    """A number of seconds above 0 (argparse type): not nan, not infinite."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def seconds_or_zero(text: str) -> float:
    """A number of seconds, 0 or more (argparse type)."""
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, 0 or more")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (finite)")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", required=True, help="deployment layout, e.g. TP4 or DP4+EP (the recipe's two)")
    p.add_argument("--dtype", required=True, help="bf16 (stepfun-ai/Step-3.5-Flash) or fp8 (-FP8 checkpoint)")
    p.add_argument("--gpu", help="GPU model: H200, H20, H20-3e or B200 (default: this node's)")
    p.add_argument("--mtp", action="store_true", help="add the recipe's MTP speculative decoding flags")
    p.add_argument("--model", help="model to serve: local checkpoint folder or HF id (default: the dtype's checkpoint)")
    p.add_argument("--port", type=int, default=8000, help="server port (default: 8000)")
    p.add_argument("--configs", metavar="DIR", help=f"tuned folder (default: {CONFIGS_ROOT}/vllm-<major.minor>/"
                   "<device_name>)")
    p.add_argument("--env-file", metavar="FILE",
                   help=f"node env file of install/node-check.sh (default: ./{ENV_FILE} if present)")
    p.add_argument("--moe-backend", default="auto",
                   help="pass --moe-backend to vLLM, e.g. triton (default: vLLM chooses per MoE layer kind)")
    p.add_argument("--vllm-version",
                   help=f"vLLM the serve runs: the shape rule of --print-command and preflight's drift check "
                        f"(default: installed, else {DEFAULT_VLLM_VERSION})")
    p.add_argument("--serve-args", metavar="ARGS", help="more vllm serve arguments, one shell-quoted string")
    p.add_argument("--print-command", action="store_true", help="print the environment and commands, then exit")
    p.add_argument("--out", metavar="DIR", help="folder for logs, results and the report (default: serve-runs/<run>)")
    p.add_argument("--log", metavar="FILE", help="server log of a single run's tuned server (default: "
                   "<out>/vllm-serve-tuned.log; an A/B writes <out>/vllm-serve-<arm>.log, with --ab-servers fresh "
                   "<out>/vllm-serve-<arm>-<pair>.log)")
    p.add_argument("--timeout", type=seconds, default=1800, help="seconds to wait for GET /health (default: 1800)")
    p.add_argument("--grace", type=seconds_or_zero, default=30,
                   help="seconds from SIGTERM to SIGKILL at teardown (default: 30)")
    p.add_argument("--no-bench", action="store_true", help="prove the configs only; skip vllm bench serve")
    r = p.add_argument_group("one GPU for a multi-GPU layout")
    r.add_argument("--reduced", action="store_true",
                   help="serve, on one GPU, a reduced Step-3.5-Flash (dummy weights, few layers, most of them MoE) "
                        "whose fused MoE runs the per-GPU shape of --layout (TP4: E=288 N=320; DP4+EP: 72 experts)")
    r.add_argument("--reduced-layers", type=int, metavar="N",
                   help=f"layers of the reduced model: layer 0 dense, the rest MoE (default: {rd.DEFAULT_LAYERS})")
    a = p.add_argument_group("A/B against vLLM's default config")
    a.add_argument("--ab", action="store_true",
                   help="interleaved pairs of measured passes without and with the tuned folder, each server warmed "
                        "up first; medians, a bootstrap interval on tuned/default and a verdict")
    a.add_argument("--pairs", type=int, metavar="N", help=f"pairs of an A/B (default: {DEFAULT_PAIRS}; at least "
                                                          f"{MIN_PAIRS})")
    a.add_argument("--ab-servers", choices=AB_SERVERS,
                   help=f"resident: one default and one tuned server up at once (--port and --port + 1, "
                        f"{GMU} {RESIDENT_MEMORY} each), started and warmed once, the pairs' passes alternating "
                        "between them: samples pass-to-pass variation, not server-to-server; fresh: a fresh server "
                        "for every run, one at a time: samples that too, at a server start per run (default: "
                        "resident where both servers fit as asked, else fresh, and the run says why)")
    a.add_argument("--measure-moe-share", action="store_true",
                   help="then one more tuned server under vLLM's torch profiler: the fused MoE's share of GPU time, "
                        "for the predicted gain (without it the share is estimated)")
    b = p.add_argument_group("vllm bench serve (each server: warm-up passes, discarded, then its measured "
                             "pass or passes)")
    b.add_argument("--warmup-passes", type=int, metavar="N",
                   help=f"warm-up passes per server, at most: they run, on prompts no measured pass sends, until two "
                        f"in a row agree within {STEADY * 100:.0f}%% on the workload's metric, so every kernel the workload "
                        f"reaches is compiled and loaded (default: {MAX_WARMUP_PASSES}; 1: one pass, unchecked)")
    b.add_argument("--workload", choices=tuple(WORKLOADS), default="recipe",
                   help="; ".join(f"{w.name}: {w.what}" for w in WORKLOADS.values()) + " (default: recipe)")
    b.add_argument("--bench-backend", default="vllm", help="--backend (default: vllm)")
    b.add_argument("--endpoint", default="/v1/completions", help="--endpoint (default: /v1/completions)")
    b.add_argument("--dataset-name", default="random", help="--dataset-name (default: random)")
    b.add_argument("--random-input", type=int, help="--random-input-len (default: the workload's)")
    b.add_argument("--random-output", type=int, help="--random-output-len (default: the workload's)")
    b.add_argument("--max-concurrency", type=int, help="--max-concurrency (default: the workload's)")
    b.add_argument("--num-prompts", type=int, help="--num-prompts (default: the workload's)")
    b.add_argument("--bench-args", metavar="ARGS", help="more vllm bench serve arguments, one shell-quoted string")
    b.add_argument("--bench-timeout", type=seconds, default=3600, help="seconds one benchmark pass may take "
                                                                      "(default: 3600)")
