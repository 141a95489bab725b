"""``tune-moe report``: tuned vs vLLM's default, from the provenance sidecars only.

For each device folder it writes ``REPORT.md`` (a table per shape plus provenance),
``summary.json`` (the same numbers) and ``plots/*.png``; the summary table is printed
and, with ``--readme``, written between the README's report markers. Shapes are sorted
and floats formatted with fixed precision, so re-running gives identical markdown.
The plots are drawn by ``plots``; this module reads and validates the sidecars, builds
the tables and markdown, and writes every file atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import geometric_mean

from . import provenance
from .configs import CONFIGS_ROOT, RELEASE, read_config_file
from .errors import UsageError
from .files import atomic_write, output_file, output_folder
from .jobs import KEEP_WITHIN
from .provenance import SUFFIX as PROVENANCE_SUFFIX, TOOL, BatchRow, Provenance
from .shapes import MoeShape
from .vllm.triton_pins import mismatch, target_triton

BEGIN = "<!-- tune-moe:report:begin -->"
END = "<!-- tune-moe:report:end -->"
DEFAULT_ROOT = CONFIGS_ROOT


@dataclass(frozen=True)
class ShapeReport:
    device: str
    file: str
    shape: MoeShape
    layouts: tuple[str, ...]
    provenance: tuple[str, ...]  # ready-made markdown bullet lines
    rows: tuple[BatchRow, ...]

    @property
    def sort_key(self) -> tuple:
        s = self.shape
        return self.device, s.dtype, s.num_experts, s.n, s.block_shape or (0, 0), self.file

    @property
    def geomean(self) -> float:
        return geometric_mean([r.speedup for r in self.rows])

    @property
    def worst(self) -> BatchRow:
        return min(self.rows, key=lambda r: (r.speedup, r.m))

    @property
    def best(self) -> BatchRow:
        return max(self.rows, key=lambda r: (r.speedup, -r.m))

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", self.file.removesuffix(".json")).strip("_")


@dataclass(frozen=True)
class Alternative:
    """One layout tuned under both FP8 shapes vLLM 0.33 may run for it: the refined block (auto or
    triton backend) and the shard padded to whole checkpoint blocks (an explicit other backend;
    with deep_gemm, vLLM runs DeepGEMM at every M unless VLLM_USE_DEEP_GEMM_E8M0=0, when Triton runs the padded
    shape for N <= 512)."""
    device: str
    layout: str
    refined: ShapeReport
    padded: ShapeReport

    @property
    def rows(self) -> list[tuple[int, float, float]]:
        """(M, refined tuned µs, padded tuned µs) for the batch sizes both were tuned at."""
        padded = {r.m: r.tuned_us for r in self.padded.rows}
        return [(r.m, r.tuned_us, padded[r.m]) for r in self.refined.rows if r.m in padded]

    @property
    def ratios(self) -> list[float]:
        return [refined / padded for _, refined, padded in self.rows]

    @property
    def geomean(self) -> float:
        return geometric_mean(self.ratios)


def alternatives(reports: list[ShapeReport]) -> list[Alternative]:
    by_layout: dict[tuple[str, str], list[ShapeReport]] = {}
    for r in reports:
        if r.shape.dtype == "fp8" and r.shape.block_shape:
            for layout in r.layouts:
                by_layout.setdefault((r.device, layout), []).append(r)
    out = []
    for (device, layout), rs in sorted(by_layout.items()):
        if len(rs) != 2:
            continue
        refined, padded = sorted(rs, key=lambda r: (min(r.shape.block_shape), r.shape.n))
        if min(refined.shape.block_shape) < min(padded.shape.block_shape) and padded.shape.n > refined.shape.n:
            alt = Alternative(device, layout, refined, padded)
            if alt.rows:
                out.append(alt)
    return out


# ---- reading and validating sidecars -------------------------------------------------------------

def _provenance_lines(p: Provenance) -> tuple[str, ...]:
    r, search = p.run, p.search
    span = f" ({p.span})" if p.span else ""
    kernel = f"; kernel: {r.kernel}" if r.kernel else ""
    python = f", Python {r.python}" if r.python else ""
    extra = "".join(f", {k} {search[k]}" for k in ("seed", "scope") if k in search)
    return (
        f"- GPU: {r.count}x {r.gpu_name} (device_name {r.device_name}), driver {r.driver}",
        f"- Software: vLLM {r.vllm}, Triton {r.triton}, torch {r.torch}, CUDA {r.cuda}{python}{kernel}",
        f"- Search: {search['strategy']}, routing {search['routing']}{extra}",
        f"- Tuning time: {p.tuning_seconds / 60:.1f} min{span}",
        *([f"- Triton drift: {drift}"] if (drift := triton_drift(p)) else []),
        *([f"- Not tuned: {empty}"] if (empty := p.empty_launch_note()) else []),
        *([_confirmed_line(p.extra["confirmed"])] if p.extra.get("confirmed") else []),
        *([_defaulted_line(p.extra["defaulted"])] if p.extra.get("defaulted") else []),
    )


def _confirmed_line(confirmed: list[dict]) -> str:
    """The entries ``verify --keep-confirmed`` took from a re-tune, each with the last board's head to head and
    the boards before it that confirmed it too, with their old/new."""
    each = "; ".join(f"M={c['m']} {c['replaces']} → {c['config']}, {c['old_us']} → {c['new_us']} µs on {c['on']}"
                     + "".join(f", {r:.3f}x on {b}" for b, r in c.get("also_confirmed_on", {}).items())
                     for c in confirmed)
    return f"- Taken from a later re-tune where another board confirmed them (`verify --keep-confirmed`): {each}"


def _defaulted_line(defaulted: list[dict]) -> str:
    """The entries set back to vLLM's default, each with what the boards that re-timed it made of it."""
    each = "; ".join(f"M={d['m']} {d['replaces']} → {d['config']} ({d['speedup']:.3f}x over vLLM's default in "
                     f"{d['readings']} re-timings on {d['boards']} boards)" for d in defaulted)
    return f"- Set back to vLLM's default, where the boards that re-timed the entry found it no faster: {each}"


