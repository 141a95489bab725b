"""Which MoE backend a block-FP8 serve should use, per GPU and layout: a data file, and the rule that fills it.

``data/backend_advice/vllm-X.Y.json`` holds, for the vLLM release X.Y whose expert paths a bake-off ran, one entry
per (GPU, layout): the serve configuration to use, whether a bake-off measured it (with the measurement's
provenance), and the fastest configuration per range of M. A serve on a release without an entry for its layout
is told so, with the advice measured under another release labelled as such (``advice_for``).
``preflight`` and ``serve`` read it (``advice_for``); ``compare-backends --write-advice`` writes it from a
bake-off (``entries_from``), with the tuned Triton config each batch size was timed with (``timed_configs``):
where the tuned files a serve reads hold another config there now, the advice line says which batch sizes
to re-time (``Advice.stale``), and a bake-off that rewrites an entry times all of its batch sizes
(``uncovered``): an entry replaces the whole layout, whose pick weighs every M. Until a GPU run fills an entry it
says ``"measured": false`` and keeps the tool's earlier advice. bf16 needs no bake-off: vLLM 0.33 runs Triton for
bf16 on Hopper (``BF16``).

A serve configuration is a ``--moe-backend`` value and VLLM_* variables; what it runs on each layer kind
comes from vLLM's rules (``vllm_rules.layer_runtime``), and its time per M is the sum over the layer kinds
of the measured backend that kind runs, weighted by ``KIND_WEIGHTS`` (the number of layers of each kind is
not in the model geometry; 1:1 is recorded with the measurement).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from statistics import geometric_mean

from ..configs import read_config_file
from ..errors import UsageError
from ..gpus import CATALOGUE
from ..shapes import FILE_NAME, Layout, parse_layout, parse_version
from .triton_pins import flashinfer_pin
from .rules import ACTIVATIONS, LayerRuntime, ServeFacts, layer_runtime

FOLDER = Path(__file__).parents[1] / "data" / "backend_advice"
SCHEMA = 1
SERVE_CONFIGS = {  # name -> (--moe-backend, VLLM_* variables)
    "auto": ("auto", {}),
    "triton": ("triton", {}),
    "deep_gemm": ("deep_gemm", {}),
    "deep_gemm_e8m0_off": ("deep_gemm", {"VLLM_USE_DEEP_GEMM_E8M0": "0"}),
}
KIND_WEIGHTS = {"silu": 1.0, "swiglustep": 1.0}
KIND_NAMES = {"silu": "SiLU", "swiglustep": "SwiGLU-step"}
TIE = 0.03  # configurations within 3% of the fastest are equal: the run-to-run spread of one layer's time
BF16 = "bf16 needs no bake-off: vLLM 0.33 and 0.34 run Triton (TritonExperts) for bf16 on Hopper on both layer kinds"
TUNED_VAR = "VLLM_TUNED_CONFIG_FOLDER"


@dataclass(frozen=True)
class Advice:
    gpu: str
    layout: str
    serve_config: str
    measured: bool
    why: str
    ranges: tuple[dict, ...] = ()
    provenance: dict | None = None
    note: str = ""  # what else the pick costs (the padded shard's weight memory), and a FlashInfer other than the pin
    timed_configs: dict | None = None  # shape label -> {M: the tuned Triton config the bake-off timed}
    batch_sizes: tuple[int, ...] = ()  # every M the bake-off timed

    @property
    def moe_backend(self) -> str:
        return SERVE_CONFIGS[self.serve_config][0]

    @property
    def env(self) -> dict[str, str]:
        return SERVE_CONFIGS[self.serve_config][1]

    def flags(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        backend = "(no --moe-backend: vLLM's default)" if self.moe_backend == "auto" else f"--moe-backend {self.moe_backend}"
        return f"{env + ' ' if env else ''}{backend}"

    def line(self, folder: Path | None = None) -> str:
        """One line; with the tuned-config ``folder`` a serve reads, it also names the batch sizes timed with
        another config than the folder holds now, and the bake-off that re-times them."""
        if not self.measured:
            return f"backend advice for {self.layout} on {self.gpu}: {self.flags()} (unmeasured: {self.why})"
        spans = "; ".join(f"M {r['m_min']}-{r['m_max']}: {r['fastest'] or 'none timed'}" for r in self.ranges)
        when = (self.provenance or {}).get("date", "?")
        note = f"; {self.note}" if self.note else ""
        stale = self.stale(folder) if folder is not None else []
        if stale:
            every = ",".join(map(str, self.batch_sizes or stale))
            note += (f"; timed at M={','.join(map(str, stale))} with tuned configs the files no longer hold: re-time "
                     f"the layout with tune-moe compare-backends --gpu {self.gpu} --layouts {self.layout} "
                     f"--batch-sizes {every}")
        return f"backend advice for {self.layout} on {self.gpu}: {self.flags()} (measured {when}: {spans}{note})"

    def stale(self, folder: Path) -> list[int]:
        """Batch sizes whose timed tuned config differs from the one ``folder``'s file for that shape holds."""
        files = {file_label(p.name): p for p in Path(folder).glob("E=*.json") if FILE_NAME.match(p.name)}
        out = set()
        for label, per_m in (self.timed_configs or {}).items():
            path = files.get(label)
            if path is None:
                continue
            table = read_config_file(path)
            out |= {int(m) for m, short in per_m.items() if int(m) in table and table[int(m)].short != short}
        return sorted(out)


