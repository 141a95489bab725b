"""One worker against several on the same jobs: the table of benchmarks/README.md section 2d, from the runs' files.

Usage: python benchmarks/scaling.py BASE.results.jsonl RUN.results.jsonl [RUN.results.jsonl ...]

Each RUN.results.jsonl is what ``benchmarks/gpu_stage.sh tune RUN ...`` brought back; its wall time is read from
the ``RUN: exit RC after N s`` line of RUN.log beside it. BASE is the run to scale against (one worker). Prints, in
Markdown: per run the wall time, the scaling against BASE, the job time summed, the jobs and job time per worker,
the wall time outside the busiest worker's jobs (start-up, plan, files: paid once a run) and, where RUN.phases.json
(run_phases.py) is beside it, the part of it before the first job (the driver's checks, Ray, the workers' start),
the compile-pool wait
(``compile_seconds``; 0 in results from before it was kept) and the configs timed; then the jobs that took
longest against the same (file, M) in BASE, where the extra time of a run sits.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

WORST = 8  # jobs listed per run


def load(path: Path) -> tuple[float | None, dict[tuple[str, int], dict], float | None]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    jobs = {(r["file"], r["m"]): r for r in rows}
    log = path.with_name(path.name.replace(".results.jsonl", ".log"))
    found = re.search(r": exit \d+ after (\d+) s", log.read_text()) if log.exists() else None
    phases = path.with_name(path.name.replace(".results.jsonl", ".phases.json"))
    started = json.loads(phases.read_text())["phases_s"].get("workers") if phases.exists() else None
    return (float(found.group(1)) if found else None), jobs, started


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    runs = {}
    for arg in argv:
        path = Path(arg)
        if not path.is_file():
            print(f"scaling.py: {arg}: no such file; pass results.jsonl files that gpu_stage.sh tune brought back",
                  file=sys.stderr)
            return 2
        runs[path.name.replace(".results.jsonl", "")] = load(path)
    (base_name, (base_wall, base, _)), *_ = runs.items()
    timed = any(started is not None for _, _, started in runs.values())  # runs from before run_phases.py: no column
    print("| run | wall | scaling | job time (sum) | jobs per worker | job time per worker | not in jobs "
          + ("| of it, before the first job " if timed else "") + "| compile wait | configs timed |")
    print("|---|---:|---:|---:|---|---|---:|" + ("---:|" if timed else "") + "---:|---:|")
    for name, (wall, jobs, started) in runs.items():
        per = defaultdict(list)
        for r in jobs.values():
            per[r["worker"]].append(r)
        scale = f"{base_wall / wall:.2f}x" if wall and base_wall else "?"
        counts = " + ".join(str(len(v)) for v in per.values())
        times = " + ".join("%.0f s" % sum(r["seconds"] for r in v) for v in per.values())
        total = sum(r["seconds"] for r in jobs.values())
        waited = sum(r.get("compile_seconds", 0.0) for r in jobs.values())
        busiest = max(sum(r["seconds"] for r in v) for v in per.values())
        fixed = f"{wall - busiest:.0f} s" if wall else "?"  # Ray, the workers' start, plan and files: paid once
        before = (f"{started:.1f} s | " if started is not None else "? | ") if timed else ""
        print(f"| {name} | {wall or 0:.0f} s | {scale} | {total:.0f} s | {counts} | {times} | {fixed} | {before}"
              f"{waited:.0f} s "
              f"| {sum(r['evaluated'] for r in jobs.values())} |")
    for name, (_, jobs, _) in list(runs.items())[1:]:
        shared = [k for k in jobs if k in base]
        extra = sorted(shared, key=lambda k: jobs[k]["seconds"] - base[k]["seconds"], reverse=True)[:WORST]
        print(f"\n{name} against {base_name}, the jobs that grew most:\n")
        print("| file | M | worker | seconds | in base | per config | in base |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for k in extra:
            r, b = jobs[k], base[k]
            print(f"| {k[0]} | {k[1]} | {r['worker']} | {r['seconds']:.1f} | {b['seconds']:.1f} "
                  f"| {r['seconds'] / max(r['evaluated'], 1):.3f} | {b['seconds'] / max(b['evaluated'], 1):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
