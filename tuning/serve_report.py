"""validate-serve's report: ``report.json`` (everything) and ``report.md`` (the proof per MoE layer kind, the
benchmark against the recipe's numbers), written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write_text
from .recipe import RECIPE_LABEL, RECIPE_METRICS

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
    lines += ["", *_bench_table(report)] if any(r["metrics"] for r in report["runs"]) else []
    lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]]] if report["notes"] else []
    return "\n".join(lines) + "\n"


def _bench_table(report: dict) -> list[str]:
    runs = {r["name"]: r["metrics"] for r in report["runs"] if r["metrics"]}
    header = [RECIPE_LABEL, *runs] + (["tuned vs recipe"] if "tuned" in runs else []) + \
             (["tuned vs default"] if {"tuned", "default"} <= set(runs) else [])
    lines = ["## Benchmark", "", f"`{report['bench_command']}`", "",
             "| metric | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for key, label in METRICS.items():
        cells = [_num(RECIPE_METRICS.get(key))] + [_num(m.get(key)) for m in runs.values()]
        compare = key not in COUNTS
        if "tuned" in runs:
            cells.append(_change(runs["tuned"].get(key), RECIPE_METRICS.get(key)) if compare else "")
        if {"tuned", "default"} <= set(runs):
            cells.append(_change(runs["tuned"].get(key), runs["default"].get(key)) if compare else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", "Changes are relative: higher output tok/s is better, lower TPOT/TTFT is better. The recipe's "
                    "numbers are bf16 TP4 without MTP on 4xH200; other setups compare with care."]


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def _change(new, old) -> str:
    return "-" if not new or not old else f"{(new - old) / old * 100:+.1f}%"
