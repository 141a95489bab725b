"""What a run writes: vLLM's config file and its provenance sidecar per shape, checked before any work.

``check_writable`` runs before the GPUs start: a config file in the way must be one of ours, tuned
under the same software, or ``--overwrite`` replaces it. ``write_shape`` runs the moment a shape's last
batch size is done, and only for shapes that got a result in this run: a re-run that tunes nothing
rewrites nothing, so provenance always comes from the run that tuned the file. It writes the sidecar first and
the config file last, so a config file a run wrote always has its sidecar; ``is_written`` tells a resume which
finished shapes a kill kept from their files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from statistics import geometric_mean

from . import clocks, configs, provenance
from .configs import TileConfig
from .errors import UsageError
from .jobs import CLEAR_WIN, JobResult, Settings
from .plan import Plan
from .provenance import BatchRow, Provenance, RunInfo, Target
from .shapes import MoeShape
from .vllm.rules import nearest_key

SOFTWARE = ("triton", "vllm", "kernel_sha256")  # what must match to merge a new run into an old file


@dataclass(frozen=True, kw_only=True)
class Existing:
    """What a run may merge into: the file's configs and sidecar rows (empty when it replaces the file)."""

    configs: dict[int, TileConfig]
    rows: tuple[BatchRow, ...] = ()
    layouts: tuple[str, ...] = ()  # the layouts its earlier runs tuned it for: a partial re-tune keeps them
    held: dict[int, TileConfig] = field(default_factory=dict)  # what the file holds now, whatever wrote it: each
    # entry is its batch size's incumbent, timed against the search's winner and kept unless beaten (search)
    confirmed: tuple[dict, ...] = ()  # entries verify --keep-confirmed took, with the board that confirmed each

    def still_confirmed(self, entries: dict[int, TileConfig]) -> dict:
        """The sidecar key for the confirmations whose entry the file still holds (a re-tune that kept it)."""
        kept = [c for c in self.confirmed if c["m"] in entries and entries[c["m"]].short == c["config"]]
        return {"confirmed": kept} if kept else {}

    def with_layouts(self, plan: Plan, shape: MoeShape) -> tuple[str, ...]:
        """The file's layouts after this run: the earlier ones, then this plan's for ``shape``."""
        return tuple(dict.fromkeys((*self.layouts, *(lay.name for lay in plan.shapes.get(shape, [])))))


def check_writable(path: Path, software: dict[str, str], overwrite: bool = False) -> Existing:
    """Existing entries a run may merge into; a one-line refusal for foreign or other-software files."""
    if not path.exists():
        return Existing(configs={})
    existing = configs.read_config_file(path)
    prov = provenance.read(path)
    if prov is None:
        if overwrite:
            return Existing(configs={}, held=existing)
        raise UsageError(f"{path} exists and was not written by tune-moe (no {provenance.sidecar_path(path).name}); "
                         "move it away, choose another --out, or pass --overwrite")
    old = {"triton": prov.run.triton, "vllm": prov.run.vllm, "kernel_sha256": prov.run.kernel_sha256}
    differ = [k for k in SOFTWARE if old[k] != software[k]]
    if differ and not overwrite:
        was = ", ".join(f"{k} {old[k] or '?'}" for k in differ)
        now = ", ".join(f"{software[k]}" for k in differ)
        raise UsageError(f"{path.name} in {path.parent} was tuned under other software ({was}; this run: {now}); "
                         "pass --overwrite to replace it with this run's batch sizes, or choose another --out")
    if differ:
        return Existing(configs={}, held=existing)
    return Existing(configs=existing, rows=prov.rows, layouts=prov.layouts, held=existing,
                    confirmed=tuple(prov.extra.get("confirmed", ())))


