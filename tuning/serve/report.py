"""validate-serve's report: ``report.json`` (everything) and ``report.md`` (the proof per MoE layer kind, the
benchmark against the recipe's numbers, a reduced model's scope, an A/B's servers, pairs, interval and verdict,
and the predicted gain against the measured one), written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write_text
from .recipe import RECIPE_LABEL, RECIPE_METRICS
from .workloads import STEADY, WARMUP_SEED

# Keys of vLLM's result JSON kept in the report, with their labels.
METRICS = {"output_throughput": "output tok/s", "mean_tpot_ms": "mean TPOT (ms)", "mean_ttft_ms": "mean TTFT (ms)",
           "median_tpot_ms": "median TPOT (ms)", "p99_tpot_ms": "P99 TPOT (ms)", "median_ttft_ms": "median TTFT (ms)",
           "p99_ttft_ms": "P99 TTFT (ms)", "total_token_throughput": "total tok/s", "completed": "completed",
           "failed": "failed", "duration": "duration (s)"}
COUNTS = ("completed", "failed", "duration")  # reported, not compared


def write_report(out: Path, report: dict) -> Path:
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report))
    return out / "report.md"


def render_markdown(report: dict) -> str:
    verdict = "PASS" if report["ok"] else "FAIL"
    lines = [f"# validate-serve: {report['model']} {report['dtype']} {report['layout']}"
             f"{' +MTP' if report['mtp'] else ''} on {report['gpu']}: {verdict}", "",
             f"- command: `{report['command']}`", f"- tuned folder: `{report['tuned_folder']}`",
             f"- expected config files: {', '.join(f'`{n}`' for n in report['expected_files']) or 'none'}", ""]
    lines += _reduced_section(report["reduced"]) if report.get("reduced") else []
    pre = report["preflight"]
    lines += ["## Preflight: what vLLM runs per MoE layer kind", "",
              "Before the serve started, `tune-moe preflight` ran on the exact command and environment"
              + (f" (the MoE geometry read from {pre['stand_in']})" if pre["stand_in"] else "") + ":", "",
              "```text", pre["text"], "```", ""]
    lines += ["## Proof from vLLM's log", "", "| run | outcome | MoE backend | loaded | default config for | log |",
              "|---|---|---|---|---|---|"]
    for run in report["runs"]:
        proof = run["proof"] or {"backends": [], "loaded": [], "missing": []}
        lines.append(f"| {run['name']} | {run['outcome']} | {', '.join(proof['backends']) or '-'} | "
                     f"{'<br>'.join(proof['loaded']) or '-'} | {', '.join(proof['missing']) or '-'} | {run['log']} |")
    kinds = [(run["name"], k) for run in report["runs"] for k in run["kinds"]]
    if kinds:
        lines += ["", "Per MoE layer kind, preflight's prediction against vLLM's log:", "",
                  "| run | layer kind | backend (preflight) | in vLLM's log | tuned file (preflight) | vLLM's log |",
                  "|---|---|---|---|---|---|"]
        for name, k in kinds:
            file = f"`{k['file']}`" if k["file"] else "reads none"
            lines.append(f"| {name} | {k['kind']} | {k['backend']} | {'yes' if k['backend_logged'] else 'NO'} | "
                         f"{file} | {k['log']} |")
    problems = [f"- {r['name']}: {p}" for r in report["runs"] for p in r["problems"]] + \
               [f"- {p}" for p in report.get("problems", [])]
    lines += ["", "Problems:", *problems] if problems else []
    if report.get("ab"):
        lines += ["", *_ab_section(report["ab"])]
    elif any(r["metrics"] for r in report["runs"]):
        lines += ["", *_bench_table(report)]
    lines += _warmup_section(report)
    lines += ["", *_prediction_section(report)] if report.get("prediction") else []
    lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]]] if report["notes"] else []
    return "\n".join(lines) + "\n"


def _warmup_section(report: dict) -> list[str]:
    """Each server's warm-up passes (a resident A/B's two servers once each) on the workload's metric."""
    key = report["workload"]["primary"]
    resident = report.get("ab_servers") == "resident"
    seen: set[str] = set()
    rows = []
    for run in report["runs"]:
        passes = run.get("warmup") or []
        if resident and run["arm"] == "profile":
            continue  # the profiled pass ran on a resident server, warmed up above
        server = run["arm"] if resident else run["name"]
        if not passes or server in seen:
            continue
        seen.add(server)
        state = {True: f"warm: the last two agree within {STEADY:.0%}, the last compiled nothing",
                 None: "one pass, not checked",
                 False: f"NOT warm: no two in a row within {STEADY:.0%} with the second compiling nothing; its "
                        "first measured pass may pay first-use costs"}[run.get("steady")]
        values = ", ".join(_num(p.get(key)) + (f" ({len(p['jit_compiles'])} compiled)" if p.get("jit_compiles") else "")
                           for p in passes)
        rows.append(f"| {server} | {len(passes)} | {values} | {state} |")
    if not rows:
        return []
    return ["", "## Warm-up passes (discarded)", "",
            f"Each server ran warm-up passes on prompts no measured pass sends (`--seed {WARMUP_SEED + 1}`, "
            f"`{WARMUP_SEED + 2}`, ...) until two in a row agreed within {STEADY:.0%} on {METRICS[key]} and vLLM's "
            "JIT monitor (`--jit-monitor-verbose`) logged no kernel compiled during the second: then the fused-MoE "
            "configs of every batch size the workload reaches are compiled and loaded.", "",
            f"| server | passes | {METRICS[key]} per pass (kernels compiled while serving) | |", "|---|---|---|---|",
            *rows, "", _compiles_line(report["runs"])]


