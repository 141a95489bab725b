"""benchmarks/second_look.py's trials: which first head to heads a second one undid, by the search's own rule."""

import json
import subprocess
import sys
from pathlib import Path

from tuning.bench import Timing
from tuning.configs import TileConfig
from tuning.runner import Outcome
from tuning.search import clear_win

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from second_look import summary, trials  # noqa: E402

C = TileConfig(16, 64, 128, 1, 4, 3)


def look(tuned: float, default: float, spread: float = 0.0) -> dict:
    """One head to head as second_look records it, with clear_win deciding from five samples each."""
    t, d = (Outcome(C, Timing(tuple(us * (1 + spread * k) for k in (-2, -1, 0, 1, 2)))) for us in (tuned, default))
    return {"tuned_us": tuned, "default_us": default, "tuned_p20_us": t.timing.p20_us, "tuned_p80_us": t.timing.p80_us,
            "default_p20_us": d.timing.p20_us, "default_p80_us": d.timing.p80_us, "clear": clear_win(t, d)}


def test_each_won_first_head_to_head_is_a_trial_of_its_kind():
    rows = [
        {"file": "a", "m": 1, "looks": [look(90, 100), look(91, 100), look(99.5, 100)]},  # clear, clear then undone
        {"file": "a", "m": 2, "looks": [look(97, 100), look(97, 100)]},  # a 3% win: close, confirmed
        {"file": "b", "m": 4, "looks": [look(90, 100, 0.06), look(100, 100)]},  # 10%, samples overlapping: close
        {"file": "b", "m": 8, "looks": [look(100, 100), look(90, 100)]},  # a tie first: no trial
    ]
    assert trials(rows) == [("clear", False), ("clear", True), ("close", False), ("close", True)]
    assert summary(rows).splitlines() == [
        "clear: 2 first head to heads won by more than 5%, samples apart; the next undid 1",
        "close: 2 first head to heads won by 1%-5%, or samples overlapping; the next undid 1",
        "3 of 9 head to heads not won by more than 1% (the entry kept as a tie or a loss there), over 4 (file, M)",
    ]


def test_from_json_prints_the_summary_without_a_gpu(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": [{"file": "a", "m": 1, "looks": [look(90, 100), look(90, 100)]}]}))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "second_look.py"), "--from-json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "clear: 1 first head to heads won by more than 5%, samples apart; the next undid 0" in out


def test_timing_without_its_kernel_source_is_one_line(tmp_path):
    got = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "second_look.py"), "--json", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert got.returncode == 1 and got.stderr.strip().count("\n") == 0 and "--vllm-src" in got.stderr
    assert not (tmp_path / "x").exists()


def test_a_file_that_is_not_second_looks_is_one_line(tmp_path):
    for text in (None, "{}", '{"rows": [1]}', "not json"):
        path = tmp_path / "rows.json"
        path.unlink(missing_ok=True)
        if text is not None:
            path.write_text(text)
        got = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "second_look.py"), "--from-json", str(path)],
                             capture_output=True, text=True)
        assert got.returncode == 1 and got.stdout == ""
        assert got.stderr == f"second_look: {path}: not a file second_look --json wrote; give one of those to " \
                             "--from-json\n"