def triton_drift(p: Provenance) -> str | None:
    """How the Triton a file was tuned with differs from the one its vLLM runs (None: same, or unknown)."""
    pin = target_triton(p.run.vllm)
    drift = mismatch(pin, p.run.triton) if pin else None
    return drift.replace("this node compiles", "this file was tuned") if drift else None


def _check_config(folder: Path, report: ShapeReport, where: Path) -> None:
    """The sidecar must describe what vLLM will load: the config beside it, M for M."""
    config_path = folder / report.file
    if not config_path.is_file():
        raise UsageError(f"{where}: its config {report.file} is missing; restore it or delete the sidecar")
    configs = read_config_file(config_path)
    for row in report.rows:
        if configs.get(row.m) != row.tuned:
            raise UsageError(f"{where}: tuned config for M={row.m} differs from {report.file}; "
                             "re-run tune-moe so the two agree")


def load_sidecar(path: Path) -> ShapeReport:
    """One validated sidecar; any problem is a one-line error naming the file and the key."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable or corrupt JSON ({exc}); regenerate it with tune-moe") from None
    p = Provenance.from_json(data, path)
    if path.name != provenance.sidecar_path(p.file).name:
        raise UsageError(f"{path}: its 'file' {p.file!r} does not match its own name; regenerate the sidecar with tune-moe")
    return ShapeReport(str(p.run.device_name), p.file, p.shape, p.layouts, _provenance_lines(p), p.rows)


def sidecars_in(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*" + PROVENANCE_SUFFIX))


def load_folder(folder: Path) -> list[ShapeReport]:
    paths = sidecars_in(folder)
    if not paths:
        raise UsageError(f"{folder} holds no *{PROVENANCE_SUFFIX}; run tune-moe first or pass another --configs")
    reports = []
    for path in paths:
        report = load_sidecar(path)
        _check_config(Path(folder), report, path)
        reports.append(report)
    return sorted(reports, key=lambda r: r.sort_key)


# ---- markdown ------------------------------------------------------------------------------------

def _x(speedup: float) -> str:
    return f"{speedup:.3f}x"


def summary_table(reports: list[ShapeReport]) -> list[str]:
    lines = ["| GPU | shape | file | layouts | geomean speedup | worst M (speedup) | best M (speedup) |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in reports:
        w, b = r.worst, r.best
        lines.append(f"| {r.device} | {r.shape.label} | `{r.file}` | {', '.join(r.layouts) or '-'} | {_x(r.geomean)} "
                     f"| {w.m} ({_x(w.speedup)}) | {b.m} ({_x(b.speedup)}) |")
    return lines


def alternatives_table(alts: list[Alternative]) -> list[str]:
    if not alts:
        return []
    lines = ["| GPU | layout | refined block (auto or triton backend) | padded shard (e.g. `--moe-backend deep_gemm`) "
             "| refined / padded µs, geomean | range |", "|---|---|---|---|---:|---:|"]
    for a in alts:
        lines.append(f"| {a.device} | {a.layout} | {a.refined.shape.label} | {a.padded.shape.label} | {_x(a.geomean)} "
                     f"| {_x(min(a.ratios))} – {_x(max(a.ratios))} |")
    return lines


def alternative_section(a: Alternative) -> list[str]:
    lines = [f"### {a.layout}: {a.refined.shape.label} or {a.padded.shape.label}", "",
             f"Tuned µs of `{a.refined.file}` against `{a.padded.file}`; above 1.000x the padded shape is faster.", "",
             "| M | refined tuned µs | padded tuned µs | refined / padded |", "|---:|---:|---:|---:|"]
    lines += [f"| {m} | {r:.1f} | {p:.1f} | {_x(r / p)} |" for m, r, p in a.rows]
    return lines + ["", f"Geomean {_x(a.geomean)}.", ""]


def shape_section(r: ShapeReport) -> list[str]:
    lines = [f"## {r.shape.label}", "", f"File `{r.file}`; layouts: {', '.join(r.layouts) or '-'}.", "",
             *r.provenance, "",
             "| M | default µs | tuned µs | speedup | % of roofline, default → tuned | bound | tuned config |",
             "|---:|---:|---:|---:|---:|---|---|"]
    for row in r.rows:
        same = " (= default)" if row.tuned == row.default else ""
        lines.append(f"| {row.m} | {row.default_us:.1f} | {row.tuned_us:.1f} | {_x(row.speedup)} | "
                     f"{row.default_pct_roofline:.1f}% → {row.tuned_pct_roofline:.1f}% | {row.bound or '-'} | "
                     f"`{row.tuned.short}`{same} |")
    return lines + ["", f"Geomean speedup {_x(r.geomean)}.", "", f"![{r.shape.label}](plots/{r.slug}.png)", ""]


def _kept_note(reports: list[ShapeReport]) -> str:
    """What a speedup below 1.000x means: an entry a re-tune kept inside the noise, or one to re-tune."""
    speedups = [row.speedup for r in reports for row in r.rows]
    kept, slower = sum(1 - KEEP_WITHIN <= s < 1 for s in speedups), sum(s < 1 - KEEP_WITHIN for s in speedups)
    note = ""
    if kept:
        note += (f" Below 1.000x by less than {KEEP_WITHIN:.0%} ({kept} of the entries): kept by a re-tune because "
                 "neither the search's pick nor vLLM's default beat them by more than the timing noise.")
    if slower:
        note += (f" Below 1.000x by more than {KEEP_WITHIN:.0%} ({slower} of the entries): vLLM's default is faster "
                 "there; re-tune over the folder, or check with `tune-moe verify`.")
    return note


def render_markdown(reports: list[ShapeReport], label: str | None = None) -> str:
    """The folder's REPORT.md; ``label`` names the folder (``vllm-0.34/NVIDIA_H200``), else its devices do."""
    lines = [f"# Tuned fused-MoE configs: {label or ', '.join(sorted({r.device for r in reports}))}", "",
             f"Generated by `tune-moe report` from the `*{PROVENANCE_SUFFIX}` sidecars; re-run it rather than "
             "editing this file. Times are medians under each shape's search scope (gemms: the two expert GEMMs; "
             "layer: the whole expert path); speedup is default / tuned." + _kept_note(reports), "",
             "## Summary", "", *summary_table(reports), "", "![Geomean speedup per shape](plots/summary.png)", ""]
    alts = alternatives(reports)
    if alts:
        lines += ["## One layout, two FP8 shapes", "",
                  "vLLM 0.33 runs a TP shard that is not a whole number of FP8 blocks in one of two ways: it refines "
                  "the block when the MoE backend is auto or triton, and pads the shard to whole blocks for any other "
                  "explicit backend. With `--moe-backend deep_gemm`, vLLM 0.33 runs DeepGEMM at every M by default "
                  "(E8M0 on, sm90 too); Triton runs the padded file only with `VLLM_USE_DEEP_GEMM_E8M0=0` (then at "
                  "every M for N <= 512). `tune-moe preflight` says which for a serve. Both tuned, on the same GPU:",
                  "",
                  *alternatives_table(alts), ""]
        for a in alts:
            lines += alternative_section(a)
    for r in reports:
        lines += shape_section(r)
    return "\n".join(lines)


