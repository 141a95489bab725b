"""What W workers would take on a one-worker run's jobs, if no job ran slower beside another: tune-moe's own
schedule (tuning.schedule.JobQueue) replayed on the run's recorded job times.

Usage: python benchmarks/schedule_replay.py RUN.results.jsonl [WORKERS ...]      (default: 2 3 4)

RUN.results.jsonl is what ``benchmarks/gpu_stage.sh tune RUN ... --workers 1`` brought back, with RUN.phases.json
(run_phases.py) beside it, or RUN.log for the wall time alone, for the seconds a run spends outside its jobs (paid
once whatever the workers) and between them (paid by each worker per job). Each worker takes its next job the
moment it is free, as the sweep does; each job lasts what it lasted in RUN. Prints per worker count the predicted
wall time, the scaling against RUN's, the jobs and seconds per worker: the ceiling the job sizes and the schedule
allow. What the replay cannot see is the cost of running side by side (two compile pools on one host, the same
kernels compiled twice at once: section 2e), which is what a measured pair adds to it.
"""

from __future__ import annotations

import heapq
import json
import sys
from pathlib import Path

from tuning.jobs import Job
from tuning.models import load_model
from tuning.schedule import JobQueue
from tuning.shapes import shapes_from_file_names

from scaling import load as load_run  # benchmarks/scaling.py: a run's rows, and its wall time from its log


def load(path: Path) -> tuple[dict[Job, float], dict]:
    wall, jobs, _ = load_run(path)
    rows = list(jobs.values())
    phases_path = path.with_name(path.name.replace(".results.jsonl", ".phases.json"))
    if phases_path.exists():
        phases = json.loads(phases_path.read_text())
    else:  # a run from before run_phases.py: its wall time from the log, everything outside jobs paid once
        phases = {"outside_jobs_s": wall - sum(r["seconds"] for r in rows), "between_jobs_s": 0.0}
    files = sorted({r["file"] for r in rows})
    device = files[0].split("device_name=")[1].split(",")[0].removesuffix(".json")
    model = load_model("stepfun-ai/Step-3.5-Flash-FP8" if "fp8" in files[0] else "stepfun-ai/Step-3.5-Flash")
    shapes = dict(zip(files, shapes_from_file_names(files, model, device)))
    return {Job(shapes[r["file"]], r["m"]): float(r["seconds"]) for r in rows}, phases


def replay(seconds: dict[Job, float], workers: int, between: float) -> list[list[float]]:
    """Each worker's job times, in the order the schedule hands them out."""
    queue, free, running, last = JobQueue(list(seconds)), [(0.0, w) for w in range(workers)], {}, {}
    ran: list[list[float]] = [[] for _ in range(workers)]
    heapq.heapify(free)
    while len(queue):
        now, w = heapq.heappop(free)
        running.pop(w, None)
        running = {k: (job, end) for k, (job, end) in running.items() if end > now}  # finished by now
        job = queue.take(last.get(w), [j for j, _ in running.values()])
        end = now + seconds[job] + between
        running[w], last[w] = (job, end), job
        ran[w].append(seconds[job])
        heapq.heappush(free, (end, w))
    return ran


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    if not Path(argv[0]).is_file() or not all(a.isdigit() and int(a) > 0 for a in argv[1:]):
        print(f"schedule_replay.py: give a run's results.jsonl (not {argv[0]!r}) and worker counts above 0",
              file=sys.stderr)
        return 2
    seconds, phases = load(Path(argv[0]))
    counts = [int(a) for a in argv[1:]] or [2, 3, 4]
    between = phases.get("between_jobs_s", 0.0) / len(seconds)
    outside = phases["outside_jobs_s"] - phases.get("between_jobs_s", 0.0)  # before the first job and after the last
    base = outside + sum(seconds.values()) + between * len(seconds)
    print(f"{argv[0]}: {len(seconds)} jobs, {sum(seconds.values()):.0f} s in jobs, {outside:.1f} s outside them "
          f"and {between:.2f} s between two; replayed on one worker: {base:.0f} s")
    print("\n| workers | predicted wall | scaling | jobs per worker | job seconds per worker |\n|---:|---:|---:|---|---|")
    for w in [1, *counts]:
        ran = replay(seconds, w, between)
        wall = outside + max(sum(r) + between * len(r) for r in ran)
        print(f"| {w} | {wall:.0f} s | {base / wall:.2f}× | {' + '.join(str(len(r)) for r in ran)} | "
              f"{' + '.join(f'{sum(r):.0f}' for r in ran)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
