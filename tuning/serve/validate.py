"""``tune-moe validate-serve``: serve Step-3.5-Flash with the tuned configs, prove vLLM used them, benchmark.

One run builds the recipe's ``vllm serve`` command for a layout (``serve_args``), refuses --serve-args that set
what the run sets or relies on, a layout that does not fit in memory and a node without its GPUs, runs
``tune-moe preflight`` on the exact command and environment and refuses a serve vLLM will not start
(``serve_checks``), then starts it in its own process group with ``VLLM_TUNED_CONFIG_FOLDER``
set, waits for ``GET /health``, reads the log for vLLM's config and backend lines (``vllm_log``), checks that
they prove the tuned files were used and agree with preflight, runs ``vllm bench serve`` (warm-up passes on
other prompts, discarded, until two in a row agree within 3%, so every kernel the workload reaches is compiled
and loaded; then the measured pass), always stops the whole group, and writes report.md and report.json (``serve_report``).

``--reduced`` serves, on one GPU, a reduced model whose fused MoE runs the per-GPU shape of the layout
(``reduced``); it must read the same tuned files as the layout. ``--ab`` runs interleaved pairs of measured
passes without and with the tuned folder (default then tuned, then tuned then default, ...) and compares them
(``ab``): by default on two resident servers, one per arm, up at once on the same GPUs (each started, proven
and warmed once; the measured passes alternate between them); with ``--ab-servers fresh`` on a fresh server
per run, one at a time. ``--measure-moe-share`` then profiles a pass on each resident server (``moe_share``: the
fused MoE's time per step on each arm, its share of the tuned server's step), or on one more tuned server.
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
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import preflight as pf
from ..errors import UsageError
from ..files import output_folder
from ..vllm.kernel import installed_vllm_version
from ..models import load_model
from .moe_share import Share, measure
from .procgroup import GATE, Interrupted, ProcessGroup, say
from .recipe import CHECKPOINTS, RECIPE_LABEL, RECIPE_METRICS, BenchSpec, ServeSpec
from .args import ARMS, PAIR_ORDER, RESIDENT_FIX, Setup, add_arguments as _add_arguments, build, resident_shortfall
from .checks import (Preflight, check_emulation, check_fit, check_gpus, expected_files, geometry_name,
                           kind_notes, kind_phrase, run_preflight, triton_alternative)
from .gain import ab_summary, in_serving, predictions
from .print_command import expected as expected_files_of, notes, print_command, print_notes
from .report import METRICS, write_report
from ..vllm.log import (ConfigProof, MoeLogFacts, agreement, file_name_of, jit_compiles, prove_default, prove_tuned,
                       read_log)
from .workloads import PROFILE_SEED, STEADY, profiler_config, steady


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
    primary: str = "output_throughput"  # the workload's metric: warm-up passes must agree on it
    warmup_passes: int = 1  # at most; 1: one warm-up pass, unchecked


@dataclass(frozen=True)
class RunResult:
    """One server's start, proof and warm-up, and one measured pass on it (a resident A/B server's passes share
    the first part: its log, proof and warm-up)."""

    name: str  # "tuned", "default", "tuned-3", "profile"
    outcome: str  # ok | timeout | exited | proof | bench
    log: str
    healthy_after_s: float | None = None
    proof: ConfigProof | None = None
    metrics: dict = field(default_factory=dict)  # the measured pass
    result_file: str | None = None
    problems: tuple[str, ...] = ()
    kinds: tuple[dict, ...] = ()  # per MoE layer kind: preflight's prediction against what the log shows
    warmup: tuple[dict, ...] = ()  # the warm-up passes, discarded
    steady: bool | None = None  # whether the last two warm-up passes agreed (None: one pass, unchecked)
    arm: str = "tuned"
    pair: int | None = None
    compiles: tuple[str, ...] = ()  # kernels vLLM's JIT monitor saw compiled during the measured pass

    def as_dict(self) -> dict:
        return {**self.__dict__, "proof": self.proof.as_dict() if self.proof else None,
                "problems": list(self.problems), "kinds": list(self.kinds), "warmup": list(self.warmup),
                "compiles": list(self.compiles)}


# -- one server: start, wait, prove, (benchmark,) stop -----------------------------------------------


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


@contextmanager
def server(spec: ServeSpec, name: str, pre: Preflight, opts: RunOptions, log: Path | None = None
           ) -> Iterator[RunResult]:
    """Start the server, wait for GET /health and prove from its log which MoE configs vLLM loaded; yields the
    result (outcome "ok", or why not); on leaving, however it is left, the whole process group is stopped."""
    log = log or opts.out / f"vllm-serve-{name}.log"
    say(f"starting the {name} server: {shlex.join(spec.argv())}  (log: {log})")
    started = time.monotonic()
    group = ProcessGroup(spec.argv(), spec.environ(dict(os.environ)), log, opts.grace)
    try:
        with group:
            state = wait_healthy(group, spec.url, opts.timeout, opts.poll)
            if state != "healthy":
                yield _not_started(name, state, group, opts.timeout)
                return
            result = RunResult(name, "ok", str(log), round(time.monotonic() - started, 1))
            say(f"{name} server healthy after {result.healthy_after_s:.0f} s")
            yield _prove(result, spec, pre, log, opts.gpu)
    finally:
        if group.stopped:
            say(f"{name} server stopped (process group {group.proc.pid}); nothing of it is left")


def serve_once(spec: ServeSpec, name: str, pre: Preflight, opts: RunOptions, log: Path | None = None,
               pair: int | None = None) -> RunResult:
    """One server: started, proven, warmed up and measured (unless --no-bench), stopped."""
    with server(spec, name, pre, opts, log) as result:
        result = replace(result, pair=pair)
        if result.outcome == "ok" and opts.bench:
            result = _measure(_warm(result, spec, opts), spec, opts)
        return result


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
        tune = f"tune-moe --gpu {gpu} --dtype {spec.dtype} --vllm-version {pre.node.vllm_version}"
        proof = prove_tuned(facts, expected, spec.tuned_folder, log, tune)
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


def _warm(result: RunResult, spec: ServeSpec, opts: RunOptions) -> RunResult:
    """Warm-up passes on prompts no measured pass sends (no prefix-cache hits later) until two in a row agree
    within ``STEADY`` on the workload's metric, at most ``opts.warmup_passes``; kept as ``warmup``, discarded."""
    passes: list[dict] = []
    agreed = None  # one pass: not checked
    for i in range(1, opts.warmup_passes + 1):
        tag = "warm-up pass" if opts.warmup_passes == 1 else f"warm-up pass {i} of at most {opts.warmup_passes}"
        warm = _bench(result, spec, opts, opts.bench.warmup(i), tag, f"warmup{i}")
        if warm.outcome != "ok":
            return replace(warm, warmup=tuple(passes))
        passes.append({**warm.metrics, "jit_compiles": list(warm.compiles)})
        if len(passes) > 1:
            agreed = steady(passes[-2], passes[-1], opts.primary) and not warm.compiles
            if agreed:
                break
    if agreed is False:
        values = ", ".join(f"{p.get(opts.primary, 0):.2f}" for p in passes)
        say(f"note: the {result.name} server's {len(passes)} warm-up passes never agreed within {STEADY:.0%} on "
            f"{METRICS[opts.primary]} ({values}) in a pass that compiled nothing; its first measured passes may "
            "still pay first-use costs")
    return replace(warm, warmup=tuple(passes), steady=agreed, metrics={}, result_file=None, compiles=())