def summary_data(reports: list[ShapeReport]) -> dict:
    def row(b: BatchRow) -> dict:
        return {**asdict(b), "default": b.default.short, "tuned": b.tuned.short}

    return {"tool": TOOL, "shapes": [
        {"device": r.device, "file": r.file, "shape": r.shape.label, "layouts": list(r.layouts),
         "geomean_speedup": round(r.geomean, 6), "worst": {"m": r.worst.m, "speedup": r.worst.speedup},
         "best": {"m": r.best.m, "speedup": r.best.speedup}, "rows": [row(b) for b in r.rows]}
        for r in reports], "alternatives": [
        {"device": a.device, "layout": a.layout, "refined": a.refined.file, "padded": a.padded.file,
         "geomean_refined_over_padded": round(a.geomean, 6),
         "rows": [{"m": m, "refined_us": r, "padded_us": p} for m, r, p in a.rows]}
        for a in alternatives(reports)]}


# ---- files: atomic writes, the folder's report, README -------------------------------------------

def write_folder_report(out: Path, reports: list[ShapeReport], label: str | None = None) -> None:
    from .plots import shape_png, summary_png

    for r in reports:
        atomic_write(out / "plots" / f"{r.slug}.png", shape_png(f"{r.shape.label} on {r.device}", r.rows))
    labels = [f"{r.device} {r.shape.label}" for r in reports]
    atomic_write(out / "plots" / "summary.png", summary_png(labels, [r.geomean for r in reports]))
    atomic_write(out / "summary.json", (json.dumps(summary_data(reports), indent=2) + "\n").encode())
    atomic_write(out / "REPORT.md", render_markdown(reports, label).encode())


