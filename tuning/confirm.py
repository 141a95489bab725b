"""``verify --against OLD --keep-confirmed OUT``: the set to bake for many nodes keeps only the changes a second
board confirms.

A re-tune on one H200 replaces entries by 1-2% that another board need not repeat: boards differ by up to 7% on
one config, and a search's pick carries its board's luck. Of 16 bf16 entries one board's re-tune replaced (each
confirmed twice on that board), a third board found the entry replaced faster at 11 of the 12 it timed both
(benchmarks/README §2p). So a re-tune's files (NEW) are re-timed on another board beside the set they would
replace (OLD), and OUT is OLD with an entry taken from NEW only where this head to head confirms it: NEW's config
faster than OLD's by more than KEEP_WITHIN, the rule the tuner's own keep decision uses.

OUT holds every config file of OLD and NEW (a file only NEW holds, one the re-tune made, is taken whole). Each
merged sidecar keeps OLD's rows, takes NEW's for the entries it takes, and lists under ``confirmed`` each of them
with the board and the head to head that confirmed it. Everything is checked before any re-timing (OUT new or
empty, a tune-moe sidecar beside each file, the same Triton and kernel on both sides, the same batch sizes), and
OUT is written whole or not at all. An entry of NEW slower than vLLM's default withholds OUT only where OUT would
hold it (``kept_regressions``); elsewhere OUT keeps OLD's entry, and the run says so and writes OUT.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from . import configs, provenance
from .clocks import GpuState
from .errors import UsageError
from .files import copy_config_files, write_folder
from .jobs import KEEP_WITHIN

OPTION = "--keep-confirmed"


@dataclass(frozen=True)
class Change:
    """One changed entry re-timed head to head: vLLM's default, OLD's entry and NEW's."""

    m: int
    old: configs.TileConfig
    new: configs.TileConfig
    default_us: float
    old_us: float
    new_us: float

    @property
    def confirmed(self) -> bool:
        return self.new_us < self.old_us * (1 - KEEP_WITHIN)


def kept_regressions(regressed: list[int], changes: list[Change], made: bool) -> list[int]:
    """Of the batch sizes where NEW's entry is slower than vLLM's default, those OUT would hold: every one of a file
    the re-tune made (taken whole), else those whose change this board confirmed (NEW's entry taken). The others
    stay OLD's, so NEW's regression there is no reason to withhold OUT."""
    if made:
        return list(regressed)
    confirmed = {c.m for c in changes if c.confirmed}
    return [m for m in regressed if m in confirmed]


def check(new_dir: Path, old_dir: Path, out: Path, names: list[str]) -> None:
    """Refuse, in one line and before anything is timed, a merge that could not be written or would mix runs."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{OPTION} {out}: exists and is not an empty folder; pass a new folder")
    for name in names:
        old_path = old_dir / name
        if not old_path.exists():
            continue  # a file the re-tune made: taken whole
        sides = {"NEW": provenance.read(new_dir / name), "OLD": provenance.read(old_path)}
        for side, prov in sides.items():
            if prov is None:
                raise UsageError(f"{OPTION}: {name} in {side} has no tune-moe sidecar, so the merged file could not "
                                 "say where each entry came from; pass folders tune-moe wrote")
        new, old = sides["NEW"], sides["OLD"]
        if (new.run.triton, new.run.kernel_sha256) != (old.run.triton, old.run.kernel_sha256):
            raise UsageError(f"{OPTION}: {name} was tuned under Triton {old.run.triton} in OLD and {new.run.triton} "
                             "in NEW, or another kernel; a merged file would mix them: re-tune OLD's set under NEW's")
        if set(configs.read_config_file(new_dir / name)) != set(configs.read_config_file(old_path)):
            raise UsageError(f"{OPTION}: {name} holds other batch sizes in NEW than in OLD; a merge needs one plan: "
                             "re-tune over a copy of OLD")


def check_board(new_dir: Path, changed: dict[str, tuple[int, ...]], board: GpuState) -> None:
    """Refuse to confirm a change on the board that tuned it (its sidecar row names the board): that would repeat
    the board's own luck, not test it."""
    for name, ms in changed.items():
        prov = provenance.read(new_dir / name)
        units = {row.m: row.unit for row in prov.rows} if prov else {}
        here = [m for m in ms if board.unit and units.get(m) == board.unit]
        if here:
            raise UsageError(f"{OPTION}: {name} M={','.join(map(str, here))} was tuned on this board ({board.unit}); "
                             "a confirmation needs another board: run this on another node (verify --against alone "
                             "checks this node's own gain)")


def write(new_dir: Path, old_dir: Path, out: Path, changes: dict[str, list[Change]], board: GpuState | None,
          when: str) -> tuple[int, list[str]]:
    """Write OUT (through OUT.partial, renamed whole) from NEW's files (``changes``: each one's changed entries,
    re-timed); return how many entries it took from NEW, and a line per file that took any. A batch size re-timed
    that is not one of the file's own (``--batch-sizes`` between them) decides nothing: the entries are the keys."""
    made = [name for name in changes if not (old_dir / name).exists()]
    taken = {name: [r for r in changes[name] if r.confirmed and r.m in configs.read_config_file(old_dir / name)]
             for name in changes if name not in made}

    def fill(partial: Path) -> None:
        copy_config_files(old_dir, partial)
        for name in made:
            for src in (new_dir / name, provenance.sidecar_path(new_dir / name)):
                if src.exists():
                    shutil.copyfile(src, partial / src.name)
        for name, entries in taken.items():
            if entries:
                _merge(new_dir / name, partial / name, entries, board, when)

    write_folder(out, fill)  # checked new or empty before anything ran
    lines = [f"  {name}: M={','.join(str(r.m) for r in entries)} from NEW" for name, entries in taken.items() if entries]
    return sum(map(len, taken.values())), lines + [f"  {name}: a file the re-tune made, taken whole" for name in made]


def _merge(new_path: Path, target: Path, taken: list[Change], board: GpuState | None, when: str) -> None:
    """``target`` (OLD's copy) with ``taken`` entries from ``new_path``, its sidecar rows likewise."""
    old_prov, new_prov = provenance.read(target), provenance.read(new_path)
    ms = {r.m for r in taken}
    entries = {**configs.read_config_file(target), **{r.m: r.new for r in taken}}
    new_rows = {row.m: row for row in new_prov.rows}
    rows = tuple(new_rows.get(row.m, row) if row.m in ms else row for row in old_prov.rows)
    on = (board.unit or "unknown board") if board else "the CPU (--interpret: for testing, not a confirmation)"
    confirmed = [c for c in old_prov.extra.get("confirmed", []) if c.get("m") not in ms] + [{
        "m": r.m, "config": r.new.short, "replaces": r.old.short, "tuned": f"{new_prov.started} to {new_prov.finished}",
        "on": on, "mem_mhz": board.mem_mhz if board else None, "when": when,
        "default_us": round(r.default_us, 2), "old_us": round(r.old_us, 2), "new_us": round(r.new_us, 2),
    } for r in taken]
    extra = {**old_prov.extra, "confirmed": sorted(confirmed, key=lambda c: c["m"])}
    configs.write_config_file(target, entries, old_prov.run.triton)
    provenance.write(target, replace(old_prov, rows=rows, extra=extra))