def write_shape(out: Path, plan: Plan, shape: MoeShape, results: dict[int, JobResult], *, settings: Settings,
                run: RunInfo, target: Target | None, existing: Existing) -> Path:
    """Write (merge into) the vLLM JSON for ``shape`` and its sidecar; return the JSON path. Each is replaced
    atomically, the sidecar first: a kill between them leaves the config file as it was, with a sidecar that does
    not match it, which ``is_written`` finds and a resume mends."""
    path = Path(out) / plan.file_name(shape)
    rows = {r.m: r for r in existing.rows} | {m: row(r) for m, r in results.items()}
    merged = configs.merge(existing.configs, {m: r.tuned for m, r in results.items()})
    provenance.write(path, Provenance(
        file=path.name, shape=shape, layouts=existing.with_layouts(plan, shape),
        gpu_key=plan.gpu.key, run=run, target=target, tool_version=_tool_version(),
        search={"strategy": settings.strategy, "routing": settings.routing, "seed": settings.seed,
                "scope": settings.scope, "max_evals": settings.max_evals},
        **_span(results), tuning_seconds=round(sum(r.seconds for r in results.values()), 1),
        rows=tuple(rows[m] for m in sorted(rows)), extra=existing.still_confirmed(merged)))
    configs.write_config_file(path, merged, run.triton)
    return path


def is_written(out: Path, plan: Plan, shape: MoeShape, results: dict[int, JobResult]) -> bool:
    """Whether ``shape``'s config file and sidecar hold ``results`` (a finished shape's, from the store): not
    when a kill came between its last result and its files."""
    path = Path(out) / plan.file_name(shape)
    prov = provenance.read(path) if path.exists() else None
    if prov is None:
        return False
    held, rows = configs.read_config_file(path), {r.m: (r.tuned, r.tuned_us) for r in prov.rows}
    return all(held.get(m) == r.tuned and rows.get(m) == (r.tuned, row(r).tuned_us) for m, r in results.items())


def never_reached(out: Path, before: Path, name: str) -> bool:
    """Whether the file ``name`` a run recorded as written is gone from ``out``, or holds, config and sidecar
    byte for byte, what ``before`` (the set the run began over) holds: the folder lost or rebuilt since, as when
    the state is carried to a fresh machine. A file changed any other way was edited by hand, and is left."""
    path, old = Path(out) / name, Path(before) / name
    if not path.exists():
        return True
    pairs = ((path, old), (provenance.sidecar_path(path), provenance.sidecar_path(old)))
    return all(a.exists() == b.exists() and (not a.exists() or a.read_bytes() == b.read_bytes()) for a, b in pairs)


def incumbent(held: dict[int, TileConfig], m: int) -> tuple[TileConfig | None, int | None]:
    """The entry vLLM runs for ``m`` from a file holding ``held``, and its key: M's own, else the key nearest to M
    (try_get_optimal_moe_config); (None, None) for no file. A batch size the file lacks is judged against that
    entry, not vLLM's default alone: adding the key changes what vLLM runs there only where the new entry beats it."""
    if not held:
        return None, None
    key = nearest_key(held, m)
    return held[key], key


def incumbent_mark(r: JobResult) -> str:
    """What became of the entry vLLM ran for this M: kept, or replaced by a config that beat it."""
    if r.incumbent is None:  # vLLM ran its default here: a pick must beat it twice, as it would an entry
        return "  (vLLM's default kept: a second head to head undid the search's pick)" if r.rechecked == "undid" else ""
    whose = f" key {r.incumbent_key}'s" if r.adds_key else ""
    if r.incumbent == r.tuned:
        if r.rechecked == "undid":
            return f"  (kept{whose}: a second head to head undid its replacement)"
        return f"  (kept{whose} entry, which vLLM ran here)" if r.adds_key else "  (kept)"
    if not r.incumbent_us:
        return f"  (replaces{whose} {r.incumbent.short}, which fails)"
    times = f"{r.incumbent_us:.1f} -> {r.tuned_us:.1f} us, {r.incumbent_us / r.tuned_us:.3f}x"
    by = ", which vLLM's default beat" if r.tuned == r.default else ""  # by more than KEEP_WITHIN, as a winner must
    return f"  (replaces{whose} {r.incumbent.short}{by}: {times})"


