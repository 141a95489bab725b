"""``tune-moe validate-serve``: serve Step-3.5-Flash with the tuned configs, prove vLLM used them, benchmark.

One run builds the recipe's ``vllm serve`` command for a layout, refuses a layout that does not fit in
memory, runs ``tune-moe preflight`` on the exact command and environment (what vLLM runs per MoE layer
kind, and which tuned file each kind reads) and refuses a serve vLLM will not start, then starts it in its
own process group with ``VLLM_TUNED_CONFIG_FOLDER`` set to the device's folder, waits for ``GET /health``,
reads the log for vLLM's config and backend lines (tuning.vllm_log), checks that they prove the tuned files
were used and agree with preflight's prediction, runs ``vllm bench serve``, always stops the whole group,
and writes report.md and report.json. ``--ab`` repeats it without the tuned folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import gpus
from . import preflight as pf
from .configs import CONFIGS_ROOT, TUNED_VAR
from .errors import UsageError
from .files import output_folder
from .fit import fit
from .models import load_model
from .shapes import DEFAULT_VLLM_VERSION, DTYPES, Refusal, parse_layout, parse_version, shape_for
from .envfile import ENV_FILE, env_file, read_env_file
from .procgroup import GATE, Interrupted, ProcessGroup, say
from .serve_checks import Preflight, check_fit, geometry_name, kind_notes, kind_phrase, run_preflight, triton_alternative
from .serve_report import METRICS, write_report
from .recipe import CHECKPOINTS, RECIPE_LABEL, RECIPE_METRICS, BenchSpec, ServeSpec
from .kernel import installed_vllm_version
from .vllm_log import (ConfigProof, MoeLogFacts, agreement, file_name_of, prove_default,
                       prove_tuned, read_log)
from .vllm_rules import ACTIVATIONS, VLLM_VERSION, ServeFacts, layer_runtime, normalize_moe_backend



@dataclass(frozen=True)
class RunOptions:
    out: Path
    log: Path | None
    timeout: float
    grace: float
    bench: BenchSpec | None  # None: --no-bench
    bench_timeout: float
    gpu: str = "<GPU>"  # for the tune-moe command a failure suggests
    poll: float = 0.5


@dataclass(frozen=True)
class RunResult:
    name: str  # "tuned" or "default"
    outcome: str  # ok | timeout | exited | proof | bench
    log: str
    healthy_after_s: float | None = None
    proof: ConfigProof | None = None
    metrics: dict = field(default_factory=dict)
    result_file: str | None = None
    problems: tuple[str, ...] = ()
    kinds: tuple[dict, ...] = ()  # per MoE layer kind: preflight's prediction against what the log shows

    def as_dict(self) -> dict:
        return {**self.__dict__, "proof": self.proof.as_dict() if self.proof else None,
                "problems": list(self.problems), "kinds": list(self.kinds)}


# -- one serve: start, wait, prove, benchmark, stop ------------------------------------------------


def health_ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(url + "/health", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(group: ProcessGroup, url: str, timeout: float, poll: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        if group.proc.poll() is not None:
            return "exited"
        if health_ok(url):
            return "healthy"
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(poll)


def serve_once(spec: ServeSpec, name: str, pre: Preflight, opts: RunOptions) -> RunResult:
    log = opts.log if (opts.log and name == "tuned") else opts.out / f"vllm-serve-{name}.log"
    say(f"starting the {name} server: {shlex.join(spec.argv())}  (log: {log})")
    started = time.monotonic()
    group = ProcessGroup(spec.argv(), spec.environ(dict(os.environ)), log, opts.grace)
    try:
        with group:
            state = wait_healthy(group, spec.url, opts.timeout, opts.poll)
            if state != "healthy":
                return _not_started(name, state, group, opts.timeout)
            result = RunResult(name, "ok", str(log), round(time.monotonic() - started, 1))
            say(f"{name} server healthy after {result.healthy_after_s:.0f} s")
            result = _prove(result, spec, pre, log, opts.gpu)
            if result.outcome == "ok" and opts.bench:
                result = _bench(result, spec, opts)
            return result
    finally:
        if group.stopped:
            say(f"{name} server stopped (process group {group.proc.pid}); nothing of it is left")


def _not_started(name: str, state: str, group: ProcessGroup, timeout: float) -> RunResult:
    why = (f"the {name} server was not healthy after {timeout:g} s; raise --timeout or read the log"
           if state == "timeout" else
           f"the {name} server exited with status {group.proc.returncode} before it was healthy; read the log")
    return RunResult(name, state, str(group.log), problems=(f"{why}: {group.log}",))


def _prove(result: RunResult, spec: ServeSpec, pre: Preflight, log: Path, gpu: str) -> RunResult:
    """The log proves the tuned files (or, for the baseline, vLLM's default) and agrees with preflight."""
    facts = read_log(log.read_text(errors="replace"))
    expected = pre.files
    if spec.tuned_folder:
        proof = prove_tuned(facts, expected, spec.tuned_folder, log, f"tune-moe --gpu {gpu} --dtype {spec.dtype}")
    else:
        proof = prove_default(facts, expected, log)
    problems = [*proof.problems, *agreement(facts, pre.predicted())]
    if spec.tuned_folder and proof.ok and not expected:
        alt = triton_alternative(pre)
        problems.append("no MoE layer kind of this serve runs the tuned Triton kernel ("
                        + "; ".join(kind_phrase(layer) for layer in pre.layers) + ")" + (f"; {alt}" if alt else ""))
    for path in proof.loaded:
        say(f"vLLM loaded {path}")
    say(f"MoE backend: {', '.join(proof.backends) or 'not reported'}")
    return replace(result, proof=proof, kinds=_per_kind(facts, pre), outcome="proof" if problems else "ok",
                   problems=tuple(problems))


def _per_kind(facts: MoeLogFacts, pre: Preflight) -> tuple[dict, ...]:
    rows = []
    for layer in pre.layers:
        seen = "-"
        if layer.file:
            path = next((p for p in facts.loaded if file_name_of(p) == layer.file), None)
            seen = f"loaded {path}" if path else "default config" if layer.file in facts.missing else "not looked up"
        rows.append({"kind": pf.KIND[layer.activation], "backend": layer.runtime.backend,
                     "backend_logged": layer.runtime.backend in facts.backend_names, "file": layer.file, "log": seen})
    return tuple(rows)


def _bench(result: RunResult, spec: ServeSpec, opts: RunOptions) -> RunResult:
    out_json = (opts.out / f"bench-{result.name}.json").absolute()
    argv = opts.bench.argv(spec, out_json)
    log = opts.out / f"bench-{result.name}.log"
    say(f"benchmarking: {shlex.join(argv)}")
    out_json.unlink(missing_ok=True)
    with ProcessGroup(argv, spec.environ(dict(os.environ)), log, opts.grace) as bench:
        code = _wait_exit(bench, opts.bench_timeout)
    metrics = _read_metrics(out_json)
    if code != 0 or metrics is None:
        why = "timed out (raise --bench-timeout)" if code is None else \
            f"exited with status {code}" if code else f"saved no result at {out_json}"
        return replace(result, outcome="bench", problems=(f"vllm bench serve {why}; read {log}",))
    say(", ".join(f"{METRICS[k]} {v:.2f}" for k, v in metrics.items() if k in RECIPE_METRICS))
    result = replace(result, metrics=metrics, result_file=str(out_json))
    if metrics.get("failed"):
        problem = f"{metrics['failed']} benchmark requests failed; read the server log {result.log}"
        return replace(result, outcome="bench", problems=(problem,))
    return result


def _wait_exit(group: ProcessGroup, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while group.proc.poll() is None:
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)
    return group.proc.returncode


def _read_metrics(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {k: data[k] for k in METRICS if isinstance(data.get(k), (int, float))} if isinstance(data, dict) else None


# -- from arguments to a spec -------------------------------------------------------------------------


def pick_gpu(key: str | None) -> gpus.GpuSpec:
    if key:
        return gpus.get_gpu(key)
    found = gpus.detect_gpus()
    spec = gpus.spec_for_name(found[0].name) if found else None
    if spec is None:
        known = ", ".join(g.key for g in gpus.CATALOGUE.values())
        raise UsageError(f"--gpu: cannot tell the GPU ({gpus.describe(found)} found); pass --gpu, one of {known}")
    return spec


def expected_files(spec: ServeSpec, gpu: gpus.GpuSpec, version: str) -> list[str]:
    """The tuned files the serve's MoE layer kinds read (--print-command, which starts nothing): vLLM 0.33's rules
    from the mirror (a run asks preflight, which asks vLLM itself); other versions by the plan's shape rule."""
    model, layout = load_model(geometry_name(spec.model, spec.dtype)), spec.layout
    shape = shape_for(model, layout, spec.dtype, version, spec.moe_backend)
    if isinstance(shape, Refusal):
        raise UsageError(f"layout {layout.name}: {shape.reason}")
    if parse_version(version) != parse_version(VLLM_VERSION):
        return [shape.file_name(gpu.device_name)]
    env = tuple(sorted((k, v) for k, v in spec.environ(dict(os.environ)).items() if k.startswith("VLLM_")))
    facts = ServeFacts(arch=gpu.arch, dtype=spec.dtype, tp=layout.tp, dp=layout.dp, ep=layout.ep,
                       moe_backend=spec.moe_backend, env=env, num_experts=model.num_experts,
                       intermediate=model.moe_intermediate_size, hidden=model.hidden_size, top_k=model.top_k)
    names = []
    for act in ACTIVATIONS:
        r = layer_runtime(facts, act)
        if r.error:
            raise UsageError(f"{pf.KIND[act]}: vLLM {version} will not start this serve ({r.error}); change "
                             "--moe-backend or the layout")
        if r.reads_tuned_file:
            names.append(pf.layer_shape(model, layout, r, spec.dtype).file_name(gpu.device_name))
    return list(dict.fromkeys(names))


def build_spec(args: argparse.Namespace, gpu: gpus.GpuSpec) -> ServeSpec:
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: unknown; use one of {', '.join(DTYPES)}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: not a TCP port; pass 1-65535")
    found = env_file(args.env_file)
    return ServeSpec(
        model=args.model or CHECKPOINTS[args.dtype], layout=parse_layout(args.layout), dtype=args.dtype,
        port=args.port, mtp=args.mtp, moe_backend=normalize_moe_backend(args.moe_backend),
        tuned_folder=Path(args.configs or CONFIGS_ROOT / gpu.device_name).absolute(),
        env=read_env_file(found, dict(os.environ)) if found else (),
        extra_args=tuple(_split(args.serve_args, "--serve-args")),
    )


def build_bench(args: argparse.Namespace) -> BenchSpec | None:
    if args.no_bench:
        return None
    for name in ("random_input", "random_output", "max_concurrency", "num_prompts"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    return BenchSpec(backend=args.bench_backend, endpoint=args.endpoint, dataset=args.dataset_name,
                     input_len=args.random_input, output_len=args.random_output,
                     max_concurrency=args.max_concurrency, num_prompts=args.num_prompts,
                     extra_args=tuple(_split(args.bench_args, "--bench-args")))


def _split(text: str | None, option: str) -> list[str]:
    try:
        return shlex.split(text or "")
    except ValueError as exc:
        raise UsageError(f"{option} {text!r}: {exc}; quote it as sh would") from None


def notes(spec: ServeSpec, expected: list[str]) -> list[str]:
    """Things the user should know before a long serve (per MoE layer kind: ``kind_notes``)."""
    out = []
    theirs = dict(spec.env).get(TUNED_VAR)
    if theirs and Path(theirs).absolute() != spec.tuned_folder:
        out.append(f"the env file sets {TUNED_VAR}={theirs}; this run uses {spec.tuned_folder} "
                   "(pass --configs to change it)")
    absent = [n for n in expected if not (spec.tuned_folder / n).is_file()]
    if absent:
        out.append(f"{spec.tuned_folder} has no {', '.join(absent)}: vLLM will use its default config and the "
                   "check will fail; its log then feeds tune-moe --from-vllm-log")
    return out


def print_notes(spec: ServeSpec, gpu: gpus.GpuSpec, expected: list[str]) -> list[str]:
    """--print-command's notes: it starts nothing and runs no preflight, so it says how to run one."""
    verdict = fit(load_model(geometry_name(spec.model, spec.dtype)), spec.layout, spec.dtype, gpu)
    out = [] if verdict.fits else [f"validate-serve will refuse this layout: {verdict.why(gpu)}"]
    command = shlex.join(["tune-moe", "preflight", "--gpu", gpu.key, "--", f"{TUNED_VAR}={spec.tuned_folder}",
                          *spec.argv()])
    return out + notes(spec, expected) + [f"what vLLM runs per MoE layer kind, and which tuned file each reads: {command}"]


def print_command(spec: ServeSpec, bench: BenchSpec | None, expected: list[str], out: Path, ab: bool) -> None:
    for name, value in spec.shown_env().items():
        print(f"# {name} is set from the env file (not shown)" if value == "<hidden>" else
              f"export {name}={shlex.quote(value)}")
    print(shlex.join(spec.argv()))
    if bench:
        print("# then, once GET /health answers 200:")
        print(shlex.join(bench.argv(spec, (out / "bench-tuned.json").absolute())))
    for name in expected:
        print(f"# vLLM must log: Using configuration from {spec.tuned_folder / name} for MoE layer.")
    if ab:
        print(f"# --ab: then the same serve and benchmark with {TUNED_VAR} unset (vLLM must log its default config)")


# -- the command --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", required=True, help="deployment layout, e.g. TP4 or DP4+EP (the recipe's two)")
    p.add_argument("--dtype", required=True, help="bf16 (stepfun-ai/Step-3.5-Flash) or fp8 (-FP8 checkpoint)")
    p.add_argument("--gpu", help="GPU model: H200, H20, H20-3e or B200 (default: this node's)")
    p.add_argument("--mtp", action="store_true", help="add the recipe's MTP speculative decoding flags")
    p.add_argument("--model", help="model to serve: local checkpoint folder or HF id (default: the dtype's checkpoint)")
    p.add_argument("--port", type=int, default=8000, help="server port (default: 8000)")
    p.add_argument("--configs", metavar="DIR", help="tuned folder (default: kernels_configs/<device_name>)")
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
    p.add_argument("--log", metavar="FILE", help="server log of the tuned run (default: <out>/vllm-serve-tuned.log)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for GET /health (default: 1800)")
    p.add_argument("--grace", type=float, default=30, help="seconds from SIGTERM to SIGKILL at teardown (default: 30)")
    p.add_argument("--ab", action="store_true", help="then serve again without the tuned folder and compare")
    p.add_argument("--no-bench", action="store_true", help="prove the configs only; skip vllm bench serve")
    b = p.add_argument_group("vllm bench serve (defaults: the recipe's)")
    b.add_argument("--bench-backend", default="vllm", help="--backend (default: vllm)")
    b.add_argument("--endpoint", default="/v1/completions", help="--endpoint (default: /v1/completions)")
    b.add_argument("--dataset-name", default="random", help="--dataset-name (default: random)")
    b.add_argument("--random-input", type=int, default=2048, help="--random-input-len (default: 2048)")
    b.add_argument("--random-output", type=int, default=1024, help="--random-output-len (default: 1024)")
    b.add_argument("--max-concurrency", type=int, default=10, help="--max-concurrency (default: 10)")
    b.add_argument("--num-prompts", type=int, default=100, help="--num-prompts (default: 100)")
    b.add_argument("--bench-args", metavar="ARGS", help="more vllm bench serve arguments, one shell-quoted string")
    b.add_argument("--bench-timeout", type=float, default=3600, help="seconds the benchmark may take (default: 3600)")


def run(args: argparse.Namespace) -> int:
    gpu = pick_gpu(args.gpu)
    spec = build_spec(args, gpu)
    bench = build_bench(args)
    version = args.vllm_version or installed_vllm_version() or DEFAULT_VLLM_VERSION
    out = Path(args.out or Path("serve-runs") / _run_name(spec, gpu))
    if not args.print_command:
        output_folder(out, "--out")
    if args.print_command:
        expected = expected_files(spec, gpu, version)
        print_command(spec, bench, expected, out, args.ab)
        for note in print_notes(spec, gpu, expected):
            sys.stderr.write(f"note: {note}\n")
        return 0
    _check_node(spec, gpu, args)
    check_fit(spec, gpu)
    pre = run_preflight(spec, gpu, version)
    say("preflight, on the exact serve command and environment (what vLLM runs per MoE layer kind):")
    print("\n".join(f"  {line}" if line else "" for line in pre.report_text().splitlines()), flush=True)
    opts = RunOptions(out, Path(args.log) if args.log else None, args.timeout, args.grace, bench, args.bench_timeout,
                      gpu.key)
    report = _report_head(spec, gpu, bench, pre, out)
    for note in report["notes"]:
        say(f"note: {note}")
    with GATE.installed():
        code = _run_all(spec, pre, opts, args.ab, report)
    path = write_report(out, report)
    say(f"{'PASS' if report['ok'] else 'FAIL'}; report: {path}")
    return code


def _run_all(spec: ServeSpec, pre: Preflight, opts: RunOptions, ab: bool, report: dict) -> int:
    try:
        runs = [serve_once(spec, "tuned", pre, opts)]
        report["runs"].append(runs[0].as_dict())
        if ab and runs[0].outcome == "ok":
            runs.append(serve_once(replace(spec, tuned_folder=None), "default", pre, opts))
            report["runs"].append(runs[1].as_dict())
    except Interrupted as exc:
        report["problems"].append(f"interrupted by {exc}; every server was stopped")
        sys.stderr.write(f"tune-moe validate-serve: interrupted by {exc}; every server was stopped\n")
        return 128 + exc.signum
    for run_ in runs:
        for problem in run_.problems:
            sys.stderr.write(f"tune-moe validate-serve: {run_.name}: {problem}\n")
        if run_.outcome in ("timeout", "exited"):
            sys.stderr.write(_tail(Path(run_.log)))
    report["ok"] = all(r.outcome == "ok" for r in runs)
    return 0 if report["ok"] else 1


def _check_node(spec: ServeSpec, gpu: gpus.GpuSpec, args: argparse.Namespace) -> None:
    env = spec.environ(dict(os.environ))
    quiet = env.get("VLLM_LOGGING_LEVEL", "INFO").upper() not in ("INFO", "DEBUG")
    if quiet or env.get("VLLM_CONFIGURE_LOGGING") == "0":
        raise UsageError("VLLM_LOGGING_LEVEL above INFO or VLLM_CONFIGURE_LOGGING=0 hides vLLM's 'Using configuration "
                         "from' line, so the check cannot pass; unset them in the shell and the env file")
    if shutil.which("vllm", path=env.get("PATH")) is None:
        raise UsageError("vllm: not on PATH; install vLLM (install/install-vllm.sh) or activate its environment")
    found = gpus.detect_gpus()
    if found:
        gpus.check_node(gpu, found)
    with socket.socket() as sock:
        sock.settimeout(1)
        if sock.connect_ex(("127.0.0.1", spec.port)) == 0:
            raise UsageError(f"--port {spec.port}: something already listens there; stop it or pass another --port")
    if args.timeout <= 0 or args.grace < 0:
        raise UsageError("--timeout must be > 0 and --grace >= 0 seconds")


def _report_head(spec: ServeSpec, gpu: gpus.GpuSpec, bench: BenchSpec | None, pre: Preflight, out: Path) -> dict:
    stand_in = [f"--model {spec.model} has no local config.json, so preflight read the MoE geometry of {pre.stand_in}"
                ] if pre.stand_in else []
    return {
        "ok": False, "model": spec.model, "dtype": spec.dtype, "layout": spec.layout.name, "mtp": spec.mtp,
        "gpu": f"{spec.layout.gpus}x{gpu.key}", "device_name": gpu.device_name, "moe_backend": spec.moe_backend,
        "tuned_folder": str(spec.tuned_folder), "expected_files": pre.files, "command": shlex.join(spec.argv()),
        "env": spec.shown_env(),
        "bench_command": shlex.join(bench.argv(spec, (out / "bench-tuned.json").absolute())) if bench else None,
        "recipe": {"label": RECIPE_LABEL, **RECIPE_METRICS}, "preflight": pre.as_dict(),
        "notes": [*stand_in, *kind_notes(pre), *notes(spec, pre.files)], "runs": [], "problems": [],
    }


def _run_name(spec: ServeSpec, gpu: gpus.GpuSpec) -> str:
    layout = spec.layout.name.lower().replace("+", "-")
    return f"{gpu.device_name}-{spec.dtype}-{layout}{'-mtp' if spec.mtp else ''}-{time.strftime('%Y%m%d-%H%M%S')}"


def _tail(log: Path, lines: int = 20) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"  | {line}\n" for line in text)
