"""The GPU's state beside each batch size a `verify` timed: does a large-M speedup follow the clock, the power or the heat?

Usage: python benchmarks/gpu_state.py RUN [RUN ...]

Each RUN is what ``benchmarks/gpu_stage.sh cli-smi RUN SECS verify ...`` brought back: RUN.log (verify's output,
each line stamped with its time) and RUN.smi.csv (nvidia-smi every 200 ms: time, SM and memory clocks, GPU and
memory temperatures, power, clock-event reasons). A verify prints a batch size's line when its head to head
ends, so the samples between the previous line and that one are the ones its compiles and timings ran under;
those the GPU reports idle in (the compiles) are left out of the clock and power. Prints, in Markdown, per run
and batch size: vLLM's default and the tuned µs, the speedup, and over that window the mean and lowest SM clock,
the mean power, the highest GPU and memory temperatures and the clock-event reasons seen.
Section 2l of benchmarks/README.md.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuning.clocks import reason_names  # noqa: E402

ROW = re.compile(r"^(\d+\.\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+(\S+)")
FILE = re.compile(r"^(\d+\.\d+) (E=\S+\.json)$")


def samples(path: Path) -> list[tuple[float, dict]]:
    out = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 7:
            continue
        try:
            t = time.mktime(time.strptime(cells[0].split(".")[0], "%Y/%m/%d %H:%M:%S")) + float("0." + cells[0].split(".")[1])
            out.append((t, {"sm": float(cells[1]), "mem_clock": float(cells[2]), "gpu_c": _num(cells[3]),
                            "mem_c": _num(cells[4]), "power": float(cells[5]), "reasons": int(cells[6], 16)}))
        except (ValueError, IndexError):
            continue  # a header, or a line cut as the sampler was stopped
    return out


def _num(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None  # N/A


def reasons(mask: int) -> str:
    return "+".join(reason_names(mask)) or "none"


def main(runs: list[str]) -> None:
    print("| run | file | M | default µs | tuned µs | speedup | SM MHz mean (min) | power W | GPU °C | HBM °C | reasons |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for run in runs:
        smi = samples(Path(f"{run}.smi.csv"))
        start, file = None, ""
        for line in Path(f"{run}.log").read_text().splitlines():
            if m := FILE.match(line):
                name = m.group(2)
                start, file = float(m.group(1)), f"{'fp8' if 'dtype=fp8' in name else 'bf16'} {name.split(',device_name')[0]}"
            elif (m := ROW.match(line)) and start is not None:
                end = float(m.group(1))
                window = [s for t, s in smi if start < t <= end]
                start = end
                busy = [s for s in window if not s["reasons"] & 0x1]  # not idle: the timing, not the compiles
                if not busy:
                    continue
                temps = [s["gpu_c"] for s in window if s["gpu_c"] is not None]
                hbm = [s["mem_c"] for s in window if s["mem_c"] is not None]
                mask = 0
                for s in window:
                    mask |= s["reasons"]
                print(f"| {Path(run).name} | {file} | {m.group(2)} | {m.group(3)} | {m.group(4)} | {m.group(5)}x "
                      f"| {fmean(s['sm'] for s in busy):.0f} ({min(s['sm'] for s in busy):.0f}) "
                      f"| {fmean(s['power'] for s in busy):.0f} | {max(temps) if temps else '-'} "
                      f"| {max(hbm) if hbm else '-'} | {reasons(mask)} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__.split("\n\n")[1])
    for run in sys.argv[1:]:
        for path in (f"{run}.log", f"{run}.smi.csv"):
            if not Path(path).is_file():
                sys.exit(f"gpu_state.py: {path}: no such file; pass the names gpu_stage.sh cli-smi brought back")
    main(sys.argv[1:])
