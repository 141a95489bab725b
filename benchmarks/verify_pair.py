"""Two sets of tuned files re-timed on one machine: `tune-moe verify` of each, read from its logs.

    python benchmarks/verify_pair.py OLD.log[,OLD2.log...] NEW.log[,NEW2.log...]
    python benchmarks/verify_pair.py --against RUN.log[,RUN2.log...]
    python benchmarks/verify_pair.py --recorded CONFIGS_DIR RUN.log

Each log is one `tune-moe verify` run; run both sets' alike (files, --batch-sizes), one after the other on
one machine. A set's logs are read together, and a point timed in several of them (a repeat) gets the mean of
its µs. Prints, per (file, M) whose two entries differ, vLLM's default and both entries' µs and old/new (above
1: the new entry is faster), then the geometric means of old/new over the points whose entries differ and over
those whose entries are the same config (what the timing noise alone gives).

With --against, each log is one `tune-moe verify --against OLD` run (both entries in one head to head); prints,
per changed (file, M), old → new, old/new in each run and their mean.

With --recorded, the log is one `tune-moe verify --configs` run of the files in CONFIGS_DIR (no --against); prints,
per file, the geomean speedup over vLLM's default it timed beside the one its provenance sidecar records.

    python benchmarks/verify_pair.py --boards CONFIGS_DIR LOG... [--kernel=VLLM LOG...]

With --boards, the logs are any `tune-moe verify` runs (with or without --against, of any set): prints, per entry of
CONFIGS_DIR whose config is not vLLM's default, every speedup over vLLM's default that its config read at that
batch size of that file (as the tuned entry, or as the entry `--against` compared), each log's board named, then the
geometric mean over the readings. A reading counts where its log compiled with the sidecar's Triton and re-timed
with a kernel the sidecar's vLLM launches alike for that file (tuning.vllm.rules.launch_changes: a bf16 file's under
0.33 and 0.34, not a block-FP8 file's). A log names
its kernel ("kernel: vLLM 0.34.0 ..."); for one older than that line, the kernel is taken to be the release the
file was tuned for, unless a --kernel=VLLM before it says otherwise (it holds for the logs after it).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from statistics import fmean, geometric_mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tuning, for --boards

FILE = re.compile(r"^(E=\S+\.json)$")
ROW = re.compile(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+x\s+(\S+)")
WAS = re.compile(r"  was (\S+) ([\d.]+) us, old/new ([\d.]+)x")
STAMP = re.compile(r"^\d{9,}\.\d+ {3}")  # cli-smi's time stamp before each line
TRITON = re.compile(r"Triton: tuned with (\S+) for vLLM (\S+); this process compiles with (\S+)")
BOARD = re.compile(r"^re-timing on (GPU-[0-9a-f-]+)")
KERNEL = re.compile(r"^kernel: vLLM (\S+) fused_moe_kernel")
SUMMARY = re.compile(r"^\d+ files, \d+ failed")  # a verify run's last word (a tune log's tables are its own record)


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


def against(logs: str) -> None:
    """Per changed (file, M): old/new in each `verify --against` run, and their mean."""
    runs: dict[tuple[str, int], tuple[str, str, list[float]]] = {}
    for path in logs.split(","):
        file = None
        for line in open(path):
            if m := FILE.match(line.rstrip("\n")):
                file = m.group(1)
            elif file and (row := ROW.match(line)) and (was := WAS.search(line)):
                key = (file.removesuffix(".json"), int(row.group(1)))
                runs.setdefault(key, (was.group(1), row.group(4), []))[2].append(float(was.group(3)))
    print("| file | M | old → new | old / new, each run | mean |")
    print("|---|---:|---|---|---:|")
    for (file, m), (old, new, gains) in sorted(runs.items()):
        print(f"| {file} | {m} | {old} → {new} | {', '.join(f'{g:.3f}' for g in gains)} | {fmean(gains):.3f} |")
    means = [fmean(g) for _, _, g in runs.values()]
    if means:
        print(f"\n{len(means)} changed entries: old/new geomean {geometric_mean(means):.4f} "
              f"(means {min(means):.3f}-{max(means):.3f}).")


def recorded(configs: str, log: str) -> None:
    """Per file: the geomean speedup this verify run timed, and the one the file's sidecar records."""
    timed = read(log)
    print("| file | timed here | recorded |")
    print("|---|---:|---:|")
    here_all, rec_all = [], []
    for file in sorted({f for f, _ in timed}):
        sidecar = json.loads((Path(configs) / file.replace(".json", ".provenance.json")).read_text())["results"]
        ms = [m for m in map(int, sidecar) if (file, m) in timed]
        here = [timed[(file, m)][0] / timed[(file, m)][1] for m in ms]
        rec = [sidecar[str(m)]["speedup"] for m in ms]
        here_all += here
        rec_all += rec
        print(f"| {file.removesuffix('.json')} | {geometric_mean(here):.3f} | {geometric_mean(rec):.3f} |")
    print(f"\n{len(here_all)} batch sizes: geomean {geometric_mean(here_all):.3f} here, {geometric_mean(rec_all):.3f} "
          f"recorded; here {min(here_all):.3f}-{max(here_all):.3f}, {sum(x < 0.99 for x in here_all)} below 0.99.")