def _measure(result: RunResult, spec: ServeSpec, opts: RunOptions) -> RunResult:
    """The measured pass, on a server that is ok and warm; an A/B's pair k sends its prompts, --seed k."""
    if result.outcome != "ok":
        return result
    return _bench(result, spec, opts, opts.bench.for_pair(result.pair), "")


def _bench(result: RunResult, spec: ServeSpec, opts: RunOptions, bench: BenchSpec, tag: str,
           suffix: str = "") -> RunResult:
    out_json = (opts.out / f"bench-{result.name}{f'-{suffix}' if suffix else ''}.json").absolute()
    argv = bench.argv(spec, out_json)
    log = out_json.with_suffix(".log")
    say(f"benchmarking{f' ({tag}, discarded)' if tag else ''}: {shlex.join(argv)}")
    out_json.unlink(missing_ok=True)
    server_log = Path(result.log)
    start = server_log.stat().st_size if server_log.exists() else 0
    with ProcessGroup(argv, spec.environ(dict(os.environ)), log, opts.grace) as group:
        code = _wait_exit(group, opts.bench_timeout)
    metrics = _read_metrics(out_json)
    compiles = tuple(jit_compiles(_read_from(server_log, start)))
    if compiles:
        say(f"vLLM compiled {len(compiles)} kernel(s) while serving this pass ({_counted(compiles)}): {server_log}")
    if code != 0 or metrics is None:
        why = "timed out (raise --bench-timeout)" if code is None else \
            f"exited with status {code}" if code else f"saved no result at {out_json}"
        return replace(result, outcome="bench", problems=(f"vllm bench serve{f' ({tag})' if tag else ''} {why}; "
                                                          f"read {log}",))
    say(", ".join(f"{METRICS[k]} {v:.2f}" for k, v in metrics.items() if k in ("output_throughput", "median_ttft_ms",
                                                                             "median_tpot_ms")))
    result = replace(result, metrics=metrics, result_file=str(out_json), compiles=compiles)
    if metrics.get("failed"):
        problem = f"{metrics['failed']} benchmark requests failed; read the server log {result.log}"
        return replace(result, outcome="bench", problems=(problem,))
    return result