def _marker_span(text: str, readme: Path) -> tuple[int, int]:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(END) < text.index(BEGIN):
        raise UsageError(f"{readme}: needs exactly one {BEGIN} followed by one {END}; add them where the table goes")
    return text.index(BEGIN) + len(BEGIN), text.index(END)


def readme_text(readme: Path) -> str:
    try:
        with open(readme, encoding="utf-8", newline="") as f:  # its line ends as they are (CRLF stays CRLF)
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--readme {readme}: cannot read it ({exc}); pass an existing README") from None
    _marker_span(text, readme)
    return text


def update_readme(readme: Path, text: str, block: list[str]) -> None:
    """Replace only what lies between the markers, in the README's own line ends, in the file a link points to;
    a re-run with the same data changes nothing."""
    start, end = _marker_span(text, readme)
    nl = "\r\n" if "\r\n" in text else "\n"
    new = text[:start] + nl + nl.join(block) + nl + text[end:]
    if new != text:
        atomic_write(Path(readme).resolve(), new.encode())


# ---- command -------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", action="extend", metavar="DIR",
                   help=f"device folders of tuned configs (default: every {DEFAULT_ROOT}/vllm-<release>/<device>/ "
                   "with sidecars)")
    p.add_argument("--out", metavar="DIR", help="write REPORT.md, summary.json and plots/ here (default: the "
                   "configs folder itself; with several folders, DIR/<folder name>/)")
    p.add_argument("--readme", metavar="PATH", help=f"also write the summary table between {BEGIN} and {END}")