def readings(path: str, kernel: str = "") -> tuple[str, list[tuple[str, int, str, float, str, str]]]:
    """A verify log's board and its (file, M, config, speedup over vLLM's default, Triton, kernel's vLLM), one
    for the tuned entry of each row and one for the entry ``--against`` set beside it. The kernel's vLLM is the
    log's own line, else ``kernel``, else the one the file was tuned for."""
    board, out, file, tags = "", [], None, {}  # tags: file -> (Triton, kernel's vLLM), from the log's head
    for line in open(path):
        line = STAMP.sub("", line.rstrip("\n"))
        if m := FILE.match(line):
            file = m.group(1)
        elif file and (m := TRITON.search(line)):
            tags[file] = (m.group(3), kernel or m.group(2)) if m.group(1) == m.group(3) else ("mismatch", "")
        elif m := KERNEL.match(line):
            tags = {f: (t, m.group(1)) for f, (t, _) in tags.items()}
        elif m := BOARD.match(line):
            board = m.group(1)
        elif file and (row := ROW.match(line)):
            m_, default_us, tuned_us, config = int(row.group(1)), float(row.group(2)), float(row.group(3)), row.group(4)
            tag = tags.get(file, ("", ""))
            out.append((file, m_, config, default_us / tuned_us, *tag))
            if was := WAS.search(line):
                out.append((file, m_, was.group(1), default_us / float(was.group(2)), *tag))
    return board, out


def collect(configs: Path | str, logs: list[str]) -> tuple[dict, dict, list[str]]:
    """Per entry (file, M, config) of CONFIGS_DIR that is not vLLM's default, its readings (speedup over the
    default, board) in the logs; the recorded speedup of each; the logs skipped (no verify run's)."""
    from tuning import provenance
    from tuning.vllm.rules import launch_changes

    entries, recorded = {}, {}
    for sidecar in sorted(Path(configs).glob("*.provenance.json")):
        prov = provenance.read(sidecar.with_name(sidecar.name.replace(provenance.SUFFIX, ".json")))
        for r in prov.rows:
            if r.tuned != r.default:
                key = (prov.file, r.m, r.tuned.short)
                entries[key], recorded[key] = (prov.run.triton, prov.target.vllm, prov.shape), r.speedup
    missing = next((p for p in logs if not p.startswith("--kernel=") and not Path(p).is_file()), None)
    if missing:
        raise SystemExit(f"{missing}: no such log; give the `tune-moe verify` logs to read (benchmarks/results/*/*.log)")
    got = {key: [] for key in entries}
    kernel, skipped = "", []
    for path in logs:
        if path.startswith("--kernel="):
            kernel = path.removeprefix("--kernel=")
            continue
        if not any(SUMMARY.match(STAMP.sub("", line)) for line in open(path)):
            skipped.append(path)
            continue
        board, rows = readings(path, kernel)
        for file, m, config, speedup, triton, vllm in rows:
            e = entries.get((file, m, config))
            if e and triton == e[0] and (vllm == e[1] or not launch_changes(e[1], vllm, e[2])):
                got[(file, m, config)].append((speedup, board or Path(path).name))
    return got, recorded, skipped


def boards(configs: str, logs: list[str]) -> None:
    """Per entry of CONFIGS_DIR that is not vLLM's default: its speedup on every board that re-timed it."""
    got, recorded, skipped = collect(configs, logs)
    print("| file | M | entry | recorded | readings (boards) | geomean | min | max |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    pooled = []
    for (file, m, config), read in sorted(got.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if read:
            g, rec = geometric_mean([s for s, _ in read]), recorded[(file, m, config)]
            pooled.append((g, rec))
            print(f"| {file.removesuffix('.json')} | {m} | {config} | {rec:.3f} | {len(read)} ({len({b for _, b in read})}) "
                  f"| {g:.3f} | {min(s for s, _ in read):.3f} | {max(s for s, _ in read):.3f} |")
    print(f"\n{len(got)} entries differ from vLLM's default; {len(pooled)} re-timed in these logs "
          f"({len(got) - len(pooled)} never)" + (f"; {len(skipped)} logs are no verify run's, skipped" if skipped else "") + ".")
    for lo, hi, what in ((0, 1.0, "below 1.000x"), (1.0, 1 / 0.99, "1.000-1.010x"), (1 / 0.99, 99, "above 1.010x")):
        n = [p for p in pooled if lo <= p[0] < hi]
        print(f"  {len(n)} read {what} over their readings" + (
            f" ({sum(p[1] > 1 / 0.99 for p in n)} of them recorded above 1.010x)" if n else ""))


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--boards":
        sys.exit(boards(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) == 4 and sys.argv[1] == "--recorded":
        sys.exit(recorded(sys.argv[2], sys.argv[3]))
    if len(sys.argv) == 3 and sys.argv[1] == "--against":
        sys.exit(against(sys.argv[2]))
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(sys.argv[1], sys.argv[2])