def file_label(file_name: str) -> str:
    """The shape label (MoeShape.label) of a vLLM config file name."""
    e, n, _, dtype, b0, b1 = FILE_NAME.match(file_name).groups()
    return f"{'fp8' if dtype else 'bf16'} E={e} N={n}" + (f" [{b0},{b1}]" if b0 else "")


def facts(layout: Layout, config: str, arch: str = "sm90") -> ServeFacts:
    backend, env = SERVE_CONFIGS[config]
    return ServeFacts(arch=arch, dtype="fp8", tp=layout.tp, dp=layout.dp, ep=layout.ep, moe_backend=backend,
                      env=tuple(sorted(env.items())))


def column(r: LayerRuntime) -> str | None:
    """The bake-off backend that a layer kind's runtime is: what vLLM runs there."""
    if r.error:
        return None
    if r.backend == "DEEPGEMM":
        return "deepgemm_e8m0" if r.e8m0 else "hybrid"
    return {"TRITON": "triton_tuned", "FLASHINFER_CUTLASS": "flashinfer"}.get(r.backend)


def reads_tuned_file(layout: Layout, config: str) -> bool:
    return any(layer_runtime(facts(layout, config), act).reads_tuned_file for act in ACTIVATIONS)


def costs(rows, layout_name: str, *, standins: bool = True) -> dict[int, dict[str, float | None]]:
    """Per M, per serve configuration: the weighted µs of one layer of each kind (None: a kind not measured).
    ``standins=False`` takes out the measured time of this harness's torch stand-ins for vLLM's CUDA ops
    (``Measured.standin_us``): a lower bound where vLLM's own ops replace them."""
    layout = parse_layout(layout_name)
    us = {(r.activation, r.m, r.backend): (r.us if standins or r.us is None else r.us - (r.standin_us or 0.0))
          for r in rows if r.layout == layout_name}
    cols = {c: {act: column(layer_runtime(facts(layout, c), act)) for act in ACTIVATIONS} for c in SERVE_CONFIGS}
    out: dict[int, dict[str, float | None]] = {}
    for m in sorted({r.m for r in rows if r.layout == layout_name}):
        out[m] = {}
        for c, kinds in cols.items():
            parts = [us.get((act, m, col)) for act, col in kinds.items()]
            ok = all(p is not None for p in parts)
            out[m][c] = sum(KIND_WEIGHTS[a] * p for a, p in zip(kinds, parts)) if ok else None
    return out


def kinds_left_out(kinds) -> list[str]:
    """The layer kinds a serve configuration's time weighs (``KIND_WEIGHTS``) that ``kinds``, those timed, leaves
    out: every configuration runs each of them, so without one no configuration has a time and none is compared."""
    kinds = set(kinds)
    return [k for k, w in KIND_WEIGHTS.items() if w and k not in kinds]


