"""Replay the guided search on landscapes that GPU runs recorded: how close does it get to the best config, and how
often, under timing noise? Runs on the CPU; the landscapes come from the runs.

Usage: python benchmarks/replay_search.py RUN.results.jsonl [RUN.results.jsonl ...] [--noise 0.005] [--repeats 20]
           [--coverage 0.9] [--set NAME=VALUE ...] [--smaller-seeds]

Each RUN.results.jsonl (with RUN.run.json beside it, which holds each file's shape and GPU) gives, per (file, M),
every config its search timed that ran ("looks": first-look µs). Runs of one plan pool their looks: an exhaustive
run over a few batch sizes, guided runs over all. A (file, M) is replayed only where the looks cover at least
--coverage of the search space (``space.space``): in practice an exhaustive run's batch sizes.

Each replay runs ``search.guided`` with an evaluator that answers a config's recorded µs times (1 + noise), noise
drawn from a normal of --noise standard deviation, and a config never timed as one that failed; seeded, as the
driver does, with the winners of the two nearest batch sizes of the same file (from the first run given; with
--smaller-seeds only those below, as a run from empty results has them when it finishes a file's batch sizes in
increasing order, so the tile a larger batch size would hand down is not among them); --repeats times, each with
other noise and another search seed. Prints, in Markdown, per (file, M): the configs in the
landscape and its best µs, the replays' picks against that best (geomean, worst, the share within 1%) and the
configs they timed. --set changes one of ``search``'s constants for a variant (TOP=5, SAMPLE=20, MAX_EVALS=60).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from statistics import geometric_mean
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuning import search, sweep  # noqa: E402
from tuning.bench import Timing  # noqa: E402
from tuning.configs import TileConfig  # noqa: E402
from tuning.gpus import CATALOGUE  # noqa: E402
from tuning.jobs import Failure, FailureKind  # noqa: E402
from tuning.runner import Outcome  # noqa: E402
from tuning.shapes import MoeShape  # noqa: E402
from tuning.space import Context, space  # noqa: E402


class Replay:
    """search's Evaluator on a recorded landscape: its µs with noise; what was never timed fails."""

    def __init__(self, landscape: dict[TileConfig, float], noise: float, rng: random.Random):
        self.landscape, self.noise, self.rng = landscape, noise, rng

    def evaluate(self, config: TileConfig, budget_ms: float) -> Outcome:
        us = self.landscape.get(config)
        if us is None:
            return Outcome(config, failure=Failure(kind=FailureKind.RESOURCES, detail="not in the landscape"))
        return Outcome(config, Timing((us * (1 + self.rng.gauss(0, self.noise)),)), 0.0)


def load(paths: list[str]):
    """Per (file, M): the pooled landscape, the shape, the GPU, vLLM's default, and the first run's winners."""
    looks: dict[tuple[str, int], dict[TileConfig, float]] = {}
    shapes, gpus, defaults, winners = {}, {}, {}, {}
    for i, path in enumerate(map(Path, paths)):
        run = json.loads(path.with_name(path.name.replace(".results.jsonl", ".run.json")).read_text())["files"]
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            key, fp = (r["file"], r["m"]), run[r["file"]]
            s = fp["shape"]
            shapes[r["file"]] = MoeShape(s["num_experts"], s["global_experts"], s["n"], s["k"], s["top_k"], s["dtype"],
                                         tuple(s["block_shape"]) if s["block_shape"] else None)
            gpus[r["file"]] = next(g for g in CATALOGUE.values() if g.device_name == fp["device_name"])
            defaults[key] = TileConfig.from_dict(r["default"])
            if i == 0:
                winners[key] = TileConfig.from_dict(r["tuned"])
            seen = looks.setdefault(key, {})
            for short, us in r.get("looks", {}).items():
                seen[TileConfig.from_short(short)] = min(us, seen.get(TileConfig.from_short(short), math.inf))
    return looks, shapes, gpus, defaults, winners


def seeds_for(key: tuple[str, int], winners: dict, smaller: bool = False) -> list[TileConfig]:
    """The driver's own rule (``sweep.seeds``) over the first run's winners of the same file's other batch sizes
    (with ``smaller``, only those below: a run that finished the file's batch sizes in increasing order)."""
    done = {m: SimpleNamespace(tuned=c) for (f, m), c in winners.items()
            if f == key[0] and (m < key[1] if smaller else m != key[1])}
    return sweep.seeds(key[1], done)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--noise", type=float, default=0.005)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--coverage", type=float, default=0.9)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--smaller-seeds", action="store_true",
                   help="seed only with the first run's winners at smaller batch sizes")
    args = p.parse_args(argv)
    for item in args.set:
        name, value = item.split("=", 1)
        if not hasattr(search, name):
            sys.exit(f"--set {item}: search has no constant {name}")
        try:
            setattr(search, name, type(getattr(search, name))(value))
        except ValueError:
            sys.exit(f"--set {item}: {value!r} is not a valid {type(getattr(search, name)).__name__} for {name}")
    missing = [r for r in args.results if not Path(r).is_file()
               or not Path(r.replace(".results.jsonl", ".run.json")).is_file()]
    if missing:
        sys.exit(f"replay_search.py: {missing[0]}: no such file, or no .run.json beside it; pass results.jsonl files "
                 "that gpu_stage.sh tune brought back")
    looks, shapes, gpus, defaults, winners = load(args.results)
    print(f"noise {args.noise:.3%}, {args.repeats} replays per batch size" + "".join(f", {s}" for s in args.set))
    print("\n| file | M | configs (of the space) | best µs | replays' pick / best: geomean | worst | within 1% "
          "| configs timed |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    skipped = 0
    for key in sorted(looks):
        ctx = Context(shapes[key[0]], gpus[key[0]], key[1])
        pool, land = space(ctx), looks[key]
        if not land or sum(c in land for c in pool) < args.coverage * len(pool):
            skipped += 1
            continue
        best = min(land.values())
        ratios, timed = [], []
        for rep in range(args.repeats):
            ev = Replay(land, args.noise, random.Random(f"{key}-{rep}"))
            result = search.guided(ev, ctx, defaults[key], seeds=seeds_for(key, winners, args.smaller_seeds), seed=rep)
            ratios.append(land[result.best.config] / best)
            timed.append(result.evaluated)
        geo = geometric_mean(ratios)
        print(f"| {key[0].split(',device_name')[0]} | {key[1]} | {len(land)} ({len(pool)}) | {best:.1f} | {geo:.4f} "
              f"| {max(ratios):.4f} | {sum(r <= 1.01 for r in ratios)}/{len(ratios)} | {sum(timed) / len(timed):.0f} |")
    print(f"\n{skipped} (file, M) skipped: their looks cover less than {args.coverage:.0%} of the space "
          "(a guided run's; an exhaustive run covers it)")


if __name__ == "__main__":
    main(sys.argv[1:])
