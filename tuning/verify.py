"""``tune-moe verify``: load tuned files the way vLLM does, then re-time tuned vs default.

Every file is read and checked first (name, schema, device), before anything heavy is imported;
a file vLLM's loader would choke on is one line, and nothing runs. Each file is then loaded by
vLLM's own ``get_moe_configs`` when vLLM is importable (with the device name it would look up),
else by this project's mirror of it (tuning.configs); that part needs no GPU. Each batch size is
then re-timed head to head on the same kernel and inputs; a tuned config more than 2% slower than
vLLM's default fails the check. On a GPU each line ends with the GPU's state after that timing (SM clock,
power against its limit, NVML's clock-event reasons: ``clocks``). Re-timing needs the GPU the files are
for: without one it stops with one line after the loader check (``--interpret`` runs the kernel under
Triton's CPU interpreter, for tiny test models).

``--against OLD`` checks a re-tune before it is committed: only the batch sizes where a file's entry differs from
the same file in OLD are re-timed, vLLM's default, OLD's entry and the new one alternating in one head to head
(the GPU's drift hits all three alike, where two verify runs, one per set, differ by the state the GPU was in),
and the line gives old/new. A file OLD lacks is re-timed whole: a re-tune's ``before/`` snapshot (tuning.store)
lacks only the files the re-tune made. With ``--keep-confirmed OUT`` it also writes OLD's set with each changed
entry taken from these files only where this head to head, and every earlier board's recorded in these files'
ledger, confirms it (tuning.confirm): the check, on other boards, of a re-tune meant for an image that many nodes
run. There an entry slower than vLLM's default is reported beside OUT: a confirmed change is faster than OLD's
entry, so only a file the re-tune made withholds OUT.

Without ``--against``, each file's speedups over vLLM's default are set beside those its provenance sidecar records
(``Record``), per file and over the set: a node an image is baked for shows whether it gives what the files were
tuned to give.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import geometric_mean

from . import clocks, configs, confirm, gpus
from .configs import CONFIGS_ROOT, TUNED_VAR, TileConfig, default_folder
from .errors import UsageError
from .files import output_folder
from .gpus import GpuSpec, get_gpu
from .jobs import KEEP_WITHIN
from .vllm.kernel import KernelSource, installed_fused_moe, installed_vllm_version, quiet_imports, target_release
from .models import DEFAULT_MODEL, ModelGeometry, load_model
from .provenance import SUFFIX as PROVENANCE_SUFFIX
from .shapes import FILE_NAME, MoeShape, file_name_error, shapes_from_file_names
from .vllm.rules import launch_changes, nearest_entry

REGRESSION = 0.98


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", required=True, help="H200, H20, H20-3e or B200")
    p.add_argument("--configs", help=f"folder of tuned files (default: {CONFIGS_ROOT}/vllm-<major.minor of the "
                   "kernel's vLLM>/<device_name>)")
    p.add_argument("--files", action="append", default=[], metavar="PREFIX",
                   help="only files whose names start with PREFIX (repeatable; names hold commas)")
    p.add_argument("--batch-sizes", help="comma list of M to re-time (default: every batch size in each file)")
    p.add_argument("--model", help=f"config.json or built-in name (default: {DEFAULT_MODEL}[-FP8] by file dtype)")
    p.add_argument("--vllm-src", help="kernel from this vLLM fused_moe.py or wheel (default: installed vLLM)")
    p.add_argument("--vllm-version", help="vLLM version of --vllm-src when it cannot tell")
    p.add_argument("--against", metavar="OLD", help="folder of the files these replace (the committed set): re-time "
                   "only the batch sizes whose entries differ, OLD's entry beside the new one")
    p.add_argument("--keep-confirmed", metavar="OUT", help="with --against: write OUT, OLD's files with each changed "
                   "entry taken from these files only where this board, and every board before it (their head to "
                   f"heads are kept in {confirm.LEDGER} of these files), confirms it (faster than OLD's by more than "
                   f"{KEEP_WITHIN:.0%}%): a re-tune from one board checked on others before it goes into an image")
    p.add_argument("--interpret", action="store_true", help="Triton interpreter on the CPU (tiny models; testing)")


@dataclass(frozen=True)
class TunedFile:
    name: str
    shape: MoeShape
    configs: dict[int, TileConfig]  # what the file holds, by tune-moe's reading of vLLM's contract


def load_with_vllm(folder: Path, shape: MoeShape, device_name: str) -> tuple[dict, str]:
    """What vLLM's loader returns for ``shape`` from ``folder`` (or the mirror when vLLM is absent)."""
    path = folder / shape.file_name(device_name)
    try:
        with quiet_imports():
            from vllm.model_executor.layers.fused_moe import fused_moe
    except ImportError:
        return configs.read_config_file(path), "tune-moe's mirror of vLLM's loader (vLLM not importable)"
    saved = os.environ.get(TUNED_VAR)  # vLLM reads the folder from the environment; this process's is restored
    os.environ[TUNED_VAR] = str(folder.resolve())
    real = fused_moe.get_device_name_as_file_name
    fused_moe.get_device_name_as_file_name = lambda *a, **k: device_name
    try:
        fused_moe.get_moe_configs.cache_clear()
        block = shape.block_shape or (0, 0)
        found = fused_moe.get_moe_configs(shape.num_experts, shape.n, shape.vllm_dtype, block[0], block[1])
    finally:
        fused_moe.get_device_name_as_file_name = real
        fused_moe.get_moe_configs.cache_clear()
        if saved is None:
            os.environ.pop(TUNED_VAR, None)
        else:
            os.environ[TUNED_VAR] = saved
    if not found:
        raise UsageError(f"vLLM's loader did not find {path.name} in {folder}; check the folder and --gpu")
    return {m: configs.TileConfig.from_dict(c) for m, c in found.items()}, "vLLM's get_moe_configs"


