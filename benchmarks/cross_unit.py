"""Two re-tunes of the same committed set on two GPU boards: is an entry a re-tune replaced slow everywhere, or only
on the board that replaced it? A third board's re-tune, given, judges the replacements.

Usage: python benchmarks/cross_unit.py FIRST.results.jsonl SECOND.results.jsonl [JUDGE.results.jsonl]

FIRST is a re-tune that kept the entries; SECOND, on another board, replaced some. For each entry SECOND replaced,
prints the old entry's µs on each board (FIRST: its head to head, where FIRST kept it; SECOND: the head to head
that replaced it) and the new config's (SECOND: its head to head; FIRST: its first look, where FIRST's search timed
it), then old/new on each board. A config picked on one board carries that board's luck; its time on the other
board is the unbiased one, so the last column sets the old entry on SECOND against the new one on FIRST, first look
against first look (a first look reads about 1% below the same config's head to head: the line under the table).
Under the table: vLLM's default and every config both searches timed, SECOND/FIRST, the boards' difference at large.

JUDGE, a re-tune over SECOND's files on a third board, picked neither config: for each replacement it gives both
configs' first looks on one board (its search looks at its incumbent, SECOND's entry, and at the old entry where its
climb reached it), old/new on that board, and how many of the replacements it confirms. Sections 2o and 2p of
benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import geometric_mean as geomean

from search_pair import load, short  # beside this script: the same results reader and config names


def main(first_path: str, second_path: str, judge_path: str | None = None) -> None:
    first, second = _by_entry(first_path), _by_entry(second_path)
    keys = [k for k in second if k in first]
    replaced = [k for k in sorted(keys) if second[k]["incumbent"] and second[k]["incumbent"] != second[k]["tuned"]]
    print("| file | M | old → new | old µs, first / second | new µs, first / second | old/new on each "
          "| old on second / new on first |")
    print("|---|---:|---|---:|---:|---:|---:|")
    unbiased = []
    for k in replaced:
        r, f = second[k], first[k]
        old, new = short(r["incumbent"]), short(r["tuned"])
        old_first = f["tuned_us"] if short(f["tuned"]) == old else None
        new_first = f["looks"].get(new)
        cross = _ratio(r["looks"].get(old), new_first)
        unbiased += [cross] if cross else []
        print(f"| {_name(k)} | {k[1]} | {old} → {new} | {_us(old_first)} / {r['incumbent_us']:.1f} | "
              f"{_us(new_first)} / {r['tuned_us']:.1f} | {_fmt(_ratio(old_first, new_first))} / "
              f"{r['incumbent_us'] / r['tuned_us']:.3f} | {_fmt(cross)} |")
    defaults = [second[k]["default_us"] / first[k]["default_us"] for k in keys]
    looks = [t / first[k]["looks"][c] for k in keys for c, t in second[k]["looks"].items() if c in first[k]["looks"]]
    print(f"\n{len(keys)} jobs in both. SECOND/FIRST: vLLM's default geomean {geomean(defaults):.3f} "
          f"({min(defaults):.3f}-{max(defaults):.3f}); the {len(looks)} first looks of configs both searches timed "
          f"{geomean(looks):.3f} ({min(looks):.3f}-{max(looks):.3f}).")
    bias = [r["looks"][short(r["incumbent"])] / r["incumbent_us"] for r in second.values()
            if r["incumbent"] and short(r["incumbent"]) in r["looks"]]
    if bias:
        print(f"A first look against the same config's head to head (SECOND's {len(bias)} incumbents): geomean "
              f"{geomean(bias):.3f}.")
    if unbiased:
        print(f"Old on second / new on first, first looks, over the {len(unbiased)} entries both searches timed both: "
              f"geomean {geomean(unbiased):.3f} ({min(unbiased):.3f}-{max(unbiased):.3f}).")
    if judge_path:
        _judge(second, replaced, _by_entry(judge_path), [first_path, second_path, judge_path])


def _judge(second: dict, replaced: list, judge: dict, paths: list[str]) -> None:
    """SECOND's replacements on JUDGE's board: old and new, first look against first look."""
    print("\n| file | M | old → new | on the judge: old µs | new µs | old/new |\n|---|---:|---|---:|---:|---:|")
    ratios = []
    for k in replaced:
        r, j = second[k], judge.get(k)
        old, new = short(r["incumbent"]), short(r["tuned"])
        old_us, new_us = (j["looks"].get(old), j["looks"].get(new)) if j else (None, None)
        ratio = _ratio(old_us, new_us)
        ratios += [ratio] if ratio else []
        print(f"| {_name(k)} | {k[1]} | {old} → {new} | {_us(old_us)} | {_us(new_us)} | {_fmt(ratio)} |")
    boards = ", ".join(f"{Path(p).parent.name}/{Path(p).name.split('.')[0]} {_unit(p)}" for p in paths)
    print(f"\nBoards: {boards}.")
    if ratios:
        print(f"The judge timed both at {len(ratios)} of {len(replaced)} replacements: old/new geomean "
              f"{geomean(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}); the new config faster at "
              f"{sum(x > 1 for x in ratios)}, the old at {sum(x < 1 for x in ratios)}.")


def _by_entry(path: str) -> dict:
    return {(r["file"], r["m"]): r for r in load(Path(path))}


def _unit(path: str) -> str:
    """The board a run timed on (gpu_state.unit, NVML's UUID; results before it lack it)."""
    units = {(r.get("gpu_state") or {}).get("unit") for r in load(Path(path))} - {None}
    return ", ".join(sorted(units)) if units else "(board not recorded)"


def _name(key: tuple[str, int]) -> str:
    return key[0].split(",device_name")[0]


def _us(value: float | None) -> str:
    return f"{value:.1f}" if value else "—"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _fmt(value: float | None) -> str:
    return f"{value:.3f}" if value else "—"


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__.strip().splitlines()[3].strip())
    main(*sys.argv[1:])