def _compiles_line(runs: list[dict]) -> str:
    """The kernels vLLM compiled during measured passes: none, when every server was warm."""
    measured = [r for r in runs if r["metrics"] and r.get("arm") != "profile"]
    hit = [f"{r['name']}: {len(r['compiles'])} ({', '.join(sorted(set(r['compiles'])))})" for r in measured
           if r.get("compiles")]
    return ("Kernels vLLM compiled while serving a measured pass: " + ("; ".join(hit) + " (those passes paid "
            "for compiles)" if hit else "none"))


def _reduced_section(r: dict) -> list[str]:
    moe = r["moe_layers"]
    overrides = json.dumps(r["overrides"], separators=(",", ":"))
    env = " ".join(f"`{k}={v}`" for k, v in r["env"].items())
    return ["## Reduced model: one GPU for " + r["layout"], "",
            f"- served: `{r['folder']}` (Step-3.5-Flash's published {r['dtype']} config.json and a word-level "
            f"tokenizer of its vocabulary) with `--load-format dummy`, {env} and", f"  `--hf-overrides {overrides}`",
            f"- {r['layers']} layers: layer 0 dense, MoE layers {moe[0]}-{moe[-1]}, {r['experts']} experts of width "
            f"{r['width']} per MoE layer ({r['shape']} as {r['layout']} runs it)", "",
            "What it reproduces:", *[f"- {x}" for x in r["reproduces"]], "",
            "What it does not:", *[f"- {x}" for x in r["differs"]], ""]


def _ab_section(a: dict) -> list[str]:
    primary = a["primary"]
    keys = [k for k in (primary, "median_ttft_ms", "median_tpot_ms") if k in a["ratios"]]
    lines = [f"## A/B: tuned against vLLM's default config ({a['pairs']} pairs, workload {a['workload']})", "",
             f"**{a['verdict']}**", "", _ab_servers(a) + f" Intervals: {a['method']}, on the geometric mean of the "
             "per-pair tuned/default ratios.", "",
             "| pair | " + " | ".join(f"default {METRICS[k]} | tuned {METRICS[k]}" for k in keys) +
             f" | tuned/default {METRICS[primary]} |", "|---" * (2 * len(keys) + 2) + "|"]
    for pair, arms in a["per_pair"].items():
        cells = [f"{_num(arms['default'].get(k))} | {_num(arms['tuned'].get(k))}" for k in keys]
        ratio = a["ratios"][primary]["per_pair"][int(pair) - 1]
        lines.append(f"| {pair} | " + " | ".join(cells) + f" | {ratio:.3f} |")
    lines += ["", "| metric | default median (min-max) | tuned median (min-max) | tuned/default (95% CI) | verdict |",
              "|---|---|---|---|---|"]
    for k in keys:
        d, t, r = a["arms"]["default"][k], a["arms"]["tuned"][k], a["ratios"][k]
        lines.append(f"| {METRICS[k]} | {_spread(d)} | {_spread(t)} | {r['estimate']:.3f} ({r['low']:.3f}-"
                     f"{r['high']:.3f}) | {a['verdicts'][k]['outcome']} |")
    return lines


