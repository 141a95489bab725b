"""Two sets of tuned files re-timed on one machine: `tune-moe verify` of each, read from its logs.

    python benchmarks/verify_pair.py OLD.log[,OLD2.log...] NEW.log[,NEW2.log...]
    python benchmarks/verify_pair.py --against RUN.log[,RUN2.log...]
    python benchmarks/verify_pair.py --recorded CONFIGS_DIR RUN.log

Each log is one `tune-moe verify` run; run both sets' alike (files, --batch-sizes), one after the other on
one machine. A set's logs are read together, and a point timed in several of them (a repeat) gets the mean of
its µs. Prints, per (file, M) whose two entries differ, vLLM's default and both entries' µs and old/new (above
1: the new entry is faster), then the geometric means of old/new over the points whose entries differ and over
those whose entries are the same config (what the timing noise alone gives).

With --against, each log is one `tune-moe verify --against OLD` run (both entries in one head to head); prints,
per changed (file, M), old → new, old/new in each run and their mean.

With --recorded, the log is one `tune-moe verify --configs` run of the files in CONFIGS_DIR (no --against); prints,
per file, the geomean speedup over vLLM's default it timed beside the one its provenance sidecar records.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from statistics import fmean, geometric_mean

FILE = re.compile(r"^(E=\S+\.json)$")
ROW = re.compile(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+x\s+(\S+)")
WAS = re.compile(r"  was (\S+) [\d.]+ us, old/new ([\d.]+)x")


def read(path: str) -> dict[tuple[str, int], tuple[float, float, str]]:
    """(file, M) -> (default µs, tuned µs, tuned config) of one verify log."""
    rows, file, in_table = {}, None, False
    for line in open(path):
        if m := FILE.match(line.rstrip("\n")):
            file, in_table = m.group(1), False
        elif line.strip().startswith("M  default us"):
            in_table = True
        elif in_table and file and (m := ROW.match(line)):
            rows[(file, int(m.group(1)))] = (float(m.group(2)), float(m.group(3)), m.group(4))
    return rows


def merged(paths: str) -> dict[tuple[str, int], tuple[float, float, str]]:
    """The logs of one set together; a point timed in several (a repeat) gets the mean of its µs."""
    runs = [read(p) for p in paths.split(",")]
    keys = dict.fromkeys(k for r in runs for k in r)
    return {k: (fmean(r[k][0] for r in runs if k in r), fmean(r[k][1] for r in runs if k in r),
                next(r[k][2] for r in runs if k in r)) for k in keys}


def main(old_logs: str, new_logs: str) -> None:
    old, new = merged(old_logs), merged(new_logs)
    points = sorted(set(old) & set(new))
    print("| file | M | vLLM default µs | old entry µs | new entry µs | old / new | old → new |")
    print("|---|---:|---:|---:|---:|---:|---|")
    differ, same = [], []
    for k in points:
        (d, o, oc), (_, n, nc) = old[k], new[k]
        (same if oc == nc else differ).append(o / n)
        if oc != nc:
            print(f"| {k[0].removesuffix('.json')} | {k[1]} | {d:.1f} | {o:.1f} | {n:.1f} | {o / n:.3f} | {oc} → {nc} |")
    print(f"\n{len(points)} points. Entries differ at {len(differ)}" + (
        f": old/new geomean {geometric_mean(differ):.4f} (min {min(differ):.3f}, max {max(differ):.3f})." if differ else "."))
    if same:
        print(f"The same config at {len(same)}: old/new geomean {geometric_mean(same):.4f} "
              f"(min {min(same):.3f}, max {max(same):.3f}): the timing noise.")


def against(logs: str) -> None:
    """Per changed (file, M): old/new in each `verify --against` run, and their mean."""
    runs: dict[tuple[str, int], tuple[str, str, list[float]]] = {}
    for path in logs.split(","):
        file = None
        for line in open(path):
            if m := FILE.match(line.rstrip("\n")):
                file = m.group(1)
            elif file and (row := ROW.match(line)) and (was := WAS.search(line)):
                key = (file.removesuffix(".json"), int(row.group(1)))
                runs.setdefault(key, (was.group(1), row.group(4), []))[2].append(float(was.group(2)))
    print("| file | M | old → new | old / new, each run | mean |")
    print("|---|---:|---|---|---:|")
    for (file, m), (old, new, gains) in sorted(runs.items()):
        print(f"| {file} | {m} | {old} → {new} | {', '.join(f'{g:.3f}' for g in gains)} | {fmean(gains):.3f} |")
    means = [fmean(g) for _, _, g in runs.values()]
    if means:
        print(f"\n{len(means)} changed entries: old/new geomean {geometric_mean(means):.4f} "
              f"(means {min(means):.3f}-{max(means):.3f}).")


def recorded(configs: str, log: str) -> None:
    """Per file: the geomean speedup this verify run timed, and the one the file's sidecar records."""
    timed = read(log)
    print("| file | timed here | recorded |")
    print("|---|---:|---:|")
    here_all, rec_all = [], []
    for file in sorted({f for f, _ in timed}):
        sidecar = json.loads((Path(configs) / file.replace(".json", ".provenance.json")).read_text())["results"]
        ms = [m for m in map(int, sidecar) if (file, m) in timed]
        here = [timed[(file, m)][0] / timed[(file, m)][1] for m in ms]
        rec = [sidecar[str(m)]["speedup"] for m in ms]
        here_all += here
        rec_all += rec
        print(f"| {file.removesuffix('.json')} | {geometric_mean(here):.3f} | {geometric_mean(rec):.3f} |")
    print(f"\n{len(here_all)} batch sizes: geomean {geometric_mean(here_all):.3f} here, {geometric_mean(rec_all):.3f} "
          f"recorded; here {min(here_all):.3f}-{max(here_all):.3f}, {sum(x < 0.99 for x in here_all)} below 0.99.")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--recorded":
        sys.exit(recorded(sys.argv[2], sys.argv[3]))
    if len(sys.argv) == 3 and sys.argv[1] == "--against":
        sys.exit(against(sys.argv[2]))
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(sys.argv[1], sys.argv[2])