def tuned_files(folder: Path, prefixes: list[str], gpu: GpuSpec, model_arg: str | None) -> list[TunedFile]:
    """Every tuned file of ``folder`` (matching ``prefixes``), each read and checked; one line for the first bad one."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--configs {folder}: is a file, not a folder; pass the folder holding the tuned files")
    if not folder.exists():
        raise UsageError(f"{folder}: no such folder; pass --configs with the folder holding the tuned files, or run "
                         f"tune-moe first" + configs.tuned_elsewhere(folder))
    names = sorted(p.name for p in folder.glob("E=*.json") if not p.name.endswith(PROVENANCE_SUFFIX))
    names = [n for n in names if not prefixes or any(n.startswith(p) for p in prefixes)]
    if not names:
        raise UsageError(f"{folder}: no tuned config files{' matching --files' if prefixes else ''}; run tune-moe first"
                         + ("" if prefixes else configs.tuned_elsewhere(folder)))
    models: dict[str, ModelGeometry] = {}
    out = []
    for name in names:
        if not FILE_NAME.match(name):
            raise file_name_error(name, folder / name)
        spec = model_arg or (DEFAULT_MODEL + ("-FP8" if "dtype=fp8" in name else ""))
        model = models[spec] = models.get(spec) or load_model(spec)
        shape = shapes_from_file_names([name], model, gpu.device_name)[0]
        if model.num_experts % shape.num_experts or shape.k != model.hidden_size:
            raise UsageError(f"{folder / name}: E={shape.num_experts} is not a shape of {model.name} "
                             f"({model.num_experts} experts); pass the --model it was tuned for")
        out.append(TunedFile(name, shape, configs.read_config_file(folder / name)))
    return out


def kernel_source(args: argparse.Namespace) -> KernelSource:
    """Where the kernel comes from. Under the interpreter vLLM's fused_moe.py is loaded on its own: an
    imported vLLM replaces Triton with a placeholder on a host without a GPU driver."""
    if args.interpret and not args.vllm_src:
        path = installed_fused_moe()
        if path is None:
            raise UsageError("--interpret: vLLM is not installed here, so there is no fused_moe.py to interpret; "
                             "pass --vllm-src with a vLLM fused_moe.py or wheel")
        return KernelSource(str(path), args.vllm_version)
    return KernelSource(args.vllm_src, args.vllm_version)


def check_gpu(gpu: GpuSpec, checked: int, failed: int) -> None:
    """Re-timing needs ``gpu`` here; one line when it is not (exit 1 when the loader check already failed)."""
    found = gpus.detect_gpus()
    done = (f"the loader check above: {checked} file{'s' if checked != 1 else ''}"
            f"{f', {failed} FAILED' if failed else ' loaded as written'}; ")
    problem = None
    if not found:
        problem = (f"{done}re-timing tuned vs default needs a {gpu.key} GPU and this node has none; "
                   f"run tune-moe verify on a {gpu.key} node")
    elif any(gpus.vllm_device_name(g.name) != gpu.device_name for g in found):
        problem = (f"{done}re-timing for --gpu {gpu.key} needs that GPU and this node has {gpus.describe(found)}; "
                   "pass the --gpu of this node or run on a matching one")
    else:
        import torch

        if not torch.cuda.is_available():
            problem = (f"{done}re-timing needs CUDA and torch sees no GPU here ({gpus.describe(found)}); "
                       "install torch with CUDA support")
    if problem:
        error = UsageError(problem)
        error.exit_code = 1 if failed else UsageError.exit_code
        raise error


def run(args: argparse.Namespace) -> int:
    from .shapes import parse_batch_sizes as batch_sizes

    gpu = get_gpu(args.gpu)
    folder = Path(args.configs or default_folder(gpu.device_name, target_release(args.vllm_version, args.vllm_src)))
    sizes = batch_sizes(args.batch_sizes) if args.batch_sizes is not None else None
    files = tuned_files(folder, args.files, gpu, args.model)
    against = Path(args.against) if args.against else None
    if against is not None and not against.is_dir():
        raise UsageError(f"--against {against}: not a folder; pass the folder of the files these replace")
    out = _keep_confirmed_folder(args, folder, against, files)
    olds = {f.name: configs.read_config_file(against / f.name) if (against / f.name).exists() else None
            for f in files} if against else {}
    source = kernel_source(args)
    kernel = source.load() if source.path else None  # a bad --vllm-src is refused before anything runs
    release = kernel.vllm_version if kernel else args.vllm_version or installed_vllm_version()  # None: unknown yet
    loaded = [f for f in files if _check_loader(folder, f, gpu, release)]
    if not args.interpret:
        check_gpu(gpu, len(files), len(files) - len(loaded))
    if kernel is None:
        kernel = source.load()
    print(f"\nkernel: {kernel.describe}")  # what a log's timings are of (0.34's reads FP8 weights through TMA)
    board = None if args.interpret else clocks.sample()
    if board and board.unit:  # boards differ by up to 7% on one config (benchmarks/README §2o): say which timed
        print(f"\nre-timing on {board.unit} (memory clock {board.mem_mhz} MHz)")
    points = {f.name: _points(f, sizes, olds.get(f.name)) for f in loaded}
    if out is not None and board is not None:
        confirm.check_board(folder, {f.name: points[f.name] for f in loaded if olds[f.name] is not None}, board)
    retimed, records = [], []
    for f in loaded:
        if against and olds[f.name] is None:
            print(f"\n{f.name}: not in {against}: a file made since, every entry re-timed against vLLM's default")
        retimed.append(_retime(f, gpu, kernel, points[f.name], olds.get(f.name),
                               judge=not args.interpret))
        if not against:
            records.append(_record(folder / f.name, retimed[-1].speedups))
            print(f"  {records[-1].line()}")
    failures = len(files) - len(loaded) + sum(r.failed for r in retimed)
    print(f"\n{len(files)} files, {failures} failed"
          + (" (under --interpret: numerics checked, CPU timings shown but not judged)" if args.interpret else ""))
    if len(records) > 1:
        print(Record.pooled(records))
    note = clocks.held_down_note(sum(r.limited for r in retimed), sum(r.timed for r in retimed), "batch sizes timed")
    if note:
        print(note)
    if against:
        print(_against_summary([g for r in retimed for g in r.gains], against))
    if out is None:
        return 1 if failures else 0
    # a confirmed change is faster than OLD's entry: only a file the re-tune made is withheld for a regression
    made = {f.name: olds[f.name] is None for f in loaded}
    blocking = len(files) - len(loaded) + sum(r.hard for r in retimed) + sum(
        bool(confirm.blocking_regressions(r.regressions, made[f.name])) for f, r in zip(loaded, retimed))
    if blocking:
        print(f"{out} not written: {blocking} failed above (a file vLLM's loader reads otherwise, a config that does "
              "not run, or a file the re-tune made slower than vLLM's default): re-tune those shapes, then run again")
        return 1
    unnamed = clocks.GpuState(0, 0.0, 0.0, ())  # a GPU NVML could not read: confirmed on an unnamed board
    written = _write_confirmed(folder, against, out, {f.name: r.changes for f, r in zip(loaded, retimed)},
                               None if args.interpret else board or unnamed)
    for f, r in zip(loaded, retimed):
        if not made[f.name]:
            for line in _slower_than_default(f.name, r, written.taken_at.get(f.name, []), out, against):
                print(line)
    return 0


def _slower_than_default(name: str, r: Retimed, taken: list[int], out: Path, against: Path) -> list[str]:
    """A line per changed entry whose config in OUT (NEW's where ``taken``, else OLD's), or NEW's there, is slower
    than vLLM's default on this board."""
    lines, timed = [], {c.m: c for c in r.changes}
    for m in r.regressions:
        c = timed.get(m)
        if c is None:  # OLD's config did not run: no head to head, OLD's entry stays
            lines.append(f"{name} M={m}: NEW's entry is slower than vLLM's default; {out} keeps {against}'s entry")
        elif m in taken:
            lines.append(f"{name} M={m}: {out} takes NEW's entry, faster than {against}'s ({c.old_us:.1f} -> "
                         f"{c.new_us:.1f} us), but vLLM's default is faster than both on this board "
                         f"({c.default_us:.1f} us)")
        else:
            lines.append(f"{name} M={m}: NEW's entry is slower than vLLM's default, not taken: {out} keeps "
                         f"{against}'s entry ({c.old_us:.1f} us against the default's {c.default_us:.1f})")
    lines += [f"{name} M={c.m}: {out} keeps {against}'s entry, slower than vLLM's default on this board "
              f"({c.old_us:.1f} against {c.default_us:.1f} us)"
              for c in r.changes if r.judged and c.m not in r.regressions and c.default_us / c.old_us < REGRESSION
              and c.m not in taken]
    return lines


