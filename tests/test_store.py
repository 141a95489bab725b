"""Persistence of finished jobs: append-only, fsynced, tolerant of a line cut by a kill."""

import pytest

from tuning.configs import TileConfig
from tuning.errors import UsageError
from tuning.jobs import JobResult
from tuning.store import Store

FP = {"gpu": "H200", "strategy": "guided"}


def result(m: int) -> JobResult:
    c = TileConfig(16, 64, 128, 1, 4, 3)
    return JobResult("E=72.json", m, c, 10.0, c, 9.0, 8.9, 9.1, 5.0, "memory", 1e-3, 30, 1, 2.5, "host:0",
                     {"M256-N256-K128-G1-w8-s5": "resources: out of shared memory"})


def test_results_survive_a_restart(tmp_path):
    s = Store(tmp_path, FP)
    s.add(result(16))
    s.add(result(32))
    again = Store(tmp_path, FP)
    assert again.done("E=72.json", 16) and again.done("E=72.json", 32)
    assert again.for_file("E=72.json")[32] == result(32)
    assert again.for_file("E=72.json")[32].speedup == pytest.approx(10 / 9)


def test_a_line_cut_short_loses_only_that_job(tmp_path):
    s = Store(tmp_path, FP)
    s.add(result(16))
    with open(s.results_path, "a") as f:
        f.write('{"file": "E=72.json", "m": 6')  # killed mid-write
    again = Store(tmp_path, FP)
    assert set(again.for_file("E=72.json")) == {16}
    again.add(result(64))
    assert set(Store(tmp_path, FP).for_file("E=72.json")) == {16, 64}


def test_other_settings_are_refused_unless_fresh(tmp_path):
    Store(tmp_path, FP).add(result(16))
    with pytest.raises(UsageError, match="strategy.*--fresh"):
        Store(tmp_path, {**FP, "strategy": "exhaustive"})
    fresh = Store(tmp_path, {**FP, "strategy": "exhaustive"}, fresh=True)
    assert fresh.results == {}