def config_dirs(configs: list[str] | None) -> list[Path]:
    if configs:
        missing = [c for c in configs if not Path(c).is_dir()]
        if missing:
            raise UsageError(f"--configs {missing[0]}: no such folder; pass a kernels_configs/vllm-<release>/<device>/ "
                             "folder")
        return [Path(c) for c in dict.fromkeys(configs)]
    found = sorted(d for d in DEFAULT_ROOT.glob("vllm-*/*") if d.is_dir() and RELEASE.fullmatch(d.parent.name)
                   and sidecars_in(d))
    if not found:
        raise UsageError(f"no {DEFAULT_ROOT}/vllm-<release>/<device>/ folder with *{PROVENANCE_SUFFIX} here; "
                         "run tune-moe first, or pass --configs DIR")
    return found


def folder_label(folder: Path) -> str:
    """A configs folder as the report names it: ``vllm-0.34/NVIDIA_H200`` inside a release folder, else its name."""
    d = folder.resolve()
    return f"{d.parent.name}/{d.name}" if RELEASE.fullmatch(d.parent.name) else d.name


def out_dirs(dirs: list[Path], out: str | None) -> list[Path]:
    if not out:
        return dirs
    if len(dirs) == 1:
        return [Path(out)]
    names = [folder_label(d) for d in dirs]
    if len(set(names)) != len(names):
        raise UsageError("--configs folders share a name, so their reports would collide under --out; report them apart")
    return [Path(out) / n for n in names]


def check_out(out: Path, option: str) -> None:
    """``out`` can take REPORT.md, summary.json and plots/; one line before anything is written otherwise."""
    output_folder(out, option)
    output_folder(out / "plots", option)
    for name in ("REPORT.md", "summary.json"):
        output_file(out / name, option)


def _details_line(outs: list[Path], readme: Path) -> str:
    base = readme.resolve().parent
    links = [f"[{folder_label(o)}]({Path(os.path.relpath(o.resolve() / 'REPORT.md', base)).as_posix()})" for o in outs]
    return "Generated by `tune-moe report`; per-shape tables and plots: " + ", ".join(links) + "."


def folder_table(reports: list[ShapeReport]) -> list[str]:
    """One folder's summary table, and its layouts tuned under both FP8 shapes."""
    ordered = sorted(reports, key=lambda r: r.sort_key)
    table = summary_table(ordered)
    alts = alternatives_table(alternatives(ordered))
    if alts:
        table += ["", "Layouts tuned under both FP8 shapes vLLM can run for them (tuned µs, refined / padded):", "",
                  *alts]
    return table


def run(args: argparse.Namespace) -> int:
    dirs = config_dirs(args.configs)
    outs = out_dirs(dirs, args.out)
    for out in outs:
        check_out(out, "--out" if args.out else "--configs")
    per_folder = [load_folder(d) for d in dirs]  # everything validated before anything is written
    readme = readme_text(Path(args.readme)) if args.readme else None
    if args.readme:
        output_file(args.readme, "--readme")
    for out, folder, reports in zip(outs, dirs, per_folder):
        write_folder_report(out, reports, folder_label(folder))
        print(f"wrote {out / 'REPORT.md'}, {out / 'summary.json'} and {len(reports) + 1} plots in {out / 'plots'}")
    table = []
    for folder, reports in sorted(zip(dirs, per_folder), key=lambda fr: folder_label(fr[0])):  # a release's set is its own
        table += ([f"**{folder_label(folder)}**", ""] if len(dirs) > 1 else []) + folder_table(reports) + [""]
    table = table[:-1]
    print("\n" + "\n".join(table))
    if readme is not None:
        update_readme(Path(args.readme), readme, table + ["", _details_line(outs, Path(args.readme))])
        print(f"\nupdated the report block in {args.readme}")
    return 0