def _keep_confirmed_folder(args: argparse.Namespace, folder: Path, against: Path | None,
                           files: list[TunedFile]) -> Path | None:
    """--keep-confirmed's folder, with everything the merge needs checked before anything is timed."""
    if not args.keep_confirmed:
        return None
    if against is None:
        raise UsageError("--keep-confirmed needs --against OLD: the set whose entries stay unless this board "
                         "confirms the change")
    out = output_folder(args.keep_confirmed, "--keep-confirmed")
    confirm.check(folder, against, out, [f.name for f in files])
    return out


def _write_confirmed(folder: Path, against: Path, out: Path, changes: dict[str, list[confirm.Change]],
                     board: clocks.GpuState | None) -> confirm.Written:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    written = confirm.write(folder, against, out, changes, board, when)
    judges = (f"every board that judged them confirmed (this one and {len(written.earlier)} before it, recorded in "
              f"{folder / confirm.LEDGER})" if written.earlier else "this board confirmed")
    print(f"wrote {out}: {against}'s files with the {written.taken} of {sum(map(len, changes.values()))} changed "
          f"entries {judges}" + (" (under --interpret: CPU timings, for testing)" if board is None else "")
          + "".join(f"\n{line}" for line in written.lines))
    return written


def _points(f: TunedFile, sizes: tuple[int, ...] | None, old: dict[int, TileConfig] | None) -> tuple[int, ...]:
    """The batch sizes to re-time: --batch-sizes or every one the file holds; given the old file (--against),
    only those whose entry (by vLLM's nearest-key rule) differs from its."""
    ms = sizes or tuple(sorted(f.configs))
    return ms if old is None else tuple(m for m in ms if nearest_entry(f.configs, m) != nearest_entry(old, m))


