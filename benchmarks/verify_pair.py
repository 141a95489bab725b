"""Two sets of tuned files re-timed on one machine: `tune-moe verify` of each, read from its logs.

    python benchmarks/verify_pair.py OLD.log[,OLD2.log...] NEW.log[,NEW2.log...]

Each log is one `tune-moe verify` run; run both sets' alike (files, --batch-sizes), one after the other on
one machine. A set's logs are read together, and a point timed in several of them (a repeat) gets the mean of
its µs. Prints, per (file, M) whose two entries differ, vLLM's default and both entries' µs and old/new (above
1: the new entry is faster), then the geometric means of old/new over the points whose entries differ and over
those whose entries are the same config (what the timing noise alone gives).
"""

from __future__ import annotations

import re
import sys
from statistics import fmean, geometric_mean

FILE = re.compile(r"^(E=\S+\.json)$")
ROW = re.compile(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+x\s+(\S+)")


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


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(sys.argv[1], sys.argv[2])