def _read_from(log: Path, offset: int) -> str:
    try:
        with log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _counted(names: tuple[str, ...]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in Counter(names).items())


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


# -- the runs: one serve, or an A/B of pairs; then the profiled serve ---------------------------------


def _run_all(setup: Setup, pre: Preflight, opts: RunOptions, report: dict) -> int:
    runs: list[RunResult] = []
    try:
        if setup.resident:
            _run_resident_pairs(setup, pre, opts, report, runs)
        elif setup.pairs:
            _run_pairs(setup, pre, opts, report, runs)
        else:
            _record(serve_once(setup.spec, "tuned", pre, opts, opts.log), report, runs)
        if setup.measure_share and not setup.resident and all(r.outcome == "ok" for r in runs):
            _record(_profiled(setup, pre, opts, report), report, runs)
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
    if setup.pairs and report["ok"]:
        report["ab"] = ab_summary(setup, report["runs"])
    if report["ok"] and setup.bench:
        measured = report.get("moe_share")
        predicted = predictions(setup, pre, Share(**measured) if measured else None)
        report["prediction"] = {**predicted, "serving": in_serving(report.get("moe_profile", {}), report.get("ab"),
                                                                   setup.workload.phase, predicted["m"])}
    if report.get("ab"):
        say(report["ab"]["verdict"])
    return 0 if report["ok"] else 1


def _record(run_: RunResult, report: dict, runs: list[RunResult]) -> RunResult:
    runs.append(run_)
    report["runs"].append(run_.as_dict())
    return run_


def _run_pairs(setup: Setup, pre: Preflight, opts: RunOptions, report: dict, runs: list[RunResult]) -> None:
    """--ab-servers fresh: interleaved pairs, a fresh server per run, one at a time: default then tuned, then
    tuned then default, ..."""
    for pair in range(1, setup.pairs + 1):
        for arm in PAIR_ORDER[(pair - 1) % 2]:
            say(f"pair {pair} of {setup.pairs}: {arm}")
            run_ = serve_once(setup.arm_spec(arm), f"{arm}-{pair}", pre, opts, pair=pair)
            if _record(replace(run_, arm=arm, pair=pair), report, runs).outcome != "ok":
                return