def _against_summary(gains: list[float], against: Path) -> str:
    if not gains:
        return f"no entry differs from {against}: nothing to compare"
    better, worse = sum(g > 1 + KEEP_WITHIN for g in gains), sum(g < 1 - KEEP_WITHIN for g in gains)
    return (f"against {against}: {len(gains)} changed entries, old/new geomean {geometric_mean(gains):.3f}x "
            f"(range {min(gains):.3f}-{max(gains):.3f}x); {better} faster and {worse} slower by more than "
            f"{KEEP_WITHIN:.0%}")


def _drift(path: Path, release: str | None) -> str:
    """The Triton the file was tuned with against the one its vLLM runs (and this process compiles with), and what
    ``release``, whose kernel re-times it, launches otherwise than the release it was tuned under."""
    from . import provenance
    from .report import triton_drift
    from .vllm.triton_pins import compiling_triton

    prov = provenance.read(path)
    if prov is None:
        return "Triton: no tune-moe provenance, so the Triton it was tuned with is unknown"
    here = compiling_triton()
    drift = triton_drift(prov)
    line = f"Triton: tuned with {prov.run.triton} for vLLM {prov.run.vllm}; this process compiles with {here}"
    empty = prov.empty_launch_note()
    changes = launch_changes(prov.run.vllm, release, prov.shape) if release else []
    launch = (f"launch: tuned under vLLM {prov.run.vllm}; vLLM {release}, whose kernel re-times it, "
              f"{' and '.join(changes)}: its entries may lose to that release's default; tune for it") if changes else ""
    return line + (f"; drift: {drift}" if drift else "") + "".join(f"\n  {n}" for n in (empty, launch) if n)


