"""Set back to vLLM's default the tuned entries that the boards which re-timed them found no faster.

    python benchmarks/default_ties.py CONFIGS_DIR LOG... [--kernel=VLLM LOG...]           # what it would change
    python benchmarks/default_ties.py --write CONFIGS_DIR LOG... [--kernel=VLLM LOG...]   # and change it
    python benchmarks/default_ties.py --write --include-advised COPY LOG...   # a copy for the bake-off to re-time

The readings are those of ``benchmarks/verify_pair.py --boards`` (same arguments): every speedup over vLLM's default
that a ``tune-moe verify`` log timed for an entry's config at its batch size, with the Triton and the kernel the
entry was tuned for. An entry with at least MIN_READINGS readings whose geometric mean is at most 1.000x is set back
to vLLM's default: in the JSON file, the default config its sidecar records for that batch size; in the sidecar,
that row's tuned config and time become the default's (1.000x: one config), and ``defaulted`` records the entry it
replaces and its readings. Such an entry is a tie its tuning board's one head to head called a win (benchmarks/README
§11): the tuner keeps it on a re-tune (an entry changes only where it gets faster by more than KEEP_WITHIN), so only
the boards' record shows it, and on a board at its power cap it reads up to 5% slower than the default, which
``verify`` flags. The default is what vLLM runs without the file: set back, the entry cannot lose to it anywhere.
An entry the committed backend advice of the set's release timed (tuning/data/backend_advice/, ``timed_configs``) is
left as it is and named: set back, it would leave that advice timed with a config the file no longer holds, which
only a bake-off on a GPU re-times (``--include-advised`` sets it back too: in a copy of the set, for that bake-off
to time). Every file is checked before any is written; each is written whole (atomically),
its sidecar after it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import geometric_mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tuning import configs  # noqa: E402
from tuning.configs import TileConfig  # noqa: E402
from tuning.files import atomic_write_json  # noqa: E402
from tuning.vllm import backend_advice  # noqa: E402
from verify_pair import collect  # noqa: E402

MIN_READINGS = 3  # one board's reading is its luck (§2o); three put a tie apart from a loss of 1-3%


def ties(configs_dir: Path, logs: list[str]) -> list[tuple[str, int, str, list[tuple[float, str]]]]:
    """(file, M, entry, readings) of each entry the readings find no faster than vLLM's default."""
    return [(file, m, entry, got) for (file, m, entry), got in sorted(collect(configs_dir, logs)[0].items())
            if len(got) >= MIN_READINGS and geometric_mean([s for s, _ in got]) <= 1.0]


def advised(configs_dir: Path) -> dict[tuple[str, int, str], str]:
    """(file label, M, config) -> the layout whose committed backend advice timed that config there."""
    release = next(iter(json.loads(p.read_text())["target"]["vllm"] for p in configs_dir.glob("*.provenance.json")),
                   None)
    path = backend_advice.data_file(release) if release else None
    if path is None or not path.exists():
        return {}
    return {(label, int(m), config): layout for (_, layout), advice in backend_advice.load(path).items()
            for label, per_m in (advice.timed_configs or {}).items() for m, config in per_m.items()}


def set_back(configs_dir: Path, found: list[tuple[str, int, str, list[tuple[float, str]]]]) -> list[str]:
    """Write each file and sidecar with its ties set back to vLLM's default; the lines saying what changed."""
    plans, lines = {}, []
    for file, m, entry, got in found:
        config_path = configs_dir / file
        sidecar_path = configs_dir / file.replace(".json", ".provenance.json")
        table, side = plans.get(file) or plans.setdefault(file, (configs.read_config_file(config_path),
                                                                  json.loads(sidecar_path.read_text())))
        row = side["results"][str(m)]
        default = TileConfig.from_dict(row["default"])
        if table[m].short != entry:
            raise SystemExit(f"{file} M={m}: the file holds {table[m].short}, not {entry}, which the readings are of")
        speedup = geometric_mean([s for s, _ in got])
        table[m] = default
        for key in ("tuned_p20_us", "tuned_p80_us"):  # the replaced entry's spread, not the default's
            row.pop(key, None)
        row.update(tuned=row["default"], tuned_us=row["default_us"], speedup=1.0,
                   tuned_pct_roofline=row["default_pct_roofline"])
        side.setdefault("defaulted", []).append({
            "m": m, "config": default.short, "replaces": entry, "readings": len(got),
            "boards": len({b for _, b in got}), "speedup": round(speedup, 4)})
        lines.append(f"{file} M={m}: {entry} -> vLLM's default {default.short} ({speedup:.3f}x over the default in "
                     f"{len(got)} re-timings on {len({b for _, b in got})} boards)")
    for file, (table, side) in plans.items():
        configs.write_config_file(configs_dir / file, table, side["software"]["triton"])
        atomic_write_json(configs_dir / file.replace(".json", ".provenance.json"), side)
    return lines


def main(argv: list[str]) -> int:
    write = argv[:1] == ["--write"]
    args = argv[1:] if write else argv
    include_advised = args[:1] == ["--include-advised"]
    args = args[1:] if include_advised else args
    if len(args) < 2 or not Path(args[0]).is_dir():
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    configs_dir, logs = Path(args[0]), args[1:]
    found, timed = [], {} if include_advised else advised(configs_dir)
    for tie in ties(configs_dir, logs):
        file, m, entry, got = tie
        layout = timed.get((backend_advice.file_label(file), m, entry))
        if layout:
            print(f"{file} M={m}: {entry}, {geometric_mean([s for s, _ in got]):.3f}x over vLLM's default in "
                  f"{len(got)} re-timings: left, as the backend advice for {layout} timed it (re-time that layout "
                  "with tune-moe compare-backends to set it back)")
        else:
            found.append(tie)
    if not write:
        for file, m, entry, got in found:
            print(f"{file} M={m}: {entry}, {geometric_mean([s for s, _ in got]):.3f}x over vLLM's default in "
                  f"{len(got)} re-timings")
        print(f"{len(found)} entries would be set back to vLLM's default (--write to do it)")
        return 0
    for line in set_back(configs_dir, found):
        print(line)
    print(f"{len(found)} entries set back to vLLM's default")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
