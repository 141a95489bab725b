"""Persistence of finished jobs: append-only, fsynced, tolerant of a line cut by a kill; fingerprints per
file; one run per output folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuning.configs import TileConfig
from tuning.errors import UsageError
from tuning.jobs import Failure, FailureKind, JobResult
from tuning.provenance import RunInfo
from tuning.store import Store

FILE = "E=72.json"
FP = {"shape": {"num_experts": 72}, "triton": "3.8.0", "strategy": "guided"}


def result(m: int, file: str = FILE) -> JobResult:
    c = TileConfig(16, 64, 128, 1, 4, 3)
    return JobResult(file=file, m=m, default=c, default_us=10.0, tuned=c, tuned_us=9.0, tuned_p20_us=8.9,
                     tuned_p80_us=9.1, roofline_us=5.0, bound="memory", error=1e-3, evaluated=30, failed=1,
                     seconds=2.5, worker="host:0",
                     failures={"M256-N256-K128-G1-w8-s5": Failure(kind=FailureKind.RESOURCES, detail="out of smem")})


RUN = RunInfo(gpu_name="NVIDIA H200", device_name="NVIDIA_H200", driver="580.95", count=2, cuda="13.0",
              torch="2.11.0", triton="3.8.0", python="3.12.3", vllm="0.33.0", kernel="fused_moe.py",
              kernel_sha256="ab" * 32)


def opened(tmp_path, fp=FP, file=FILE, fresh=False) -> Store:
    s = Store(tmp_path, fresh=fresh)
    s.claim(file, fp)
    return s


def test_results_survive_a_restart(tmp_path):
    s = opened(tmp_path)
    s.add(result(16))
    s.add(result(32))
    s.close()
    again = opened(tmp_path)
    assert again.done(FILE, 16) and again.done(FILE, 32)
    assert again.for_file(FILE)[32] == result(32)
    assert again.for_file(FILE)[32].failures["M256-N256-K128-G1-w8-s5"].kind.sticky
    assert again.for_file(FILE)[32].speedup == pytest.approx(10 / 9)


def test_what_the_workers_run_on_is_kept_with_the_fingerprints(tmp_path):
    """The workers' GPUs and software, so a resume can write a finished shape's files without starting them."""
    s = opened(tmp_path)
    assert s.run is None
    s.note_run(RUN)
    s.close()
    again = opened(tmp_path)
    assert again.run == RUN and again.fingerprints == {FILE: FP}
    again.claim("E=36.json", FP)  # a later claim keeps it
    again.close()
    assert opened(tmp_path).run == RUN
    state = json.loads((tmp_path / ".tune-moe" / "run.json").read_text())
    del state["run"]["cuda"]  # a record it cannot read is none
    (tmp_path / ".tune-moe" / "run.json").write_text(json.dumps(state))
    assert opened(tmp_path).run is None


def test_the_files_written_from_the_results_are_recorded(tmp_path):
    """A resume tells a shape a kill kept from its files (not recorded) from one written and changed since."""
    s = opened(tmp_path)
    assert s.written == set()
    s.note_written(FILE)
    s.close()
    assert opened(tmp_path).written == {FILE}
    state = json.loads((tmp_path / ".tune-moe" / "run.json").read_text())
    del state["written"]  # results from before the record was kept: unknown, not "none written"
    (tmp_path / ".tune-moe" / "run.json").write_text(json.dumps(state))
    old = opened(tmp_path)
    assert old.written is None
    old.note_run(RUN)  # kept from the next run on
    old.close()
    assert opened(tmp_path).written == set()


def killed_mid_write(path: Path) -> None:
    """``atomic_write`` of ``path`` in a process SIGKILLed after its temp file is written, before the rename."""
    code = ("import os, sys, time; from tuning import files\n"
            "def stop(fd): print('written', flush=True); time.sleep(60)\n"
            "files.os.fsync = stop\n"
            "files.atomic_write(sys.argv[1], b'{}')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "written\n"
    proc.kill()
    proc.wait(timeout=30)


def test_what_a_kill_mid_write_left_is_removed_when_the_folder_is_next_opened(tmp_path):
    (tmp_path / ".tune-moe").mkdir()
    for name in (f"{FILE}", "E=72.provenance.json", ".tune-moe/run.json"):
        killed_mid_write(tmp_path / name)
    (tmp_path / ".keep.tmp").write_text("not ours")
    left = sorted(p.name for p in tmp_path.rglob(".*.tmp"))
    assert len(left) == 4 and not (tmp_path / FILE).exists()
    opened(tmp_path).close()
    assert [p.name for p in tmp_path.rglob(".*.tmp")] == [".keep.tmp"]


def test_a_line_cut_short_loses_only_that_job(tmp_path):
    s = opened(tmp_path)
    s.add(result(16))
    with open(s.results_path, "a") as f:
        f.write('{"file": "E=72.json", "m": 6')  # killed mid-write
    s.close()
    again = opened(tmp_path)
    assert set(again.for_file(FILE)) == {16}
    again.add(result(64))
    again.close()
    assert set(opened(tmp_path).for_file(FILE)) == {16, 64}


def test_other_settings_for_a_file_are_refused_unless_fresh(tmp_path):
    opened(tmp_path).add(result(16))
    with pytest.raises(UsageError, match=r"other settings \(triton '3.8.0' -> '3.6.0'\).*--fresh"):
        opened(tmp_path, {**FP, "triton": "3.6.0"})
    fresh = opened(tmp_path, {**FP, "triton": "3.6.0"}, fresh=True)
    assert fresh.results == {}


def test_other_geometry_is_another_fingerprint(tmp_path):
    opened(tmp_path).add(result(16))
    with pytest.raises(UsageError, match="shape"):
        opened(tmp_path, {**FP, "shape": {"num_experts": 36}})


def test_files_of_one_folder_keep_their_own_fingerprints(tmp_path):
    s = opened(tmp_path)
    s.add(result(16))
    s.claim("E=36.json", {**FP, "strategy": "exhaustive"})  # a bf16 and an fp8 run may share a folder
    s.add(result(1, "E=36.json"))
    s.close()
    again = Store(tmp_path)
    again.claim(FILE, FP)
    again.claim("E=36.json", {**FP, "strategy": "exhaustive"})
    assert set(again.results) == {(FILE, 16), ("E=36.json", 1)}


def test_results_without_settings_are_refused(tmp_path):
    s = opened(tmp_path)
    s.add(result(16))
    s.close()
    (tmp_path / ".tune-moe" / "run.json").unlink()
    with pytest.raises(UsageError, match="without their settings.*--fresh"):
        opened(tmp_path)


def test_a_corrupt_or_old_run_json_is_named_as_such(tmp_path):
    opened(tmp_path).close()
    run = tmp_path / ".tune-moe" / "run.json"
    run.write_text("{cut")
    with pytest.raises(UsageError, match="run.json is unreadable"):
        Store(tmp_path)
    run.write_text(json.dumps({"gpu": "H200", "strategy": "guided"}))  # the flat format of older versions
    with pytest.raises(UsageError, match="another tune-moe version.*--fresh"):
        Store(tmp_path)
    for damaged in ([1, 2], {"format": "2", "files": {}}, {"format": 2, "files": []}, {}):
        run.write_text(json.dumps(damaged))
        with pytest.raises(UsageError, match="run.json is not a run record tune-moe wrote .* move the folder away"):
            Store(tmp_path)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    first = Store(tmp_path)
    code = ("import sys; from tuning.store import Store; from tuning.errors import UsageError\n"
            "try:\n    Store(sys.argv[1])\nexcept UsageError as e:\n    print(e); sys.exit(2)\n")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert other.returncode == 2
    assert "being written by another tune-moe (pid" in other.stdout and "another --out" in other.stdout
    first.close()
    again = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0


def test_results_recorded_before_compile_seconds_was_kept_still_load():
    """The committed 2b results predate the fields: they load with the compile wait unknown (0), no looks and no
    GPU state; the fields round-trip."""
    from pathlib import Path

    old = Path(__file__).resolve().parents[1] / "benchmarks/results/triton38/results.jsonl"
    rows = [JobResult.from_json(json.loads(line)) for line in old.read_text().splitlines()]
    assert len(rows) == 216 and all(r.compile_seconds == 0.0 and r.looks == r.gpu_state == {} for r in rows)
    state = {"sm_mhz": 1470, "power_w": 682.4, "limit_w": 700.0, "reasons": ["sw-power-cap"]}
    new = JobResult.from_json({**rows[0].to_json(), "compile_seconds": 3.5, "looks": {"M16-N64-K128-G1-w4-s3": 41.25},
                               "gpu_state": state})
    assert new.compile_seconds == 3.5 and JobResult.from_json(json.loads(json.dumps(new.to_json()))) == new


def test_the_scaling_table_in_the_benchmarks_readme_comes_from_the_committed_results():
    """benchmarks/scaling.py reads results.jsonl files (and each run's log for its wall time) and gives sections
    2d's and 2e's tables: the runs' wall times, job time, jobs per worker and configs timed as the README states
    them, and for 2e's runs the time outside jobs and the compile wait."""
    root = Path(__file__).resolve().parents[1]
    runs = [str(root / f"benchmarks/results/scaling-x2/c{i}.results.jsonl") for i in (1, 2, 3, 4)]
    done = subprocess.run([sys.executable, str(root / "benchmarks/scaling.py"), *runs], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| c")]
    assert rows[:4] == ["| c1 | 297 s | 1.00x | 275 s | 36 | 275 s | 22 s | 0 s | 1661 |",
                        "| c2 | 184 s | 1.61x | 322 s | 20 + 16 | 163 s + 159 s | 21 s | 0 s | 1734 |",
                        "| c3 | 187 s | 1.59x | 330 s | 18 + 18 | 168 s + 162 s | 19 s | 0 s | 1728 |",
                        "| c4 | 192 s | 1.55x | 336 s | 20 + 16 | 172 s + 163 s | 20 s | 0 s | 1774 |"]
    readme = (root / "benchmarks/README.md").read_text()
    for wall, total, split, configs in (("297 s", "275 s", "36", "1661"), ("184 s", "322 s", "20 + 16", "1734")):
        assert f"| {wall} | {total} | {split} | {configs} |" in readme
    assert "| E=288,N=320,device_name=NVIDIA_H200.json | 1 | vm:1 | 17.8 | 4.2 |" in done.stdout  # M = 1 of N=320
    walk = [str(root / f"benchmarks/results/scaling-x2/c{i}.results.jsonl") for i in (5, 6)]
    done = subprocess.run([sys.executable, str(root / "benchmarks/scaling.py"), *walk], capture_output=True,
                          text=True, timeout=60)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| c")]
    assert rows == ["| c5 | 304 s | 1.00x | 276 s | 36 | 276 s | 28 s | 185 s | 1666 |",
                    "| c6 | 180 s | 1.69x | 310 s | 19 + 17 | 155 s + 154 s | 25 s | 214 s | 1673 |"]
    for row, workers in zip(rows, ("1", "2")):  # the README's table adds the worker count
        run, rest = row.split("|", 2)[1:]
        assert f"|{run}| {workers} |{rest}".replace("x |", "× |") in readme, row
    bad = subprocess.run([sys.executable, str(root / "benchmarks/scaling.py"), runs[0], "nowhere.jsonl"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nowhere.jsonl: no such file" in bad.stderr


def test_the_scaling_table_says_what_came_before_the_first_job_where_the_phases_were_timed():
    """c15 was timed by run_phases.py (its phases.json: the workers reported 19.27 s into the run); c13 was not."""
    root = Path(__file__).resolve().parents[1] / "benchmarks/results/streamed"
    done = subprocess.run([sys.executable, str(root.parents[1] / "scaling.py"), str(root / "c13.results.jsonl"),
                           str(root / "c15.results.jsonl")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| of it, before the first job |" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("| c1")]
    assert rows[0].startswith("| c13 | 220 s | 1.00x | 197 s | 36 | 197 s | 23 s | ? | ")
    assert rows[1].startswith("| c15 | 226 s | 0.97x | 200 s | 36 | 200 s | 26 s | 19.3 s | ")


def test_a_run_that_finished_no_job_leaves_no_folder_it_made(tmp_path):
    """``close(drop_unused=True)``, as the sweep closes: the state folder (and the --out folder) a run made go with
    it when it finished no job; a folder that held results before, or got one now, stays."""
    out = tmp_path / "new" / "cfg"
    opened(out).close(drop_unused=True)
    assert not (tmp_path / "new").exists()
    kept = opened(out)
    kept.add(result(16))
    kept.close(drop_unused=True)
    again = opened(out)
    again.close(drop_unused=True)  # made by the run before: stays, with its result
    assert opened(out).done(FILE, 16)


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_a_run_that_finished_no_job_and_wrote_no_file_leaves_a_state_it_found_as_it_was(tmp_path):
    """A state found in --out (here results of other files, and a config file to snapshot) and a run that claims new
    files, snapshots --out, notes its workers, then finishes nothing (refused on a node without GPUs, say): the
    record, the snapshot and the lock file (none, or an earlier run's holder line) are as they were. One that wrote a
    file from the results keeps them."""
    first = opened(tmp_path, file="E=36.json")
    first.add(result(16, "E=36.json"))
    first.close()
    (tmp_path / "E=72.json").write_text("{}")
    lock = tmp_path / ".tune-moe" / "lock"
    for holder in (None, b"pid 1 on another-host since 2026-12-01 00:00:00\n"):
        lock.unlink(missing_ok=True)
        if holder is not None:
            lock.write_bytes(holder)
        found = tree(tmp_path)
        run = opened(tmp_path)
        run.keep_before()
        run.note_run(RUN)
        assert tree(tmp_path) != found
        run.close(drop_unused=True)
        assert tree(tmp_path) == found
    wrote = opened(tmp_path)
    wrote.note_run(RUN)
    wrote.note_written("E=36.json")
    wrote.close(drop_unused=True)
    assert json.loads((tmp_path / ".tune-moe" / "run.json").read_text())["written"] == ["E=36.json"]


def test_a_damaged_state_is_refused_and_left_as_found(tmp_path):
    state = tmp_path / ".tune-moe"
    state.mkdir()
    (state / "results.jsonl").write_bytes(b"\xff\xfe\x00\n[1, 2]\n")
    for record in ('{"format": 2, "files": {}, "written": [{}]}', '{"format": 2, "files": {"E=72.json": 1}}'):
        (state / "run.json").write_text(record)
        found = tree(tmp_path)
        with pytest.raises(UsageError, match="is not a run record tune-moe wrote"):
            Store(tmp_path)
        assert tree(tmp_path) == found
    (state / "run.json").unlink()
    assert Store(tmp_path).results == {}  # lines no JSON result reads run again
    (state / "results.jsonl").unlink()
    (state / "results.jsonl").mkdir()
    with pytest.raises(UsageError, match="results.jsonl is not the file a run keeps there; move it away"):
        Store(tmp_path)


def test_the_files_as_they_were_before_the_results_began_are_kept(tmp_path):
    """``keep_before``: a snapshot of every config file and sidecar the folder holds (whatever the plan), taken
    once: a resumed run keeps it (what the folder held before any of these results), so a file the results made
    stays out of it; --fresh takes it again; a run that made the state folder and finished no job takes it with
    it; other files in the folder are not config files and stay out."""
    out = tmp_path / "cfg"
    out.mkdir()
    (out / FILE).write_text('{"1": "first"}')
    (out / "E=72.provenance.json").write_text('{"run": "first"}')
    (out / "E=288,N=320,dtype=fp8_w8a8.json").write_text('{"1": "another dtype"}')
    (out / "notes.json").write_text("{}")
    s = opened(out)
    s.keep_before()
    assert sorted(p.name for p in s.before_dir.iterdir()) == \
        ["E=288,N=320,dtype=fp8_w8a8.json", "E=72.json", "E=72.provenance.json"]
    s.add(result(16))
    s.close()
    (out / FILE).write_text('{"1": "rewritten"}')
    (out / "E=144.json").write_text('{"1": "made by the run"}')
    resumed = opened(out)
    resumed.keep_before()
    assert (resumed.before_dir / FILE).read_text() == '{"1": "first"}'
    assert not (resumed.before_dir / "E=144.json").exists()
    resumed.close()
    fresh = opened(out, fresh=True)
    assert not fresh.before_dir.exists()
    fresh.keep_before()
    assert (fresh.before_dir / FILE).read_text() == '{"1": "rewritten"}'
    assert (fresh.before_dir / "E=144.json").exists()
    fresh.close()
    made = tmp_path / "made"
    made.mkdir()
    (made / FILE).write_text("{}")
    unused = opened(made)
    unused.keep_before()
    unused.close(drop_unused=True)
    assert sorted(p.name for p in made.iterdir()) == [FILE]


def test_a_snapshot_cut_short_is_taken_again_whole(tmp_path):
    """A kill while ``keep_before`` copies leaves ``before.partial``, never a ``before/`` that a resumed run
    would take for complete; the next run takes the snapshot whole."""
    out = tmp_path / "cfg"
    out.mkdir()
    (out / FILE).write_text('{"1": "first"}')
    s = opened(out)
    (s.dir / "before.partial").mkdir()
    (s.dir / "before.partial" / "E=36.json").write_text("cut short")
    s.keep_before()
    assert sorted(p.name for p in s.before_dir.iterdir()) == [FILE]
    assert not (s.dir / "before.partial").exists()
    s.close()


def test_the_sibling_seed_pair_in_the_benchmarks_readme_comes_from_the_committed_results():
    """benchmarks/search_pair.py on section 2l's committed pair gives the figures the README states: no gain from
    sibling seeds (geomean 1.0008), 19 winners differing, 6 by more than 1%, 16 borrowed of which sib-old found 12."""
    root = Path(__file__).resolve().parents[1]
    pair = [str(root / f"benchmarks/results/retune-b13/sib-{n}.results.jsonl") for n in ("old", "new")]
    done = subprocess.run([sys.executable, str(root / "benchmarks/search_pair.py"), *pair], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "72 jobs in both runs; speedup over vLLM's default, new/old: geomean 1.0008, range 0.941-1.062" in out
    assert "Winners differ in 19 jobs, 6 of them by more than 1%" in out
    assert "| E=36,N=1280 | 3072 | M128-N256-K64-G1-w8-s4 | 1.078x | M128-N128-K64-G1-w4-s3 | 1.014x |" in out
    assert "16 of NEW's winners (not vLLM's default) had been picked earlier in NEW by another file at the same M; " \
           "OLD picked the same config in 12 of them." in out
    readme = (root / "benchmarks/README.md").read_text()
    assert "geomean **1.0008**, range 0.941–1.062" in readme and "19 of the 72 differ, 6 of them by more than 1%" in readme