def _check_loader(folder: Path, f: TunedFile, gpu: GpuSpec, release: str | None) -> bool:
    """Whether the loader returns exactly what the file holds (printed either way)."""
    loaded, loader = load_with_vllm(folder, f.shape, gpu.device_name)
    print(f"\n{f.name}\n  loaded by {loader}: {len(loaded)} batch sizes")
    print(f"  {_drift(folder / f.name, release)}")
    if loaded != f.configs:
        print("  FAIL: the loader returns other configs than the file holds")
        return False
    return True


@dataclass(frozen=True)
class Record:
    """A file's speedups over vLLM's default timed here, beside those its provenance sidecar records, at the batch
    sizes both hold: whether this node gives what the file was tuned to give (boards differ by 1-3% at the power
    cap, benchmarks/README §2m)."""
    here: dict[int, float]
    recorded: dict[int, float] | None  # None: the file has no tune-moe sidecar

    @property
    def common(self) -> list[int]:
        return sorted(set(self.here) & set(self.recorded or {}))

    def line(self) -> str:
        if not self.here:
            return "no speedup timed here to compare with its record"
        if self.recorded is None:
            return (f"geomean {geometric_mean(self.here.values()):.3f}x over vLLM's default here; no tune-moe sidecar, "
                    "so no recorded speedup to compare")
        ms = self.common
        if not ms:
            return "none of these batch sizes is in its sidecar: no recorded speedup to compare"
        here, then = (geometric_mean(d[m] for m in ms) for d in (self.here, self.recorded))
        return (f"geomean {here:.3f}x over vLLM's default here, {then:.3f}x recorded in its sidecar "
                f"({len(ms)} batch size{'s' if len(ms) != 1 else ''}; here/recorded {here / then:.3f})")

    @staticmethod
    def pooled(records: list[Record]) -> str:
        pairs = [(r.here[m], r.recorded[m]) for r in records for m in r.common]
        if not pairs:
            return "no file has a recorded speedup at the batch sizes timed here"
        here, then = geometric_mean(h for h, _ in pairs), geometric_mean(r for _, r in pairs)
        low = sum(h < 1 - KEEP_WITHIN for h, _ in pairs)
        files = sum(bool(r.common) for r in records)
        return (f"against the record: geomean {here:.3f}x over vLLM's default here, {then:.3f}x recorded, over "
                f"{len(pairs)} batch sizes of {files} file{'s' if files != 1 else ''}; {low} timed here more "
                f"than {KEEP_WITHIN:.0%} slower than vLLM's default")


