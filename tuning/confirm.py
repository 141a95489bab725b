"""``verify --against OLD --keep-confirmed OUT``: the set to bake for many nodes keeps only the changes the other
boards confirm.

A re-tune on one H200 replaces entries by 1-2% that another board need not repeat: boards differ by up to 7% on
one config, and a search's pick carries its board's luck. Of 16 bf16 entries one board's re-tune replaced (each
confirmed twice on that board), a third board found the entry replaced faster at 11 of the 12 it timed both
(benchmarks/README §2p). So a re-tune's files (NEW) are re-timed on another board beside the set they would
replace (OLD), and OUT is OLD with an entry taken from NEW only where this head to head confirms it: NEW's config
faster than OLD's by more than KEEP_WITHIN, the rule the tuner's own keep decision uses.

One board is not enough either: the eighth board took 10 of 26 changes that the seventh and the ninth both refused,
7 of them slower there by more than 1% (§2s). So each board's head to heads are recorded in NEW
(``NEW/.tune-moe/judged.jsonl``, which travels with NEW to the next node), and an entry is taken only where every
board that judged it confirms it, each board's rounds pooled (the geometric mean of new/old).

OUT holds every config file of OLD and NEW (a file only NEW holds, one the re-tune made, is taken whole). Each
merged sidecar keeps OLD's rows, takes NEW's for the entries it takes, and lists under ``confirmed`` each of them
with the boards and the head to heads that confirmed it (and NEW's vLLM release, where NEW's kernel is not OLD's).
Everything is checked before any re-timing (OUT new or empty, NEW writable, a tune-moe sidecar beside each file, the
same Triton on both sides, the same kernel or two known vLLM releases that launch the file's kernel alike, as 0.33
and 0.34 do a bf16 file's, NEW keeping OLD's batch sizes), and OUT is written whole or not at all. A change this
board confirms is faster than OLD's entry, so where NEW's entry is slower than vLLM's default OLD's is slower still:
OUT loses nothing by taking it, and only a file the re-tune made is withheld for a regression. A batch size NEW adds
whose entry is the one vLLM already ran there from OLD (its nearest key's) changes nothing vLLM runs: it is taken
with NEW's row, which records what that entry measured at that batch size, and needs no board's confirmation.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import geometric_mean

from . import configs, provenance
from .vllm import source as vllm_source
from .clocks import GpuState
from .errors import UsageError
from .files import atomic_write_text, copy_config_files, write_folder
from .jobs import KEEP_WITHIN
from .vllm.rules import kernel_launch_changes, nearest_entry

OPTION = "--keep-confirmed"
LEDGER = Path(".tune-moe") / "judged.jsonl"  # in NEW: every board's head to heads of NEW's changes


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


@dataclass(frozen=True)
class Verdict:
    """One board's head to head of one changed entry, as the ledger in NEW keeps it."""

    file: str
    m: int
    new: str
    old: str
    on: str
    mem_mhz: int
    when: str
    default_us: float
    old_us: float
    new_us: float

    def matches(self, file: str, change: Change) -> bool:
        return (self.file, self.m, self.new, self.old) == (file, change.m, change.new.short, change.old.short)