def _run_resident_pairs(setup: Setup, pre: Preflight, opts: RunOptions, report: dict, runs: list[RunResult]) -> None:
    """--ab-servers resident: the default server, then the tuned one, both left running, each proven and warmed
    up; then the pairs' measured passes alternate between them in the order of fresh pairs; then both stop."""
    with ExitStack() as running:
        up: dict[str, tuple[ServeSpec, RunResult]] = {}
        for arm in ARMS:
            spec = setup.arm_spec(arm)
            result = running.enter_context(server(spec, arm, pre, opts))
            result = replace(_warm(result, spec, opts) if result.outcome == "ok" else result, arm=arm)
            up[arm] = (spec, result)
            if result.outcome != "ok":  # record the servers started so far: their proofs, and the problem
                for _, started in up.values():
                    _record(started, report, runs)
                return
        for pair in range(1, setup.pairs + 1):
            for arm in PAIR_ORDER[(pair - 1) % 2]:
                spec, warm = up[arm]
                say(f"pair {pair} of {setup.pairs}: {arm} (port {spec.port})")
                run_ = _measure(replace(warm, name=f"{arm}-{pair}", pair=pair), spec, opts)
                if _record(run_, report, runs).outcome != "ok":
                    return
        if setup.measure_share:
            for arm in ARMS:
                spec, warm = up[arm]
                say(f"profiled pass: {arm} (port {spec.port})")
                run_ = _bench(replace(warm, name=f"profile-{arm}", arm="profile"), spec, opts, _profile_bench(opts), "")
                if _record(_with_share(run_, setup, arm, report), report, runs).outcome != "ok":
                    return


def _profiled(setup: Setup, pre: Preflight, opts: RunOptions, report: dict) -> RunResult:
    """One more tuned server under vLLM's torch profiler; a profiled pass of one wave of requests."""
    spec = replace(setup.spec, model_args=(*setup.spec.model_args, "--profiler-config",
                                           profiler_config(setup.profile_folder("tuned"), setup.workload)))
    result = serve_once(spec, "profile", pre, replace(opts, bench=_profile_bench(opts)))
    return _with_share(replace(result, arm="profile"), setup, "tuned", report)


def _profile_bench(opts: RunOptions) -> BenchSpec:
    """The profiled pass: one wave of requests on prompts no other pass sent, /start_profile and /stop_profile
    around it."""
    return replace(opts.bench, profile=True, seed=PROFILE_SEED, num_prompts=opts.bench.max_concurrency)


def _with_share(result: RunResult, setup: Setup, arm: str, report: dict) -> RunResult:
    """The profiled pass's trace, read per step: the fused MoE's time and share (report's moe_share is the tuned
    server's; moe_profile has every profiled arm's)."""
    if result.outcome != "ok":
        return result
    folder = setup.profile_folder(arm)
    share = measure(folder, setup.moe_calls_per_step)
    if share is None:
        return replace(result, outcome="bench", problems=(f"vLLM's profiler wrote no GPU kernel trace under "
                                                          f"{folder}; read {result.log}",))
    report.setdefault("moe_profile", {})[arm] = share.__dict__
    if arm == "tuned":
        report["moe_share"] = share.__dict__
    return result


# -- the command --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    _add_arguments(p)