def kinds_flag(kinds) -> str:
    """The --kinds that timed ``kinds`` ("no rows" where none was)."""
    kinds = set(kinds)
    named = ",".join(k for k in ACTIVATIONS if k in kinds)
    return f"--kinds {named}" if named else "no rows"


def not_compared(kinds) -> str:
    """The one line that replaces the per-serve table of a layout whose rows leave out a layer kind (--kinds)."""
    left = " and ".join(KIND_NAMES[k] for k in kinds_left_out(kinds))
    return (f"per serve configuration: not compared, {left} layers were not timed ({kinds_flag(kinds)}); a serve runs "
            f"{'both kinds' if len(KIND_WEIGHTS) == 2 else 'every kind'}: time them with --kinds {','.join(KIND_WEIGHTS)}")


def fastest(per_m: dict[str, float | None]) -> str | None:
    """The fastest configuration; those within ``TIE`` of it count as equal, and the first of them in
    ``SERVE_CONFIGS`` order (vLLM's default first) is named, so noise never moves a user off the default."""
    timed = {c: v for c, v in per_m.items() if v is not None}
    if not timed:
        return None
    best = min(timed.values())
    return next(c for c in timed if timed[c] <= best * (1 + TIE))


def ranges(table: dict[int, dict[str, float | None]]) -> list[dict]:
    """Consecutive batch sizes with the same fastest configuration."""
    out: list[dict] = []
    for m, per_m in sorted(table.items()):
        best = fastest(per_m)
        if out and out[-1]["fastest"] == best:
            out[-1]["m_max"] = m
        else:
            out.append({"m_min": m, "m_max": m, "fastest": best})
    return out


def overall(table: dict[int, dict[str, float | None]]) -> str | None:
    """The configuration one serve should use: smallest geometric mean of its time over the best, over the batch
    sizes where every candidate was timed (within ``TIE``, the earlier configuration)."""
    full = [per_m for per_m in table.values() if all(v is not None for v in per_m.values())]
    if not full:
        return None
    return fastest({c: geometric_mean([p[c] / min(p.values()) for p in full]) for c in full[0]})


def padding_note(rows, layout_name: str, config: str) -> str:
    """What a configuration that runs the padded 128-block shard costs in weight memory (TP4, TP8)."""
    shapes = {r.backend: r.shape for r in rows if r.layout == layout_name}
    n = {b: re.search(r"N=(\d+)", shapes.get(b, "")) for b in ("triton_tuned", "hybrid")}
    if config not in ("deep_gemm", "deep_gemm_e8m0_off") or not all(n.values()):
        return ""
    base, padded = (int(n[b].group(1)) for b in ("triton_tuned", "hybrid"))
    if padded == base:
        return ""
    return (f"it holds the MoE weights padded to 128 blocks (N={padded} instead of {base}: "
            f"{padded / base - 1:.0%} more expert weight memory per GPU)")


def flashinfer_note(rows, layout_name: str, provenance: dict) -> str:
    """Where a layout's FlashInfer-CUTLASS rows were timed with another FlashInfer than the release pins, say so."""
    timed = any(r.layout == layout_name and r.backend == "flashinfer" and r.us is not None for r in rows)
    have, vllm = provenance.get("flashinfer"), provenance.get("vllm")
    pin = flashinfer_pin(vllm) if vllm else None
    if not timed or not have or not pin or have == pin:
        return ""
    return f"FlashInfer-CUTLASS timed with FlashInfer {have}; vLLM {vllm} pins {pin}"


def brief(reason: str) -> str:
    """A failure's first clause, for a one-line advice: the recorded row keeps the whole text."""
    head = re.split(r"(?<=[\w)])[.,;] (?=[a-z])", reason, maxsplit=1)[0]
    return head if len(head) <= 100 else head[:99].rsplit(" ", 1)[0] + "…"


