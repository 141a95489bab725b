"""``validate-serve --print-command``: the environment and every command a run will execute, in order, with
the files vLLM must log; and the notes a user should read before a long serve. It starts and writes nothing."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..configs import TUNED_VAR
from ..fit import fit
from ..models import load_model
from .reduced import SERVED_CONFIG
from .recipe import ServeSpec
from .args import GMU, PAIR_ORDER, RESIDENT_FIX, RESIDENT_MEMORY, Setup, resident_shortfall
from .checks import check_emulation, expected_files, geometry_name
from .report import METRICS
from .workloads import PROFILE_SEED, STEADY, WARMUP_SEED, profiler_config


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


def expected(setup: Setup) -> list[str]:
    """The files the serve reads; a reduced serve must read the layout's (refused otherwise)."""
    spec, gpu, version = setup.spec, setup.gpu, setup.version
    if not setup.reduced:
        return expected_files(spec, gpu, version, load_model(geometry_name(spec.model, spec.dtype)))
    served = expected_files(spec, gpu, version, setup.reduced.geometry())
    full = setup.full_spec
    check_emulation(served, expected_files(full, gpu, version, load_model(full.model)), setup.reduced,
                    spec.moe_backend)
    return served


def print_command(setup: Setup, expected: list[str]) -> None:
    spec, bench, r = setup.spec, setup.bench, setup.reduced
    tuned = setup.arm_spec("tuned")  # a resident A/B's: on --port + 1, with its share of the GPU memory
    if r:
        print(f"# first writes {r.folder}/: config.json (Step-3.5-Flash's published {spec.dtype} config), "
              f"tokenizer.json, tokenizer_config.json, {SERVED_CONFIG} (config.json as vLLM sees it after the "
              "overrides: tune-moe --model takes it)")
    for name, value in spec.shown_env().items():
        print(f"# {name} is set from the env file (not shown)" if value == "<hidden>" else
              f"export {name}={shlex.quote(value)}")
    print(shlex.join(tuned.argv()))
    name = "tuned-1" if setup.pairs else "tuned"
    if bench:
        n = setup.warmup_passes
        print("# then, once GET /health answers 200, warm-up passes on other prompts (discarded), --seed "
              f"{WARMUP_SEED + 1}, {WARMUP_SEED + 2}, ...: " + (
                  f"until two in a row agree within {STEADY:.0%} on {METRICS[setup.workload.primary]} and vLLM "
                  f"compiled no kernel during the second (--jit-monitor-verbose logs each), at most {n}"
                  if n > 1 else "one (--warmup-passes 1)") + ":")
        warm = bench.warmup(1)
        warm_name = "tuned" if setup.resident else name  # a resident server is warmed once
        print(shlex.join(warm.argv(tuned, (setup.out / f"bench-{warm_name}-warmup1.json").absolute())))
        print("# then the measured pass" + (" (pair k: --seed k on both arms):" if setup.pairs else ":"))
        measured = bench.for_pair(1 if setup.pairs else None)
        print(shlex.join(measured.argv(tuned, (setup.out / f"bench-{name}.json").absolute())))
    for file in expected:
        print(f"# vLLM must log: Using configuration from {spec.tuned_folder / file} for MoE layer.")
    if setup.pairs:
        print(ab_line(setup))
    if setup.measure_share:
        delay, steps = setup.workload.profile_window()
        window = f"vLLM's torch profiler over {steps} steps after {delay}" if delay else \
            f"vLLM's torch profiler over the first {steps} steps"
        if setup.resident:
            print(f"# --measure-moe-share: both servers above carry --profiler-config (idle until asked); after the "
                  f"pairs, one profiled pass on each (--profile --seed {PROFILE_SEED} --num-prompts "
                  f"{bench.max_concurrency}), {window}; traces in {setup.profile_folder('default')} and "
                  f"{setup.profile_folder('tuned')}")
        else:
            print(f"# --measure-moe-share: then one more tuned server with --profiler-config "
                  f"{shlex.quote(profiler_config(setup.profile_folder('tuned'), setup.workload))}, and its pass with "
                  f"--profile --seed {PROFILE_SEED} --num-prompts {bench.max_concurrency}, {window}")


def ab_line(setup: Setup) -> str:
    """What --ab runs, with which servers, and so which variation it samples."""
    order = "; ".join(", ".join(PAIR_ORDER[i % 2]) for i in range(setup.pairs))
    if not setup.resident:
        return (f"# --ab --ab-servers fresh: {setup.pairs} pairs of fresh servers, one at a time, in the order {order}; "
                f"the default server has {TUNED_VAR} unset (vLLM must log its default config); this samples "
                "server-to-server variation too (a server start per run)")
    default, tuned = setup.arm_spec("default").port, setup.arm_spec("tuned").port
    return (f"# --ab --ab-servers resident: first a default server ({TUNED_VAR} unset; vLLM must log its default "
            f"config) on port {default}, then the tuned one above on port {tuned}, both with {GMU} "
            f"{RESIDENT_MEMORY}, each warmed up once (until steady); then {setup.pairs} pairs of measured passes "
            f"alternate between them in the order {order}; this samples pass-to-pass variation, not "
            f"server-to-server (--ab-servers "
            "fresh: a server start per run)")


def print_notes(setup: Setup, expected: list[str]) -> list[str]:
    """--print-command's notes: it starts nothing and runs no preflight, so it says how to run one."""
    spec, gpu = setup.spec, setup.gpu
    model = setup.reduced.geometry() if setup.reduced else load_model(geometry_name(spec.model, spec.dtype))
    verdict = fit(model, spec.layout, spec.dtype, gpu)
    out = [] if verdict.fits else [f"validate-serve will refuse this layout: {verdict.why(gpu)}"]
    shortfall = resident_shortfall(setup, model)
    out += [f"validate-serve will refuse this A/B: {shortfall}; {RESIDENT_FIX}"] if shortfall else []
    out += [setup.servers_note] if setup.servers_note else []
    served = spec.argv()
    if setup.reduced:  # a reduced folder is written by the run: preflight reads its published checkpoint's config
        served[2] = geometry_name(spec.model, spec.dtype)
    command = shlex.join(["tune-moe", "preflight", "--gpu", gpu.key, "--", f"{TUNED_VAR}={spec.tuned_folder}",
                          *served])
    return out + notes(spec, expected) + [f"what vLLM runs per MoE layer kind, and which tuned file each reads: {command}"]
