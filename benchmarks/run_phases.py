"""Run a tune-moe command and time its phases from its own output: where a run's seconds go outside its jobs.

    python benchmarks/run_phases.py LOG PHASES_JSON -- python3 -m tuning.cli --gpu H200 ... --out DIR

The command's output goes to LOG as it is (tqdm's carriage returns kept); PHASES_JSON gets the second, counted
from the command's start, at which each phase's line appeared, the jobs' own seconds (those in ``--out``'s
``results.jsonl`` that finished after the command started: a resume counts only what it ran; ``jobs_before`` the
rest) and the rest of the wall: what the run spent outside its jobs (with W workers, the wall less the jobs' seconds
over W), and of that what fell between jobs (``between_jobs_s``: from the workers' report to the summary, less the
jobs' seconds over W). gpu_stage.sh's ``tune`` runs every sweep this way.

Phases: ``plan`` (the plan is printed), ``checked`` (the kernel, Triton and output folder checked: the driver is
about to start Ray), ``ray`` (Ray's "Started a local Ray instance"), ``workers`` (every worker has started and
reported), ``summary`` (the jobs are done and Ray is shut down), ``exit``.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

MARKS = {
    "plan": re.compile(r"^Jobs: "),
    "checked": re.compile(r" jobs already done in "),
    "ray": re.compile(r"Started a local Ray instance"),
    "workers": re.compile(r"^\d+ workers: "),
    "summary": re.compile(r"^shape +M +default us"),
}
RAY_UP = re.compile(r"Ray up in ([0-9.]+) s, the workers ([0-9.]+) s later")


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        sys.exit(__doc__.strip().splitlines()[2].strip())
    log, phases_path, command = Path(argv[0]), Path(argv[1]), argv[3:]
    seen: dict[str, float] = {}
    said: dict[str, float] = {}
    start = time.monotonic()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # the format of a result's `finished`
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for sig in (signal.SIGINT, signal.SIGTERM):  # a time limit's signal is the command's (it stops cleanly)
            signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
        for line in proc.stdout:
            out.write(line)
            out.flush()
            now = time.monotonic() - start
            for part in line.split("\r"):
                for name, mark in MARKS.items():
                    if name not in seen and mark.search(part):
                        seen[name] = round(now, 2)
                if m := RAY_UP.search(part):
                    said = {"ray_up": float(m.group(1)), "workers_after": float(m.group(2))}
        code = proc.wait()
    seen["exit"] = round(time.monotonic() - start, 2)
    folder = command[command.index("--out") + 1] if "--out" in command else None
    results = Path(folder) / ".tune-moe" / "results.jsonl" if folder else None
    stored = [json.loads(x) for x in results.read_text().splitlines() if x.strip()] if results and results.exists() else []
    # a result without a stamp (a tune-moe from before them, e.g. an old commit's run beside this one) counts
    jobs = [j for j in stored if not j.get("finished") or j["finished"] >= started]
    job_seconds = round(sum(j["seconds"] for j in jobs), 2)
    workers = len({j.get("worker") for j in jobs}) or 1
    report = {"command": command, "exit_code": code, "phases_s": seen, **said, "jobs": len(jobs),
              "jobs_before": len(stored) - len(jobs),
              "job_seconds": job_seconds, "workers": workers,
              "outside_jobs_s": round(seen["exit"] - job_seconds / workers, 2)}
    if "workers" in seen and "summary" in seen:  # from the first job's start to the last one's end, not in a job
        report["between_jobs_s"] = round(seen["summary"] - seen["workers"] - job_seconds / workers, 2)
    phases_path.write_text(json.dumps(report, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