def timed_configs(rows, layout_name: str) -> dict[str, dict[str, str]]:
    """Shape label -> {M: the tuned Triton config timed} of one layout's rows (both layer kinds read one file)."""
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        if r.layout == layout_name and r.backend == "triton_tuned" and r.runs:
            out.setdefault(r.shape, {}).setdefault(str(r.m), r.runs)
    return out


def entries_from(rows, gpu: str, provenance: dict) -> list[dict]:
    """One entry per layout. Measured: every configuration timed at some M. Otherwise an unmeasured entry that
    records what was timed and why the rest was not (``serve_config`` None: ``merged`` keeps the old one)."""
    out = []
    for name in sorted({r.layout for r in rows}):
        table, bare = costs(rows, name), costs(rows, name, standins=False)
        pick, pick_bare = overall(table), overall(bare)
        entry = {"gpu": gpu, "layout": name, "ranges": ranges(table), "us": {str(m): v for m, v in table.items()},
                 "us_without_standins": {str(m): v for m, v in bare.items()}, "kind_weights": KIND_WEIGHTS,
                 "timed_configs": timed_configs(rows, name), "provenance": provenance}
        if pick is None:
            untimed = sorted({c for per_m in table.values() for c, v in per_m.items() if v is None})
            layout = parse_layout(name)
            cols = {column(layer_runtime(facts(layout, c), a)) for c in untimed for a in ACTIVATIONS}
            why = sorted({f"{r.backend}: {brief(r.failure)}" for r in rows
                          if r.layout == name and r.us is None and r.failure and r.backend in cols})
            out.append({**entry, "serve_config": None, "measured": False,
                        "why": f"{', '.join(untimed)} not timed ({'; '.join(why) or 'no rows'}), so the earlier advice "
                               "stays; the other configurations were (ranges, us)"})
            continue
        why = "fastest over the batch sizes timed (geometric mean of time over the best per M; within " \
              f"{TIE:.0%}, vLLM's default first)"
        if pick_bare != pick:
            why += (f"; without the time of this harness's stand-ins for vLLM's CUDA ops {pick_bare} would be, so "
                    "the pick waits on a run with vLLM's own ops")
        note = "; ".join(n for n in (padding_note(rows, name, pick), flashinfer_note(rows, name, provenance)) if n)
        out.append({**entry, "serve_config": pick, "measured": True, "why": why, "note": note})
    return out


# ---- the data files, one per vLLM release ----------------------------------------------------------

def series(vllm_version: str) -> str:
    """The release a version belongs to: 0.34.0 -> 0.34."""
    return ".".join(vllm_version.split(".")[:2])


def data_file(release: str) -> Path:
    """The committed advice of the bake-offs run with vLLM ``release``'s expert paths."""
    return FOLDER / f"vllm-{series(release)}.json"


def releases() -> list[str]:
    """The releases with committed advice, newest first."""
    found = [f.stem.removeprefix("vllm-") for f in FOLDER.glob("vllm-*.json")]
    return sorted(found, key=lambda r: tuple(int(x) for x in r.split(".")), reverse=True)


def release_of(path: Path) -> str | None:
    """The release an advice file was measured with (its "vllm" field), None for a file without one."""
    try:
        return json.loads(Path(path).read_text()).get("vllm")
    except (OSError, ValueError, AttributeError):
        return None


def load(path: Path) -> dict[tuple[str, str], Advice]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable backend-advice file ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), list):
        raise UsageError(f"{path}: not a schema-{SCHEMA} backend-advice file (needs 'schema' and 'entries')")
    out = {}
    for i, e in enumerate(data["entries"]):
        out[(e.get("gpu"), e.get("layout"))] = _entry(e, f"{path}: entry {i}")
    return out


