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
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .configs import FIELDS, PROVENANCE_SUFFIX, TOOL, TileConfig, read_config_file
from .errors import UsageError
from .plots import shape_png, summary_png
from .shapes import MoeShape

BEGIN = "<!-- tune-moe:report:begin -->"
END = "<!-- tune-moe:report:end -->"
DEFAULT_ROOT = Path("kernels_configs")
REQUIRED = ("tool", "file", "layouts", "tuning_seconds", "results", *(f"shape.{k}" for k in (
    "num_experts", "global_experts", "n", "k", "top_k", "dtype", "block_shape")), "gpu.name", "gpu.device_name",
    "gpu.driver", "gpu.count", "software.cuda", "software.torch", "software.triton", "software.vllm",
    "search.strategy", "search.routing")
NUMBERS = ("default_us", "tuned_us", "speedup", "roofline_us", "default_pct_roofline", "tuned_pct_roofline")


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


@dataclass(frozen=True)
class BatchRow:
    m: int
    default_us: float
    tuned_us: float
    speedup: float
    roofline_us: float
    default_pct_roofline: float
    tuned_pct_roofline: float
    bound: str
    default: TileConfig
    tuned: TileConfig


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
        return _geomean([r.speedup for r in self.rows])

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
    with deep_gemm, vLLM falls back to Triton on the padded shape when N <= 512)."""
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
        return _geomean(self.ratios)


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

def _get(data: object, path: str, where: Path) -> object:
    """``data[a][b]...`` for the dotted ``path``; a missing key is a one-line error naming file and key."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(data, dict) or part not in data:
            missing = ".".join(parts[: i + 1])
            raise UsageError(f"{where}: missing required key '{missing}'; regenerate the sidecar with tune-moe")
        data = data[part]
    return data


def _number(data: dict, path: str, where: Path) -> float:
    value = _get(data, path, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where}: key '{path}' is not a finite number; regenerate the sidecar with tune-moe")
    return float(value)


def _tile(data: dict, path: str, where: Path) -> TileConfig:
    values = [_get(data, f"{path}.{f}", where) for f in FIELDS]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UsageError(f"{where}: '{path}' holds a non-integer tile field; regenerate the sidecar with tune-moe")
    return TileConfig(*values)


def _row(data: dict, m: str, where: Path) -> BatchRow:
    if not m.isdigit():
        raise UsageError(f"{where}: results key {m!r} is not a batch size; regenerate the sidecar with tune-moe")
    n = {key: _number(data, f"results.{m}.{key}", where) for key in NUMBERS}
    if min(n["speedup"], n["default_us"], n["tuned_us"]) <= 0:
        raise UsageError(f"{where}: results.{m} has a non-positive time or speedup; regenerate the sidecar")
    return BatchRow(m=int(m), **n, bound=str(data["results"][m].get("bound", "")),
                    default=_tile(data, f"results.{m}.default", where), tuned=_tile(data, f"results.{m}.tuned", where))


def _shape(d: dict, where: Path) -> MoeShape:
    block = d["block_shape"]
    try:
        return MoeShape(int(d["num_experts"]), int(d["global_experts"]), int(d["n"]), int(d["k"]),
                        int(d["top_k"]), str(d["dtype"]), tuple(int(b) for b in block) if block else None)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: 'shape' holds a non-integer field; regenerate the sidecar with tune-moe") from None


