"""benchmarks/default_ties.py and verify_pair.py --boards on the committed verify logs: the entries the committed
sets hold as vLLM's default because the boards found the tuned entry no faster (benchmarks/README §11)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from committed_then import before_defaults

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
V034 = re.compile(r"/(v34[^/]*|kc1|kc2|b34a|kc34)\.log$")  # the runs with vLLM 0.34's kernel (benchmarks/README §11)


def _logs() -> list[str]:
    """benchmarks/README §11's arguments: every committed log with a speedup table, 0.34's kernel runs last."""
    logs = sorted(str(p) for p in RESULTS.rglob("*.log") if "default us  tuned us" in p.read_text(errors="replace"))
    return [p for p in logs if not V034.search(p)] + ["--kernel=0.34.0"] + [p for p in logs if V034.search(p)]


@pytest.mark.parametrize("release, count", [("0.33", 2), ("0.34", 6)])
def test_the_committed_ties_are_what_the_committed_logs_give(tmp_path, release, count):
    """Undo the committed set's ``defaulted`` entries in a copy; the script, on the committed logs, finds exactly
    those entries (their readings, boards and geomean as recorded), and writes the committed files byte for byte."""
    committed = REPO / "kernels_configs" / f"vllm-{release}" / "NVIDIA_H200"
    folder = tmp_path / "set"
    undone = before_defaults(committed, folder)
    assert len(undone) == count
    script = str(REPO / "benchmarks" / "default_ties.py")
    dry = subprocess.run([sys.executable, script, str(folder), *_logs()], capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == f"{count} entries would be set back to vLLM's default (--write to do it)"
    for d in undone:
        (said,) = re.findall(rf"^{re.escape(d['file'])} M={d['m']}: {d['replaces']}, ([\d.]+)x over vLLM's default in "
                             rf"{d['readings']} re-timings$", dry.stdout, re.M)
        assert float(said) == pytest.approx(d["speedup"], abs=6e-4)  # printed to 3 places, recorded to 4
    wrote = subprocess.run([sys.executable, script, "--write", str(folder), *_logs()], capture_output=True, text=True,
                           timeout=600)
    assert wrote.returncode == 0, wrote.stderr
    for path in folder.glob("*.json"):
        assert path.read_bytes() == (committed / path.name).read_bytes(), path.name
    again = subprocess.run([sys.executable, script, str(folder), *_logs()], capture_output=True, text=True, timeout=600)
    assert again.stdout.splitlines()[-1] == "0 entries would be set back to vLLM's default (--write to do it)"


def test_every_committed_tuned_entry_reads_above_the_default_over_its_boards_or_is_named():
    """verify_pair.py --boards on the committed 0.33 set: every entry that is not vLLM's default was re-timed on
    some board, and the one with three readings or more at or below 1.000x over them is the entry the committed
    backend advice timed, which default_ties.py names and leaves (the others were set back)."""
    folder = REPO / "kernels_configs" / "vllm-0.33" / "NVIDIA_H200"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "verify_pair.py"), "--boards", str(folder),
                          *_logs()], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in run.stdout.splitlines() if line.startswith("| E=")]
    assert len(rows) == 208 and "208 re-timed in these logs (0 never)" in run.stdout
    ties = [(r[0], int(r[1]), r[2]) for r in rows if int(r[4].split()[0]) >= 3 and float(r[5]) <= 1.0]
    assert ties == [("E=36,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128]", 65536,
                     "M64-N128-K128-G1-w4-s4")]
    dry = subprocess.run([sys.executable, str(REPO / "benchmarks" / "default_ties.py"), str(folder), *_logs()],
                         capture_output=True, text=True, timeout=600)
    assert dry.stdout.splitlines() == [
        f"{ties[0][0]}.json M=65536: M64-N128-K128-G1-w4-s4, 0.996x over vLLM's default in 3 re-timings: left, as the "
        "backend advice for DP8+EP timed it (re-time that layout with tune-moe compare-backends to set it back)",
        "0 entries would be set back to vLLM's default (--write to do it)"]
    included = subprocess.run([sys.executable, str(REPO / "benchmarks" / "default_ties.py"), "--include-advised",
                               str(folder), *_logs()], capture_output=True, text=True, timeout=600)
    assert included.stdout.splitlines() == [
        f"{ties[0][0]}.json M=65536: M64-N128-K128-G1-w4-s4, 0.996x over vLLM's default in 3 re-timings",
        "1 entries would be set back to vLLM's default (--write to do it)"]


def test_a_log_that_is_not_there_is_one_line_and_nothing_is_written(tmp_path):
    folder = tmp_path / "set"
    before_defaults(REPO / "kernels_configs" / "vllm-0.33" / "NVIDIA_H200", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "default_ties.py"), "--write", str(folder),
                          *_logs(), str(tmp_path / "gone.log")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == f"{tmp_path / 'gone.log'}: no such log; give the `tune-moe verify` logs to read " \
                         "(benchmarks/results/*/*.log)\n"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