def _ab_servers(a: dict) -> str:
    """Which servers ran the measured passes, and so which variation the interval samples."""
    order = "; ".join(a["order"])
    servers = a.get("servers") or {"mode": "fresh"}
    if servers["mode"] == "fresh":
        return ("`--ab-servers fresh`: each pair is two fresh servers, one at a time, their order alternating "
                f"({order}); each server was warmed up (below) before its measured pass, and pair k's two passes "
                "sent the same prompts (`--seed k`). This samples server-to-server variation (a server start per "
                "run) as well as pass-to-pass.")
    ports = servers["ports"]
    return (f"`--ab-servers resident`: two servers up at once, the default one on port {ports['default']} and the "
            f"tuned one on port {ports['tuned']}, each with `--gpu-memory-utilization "
            f"{servers['gpu_memory_utilization']}`, started once and warmed up (below); the measured passes "
            f"alternated between them, their order alternating ({order}), pair k's two passes sending the same "
            "prompts (`--seed k`), which no other pass on either server sent. This "
            "samples pass-to-pass variation on two resident servers, not server-to-server variation; "
            "`--ab-servers fresh` samples that too, at a server start per run.")


def _spread(s: dict) -> str:
    return f"{s['median']:.2f} ({s['low']:.2f}-{s['high']:.2f})"


def _prediction_section(report: dict) -> list[str]:
    p, a = report["prediction"], report.get("ab")
    lines = ["## Predicted gain", "", f"- workload {report['workload']['name']}: {p['m_phrase']}"]
    if not p["served"]:
        return lines + [f"- no prediction: {p['why']}"]
    for label, x in (("this serve", p["served"]), (f"the {report['layout'].split(' ')[0]} serve", p["full"])):
        if x:
            lines.append(f"- {label}: `{x['file']}` is {x['kernel_speedup']:.3f}x vLLM's default at batch key "
                         f"{x['key']} (its provenance); the fused MoE is {x['share']['value']:.0%} of the step "
                         f"({x['share']['how']}): predicted {(x['gain'] - 1) * 100:+.1f}%")
    x = p.get("serving")
    if x:
        lines.append(f"- in serving (vLLM's profiler, {x['steps']} steps on each server): the fused MoE took "
                     f"{x['default_moe_us']:.0f} us a step on the default server and {x['tuned_moe_us']:.0f} us on the "
                     f"tuned one, {x['kernel_speedup']:.3f}x, {x['saved_us']:.0f} us saved a step" + (
                         f"; against the default passes' step of {x['step_ms']:.2f} ms ({x['step_from']}): "
                         f"predicted {(x['gain'] - 1) * 100:+.1f}%" if x["gain"] else ""))
    if a and a["primary"] in a["ratios"]:
        r = a["ratios"][a["primary"]]
        which = [(label, g) for label, g in (("the in-serving prediction", (x or {}).get("gain")),
                                             ("this serve's prediction", p["served"]["gain"])) if g]
        lines.append(f"- measured: {(r['estimate'] - 1) * 100:+.1f}% {METRICS[a['primary']]} (95% CI "
                     f"{(r['low'] - 1) * 100:+.1f}% to {(r['high'] - 1) * 100:+.1f}%): " + ", ".join(
                         f"{label} is {_where(g, r)} the interval" for label, g in which))
    return lines


def _where(gain: float, r: dict) -> str:
    return "inside" if r["low"] <= gain <= r["high"] else "above" if gain > r["high"] else "below"


def _bench_table(report: dict) -> list[str]:
    runs = {r["name"]: r["metrics"] for r in report["runs"] if r["metrics"] and r.get("arm") != "profile"}
    recipe = not report.get("reduced")  # a reduced model on one GPU is no comparison for the recipe's serve
    header = ([RECIPE_LABEL] if recipe else []) + [*runs] + (["tuned vs recipe"] if recipe and "tuned" in runs else [])
    lines = ["## Benchmark", "", f"`{report['bench_command']}`", "",
             "| metric | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for key, label in METRICS.items():
        cells = ([_num(RECIPE_METRICS.get(key))] if recipe else []) + [_num(m.get(key)) for m in runs.values()]
        if recipe and "tuned" in runs:
            cells.append(_change(runs["tuned"].get(key), RECIPE_METRICS.get(key)) if key not in COUNTS else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if not recipe:
        return lines + ["", "The measured pass of each server; a reduced model's numbers do not compare with the "
                        "recipe's 4xH200 serve (use --ab for tuned against default)."]
    return lines + ["", "Changes are relative: higher output tok/s is better, lower TPOT/TTFT is better. The recipe's "
                    "numbers are bf16 TP4 without MTP on 4xH200; other setups compare with care."]


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def _change(new, old) -> str:
    return "-" if not new or not old else f"{(new - old) / old * 100:+.1f}%"