def _provenance_lines(data: dict) -> tuple[str, ...]:
    gpu, sw, search = data["gpu"], data["software"], data["search"]
    seconds = float(data["tuning_seconds"])
    span = f" ({data['started']} to {data['finished']})" if data.get("started") and data.get("finished") else ""
    kernel = f"; kernel: {sw['kernel']}" if sw.get("kernel") else ""
    python = f", Python {sw['python']}" if sw.get("python") else ""
    extra = "".join(f", {k} {search[k]}" for k in ("seed", "scope") if k in search)
    return (
        f"- GPU: {gpu['count']}x {gpu['name']} (device_name {gpu['device_name']}), driver {gpu['driver']}",
        f"- Software: vLLM {sw['vllm']}, Triton {sw['triton']}, torch {sw['torch']}, CUDA {sw['cuda']}{python}{kernel}",
        f"- Search: {search['strategy']}, routing {search['routing']}{extra}",
        f"- Tuning time: {seconds / 60:.1f} min{span}",
    )


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
    """One validated sidecar; any missing key is a one-line error naming the file and the key."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable or corrupt JSON ({exc}); regenerate it with tune-moe") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a provenance object; regenerate it with tune-moe")
    for key in REQUIRED:
        _get(data, key, path)
    if data["tool"] != TOOL or not isinstance(data["results"], dict) or not data["results"]:
        raise UsageError(f"{path}: not a {TOOL} sidecar with results; regenerate it with tune-moe")
    shape, device = _shape(data["shape"], path), str(data["gpu"]["device_name"])
    if data["file"] != shape.file_name(device) or path.name != data["file"].removesuffix(".json") + PROVENANCE_SUFFIX:
        raise UsageError(f"{path}: its 'file' {data['file']!r} does not match its shape, device or own name; "
                         "regenerate the sidecar with tune-moe")
    rows = tuple(sorted((_row(data, m, path) for m in data["results"]), key=lambda r: r.m))
    layouts = tuple(str(x) for x in data["layouts"]) if isinstance(data["layouts"], list) else ()
    return ShapeReport(device, data["file"], shape, layouts, _provenance_lines(data), rows)


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


def render_markdown(reports: list[ShapeReport]) -> str:
    devices = ", ".join(sorted({r.device for r in reports}))
    lines = [f"# Tuned fused-MoE configs: {devices}", "",
             f"Generated by `tune-moe report` from the `*{PROVENANCE_SUFFIX}` sidecars; re-run it rather than "
             "editing this file. Times are medians under each shape's search scope (gemms: the two expert GEMMs; "
             "layer: the whole expert path); speedup is default / tuned.", "",
             "## Summary", "", *summary_table(reports), "", "![Geomean speedup per shape](plots/summary.png)", ""]
    alts = alternatives(reports)
    if alts:
        lines += ["## One layout, two FP8 shapes", "",
                  "vLLM 0.33 runs a TP shard that is not a whole number of FP8 blocks in one of two ways: it refines "
                  "the block when the MoE backend is auto or triton, and pads the shard to whole blocks for any other "
                  "explicit backend. With `--moe-backend deep_gemm` on Hopper, DeepGEMM declines N <= 512, so the "
                  "padded shape runs on Triton at every M. Both tuned, on the same GPU:", "",
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

def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_folder_report(out: Path, reports: list[ShapeReport]) -> None:
    for r in reports:
        write_atomic(out / "plots" / f"{r.slug}.png", shape_png(r))
    write_atomic(out / "plots" / "summary.png", summary_png(reports))
    write_atomic(out / "summary.json", (json.dumps(summary_data(reports), indent=2) + "\n").encode())
    write_atomic(out / "REPORT.md", render_markdown(reports).encode())


def _marker_span(text: str, readme: Path) -> tuple[int, int]:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(END) < text.index(BEGIN):
        raise UsageError(f"{readme}: needs exactly one {BEGIN} followed by one {END}; add them where the table goes")
    return text.index(BEGIN) + len(BEGIN), text.index(END)


def readme_text(readme: Path) -> str:
    try:
        text = Path(readme).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--readme {readme}: cannot read it ({exc}); pass an existing README") from None
    _marker_span(text, readme)
    return text


def update_readme(readme: Path, text: str, block: list[str]) -> None:
    """Replace only what lies between the markers; a re-run with the same data changes nothing."""
    start, end = _marker_span(text, readme)
    new = text[:start] + "\n" + "\n".join(block) + "\n" + text[end:]
    if new != text:
        write_atomic(Path(readme), new.encode())


# ---- command -------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", action="extend", metavar="DIR",
                   help=f"device folders of tuned configs (default: every {DEFAULT_ROOT}/<device>/ with sidecars)")
    p.add_argument("--out", metavar="DIR", help="write REPORT.md, summary.json and plots/ here (default: the "
                   "configs folder itself; with several folders, DIR/<folder name>/)")
    p.add_argument("--readme", metavar="PATH", help=f"also write the summary table between {BEGIN} and {END}")


def config_dirs(configs: list[str] | None) -> list[Path]:
    if configs:
        missing = [c for c in configs if not Path(c).is_dir()]
        if missing:
            raise UsageError(f"--configs {missing[0]}: no such folder; pass a kernels_configs/<device>/ folder")
        return [Path(c) for c in dict.fromkeys(configs)]
    found = sorted(d for d in DEFAULT_ROOT.glob("*") if d.is_dir() and sidecars_in(d))
    if not found:
        raise UsageError(f"no {DEFAULT_ROOT}/<device>/ folder with *{PROVENANCE_SUFFIX} here; "
                         "run tune-moe first, or pass --configs DIR")
    return found


def out_dirs(dirs: list[Path], out: str | None) -> list[Path]:
    if not out:
        return dirs
    if len(dirs) == 1:
        return [Path(out)]
    names = [d.resolve().name for d in dirs]
    if len(set(names)) != len(names):
        raise UsageError("--configs folders share a name, so their reports would collide under --out; report them apart")
    return [Path(out) / n for n in names]


def _details_line(outs: list[Path], readme: Path) -> str:
    base = readme.resolve().parent
    links = [f"[{o.resolve().name}]({Path(os.path.relpath(o.resolve() / 'REPORT.md', base)).as_posix()})" for o in outs]
    return "Generated by `tune-moe report`; per-shape tables and plots: " + ", ".join(links) + "."


def run(args: argparse.Namespace) -> int:
    dirs = config_dirs(args.configs)
    outs = out_dirs(dirs, args.out)
    per_folder = [load_folder(d) for d in dirs]  # everything validated before anything is written
    readme = readme_text(Path(args.readme)) if args.readme else None
    for out, reports in zip(outs, per_folder):
        write_folder_report(out, reports)
        print(f"wrote {out / 'REPORT.md'}, {out / 'summary.json'} and {len(reports) + 1} plots in {out / 'plots'}")
    everything = sorted((r for reports in per_folder for r in reports), key=lambda r: r.sort_key)
    table = summary_table(everything)
    alts = alternatives_table(alternatives(everything))
    if alts:
        table += ["", "Layouts tuned under both FP8 shapes vLLM can run for them (tuned µs, refined / padded):", "",
                  *alts]
    print("\n" + "\n".join(table))
    if readme is not None:
        update_readme(Path(args.readme), readme, table + ["", _details_line(outs, Path(args.readme))])
        print(f"\nupdated the report block in {args.readme}")
    return 0
