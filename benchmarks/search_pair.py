"""Two runs of the same plan with two searches (or two codes): is one search's pick better, and how large is the noise?

Usage: python benchmarks/search_pair.py OLD.results.jsonl NEW.results.jsonl

Each job's speedup over vLLM's default is its own run's head to head (winner and default timed alternately), so it
carries no drift between the runs. Prints, in Markdown:
- per file, the geomean speedup of each run; over all jobs, the geomean of new/old speedups and its range;
- the jobs whose winners differ, and those differing by more than 1%;
- per batch size, how the same config's µs moved from one run to the other (vLLM's default in every job, and the
  winner where both runs picked the same): the run-to-run noise at that M;
- how many of NEW's winners are a config that another file's job at the same M had picked earlier in NEW (the
  results are in the order they finished), and how many of those OLD also picked.
Section 2l of benchmarks/README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import geometric_mean as geomean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuning.configs import TileConfig  # noqa: E402


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def speedup(r: dict) -> float:
    return r["default_us"] / r["tuned_us"]


def short(c: dict) -> str:
    return TileConfig.from_dict(c).short


def main(old_path: str, new_path: str) -> None:
    new_rows = load(Path(new_path))
    old = {(r["file"], r["m"]): r for r in load(Path(old_path))}
    new = {(r["file"], r["m"]): r for r in new_rows}
    keys = [k for k in new if k in old]
    ratios = [speedup(new[k]) / speedup(old[k]) for k in keys]
    print(f"{len(keys)} jobs in both runs; speedup over vLLM's default, new/old: geomean {geomean(ratios):.4f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}\n")
    print("| file | old speedup | new speedup |\n|---|---:|---:|")
    for file in sorted({f for f, _ in keys}):
        mine = [k for k in keys if k[0] == file]
        print(f"| {file.split(',device_name')[0]} | {geomean([speedup(old[k]) for k in mine]):.3f}x "
              f"| {geomean([speedup(new[k]) for k in mine]):.3f}x |")
    differ = [k for k in keys if old[k]["tuned"] != new[k]["tuned"]]
    beyond = [k for k in differ if abs(speedup(new[k]) / speedup(old[k]) - 1) > 0.01]
    print(f"\nWinners differ in {len(differ)} jobs, {len(beyond)} of them by more than 1%:\n")
    print("| file | M | old winner | old speedup | new winner | new speedup |\n|---|---:|---|---:|---|---:|")
    for k in sorted(beyond):
        print(f"| {k[0].split(',device_name')[0]} | {k[1]} | {short(old[k]['tuned'])} | {speedup(old[k]):.3f}x "
              f"| {short(new[k]['tuned'])} | {speedup(new[k]):.3f}x |")
    print("\n| M | vLLM's default µs, new/old | same winner µs, new/old |\n|---:|---:|---:|")
    for m in sorted({m for _, m in keys}):
        at = [k for k in keys if k[1] == m]
        same = [k for k in at if old[k]["tuned"] == new[k]["tuned"]]
        default = geomean([new[k]["default_us"] / old[k]["default_us"] for k in at])
        winner = f"{geomean([new[k]['tuned_us'] / old[k]['tuned_us'] for k in same]):.3f}" if same else "-"
        print(f"| {m} | {default:.3f} | {winner} |")
    borrowed = []
    for i, r in enumerate(new_rows):
        earlier = {json.dumps(e["tuned"], sort_keys=True) for e in new_rows[:i] if e["m"] == r["m"] and e["file"] != r["file"]}
        if json.dumps(r["tuned"], sort_keys=True) in earlier - {json.dumps(r["default"], sort_keys=True)}:
            borrowed.append((r["file"], r["m"]))
    also = sum(old[k]["tuned"] == new[k]["tuned"] for k in borrowed if k in old)
    print(f"\n{len(borrowed)} of NEW's winners (not vLLM's default) had been picked earlier in NEW by another file at "
          f"the same M; OLD picked the same config in {also} of them.")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    for arg in sys.argv[1:]:
        if not Path(arg).is_file():
            sys.exit(f"search_pair.py: {arg}: no such file; pass results.jsonl files that gpu_stage.sh tune brought back")
    main(sys.argv[1], sys.argv[2])
