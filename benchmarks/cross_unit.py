"""Two re-tunes of the same committed set on two GPU boards: is an entry a re-tune replaced slow everywhere, or only
on the board that replaced it?

Usage: python benchmarks/cross_unit.py FIRST.results.jsonl SECOND.results.jsonl

FIRST is a re-tune that kept the entries; SECOND, on another board, replaced some. For each entry SECOND replaced,
prints the old entry's µs on each board (FIRST: its head to head, where FIRST kept it; SECOND: the head to head
that replaced it) and the new config's (SECOND: its head to head; FIRST: its first look, where FIRST's search timed
it), then old/new on each board. A config picked on one board carries that board's luck; its time on the other
board is the unbiased one, so the last column sets the old entry on SECOND against the new one on FIRST. Under the
table: vLLM's default and every config both searches timed, SECOND/FIRST, the boards' difference at large. Section
2o of benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import geometric_mean as geomean

from search_pair import load, short  # beside this script: the same results reader and config names


def main(first_path: str, second_path: str) -> None:
    first = {(r["file"], r["m"]): r for r in load(Path(first_path))}
    second = {(r["file"], r["m"]): r for r in load(Path(second_path))}
    keys = [k for k in second if k in first]
    print("| file | M | old → new | old µs, first / second | new µs, first / second | old/new on each "
          "| old on second / new on first |")
    print("|---|---:|---|---:|---:|---:|---:|")
    unbiased = []
    for k in sorted(keys):
        r, f = second[k], first[k]
        if not r["incumbent"] or r["incumbent"] == r["tuned"]:
            continue
        old, new = short(r["incumbent"]), short(r["tuned"])
        old_first = f["tuned_us"] if short(f["tuned"]) == old else None
        new_first = f["looks"].get(new)
        cross = r["incumbent_us"] / new_first if new_first else None
        unbiased += [cross] if cross else []
        print(f"| {k[0].split(',device_name')[0]} | {k[1]} | {old} → {new} | {_us(old_first)} / "
              f"{r['incumbent_us']:.1f} | {_us(new_first)} / {r['tuned_us']:.1f} | "
              f"{_ratio(old_first, new_first)} / {r['incumbent_us'] / r['tuned_us']:.3f} | {_ratio(cross, 1)} |")
    defaults = [second[k]["default_us"] / first[k]["default_us"] for k in keys]
    looks = [t / first[k]["looks"][c] for k in keys for c, t in second[k]["looks"].items() if c in first[k]["looks"]]
    print(f"\n{len(keys)} jobs in both. SECOND/FIRST: vLLM's default geomean {geomean(defaults):.3f} "
          f"({min(defaults):.3f}-{max(defaults):.3f}); the {len(looks)} first looks of configs both searches timed "
          f"{geomean(looks):.3f} ({min(looks):.3f}-{max(looks):.3f}).")
    if unbiased:
        print(f"Old on second / new on first, over the {len(unbiased)} entries first's search timed the new config: "
              f"geomean {geomean(unbiased):.3f} ({min(unbiased):.3f}-{max(unbiased):.3f}).")


def _us(value: float | None) -> str:
    return f"{value:.1f}" if value else "—"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a and b else "—"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(sys.argv[1], sys.argv[2])
