"""Compare two folders of tuned configs for one device, shape by shape (e.g. the same plan tuned under two Tritons).

    python benchmarks/compare_configs.py OLD_DIR NEW_DIR

Per config file present in NEW_DIR: the Triton each was tuned with, the geomean speedup over vLLM's default
each recorded (under its own Triton), the batch sizes whose winning tile config changed, and the geomean
ratio new/old of vLLM's default time and of the tuned time (both read from the sidecars, each measured
under its own Triton). Prints a markdown table.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuning import provenance  # noqa: E402


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(old_dir: Path, new_dir: Path) -> None:
    print("| shape | Triton old → new | geomean speedup old → new | winners changed (of M) | default µs new/old "
          "| tuned µs new/old |")
    print("|---|---|---:|---|---:|---:|")
    for path in sorted(new_dir.glob("E=*.json")):
        if path.name.endswith(provenance.SUFFIX):
            continue
        new = provenance.read(path)
        old = provenance.read(old_dir / path.name) if (old_dir / path.name).exists() else None
        n = {r.m: r for r in new.rows}
        geo_new = geomean([r.speedup for r in new.rows])
        if old is None:
            print(f"| {new.shape.label} | – → {new.run.triton} | – → {geo_new:.3f}x | (new file) | – | – |")
            continue
        o = {r.m: r for r in old.rows}
        ms = sorted(set(n) & set(o))
        changed = [m for m in ms if n[m].tuned != o[m].tuned]
        default = geomean([n[m].default_us / o[m].default_us for m in ms])
        tuned = geomean([n[m].tuned_us / o[m].tuned_us for m in ms])
        geo_old = geomean([o[m].speedup for m in ms])
        print(f"| {new.shape.label} | {old.run.triton} → {new.run.triton} | {geo_old:.3f}x → {geo_new:.3f}x "
              f"| {len(changed)} of {len(ms)}: {', '.join(map(str, changed)) or '-'} | {default:.3f} | {tuned:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(Path(sys.argv[1]), Path(sys.argv[2]))
