"""Head to heads of `tune-moe verify --against OLD --keep-confirmed OUT` runs from before NEW kept a ledger, read
from their logs into NEW's ledger (NEW/.tune-moe/judged.jsonl), so that the next board pools them with its own.

    python benchmarks/judged_from_logs.py NEW WHEN LOG [LOG...]

Each LOG is one such run of NEW's files against the set they would replace; WHEN is the day they ran (the logs do
not say). The board is the one the log names ("re-timing on GPU-..."). Section 2s of benchmarks/README.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from verify_pair import FILE, ROW  # beside this script: the same verify log reader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tuning.confirm import LEDGER, Verdict, read_ledger, record  # noqa: E402

BOARD = re.compile(r"^re-timing on (\S+) \(memory clock (\d+) MHz\)")
WAS = re.compile(r"  was (\S+) ([\d.]+) us, old/new")  # OLD's entry and its µs in the same head to head


def verdicts(log: str, when: str) -> list[Verdict]:
    board, mem, file, out = None, 0, None, []
    for line in open(log):
        line = line.rstrip("\n")
        if m := BOARD.match(line):
            board, mem = m.group(1), int(m.group(2))
        elif m := FILE.match(line):
            file = m.group(1)
        elif board and file and (m := ROW.match(line)) and (was := WAS.search(line)):
            out.append(Verdict(file, int(m.group(1)), m.group(4), was.group(1), board, mem, when,
                               float(m.group(2)), float(was.group(2)), float(m.group(3))))
    if board is None:
        sys.exit(f"{log}: no 're-timing on GPU-...' line: not a verify log from a GPU")
    return out


def main(new: str, when: str, *logs: str) -> None:
    known = read_ledger(Path(new))
    rows = [v for log in logs for v in verdicts(log, when) if v not in known]
    record(Path(new), rows)
    print(f"{Path(new) / LEDGER}: {len(rows)} head to heads added from {len(logs)} logs, {len(known) + len(rows)} in all")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