def row(r: JobResult) -> BatchRow:
    return BatchRow(m=r.m, default=r.default, default_us=round(r.default_us, 2), tuned=r.tuned,
                    tuned_us=round(r.tuned_us, 2), tuned_p20_us=round(r.tuned_p20_us, 2),
                    tuned_p80_us=round(r.tuned_p80_us, 2), speedup=round(r.speedup, 4),
                    roofline_us=round(r.roofline_us, 2), bound=r.bound,
                    default_pct_roofline=round(100 * r.roofline_us / r.default_us, 1),
                    tuned_pct_roofline=round(100 * r.roofline_us / r.tuned_us, 1),
                    evaluated=r.evaluated, failed=r.failed, unit=r.gpu_state.get("unit") or None)


STAMP = "%Y-%m-%dT%H:%M:%SZ"


def now() -> str:
    return datetime.now(timezone.utc).strftime(STAMP)


def _span(results: dict[int, JobResult]) -> dict[str, str]:
    """When ``results`` were tuned: from the start of the first job to the end of the last, whichever run and machine
    writes the file (a resume writing a finished shape from the store says when it was tuned, not when written).
    A result from an older store, which kept no time per result, was tuned at an unrecorded time before the run that
    resumed it: then the start is unknown (""), and the end is the last recorded one ("" when none was)."""
    ends = [(datetime.strptime(r.finished, STAMP).replace(tzinfo=timezone.utc), r.seconds)
            for r in results.values() if r.finished]
    last = max((end for end, _ in ends), default=None)
    if len(ends) < len(results) or last is None:
        return {"started": "", "finished": last.strftime(STAMP) if last else ""}
    first = min(end - timedelta(seconds=seconds) for end, seconds in ends)
    return {"started": first.strftime(STAMP), "finished": last.strftime(STAMP)}


def _tool_version() -> str:
    from . import __version__

    return __version__


def summary(plan: Plan, results: dict[tuple[str, int], JobResult]) -> str:
    lines = [f"{'shape':<34} {'M':>5} {'default us':>11} {'tuned us':>9} {'speedup':>8} {'% roofline':>11}  tuned config"]
    for shape in plan.shapes:
        file = plan.file_name(shape)
        rows = sorted((r for (f, _), r in results.items() if f == file), key=lambda r: r.m)
        for r in rows:
            pct = f"{100 * r.roofline_us / r.default_us:.0f}->{100 * r.roofline_us / r.tuned_us:.0f}"
            lines.append(f"{shape.label:<34} {r.m:>5} {r.default_us:>11.1f} {r.tuned_us:>9.1f} {r.speedup:>7.3f}x "
                         f"{pct:>11}  {r.tuned.short}{incumbent_mark(r)}")
        if rows:
            geo = geometric_mean([r.speedup for r in rows])
            worst = min(rows, key=lambda r: r.speedup)
            held = [r for r in rows if r.incumbent and not r.adds_key]
            kept = f"; kept {sum(r.tuned == r.incumbent for r in held)} of the {len(held)} entries the file held" if held else ""
            added = [r for r in rows if r.adds_key]
            kept += (f"; {len(added)} batch size(s) added, {sum(r.tuned != r.incumbent for r in added)} with an entry "
                     "of their own that beat the nearest key's") if added else ""
            lines.append(f"{shape.label:<34} geomean {geo:.3f}x, worst {worst.speedup:.3f}x at M={worst.m}{kept}")
    states = [clocks.GpuState.from_json(r.gpu_state) for r in results.values()]
    note = clocks.held_down_note(sum(bool(s and s.limited) for s in states), len(states), "jobs ended")
    return "\n".join(lines + ([note] if note else []) + ([rechecked_note(results.values())] if any(
        r.rechecked for r in results.values()) else []))


def rechecked_note(results) -> str:
    """How the second head to heads went: each replacement of what vLLM ran (the file's entry, else its default)
    that the first decided is timed once more, unless it won the first clearly (search)."""
    n = {k: sum(r.rechecked == k for r in results) for k in ("confirmed", "undid", "clear")}
    parts, timed = [], n["confirmed"] + n["undid"]
    if timed:
        parts.append(f"{timed} replacement{'s' * (timed != 1)} timed in a second head to head: {n['confirmed']} "
                     f"confirmed, {n['undid']} undone (what vLLM ran kept: the file's entry, else its default)")
    if n["clear"]:
        parts.append(f"{n['clear']} won the first by more than {CLEAR_WIN:.0%}, samples apart: not timed again")
    return "; ".join(parts)