def _entry(e: dict, where: str) -> Advice:
    need = {"gpu": str, "layout": str, "serve_config": str, "measured": bool, "why": str}
    bad = [k for k, t in need.items() if not isinstance(e.get(k), t)]
    if bad or e["serve_config"] not in SERVE_CONFIGS:
        raise UsageError(f"{where}: needs {', '.join(need)}, serve_config one of {', '.join(SERVE_CONFIGS)}")
    if e["measured"] and not isinstance(e.get("provenance"), dict):
        raise UsageError(f"{where}: a measured entry needs its provenance")
    parse_layout(e["layout"])
    return Advice(e["gpu"], e["layout"], e["serve_config"], e["measured"], e["why"], tuple(e.get("ranges") or ()),
                  e.get("provenance"), str(e.get("note") or ""), e.get("timed_configs"),
                  tuple(sorted(int(m) for m in e.get("us") or {})))


def uncovered(gpu: str, layout: str, ms, path: Path | None) -> list[int]:
    """The batch sizes the entry for (gpu, layout) in ``path`` was timed at that ``ms`` leaves out. A bake-off that
    writes the entry must time them all: it replaces the whole entry, and the pick weighs every M."""
    old = load(path).get((gpu, layout)) if path else None
    return sorted(set(old.batch_sizes) - set(ms)) if old and old.measured else []


def merged(entries: list[dict], path: Path | None, release: str) -> dict:
    """The data file at ``path`` (a new one for vLLM ``release`` where there is none) with ``entries`` replacing
    those of the same (GPU, layout) in place (a re-timed layout's diff is its own); an unmeasured entry keeps the
    serve configuration it replaces (vLLM's default where there was none)."""
    data = json.loads(Path(path).read_text()) if path else {
        "schema": SCHEMA, "vllm": series(release), "dtype": "fp8",
        "what": "the MoE serve configuration (--moe-backend and VLLM_* variables) per GPU and layout for block-FP8 "
                f"Step-3.5-Flash under vLLM {series(release)}; written by tune-moe compare-backends --write-advice, "
                "read by preflight and serve",
        "bf16": BF16, "status": "not measured", "entries": []}
    old = {(e["gpu"], e["layout"]): e for e in data["entries"]}
    new = []
    for e in entries:
        if e["serve_config"] is None:
            e = {**e, "serve_config": old.get((e["gpu"], e["layout"]), {}).get("serve_config", "auto")}
        new.append(e)
    fresh = {(e["gpu"], e["layout"]): e for e in new}  # each in the place of the one it replaces, the rest after
    data["entries"] = [fresh.pop((e["gpu"], e["layout"]), e) for e in data["entries"]] + list(fresh.values())
    measured = sum(e["measured"] for e in data["entries"])
    data["status"] = "measured" if measured == len(data["entries"]) else \
        "not measured" if not measured else f"{measured} of {len(data['entries'])} layouts measured"
    return data


def nearest_first(releases_: list[str], release: str) -> list[str]:
    """``releases_`` ordered by distance from ``release`` (in minor versions), the newer of two as near first."""
    def minor(r: str) -> int:
        major, minor_ = parse_version(r)
        return major * 1000 + minor_

    want = minor(release)
    return sorted(releases_, key=lambda r: (abs(minor(r) - want), -minor(r)))


def advice_for(gpu: str, layout: Layout, dtype: str, vllm_version: str,
               path: Path | None = None) -> Advice | str | None:
    """The advice for a serve on ``vllm_version``: an Advice measured under its release (``path``, else the
    committed file), the one bf16 line (on Hopper; None on other GPUs), a line labelling the advice measured under
    the nearest other release that has the layout (the newer of two as near), None where none has."""
    if dtype != "fp8":  # the bf16 line holds on Hopper; elsewhere vLLM picks other kernels (FlashInfer on B200)
        return BF16 if CATALOGUE.get(gpu.lower()) is None or CATALOGUE[gpu.lower()].arch == "sm90" else None
    release = series(vllm_version)
    own = Path(path) if path else data_file(release)
    found = load(own).get((gpu, layout.name)) if own.is_file() else None
    if found or path:
        return found
    for other in nearest_first(releases(), release):
        old = load(data_file(other)).get((gpu, layout.name))
        if old:
            said = old.line().split(": ", 1)[1]
            return (f"backend advice for {layout.name} on {gpu}: not measured under vLLM {release} (tune-moe "
                    f"compare-backends with vLLM {release}'s sources measures it); under vLLM {other}: {said}")
    return None