def _record(path: Path, here: dict[int, float]) -> Record:
    from . import provenance

    prov = provenance.read(path)
    return Record(dict(here), None if prov is None else {row.m: row.speedup for row in prov.rows})


@dataclass
class Retimed:
    hard: int = 0  # 1 if a tuned config failed to run
    regressions: list[int] = field(default_factory=list)  # batch sizes whose tuned config is slower than the default
    limited: int = 0  # batch sizes timed with the clock held down
    timed: int = 0
    changes: list[confirm.Change] = field(default_factory=list)  # with --against, each changed entry timed
    speedups: dict[int, float] = field(default_factory=dict)  # vLLM's default µs / the tuned entry's, per batch size
    judged: bool = True  # False under --interpret: CPU timings are shown, not judged

    @property
    def failed(self) -> int:
        """1 if any batch size failed: a config that does not run, or a regression."""
        return int(bool(self.hard or self.regressions))

    @property
    def gains(self) -> list[float]:
        """old/new per changed batch size."""
        return [c.old_us / c.new_us for c in self.changes]


def _retime(f: TunedFile, gpu: GpuSpec, kernel, sizes: tuple[int, ...], old: dict[int, TileConfig] | None = None,
            judge: bool = True) -> Retimed:
    """Re-time each batch size head to head (with ``old``, that file's entry too), with the GPU's state after
    it (on a GPU)."""
    from .routing import Routing
    from .runner import Runner
    from .search import head_to_head

    out = Retimed(judged=judge)
    print(f"\n{f.name}\n  {'M':>5} {'default us':>11} {'tuned us':>9} {'speedup':>8}  tuned")
    if not sizes:
        print("  no batch size to re-time: every entry equals the old file's")
    for m in sizes:
        tuned = nearest_entry(f.configs, m)
        was = nearest_entry(old, m) if old else None
        runner = Runner(kernel, f.shape, m, gpu, Routing(), seed=0)
        t, d, *o = head_to_head(runner, tuned, runner.default_config(), *([was] if was else []),
                                rounds=3 if judge else 1)
        del runner
        if not t.ok:
            print(f"  {m:>5} tuned config fails: {t.failure}")
            out.hard = 1
            continue
        if not d.ok:
            print(f"  {m:>5} vLLM's default config fails: {d.failure}; tuned {t.us:.1f} us")
            continue
        speedup = out.speedups[m] = d.us / t.us
        flag = "  REGRESSION" if judge and speedup < REGRESSION else ""
        out.regressions += [m] if flag else []
        state = clocks.sample() if judge else None
        out.limited, out.timed = out.limited + bool(state and state.limited), out.timed + 1
        versus = ""
        if o:
            versus = f"  was {was.short} {o[0].us:.1f} us, old/new {o[0].us / t.us:.3f}x" if o[0].ok else \
                f"  was {was.short}, which fails: {o[0].failure}"
            out.changes += [confirm.Change(m, was, tuned, d.us, o[0].us, t.us)] if o[0].ok else []
        print(f"  {m:>5} {d.us:>11.1f} {t.us:>9.1f} {speedup:>7.3f}x  {tuned.short}{flag}{versus}"
              + (f"  ({state.short()})" if state else ""))
    return out
