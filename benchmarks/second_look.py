"""Would a second head to head undo the first? Each tuned entry and vLLM's default timed head to head several times
in a row on one runner per (file, M), as the search times a pick against what vLLM runs (search._finish).

    python benchmarks/second_look.py --vllm-src fused_moe_v033.py [--gpu H200] [--configs DIR] [--files PREFIX]
        [--batch-sizes 1024,2048,3072,4096] [--repeats 5] --json out.json
    python benchmarks/second_look.py --from-json out.json...          # the summary again, no GPU

Each pair of consecutive head to heads is one trial: the first's verdict (the entry faster than the default by more
than KEEP_WITHIN, and whether that win is clear: search.clear_win, by more than CLEAR_WIN with the samples apart),
then whether the next one undoes it (the entry no longer faster by more than KEEP_WITHIN). The summary counts,
per kind of first win, the trials and the undone: a clear win that a second undoes would make the search's skip
of the second head to head wrong. The GPU's state after each head to head is kept (a board at its power cap
spreads the samples), and the device's own name, which need not be --gpu's (the files are named for --gpu).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuning.errors import UsageError  # noqa: E402
from tuning.jobs import CLEAR_WIN, KEEP_WITHIN  # noqa: E402


def trials(rows: list[dict]) -> list[tuple[str, bool]]:
    """(kind of the first win, whether the next head to head undid it) for each consecutive pair of a row's head
    to heads whose first the entry won by more than KEEP_WITHIN."""
    out = []
    for row in rows:
        looks = row["looks"]
        for first, second in zip(looks, looks[1:]):
            if first["tuned_us"] < first["default_us"] * (1 - KEEP_WITHIN):
                undone = not second["tuned_us"] < second["default_us"] * (1 - KEEP_WITHIN)
                out.append(("clear" if first["clear"] else "close", undone))
    return out


def summary(rows: list[dict]) -> str:
    got = trials(rows)
    lines = []
    for kind, what in (("clear", f"won by more than {CLEAR_WIN:.0%}, samples apart"),
                       ("close", f"won by {KEEP_WITHIN:.0%}-{CLEAR_WIN:.0%}, or samples overlapping")):
        n = [u for k, u in got if k == kind]
        lines.append(f"{kind}: {len(n)} first head to heads {what}; the next undid {sum(n)}")
    lost = sum(1 for r in rows for a in r["looks"] if not a["tuned_us"] < a["default_us"] * (1 - KEEP_WITHIN))
    looks = sum(len(r["looks"]) for r in rows)
    lines.append(f"{lost} of {looks} head to heads not won by more than {KEEP_WITHIN:.0%} (the entry kept as a tie "
                 f"or a loss there), over {len(rows)} (file, M)")
    return "\n".join(lines)


def read_rows(path: str) -> list[dict]:
    """The rows of one --json file, or one line naming what is wrong with it."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
        if all(isinstance(r, dict) and isinstance(r.get("looks"), list) for r in rows):
            return rows
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        pass
    sys.exit(f"second_look: {path}: not a file second_look --json wrote; give one of those to --from-json")


def measure(args: argparse.Namespace) -> list[dict]:
    import torch

    from tuning import clocks
    from tuning.gpus import get_gpu
    from tuning.routing import Routing
    from tuning.runner import Runner
    from tuning.search import clear_win, head_to_head
    from tuning.shapes import parse_batch_sizes
    from tuning.verify import tuned_files
    from tuning.vllm.kernel import KernelSource
    from tuning.vllm.rules import nearest_entry

    gpu, sizes = get_gpu(args.gpu), parse_batch_sizes(args.batch_sizes)
    kernel = KernelSource(args.vllm_src).load()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton's interpreter)"
    print(f"{kernel.describe}; device {device} (files for --gpu {args.gpu})")
    rows = []
    for f in tuned_files(Path(args.configs), args.files, gpu, None):
        print(f"\n{f.name}\n  {'M':>5}  default/tuned per head to head (c: won clearly)")
        for m in sizes:
            tuned = nearest_entry(f.configs, m)
            runner = Runner(kernel, f.shape, m, gpu, Routing(), seed=0)
            default = runner.default_config()
            if tuned == default:
                continue
            looks = []
            for _ in range(args.repeats):
                t, d = head_to_head(runner, tuned, default)
                if not (t.ok and d.ok):
                    break
                state = clocks.sample()
                looks.append({"tuned_us": t.us, "default_us": d.us, "tuned_p20_us": t.timing.p20_us,
                              "tuned_p80_us": t.timing.p80_us, "default_p20_us": d.timing.p20_us,
                              "default_p80_us": d.timing.p80_us, "clear": clear_win(t, d),
                              "gpu_state": state.to_json() if state else {}})
            del runner
            rows.append({"file": f.name, "m": m, "tuned": tuned.short, "default": default.short, "looks": looks,
                         "device": device})
            print(f"  {m:>5}  " + " ".join(f"{a['default_us'] / a['tuned_us']:.3f}{'c' if a['clear'] else ' '}"
                                           for a in looks), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", default="H200")
    p.add_argument("--vllm-src")
    p.add_argument("--configs", default="kernels_configs/vllm-0.33/NVIDIA_H200")
    p.add_argument("--files", action="append", default=None)
    p.add_argument("--batch-sizes", default="1024,2048,3072,4096")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--from-json", nargs="+")
    args = p.parse_args()
    if args.from_json:
        rows = [r for path in args.from_json for r in read_rows(path)]
    else:
        if not (args.vllm_src and args.json):
            sys.exit("second_look: timing needs --vllm-src (vLLM's fused_moe.py) and --json (where the rows go)")
        args.files = args.files or ["E="]
        try:
            rows = measure(args)
        except UsageError as exc:  # --configs, --files, --batch-sizes, --vllm-src: what tune-moe says of them
            sys.exit(f"second_look: {exc}")
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    print("\n" + summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