def read_ledger(new_dir: Path) -> list[Verdict]:
    """The head to heads earlier boards recorded in NEW (none for a NEW no board has judged)."""
    path = new_dir / LEDGER
    if not path.exists():
        return []
    try:
        return [Verdict(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{OPTION}: {path} is not a ledger tune-moe wrote ({exc}); restore it from where NEW came "
                         "from, or move it away to judge NEW on this board alone") from None


def verdicts(name: str, changes: list[Change], board: GpuState, when: str) -> list[Verdict]:
    return [Verdict(name, c.m, c.new.short, c.old.short, _name(board), board.mem_mhz, when,
                    round(c.default_us, 2), round(c.old_us, 2), round(c.new_us, 2)) for c in changes]


def boards(name: str, change: Change, earlier: list[Verdict], here: str) -> dict[str, float]:
    """new/old on each board that judged ``change`` (this run's head to head under ``here``), a board's rounds
    pooled by their geometric mean; a board confirms where it is below 1 - KEEP_WITHIN."""
    ratios: dict[str, list[float]] = {}
    for v in earlier:
        if v.matches(name, change):
            ratios.setdefault(v.on, []).append(v.new_us / v.old_us)
    ratios.setdefault(here, []).append(change.new_us / change.old_us)
    return {on: geometric_mean(r) for on, r in ratios.items()}


def blocking_regressions(regressed: list[int], made: bool) -> list[int]:
    """Of the batch sizes where NEW's entry is slower than vLLM's default, those that withhold OUT: every one of a
    file the re-tune made (taken whole, no OLD entry to set it against). Elsewhere OUT holds NEW's entry only where
    it is confirmed faster than OLD's, which is then slower than the default still, so OUT loses nothing."""
    return list(regressed) if made else []


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
        # another kernel is judged only between known releases (by the sha256, not the recorded text)
        changed = kernel_launch_changes(old.run.kernel_sha256, new.run.kernel_sha256, new.shape)
        if new.run.triton != old.run.triton or changed is None:
            raise UsageError(f"{OPTION}: {name} was tuned under Triton {old.run.triton} in OLD and {new.run.triton} "
                             "in NEW, or another kernel; a merged file would mix them: re-tune OLD's set under NEW's")
        if changed:
            was, now = (vllm_source.KNOWN_SOURCES[p.run.kernel_sha256] for p in (old, new))
            raise UsageError(f"{OPTION}: {name} was tuned under vLLM {was} in OLD and {now} in NEW, and {now} "
                             f"{' and '.join(changed)}: a merged file would mix launches; re-tune OLD's set under "
                             "NEW's")
        lost = sorted(set(configs.read_config_file(old_path)) - set(configs.read_config_file(new_dir / name)))
        if lost:  # a re-tune over a copy of OLD keeps every key of OLD, and may add some (--batch-sizes)
            raise UsageError(f"{OPTION}: {name} in NEW lacks OLD's batch sizes {','.join(map(str, lost))}; a merge "
                             "needs NEW re-tuned over a copy of OLD, which keeps them")
    ledger = new_dir / LEDGER
    nearest = ledger if ledger.exists() else ledger.parent if ledger.parent.exists() else new_dir  # what will be written
    if not os.access(nearest, os.W_OK):
        raise UsageError(f"{OPTION}: {ledger} cannot be written, and it records this board's head to heads for the "
                         "next board: judge a writable copy of NEW")
    read_ledger(new_dir)


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


def _name(board: GpuState) -> str:
    return board.unit or "unknown board"  # a GPU NVML could not name


@dataclass(frozen=True)
class Written:
    taken_at: dict[str, list[int]]  # per file of OLD, the batch sizes whose entry OUT took from NEW
    lines: list[str]  # a line per file that took any, and per change an earlier board did not confirm
    earlier: list[str]  # the boards whose head to heads NEW's ledger held

    @property
    def taken(self) -> int:
        return sum(map(len, self.taken_at.values()))


def write(new_dir: Path, old_dir: Path, out: Path, changes: dict[str, list[Change]], board: GpuState | None,
          when: str) -> Written:
    """Write OUT (through OUT.partial, renamed whole) from NEW's files (``changes``: each one's changed entries,
    re-timed on ``board``), taking an entry where every board that judged it confirms it, then add this board's head
    to heads to NEW's ledger. Each judged change is one of NEW's keys, against the entry vLLM runs there from OLD
    (its own, or its nearest key's: a key NEW adds is taken, with its sidecar row, where it is confirmed); a batch
    size re-timed that is not one of NEW's keys (``--batch-sizes`` between them) decides nothing. ``board`` None
    (``--interpret``: CPU timings) reads and adds nothing: a CPU's timings confirm nothing for a GPU."""
    made = [name for name in changes if not (old_dir / name).exists()]
    judged = {name: [c for c in changes[name] if c.m in configs.read_config_file(new_dir / name)]
              for name in changes if name not in made}
    earlier = read_ledger(new_dir) if board else []
    here = _name(board) if board else ""
    # new/old per board that judged each change; with no ledger (or --interpret) this board's alone
    pooled = {(name, c.m): boards(name, c, earlier, here) for name, cs in judged.items() for c in cs}
    taken = {name: [c for c in cs if all(r < 1 - KEEP_WITHIN for r in pooled[name, c.m].values())]
             for name, cs in judged.items()}
    same = {name: unchanged_additions(new_dir / name, old_dir / name) for name in changes if name not in made}

    def fill(partial: Path) -> None:
        copy_config_files(old_dir, partial)
        for name in made:
            for src in (new_dir / name, provenance.sidecar_path(new_dir / name)):
                if src.exists():
                    shutil.copyfile(src, partial / src.name)
        for name, entries in taken.items():
            if entries:
                _merge(new_dir / name, partial / name, entries, board, when, {c.m: pooled[name, c.m] for c in entries})
        for name, ms in same.items():
            if ms:
                _add_rows(new_dir / name, partial / name, ms)

    write_folder(out, fill)  # checked new or empty before anything ran
    if board:
        try:
            record(new_dir, [v for name, cs in judged.items() for v in verdicts(name, cs, board, when)])
        except OSError as exc:  # the ledger is as it was (record replaces it whole); OUT is written and whole
            raise UsageError(f"{OPTION}: wrote {out}, but {new_dir / LEDGER} could not take this board's head to heads "
                             f"({exc.strerror or exc}); make room there and judge NEW again into a new OUT, so that "
                             "the next board pools this one") from None
    lines = [f"  {name}: M={','.join(str(r.m) for r in entries)} from NEW" for name, entries in taken.items() if entries]
    lines += [f"  {name}: a file the re-tune made, taken whole" for name in made]
    lines += [f"  {name}: M={','.join(map(str, ms))} added, each the entry vLLM ran there from OLD (its nearest key's), "
              "with NEW's row measured at it" for name, ms in same.items() if ms]
    for name, cs in judged.items():
        for c in cs:
            against = {on: r for on, r in pooled[name, c.m].items() if on != here and r >= 1 - KEEP_WITHIN}
            if c.confirmed and against:
                lines.append(f"  {name}: M={c.m} confirmed here (old/new {c.old_us / c.new_us:.3f}x) but not on "
                             + ", ".join(f"{on} ({1 / r:.3f}x)" for on, r in against.items()) + f": {old_dir}'s entry stays")
    return Written({name: [c.m for c in cs] for name, cs in taken.items()}, lines, sorted({v.on for v in earlier} - {here}))


def record(new_dir: Path, rows: list[Verdict]) -> None:
    """Add this board's head to heads to NEW's ledger, for the boards that judge NEW next: the ledger is replaced
    whole (a kill or a full disk mid-write leaves it as it was, never a line cut short that the next board refuses)."""
    path = new_dir / LEDGER
    held = path.read_text() if path.exists() else ""
    atomic_write_text(path, held + "".join(json.dumps(asdict(v)) + "\n" for v in rows))


def unchanged_additions(new_path: Path, old_path: Path) -> list[int]:
    """The batch sizes NEW's file adds to OLD's whose entry is the one vLLM runs there from OLD (the nearest key's)."""
    new, old = configs.read_config_file(new_path), configs.read_config_file(old_path)
    return [m for m in sorted(set(new) - set(old)) if new[m] == nearest_entry(old, m)]


def _add_rows(new_path: Path, target: Path, ms: list[int]) -> None:
    """``target`` (OUT's copy of OLD) with NEW's entries and sidecar rows at ``ms``, keys vLLM ran alike before."""
    prov, new = provenance.read(target), configs.read_config_file(new_path)
    entries = {**configs.read_config_file(target), **{m: new[m] for m in ms}}
    configs.write_config_file(target, entries, prov.run.triton)
    provenance.write(target, replace(prov, rows=_rows_with(prov.rows, provenance.read(new_path).rows, ms)))


def _rows_with(rows, new_rows, ms) -> tuple:
    """Sidecar ``rows`` with NEW's rows at the batch sizes ``ms`` (replaced or added), in batch-size order."""
    by_m = {row.m: row for row in rows} | {row.m: row for row in new_rows if row.m in ms}
    return tuple(by_m[m] for m in sorted(by_m))


def _merge(new_path: Path, target: Path, taken: list[Change], board: GpuState | None, when: str,
           on_boards: dict[int, dict[str, float]]) -> None:
    """``target`` (OLD's copy) with ``taken`` entries from ``new_path``, its sidecar rows likewise; each confirmed
    entry names the boards before this one that confirmed it, with their old/new (``on_boards``: new/old)."""
    old_prov, new_prov = provenance.read(target), provenance.read(new_path)
    ms = {r.m for r in taken}
    entries = {**configs.read_config_file(target), **{r.m: r.new for r in taken}}
    rows = _rows_with(old_prov.rows, new_prov.rows, ms)
    on = _name(board) if board else "the CPU (--interpret: for testing, not a confirmation)"
    # the merged sidecar keeps OLD's run: an entry tuned under another kernel (a release check() found launched
    # alike) names NEW's release
    sha = new_prov.run.kernel_sha256
    release = {} if sha == old_prov.run.kernel_sha256 else {"vllm": vllm_source.KNOWN_SOURCES.get(sha, new_prov.run.vllm)}
    confirmed = [c for c in old_prov.extra.get("confirmed", []) if c.get("m") not in ms] + [{
        "m": r.m, "config": r.new.short, "replaces": r.old.short, "tuned": new_prov.span, **release,
        "on": on, "mem_mhz": board.mem_mhz if board else None, "when": when,
        "default_us": round(r.default_us, 2), "old_us": round(r.old_us, 2), "new_us": round(r.new_us, 2),
        **({"also_confirmed_on": {b: round(1 / x, 4) for b, x in on_boards[r.m].items() if b != on}}
           if len(on_boards.get(r.m, {})) > 1 else {}),
    } for r in taken]
    extra = {**old_prov.extra, "confirmed": sorted(confirmed, key=lambda c: c["m"])}
    configs.write_config_file(target, entries, old_prov.run.triton)
    provenance.write(target, replace(old_prov, rows=rows, extra=extra))