def run(args: argparse.Namespace) -> int:
    setup = build(args, installed_vllm_version())
    if args.print_command:
        expected = expected_files_of(setup)
        print_command(setup, expected)
        for note in print_notes(setup, expected):
            sys.stderr.write(f"note: {note}\n")
        return 0
    output_folder(setup.out, "--out")
    spec, gpu = setup.spec, setup.gpu
    check_fit(spec, gpu, setup.reduced)
    shortfall = resident_shortfall(setup, setup.reduced.geometry() if setup.reduced else
                                   load_model(geometry_name(spec.model, spec.dtype)))
    if shortfall:
        raise UsageError(f"{shortfall}; nothing was started; {RESIDENT_FIX}")
    _check_node(setup, args)
    pre = run_preflight(spec, gpu, setup.version)
    if setup.reduced:
        full = setup.full_spec
        check_emulation(pre.files, expected_files(full, gpu, setup.version, load_model(full.model)), setup.reduced,
                        spec.moe_backend)
    say("preflight, on the exact serve command and environment (what vLLM runs per MoE layer kind):")
    print("\n".join(f"  {line}" if line else "" for line in pre.report_text().splitlines()), flush=True)
    opts = RunOptions(setup.out, Path(args.log) if args.log else None, args.timeout, args.grace, setup.bench,
                      args.bench_timeout, gpu.key, primary=setup.workload.primary, warmup_passes=setup.warmup_passes)
    report = _report_head(setup, pre)
    for note in report["notes"]:
        say(f"note: {note}")
    if setup.reduced:
        say(f"wrote the reduced model: {', '.join(str(p) for p in setup.reduced.write())}")
    with GATE.installed():
        code = _run_all(setup, pre, opts, report)
    path = write_report(setup.out, report)
    say(f"{'PASS' if report['ok'] else 'FAIL'}; report: {path}")
    return code


def _check_node(setup: Setup, args: argparse.Namespace) -> None:
    """What the node must have for the serve: vLLM's INFO lines, ``vllm``, the GPUs, the port."""
    spec, gpu = setup.spec, setup.gpu
    env = spec.environ(dict(os.environ))
    quiet = env.get("VLLM_LOGGING_LEVEL", "INFO").upper() not in ("INFO", "DEBUG")
    if quiet or env.get("VLLM_CONFIGURE_LOGGING") == "0":
        raise UsageError("VLLM_LOGGING_LEVEL above INFO or VLLM_CONFIGURE_LOGGING=0 hides vLLM's 'Using configuration "
                         "from' line, so the check cannot pass; unset them in the shell and the env file")
    if shutil.which("vllm", path=env.get("PATH")) is None:
        raise UsageError("vllm: not on PATH; install vLLM (install/install-vllm.sh) or activate its environment")
    check_gpus(gpu, spec.layout, env)
    for arm in ARMS if setup.resident else ("tuned",):
        port = setup.arm_spec(arm).port
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                which = f"--port {port}" if port == spec.port else f"--port + 1 ({port}, the resident tuned server's)"
                raise UsageError(f"{which}: something already listens there; stop it or pass another --port")


def _report_head(setup: Setup, pre: Preflight) -> dict:
    spec, gpu, bench, r = setup.spec, setup.gpu, setup.bench, setup.reduced
    stand_in = [f"--model {spec.model} has no local config.json, so preflight read the MoE geometry of {pre.stand_in}"
                ] if pre.stand_in and not r else []
    layout = f"{setup.layout.name} (reduced, one GPU)" if r else setup.layout.name
    first = "tuned-1" if setup.pairs else "tuned"
    tuned = setup.arm_spec("tuned")  # a resident A/B's tuned server: --port + 1, its share of the GPU memory
    return {
        "ok": False, "model": CHECKPOINTS[spec.dtype] if r else spec.model, "dtype": spec.dtype, "layout": layout,
        "mtp": spec.mtp, "gpu": f"{spec.layout.gpus}x{gpu.key}", "device_name": gpu.device_name,
        "moe_backend": spec.moe_backend, "vllm_version": setup.version,
        "tuned_folder": str(spec.tuned_folder), "expected_files": pre.files, "command": shlex.join(tuned.argv()),
        "env": spec.shown_env(), "workload": setup.workload.as_dict(),
        "ab_servers": setup.ab_servers if setup.pairs else None,
        "bench_command": shlex.join(bench.argv(tuned, (setup.out / f"bench-{first}.json").absolute())) if bench else None,
        "reduced": r.as_dict() if r else None, "recipe": {"label": RECIPE_LABEL, **RECIPE_METRICS},
        "preflight": pre.as_dict(),
        "notes": [*stand_in, *kind_notes(pre), *notes(spec, pre.files), *filter(None, [setup.servers_note])],
        "runs": [], "problems": [],
    }


def _tail(log: Path, lines: int = 20) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"  | {line}\n" for line in text)

