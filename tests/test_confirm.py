"""``verify --against OLD --keep-confirmed OUT``: OLD's set with only the changes this board confirmed."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_MODEL, provenance_for, vllm_fused_moe_path
from tuning import confirm, provenance, report, verify
from tuning.vllm import source as vllm_source
from tuning.clocks import GpuState
from tuning.configs import TileConfig, read_config_file, write_config_file
from tuning.errors import UsageError
from tuning.shapes import MoeShape
from committed_then import before_defaults

BF16 = "E=36,N=1280,device_name=NVIDIA_H200.json"
FP8 = "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
A, B, C = TileConfig(16, 64, 128, 1, 4, 3), TileConfig(16, 128, 128, 32, 4, 3), TileConfig(64, 128, 64, 1, 4, 3)
BOARD = GpuState(1980, 400.0, 700.0, (), 3201, "GPU-2e2a7309-362b-b544-b123-a009c322962a")


def tuned(folder, name, entries, tuned_us=10.0, **kw):
    """A config file and its sidecar, each row's tuned time ``tuned_us``."""
    folder.mkdir(exist_ok=True)
    write_config_file(folder / name, entries, "3.8.0")
    prov = provenance_for(folder / name, entries, **kw)
    rows = tuple(dataclasses.replace(r, tuned_us=tuned_us) for r in prov.rows)
    provenance.write(folder / name, dataclasses.replace(prov, rows=rows))


@pytest.fixture
def sets(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    tuned(old, BF16, {1: A, 16: A, 64: A}, tuned_us=10.0)
    tuned(new, BF16, {1: A, 16: B, 64: C}, tuned_us=9.0)
    tuned(old, FP8, {1: A, 16: A})  # a file the re-tune did not touch
    tuned(new, "E=144,N=1280,device_name=NVIDIA_H200.json", {1: C})  # one the re-tune made
    return old, new, tmp_path / "out"


def test_only_the_confirmed_entry_is_taken_and_the_sidecar_says_where_it_came_from(sets):
    old, new, out = sets
    changes = {BF16: [confirm.Change(16, A, B, 12.0, 10.0, 9.5),  # 5% faster: confirmed
                      confirm.Change(64, A, C, 12.0, 10.0, 9.95)],  # 0.5%: inside the noise, OLD's stays
               "E=144,N=1280,device_name=NVIDIA_H200.json": []}
    written = confirm.write(new, old, out, changes, BOARD, "2026-12-02T17:00:00Z")
    assert written.taken == 1
    assert written.lines == [f"  {BF16}: M=16 from NEW", "  E=144,N=1280,device_name=NVIDIA_H200.json: a file the re-tune "
                     "made, taken whole"]
    assert read_config_file(out / BF16) == {1: A, 16: B, 64: A}
    assert read_config_file(out / FP8) == {1: A, 16: A}
    assert read_config_file(out / "E=144,N=1280,device_name=NVIDIA_H200.json") == {1: C}
    merged = provenance.read(out / BF16)
    assert {r.m: r.tuned_us for r in merged.rows} == {1: 10.0, 16: 9.0, 64: 10.0}  # row 16 is NEW's
    assert {r.m: r.tuned for r in merged.rows} == {1: A, 16: B, 64: A}
    assert merged.extra["confirmed"] == [{
        "m": 16, "config": B.short, "replaces": A.short, "tuned": "2026-11-30T00:00:00Z to 2026-11-30T00:01:00Z",
        "on": BOARD.unit, "mem_mhz": 3201, "when": "2026-12-02T17:00:00Z", "default_us": 12.0, "old_us": 10.0,
        "new_us": 9.5}]
    assert sorted(p.name for p in out.parent.iterdir()) == ["new", "old", "out"]  # no .partial left
    # vLLM's own loader reads the merged file as written
    shape = MoeShape(36, 288, 1280, 4096, 8, "bf16", None)
    loaded, how = verify.load_with_vllm(out, shape, "NVIDIA_H200")
    assert loaded == {1: A, 16: B, 64: A}, how
    # the report reads the merged sidecar (its rows agree with the file) and names the entry and the board
    merged_report = next(r for r in report.load_folder(out) if r.file == BF16)
    assert merged_report.provenance[-1] == (
        "- Taken from a later re-tune where another board confirmed them (`verify --keep-confirmed`): "
        f"M=16 {A.short} → {B.short}, 10.0 → 9.5 µs on {BOARD.unit}")


def test_a_key_new_adds_is_taken_with_its_row_where_confirmed_against_the_entry_vllm_ran_there(sets):
    """NEW adds M=4096, which OLD lacks: judged against OLD's nearest entry (M=64's, which vLLM runs there), taken
    with its sidecar row when confirmed; M=2048, re-timed between NEW's keys (--batch-sizes), decides nothing."""
    old, new, out = sets
    tuned(new, BF16, {1: A, 16: A, 64: A, 4096: B}, tuned_us=9.0)
    confirm.check(new, old, out, [BF16])  # NEW keeps OLD's keys and adds one: a merge, not another plan
    changes = {BF16: [confirm.Change(4096, A, B, 120.0, 100.0, 90.0), confirm.Change(2048, A, B, 60.0, 50.0, 40.0)]}
    written = confirm.write(new, old, out, changes, BOARD, "t1")
    assert written.lines == [f"  {BF16}: M=4096 from NEW"]
    assert read_config_file(out / BF16) == {1: A, 16: A, 64: A, 4096: B}
    merged = provenance.read(out / BF16)
    assert [(r.m, r.tuned, r.tuned_us) for r in merged.rows] == [(1, A, 10.0), (16, A, 10.0), (64, A, 10.0),
                                                                (4096, B, 9.0)]
    assert [(c["m"], c["replaces"]) for c in merged.extra["confirmed"]] == [(4096, A.short)]
    assert [json.loads(line)["m"] for line in (new / confirm.LEDGER).read_text().splitlines()] == [4096]
    shape = MoeShape(36, 288, 1280, 4096, 8, "bf16", None)
    before = os.environ.get("VLLM_TUNED_CONFIG_FOLDER")
    loaded, how = verify.load_with_vllm(out, shape, "NVIDIA_H200")
    assert loaded == {1: A, 16: A, 64: A, 4096: B}, how
    assert os.environ.get("VLLM_TUNED_CONFIG_FOLDER") == before  # vLLM's loader was pointed at OUT, then put back


def test_a_key_new_adds_with_the_entry_vllm_ran_there_is_taken_without_a_confirmation(sets):
    """NEW adds M=4096 holding OLD's M=64 entry (the one vLLM ran at 4096): nothing vLLM runs changes, so OUT takes
    the key and NEW's row measured at it, with no head to head and no ledger line; the file's confirmed entries
    and OLD's other rows stay."""
    old, new, out = sets
    tuned(new, BF16, {1: A, 16: A, 64: A, 4096: A}, tuned_us=9.0)
    confirm.check(new, old, out, [BF16])
    assert confirm.unchanged_additions(new / BF16, old / BF16) == [4096]
    written = confirm.write(new, old, out, {BF16: []}, BOARD, "t1")
    assert written.taken == 0 and written.lines == [
        f"  {BF16}: M=4096 added, each the entry vLLM ran there from OLD (its nearest key's), with NEW's row measured at it"]
    assert read_config_file(out / BF16) == {1: A, 16: A, 64: A, 4096: A}
    merged = provenance.read(out / BF16)
    assert [(r.m, r.tuned_us) for r in merged.rows] == [(1, 10.0), (16, 10.0), (64, 10.0), (4096, 9.0)]
    assert merged.run == provenance.read(old / BF16).run and "confirmed" not in merged.extra
    assert not (new / confirm.LEDGER).read_text().strip()  # no head to head to record
    loaded, how = verify.load_with_vllm(out, MoeShape(36, 288, 1280, 4096, 8, "bf16", None), "NVIDIA_H200")
    assert loaded == {1: A, 16: A, 64: A, 4096: A}, how
    tuned(new, BF16, {1: A, 16: A, 64: A, 4096: B}, tuned_us=9.0)  # another entry: a change to confirm instead
    assert confirm.unchanged_additions(new / BF16, old / BF16) == []


def test_a_second_merge_keeps_the_first_confirmations(sets, tmp_path):
    old, new, out = sets
    confirm.write(new, old, out, {BF16: [confirm.Change(16, A, B, 12.0, 10.0, 9.5)]}, BOARD, "t1")
    again = tmp_path / "again"
    confirm.write(new, out, again, {BF16: [confirm.Change(64, A, C, 12.0, 10.0, 9.0)]}, None, "t2")
    entries = provenance.read(again / BF16).extra["confirmed"]
    assert [(c["m"], c["when"]) for c in entries] == [(16, "t1"), (64, "t2")]
    assert entries[1]["on"].startswith("the CPU (--interpret")


@pytest.mark.parametrize("spoil, match", [
    (lambda old, new, out: (out.mkdir(), (out / "x").write_text("")), "exists and is not an empty folder"),
    (lambda old, new, out: provenance.sidecar_path(old / BF16).unlink(), f"{re.escape(BF16)} in OLD has no tune-moe"),
    (lambda old, new, out: tuned(new, BF16, {1: A, 16: B, 64: C}, triton="3.6.0"),
     "tuned under Triton 3.8.0 in OLD and 3.6.0 in NEW"),
    (lambda old, new, out: tuned(new, BF16, {1: A, 16: B}), f"{BF16} in NEW lacks OLD's batch sizes 64"),
])
def test_a_merge_that_would_mix_runs_is_refused_before_anything_is_timed(sets, spoil, match):
    old, new, out = sets
    spoil(old, new, out)
    with pytest.raises(UsageError, match=match):
        confirm.check(new, old, out, [BF16, "E=144,N=1280,device_name=NVIDIA_H200.json"])
    assert not out.with_name("out.partial").exists()


SHA = {release: sha for sha, release in vllm_source.KNOWN_SOURCES.items()}  # vLLM's fused_moe.py by release


def test_a_bf16_re_tune_under_0_34_is_judged_against_a_set_tuned_under_0_33(sets):
    """0.34's fused_moe.py is not 0.33's, but it launches a bf16 file's kernel alike: the merge goes ahead, and each
    entry taken from NEW names the release it was tuned under (the merged sidecar keeps OLD's run)."""
    old, new, out = sets
    tuned(old, BF16, {1: A, 16: A, 64: A}, vllm="0.33.0", kernel_sha256=SHA["0.33.0"])
    tuned(new, BF16, {1: A, 16: B, 64: C}, vllm="0.34.0", kernel_sha256=SHA["0.34.0"])
    confirm.check(new, old, out, [BF16, "E=144,N=1280,device_name=NVIDIA_H200.json"])
    assert not out.exists() and not out.with_name("out.partial").exists()
    confirm.write(new, old, out, {BF16: [confirm.Change(16, A, B, 12.0, 10.0, 9.5)]}, BOARD, "t1")
    merged = provenance.read(out / BF16)
    assert (merged.run.vllm, merged.run.kernel_sha256) == ("0.33.0", SHA["0.33.0"])
    assert [(c["m"], c["vllm"]) for c in merged.extra["confirmed"]] == [(16, "0.34.0")]
    assert read_config_file(out / BF16) == {1: A, 16: B, 64: A}


@pytest.mark.parametrize("name, old_kw, new_kw, message", [
    (FP8, {"vllm": "0.33.0", "kernel_sha256": SHA["0.33.0"]}, {"vllm": "0.34.0", "kernel_sha256": SHA["0.34.0"]},
     f"{confirm.OPTION}: {FP8} was tuned under vLLM 0.33.0 in OLD and 0.34.0 in NEW, and 0.34.0 reads block-FP8 "
     "weights through a TMA descriptor: a merged file would mix launches; re-tune OLD's set under NEW's"),
    # a kernel tune-moe does not know is refused, whatever release its sidecar names
    (BF16, {"vllm": "0.33.0", "kernel_sha256": SHA["0.33.0"]}, {"vllm": "0.34.0", "kernel_sha256": "f" * 64},
     f"{confirm.OPTION}: {BF16} was tuned under Triton 3.8.0 in OLD and 3.8.0 in NEW, or another kernel; a merged "
     "file would mix them: re-tune OLD's set under NEW's"),
    # releases that launch alike, under another Triton
    (BF16, {"vllm": "0.33.0", "kernel_sha256": SHA["0.33.0"]},
     {"vllm": "0.34.0", "kernel_sha256": SHA["0.34.0"], "triton": "3.6.0"},
     f"{confirm.OPTION}: {BF16} was tuned under Triton 3.8.0 in OLD and 3.6.0 in NEW, or another kernel; a merged "
     "file would mix them: re-tune OLD's set under NEW's"),
])
def test_a_merge_across_kernels_is_refused_unless_known_releases_launch_the_file_alike(sets, name, old_kw, new_kw,
                                                                                        message):
    old, new, out = sets
    tuned(old, name, {1: A, 16: A, 64: A}, **old_kw)
    tuned(new, name, {1: A, 16: B, 64: C}, **new_kw)
    with pytest.raises(UsageError) as refused:
        confirm.check(new, old, out, [name])
    assert str(refused.value) == message
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_a_change_is_not_confirmed_on_the_board_that_tuned_it(sets):
    """NEW's sidecar rows name the board that timed them: a confirmation there would repeat its luck."""
    old, new, out = sets
    prov = provenance.read(new / BF16)
    rows = tuple(dataclasses.replace(r, unit=BOARD.unit if r.m == 64 else "GPU-another") for r in prov.rows)
    provenance.write(new / BF16, dataclasses.replace(prov, rows=rows))
    confirm.check_board(new, {BF16: (16,)}, BOARD)  # M=16 was tuned on another board
    with pytest.raises(UsageError, match=rf"{re.escape(BF16)} M=64 was tuned on this board \(GPU-2e2a7309-.*\); "
                                         "a confirmation needs another board"):
        confirm.check_board(new, {BF16: (16, 64)}, BOARD)
    confirm.check_board(new, {BF16: (16, 64)}, dataclasses.replace(BOARD, unit=""))  # a board NVML did not name


def test_keep_confirmed_needs_against(sets):
    old, new, out = sets
    parser = verify.argparse.ArgumentParser()
    verify.add_arguments(parser)
    args = parser.parse_args(["--gpu", "H200", "--configs", str(new), "--keep-confirmed", str(out)])
    with pytest.raises(UsageError, match="--keep-confirmed needs --against OLD"):
        verify.run(args)
    assert not out.exists()


def tiny_sets(tmp_path):
    """OLD and NEW of the tiny model's bf16 DP2+EP file in ``tmp_path``, NEW's M=16 entry changed."""
    name = "E=8,N=128,device_name=NVIDIA_H200.json"
    a, b = TileConfig(16, 32, 32, 1, 2, 1), TileConfig(16, 64, 32, 1, 2, 1)
    for folder, entries in (("old", {1: a, 16: a}), ("new", {1: a, 16: b})):
        (tmp_path / folder).mkdir()
        write_config_file(tmp_path / folder / name, entries, "3.8.0")
        prov = provenance_for(tmp_path / folder / name, entries)
        provenance.write(tmp_path / folder / name, dataclasses.replace(
            prov, shape=MoeShape(8, 16, 128, 64, 2, "bf16", None)))
    return name, a, b


def test_verify_writes_the_merged_set_from_its_own_head_to_heads(tmp_path):
    """End to end under Triton's interpreter: vLLM's kernel re-times the changed entry beside OLD's, and OUT takes
    NEW's entry exactly when the printed old/new clears KEEP_WITHIN."""
    src = vllm_fused_moe_path()
    if src is None:
        pytest.skip("vLLM is not installed: its fused_moe.py is the kernel under test")
    name, a, b = tiny_sets(tmp_path)
    run = subprocess.run([sys.executable, "-m", "tuning.cli", "verify", "--gpu", "H200", "--model", str(TINY_MODEL),
                          "--configs", str(tmp_path / "new"), "--against", str(tmp_path / "old"), "--keep-confirmed",
                          str(tmp_path / "out"), "--interpret", "--vllm-src", str(src)],
                         capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    ratio = float(re.search(r"old/new ([\d.]+)x", run.stdout).group(1))
    assert re.search(rf"^wrote {tmp_path / 'out'}: {tmp_path / 'old'}'s files with the [01] of 1 changed entries this "
                     r"board confirmed \(under --interpret: CPU timings, for testing\)$", run.stdout, re.M)
    merged = read_config_file(tmp_path / "out" / name)
    if abs(ratio - 1 / 0.99) > 0.002:  # clear of the rounding at the threshold
        assert merged == ({1: a, 16: b} if ratio > 1 / 0.99 else {1: a, 16: a}), run.stdout
    assert json.loads((tmp_path / "out" / name).read_text())["triton_version"] == "3.8.0"


def test_only_a_file_the_re_tune_made_is_withheld_for_a_regression():
    """A change this board confirms is faster than OLD's entry, so NEW's regression there is OLD's, worse."""
    assert confirm.blocking_regressions([16, 64], made=False) == []
    assert confirm.blocking_regressions([1, 64], made=True) == [1, 64]


@pytest.mark.parametrize("keep_within, case", [(1.0, "not taken"), (-1e9, "taken"), (1.0, "made")])
def test_a_regression_withholds_out_only_in_a_file_the_re_tune_made(tmp_path, monkeypatch, capsys, keep_within, case):
    """Sessions B20 and B21 on the CPU: NEW's changed entry is slower than vLLM's default (every judged entry is,
    with REGRESSION raised). OUT is written, with OLD's entry where the change is not confirmed and with NEW's where
    it is (faster than OLD's, which is slower than the default still), each named; a file the re-tune made, taken
    whole, withholds OUT. vLLM's kernel runs under Triton's interpreter, judged as on a GPU."""
    src = vllm_fused_moe_path()
    if src is None:
        pytest.skip("vLLM is not installed: its fused_moe.py is the kernel under test")
    name, a, b = tiny_sets(tmp_path)
    if case == "made":
        (tmp_path / "old" / name).unlink()
        provenance.sidecar_path(tmp_path / "old" / name).unlink()
    monkeypatch.setattr(verify, "REGRESSION", float("inf"))
    monkeypatch.setattr(confirm, "KEEP_WITHIN", keep_within)  # 1.0: nothing confirmed; -1e9: everything
    judged = verify._retime
    monkeypatch.setattr(verify, "_retime", lambda *a, **k: judged(*a, **{**k, "judge": True}))
    parser = verify.argparse.ArgumentParser()
    verify.add_arguments(parser)
    out, old = tmp_path / "out", tmp_path / "old"
    args = parser.parse_args(["--gpu", "H200", "--model", str(TINY_MODEL), "--configs", str(tmp_path / "new"),
                              "--against", str(old), "--keep-confirmed", str(out), "--interpret",
                              "--vllm-src", str(src)])
    code = verify.run(args)
    printed = capsys.readouterr().out
    assert re.search(r"^\s+16 .*REGRESSION", printed, re.M), printed
    assert "1 files, 1 failed" in printed
    if case == "made":
        assert code == 1 and not out.exists() and not out.with_name("out.partial").exists()
        assert f"{out} not written: 1 failed above" in printed
        return
    assert code == 0, printed
    if case == "taken":
        assert re.search(rf"^{re.escape(name)} M=16: {out} takes NEW's entry, faster than {old}'s \([\d.]+ -> "
                         r"[\d.]+ us\), but vLLM's default is faster than both on this board \([\d.]+ us\)$",
                         printed, re.M), printed
        assert read_config_file(out / name) == {1: a, 16: b}
    else:
        assert re.search(rf"^{re.escape(name)} M=16: NEW's entry is slower than vLLM's default, not taken: {out} "
                         rf"keeps {old}'s entry \([\d.]+ us against the default's [\d.]+\)$", printed, re.M), printed
        assert read_config_file(out / name) == {1: a, 16: a}
    assert not (tmp_path / "new" / confirm.LEDGER).exists()  # CPU timings are no board's verdict


def test_an_entry_is_taken_only_where_every_board_that_judged_it_confirms_it(sets):
    """Session B21's case: one board confirms a change that two others found slower. Each board's head to heads go
    to NEW's ledger; a later board takes an entry only where every board so far, its rounds pooled, confirms it."""
    old, new, out = sets
    seventh, eighth = (dataclasses.replace(BOARD, unit=u) for u in ("GPU-seventh", "GPU-eighth"))
    # the seventh board: M=16 5% faster (confirmed), M=64 2% slower
    first = confirm.write(new, old, out, {BF16: [confirm.Change(16, A, B, 12.0, 10.0, 9.5),
                                                 confirm.Change(64, A, C, 12.0, 10.0, 10.2)]}, seventh, "t1")
    assert first.taken_at == {BF16: [16]} and first.earlier == []
    ledger = [json.loads(line) for line in (new / confirm.LEDGER).read_text().splitlines()]
    assert [(v["on"], v["m"], v["new"], v["old"], v["old_us"], v["new_us"]) for v in ledger] == [
        ("GPU-seventh", 16, B.short, A.short, 10.0, 9.5), ("GPU-seventh", 64, C.short, A.short, 10.0, 10.2)]
    # the eighth board confirms both: M=64 stays OLD's, as the seventh found it slower
    second = confirm.write(new, old, out.with_name("out8"), {
        BF16: [confirm.Change(16, A, B, 12.0, 10.0, 9.6), confirm.Change(64, A, C, 12.0, 10.0, 9.7)]}, eighth, "t2")
    assert second.taken_at == {BF16: [16]} and second.earlier == ["GPU-seventh"]
    assert read_config_file(out.with_name("out8") / BF16) == {1: A, 16: B, 64: A}
    assert f"  {BF16}: M=64 confirmed here (old/new 1.031x) but not on GPU-seventh (0.980x): {old}'s entry stays" \
        in second.lines
    row = provenance.read(out.with_name("out8") / BF16).extra["confirmed"][0]
    assert (row["m"], row["on"], row["also_confirmed_on"]) == (16, "GPU-eighth", {"GPU-seventh": round(10 / 9.5, 4)})
    merged_report = next(r for r in report.load_folder(out.with_name("out8")) if r.file == BF16)
    assert merged_report.provenance[-1].endswith(f"M=16 {A.short} → {B.short}, 10.0 → 9.6 µs on GPU-eighth, "
                                                 "1.053x on GPU-seventh")
    # a second round on the seventh board is pooled with its first: 1.02x slower then 1.04x faster is 1.0098x:
    # inside the noise, so M=64 is still not taken
    third = confirm.write(new, old, out.with_name("out7b"), {
        BF16: [confirm.Change(16, A, B, 12.0, 10.0, 9.5), confirm.Change(64, A, C, 12.0, 10.4, 10.0)]}, seventh, "t3")
    assert third.taken_at == {BF16: [16]} and third.earlier == ["GPU-eighth"]  # boards besides this one
    assert len((new / confirm.LEDGER).read_text().splitlines()) == 6
    # a CPU run (--interpret) neither reads nor adds to the ledger
    cpu = confirm.write(new, old, out.with_name("outcpu"), {
        BF16: [confirm.Change(16, A, B, 12.0, 10.0, 9.5), confirm.Change(64, A, C, 12.0, 10.0, 9.0)]}, None, "t4")
    assert cpu.taken_at == {BF16: [16, 64]} and cpu.earlier == []
    assert len((new / confirm.LEDGER).read_text().splitlines()) == 6


def test_a_ledger_write_that_fails_leaves_the_ledger_as_it_was(tmp_path):
    """A board's head to heads are added whole or not at all. Here the write runs out of room (a file size limit,
    as a full disk would): the ledger keeps its rows and stays readable, where an append would leave a cut line
    that the next board refuses. Through --keep-confirmed, OUT is written whole and the failure is one line."""
    new = tmp_path / "new"
    row = confirm.Verdict(BF16, 16, B.short, A.short, "GPU-seventh", 3201, "t1", 12.0, 10.0, 9.5)
    confirm.record(new, [row])
    held = (new / confirm.LEDGER).read_bytes()
    script = f"""
import dataclasses, resource, signal, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from tuning import confirm
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({len(held) + 100}, {len(held) + 100}))
row = confirm.read_ledger(Path({str(new)!r}))[0]
try:
    confirm.record(Path({str(new)!r}), [dataclasses.replace(row, on="GPU-eighth", when=str(i)) for i in range(20)])
except OSError as exc:
    print("refused:", exc.strerror)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("refused: File too large"), done.stdout + done.stderr
    assert (new / confirm.LEDGER).read_bytes() == held and confirm.read_ledger(new) == [row]
    assert [p.name for p in (new / confirm.LEDGER).parent.iterdir()] == ["judged.jsonl"]  # no temp file left

    # the same through --keep-confirmed's write: OUT is written whole, and the failure is one line naming the fix
    old, out = tmp_path / "old", tmp_path / "out"
    tuned(old, BF16, {1: A, 16: A})
    tuned(new, BF16, {1: A, 16: B})
    filler = [dataclasses.replace(row, file=f"E={i},N=64,device_name=NVIDIA_H200.json") for i in range(400)]
    confirm.record(new, filler)
    held = (new / confirm.LEDGER).read_bytes()
    limit = len(held) + 100  # above every config file and sidecar OUT holds, below the ledger with this round's rows
    script = f"""
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from tuning import confirm
from tuning.clocks import GpuState
from tuning.configs import TileConfig
from tuning.errors import UsageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
a, b = TileConfig.from_short({A.short!r}), TileConfig.from_short({B.short!r})
changes = {{{BF16!r}: [confirm.Change(16, a, b, 12.0, 10.0, 9.5)]}}
board = GpuState(1980, 400.0, 700.0, (), 3201, "GPU-ninth")
try:
    confirm.write(Path({str(new)!r}), Path({str(old)!r}), Path({str(out)!r}), changes, board, "t2")
except UsageError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(f"--keep-confirmed: wrote {out}, but {new / confirm.LEDGER} "
                                                          "could not take this board's head to heads (File too large)"), \
        done.stdout + done.stderr
    assert len(done.stdout.strip().splitlines()) == 1
    assert read_config_file(out / BF16) == {1: A, 16: B} and (new / confirm.LEDGER).read_bytes() == held


def test_a_ledger_that_is_not_tune_moe_s_or_cannot_be_written_is_refused_before_anything_is_timed(sets):
    old, new, out = sets
    (new / confirm.LEDGER).parent.mkdir()
    (new / confirm.LEDGER).write_text("not json\n")
    with pytest.raises(UsageError, match=r"judged\.jsonl is not a ledger tune-moe wrote .*; restore it"):
        confirm.check(new, old, out, [BF16])
    (new / confirm.LEDGER).unlink()
    if os.geteuid() != 0:  # root writes anywhere
        (new / confirm.LEDGER).parent.chmod(0o500)
        try:
            with pytest.raises(UsageError, match="cannot be written, and it records this board's head to heads"):
                confirm.check(new, old, out, [BF16])
        finally:
            (new / confirm.LEDGER).parent.chmod(0o700)


def test_a_re_tune_keeps_the_confirmations_of_the_entries_it_keeps(sets):
    """A later re-tune rewrites a merged file's sidecar from its own results: the confirmation of an entry it kept
    stays, of one it replaced goes."""
    from tuning.jobs import JobResult, Settings
    from tuning.vllm.kernel import KernelSource
    from tuning.models import DEFAULT_MODEL, load_model
    from tuning.outputs import check_writable, write_shape
    from tuning.gpus import get_gpu
    from tuning.plan import make_plan
    from tuning.shapes import parse_layout

    old, new, out = sets
    confirm.write(new, old, out, {BF16: [confirm.Change(16, A, B, 12.0, 10.0, 9.5),
                                         confirm.Change(64, A, C, 12.0, 10.0, 9.0)]}, BOARD, "t1")
    prov = provenance.read(out / BF16)
    existing = check_writable(out / BF16, {"triton": prov.run.triton, "vllm": prov.run.vllm,
                                            "kernel_sha256": prov.run.kernel_sha256})
    assert [c["m"] for c in existing.confirmed] == [16, 64]
    plan = make_plan(load_model(DEFAULT_MODEL), get_gpu("H200"), "bf16", [parse_layout("DP8+EP")], 8, (1, 16, 64),
                     vllm_version="0.33.0")
    (shape,) = plan.shapes

    def result(m, tuned):
        return JobResult(file=BF16, m=m, default=A, default_us=12.0, tuned=tuned, tuned_us=9.0, tuned_p20_us=8.9,
                         tuned_p80_us=9.1, roofline_us=5.0, bound="memory", error=0.0, evaluated=9, failed=0,
                         seconds=1.0, worker="w")

    write_shape(out, plan, shape, {16: result(16, B), 64: result(64, A)}, settings=Settings(gpu="H200", source=KernelSource()),
                run=prov.run, target=None, existing=existing)
    assert read_config_file(out / BF16) == {1: A, 16: B, 64: A}
    assert [c["m"] for c in provenance.read(out / BF16).extra["confirmed"]] == [16]
    write_shape(out, plan, shape, {16: result(16, A)}, settings=Settings(gpu="H200", source=KernelSource()), run=prov.run,
                target=None, existing=check_writable(out / BF16, {"triton": prov.run.triton, "vllm": prov.run.vllm,
                                                                   "kernel_sha256": prov.run.kernel_sha256}))
    assert "confirmed" not in provenance.read(out / BF16).extra


def test_the_proposals_kept_for_the_next_board_merge_with_the_committed_set_and_not_on_their_own_board(tmp_path):
    """benchmarks/results/b20/proposed (benchmarks/README §2r) is what the seventh board's --keep-confirmed read:
    its files pass every check a merge with the committed set (as it was then: vLLM's 18 batch sizes) makes, and the
    board that tuned them is refused. The committed set now also holds the EP files' prefill batch sizes (§7), which
    those proposals lack: a merge with it is refused in one line."""

    repo = Path(__file__).resolve().parents[1]
    results, now = repo / "benchmarks" / "results", repo / "kernels_configs" / "vllm-0.33" / "NVIDIA_H200"
    proposed = results / "b20" / "proposed"
    names = sorted(p.name for p in proposed.glob("E=*.json") if not p.name.endswith(provenance.SUFFIX))
    assert len(names) == 8
    with pytest.raises(UsageError, match=r"in NEW lacks OLD's batch sizes (16384|32768|65536); a merge needs NEW "):
        confirm.check(proposed, now, tmp_path / "out", names)
    committed = tmp_path / "committed"
    before_defaults(now, committed)  # the set without §11's entries set back to vLLM's default
    for name in names:  # and without §7's keys
        entries = {m: c for m, c in read_config_file(committed / name).items() if m <= 4096}
        write_config_file(committed / name, entries, "3.8.0")
        prov = provenance.read(committed / name)
        provenance.write(committed / name, dataclasses.replace(prov, rows=tuple(r for r in prov.rows if r.m <= 4096)))
    confirm.check(proposed, committed, tmp_path / "out", names)
    changed = {name: tuple(m for m, c in read_config_file(proposed / name).items()
                           if read_config_file(committed / name)[m] != c) for name in names}
    assert sum(map(len, changed.values())) == 26
    board = dataclasses.replace(BOARD, unit="GPU-b58fe6b3-5469-1037-1694-307d63fcd386")
    with pytest.raises(UsageError, match="was tuned on this board"):
        confirm.check_board(proposed, changed, board)
    confirm.check_board(proposed, changed, BOARD)



def test_the_proposals_ledger_comes_from_the_logs_and_holds_them_back_on_any_later_board(tmp_path):
    """benchmarks/results/b20/proposed carries the head to heads of the seventh, eighth and ninth boards (§2r, §2s),
    read from their committed logs by benchmarks/judged_from_logs.py, then the tenth board's two rounds (§2t) and the
    eleventh's one (§2u), which tune-moe verify wrote there itself: each as its log prints it. A twelfth board that
    confirmed every one of the 26 changes would still take none: the seventh, ninth, tenth and eleventh found every one
    slower or within the noise."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    results = repo / "benchmarks" / "results"
    proposed, committed = results / "b20" / "proposed", tmp_path / "committed"
    before_defaults(repo / "kernels_configs" / "vllm-0.33" / "NVIDIA_H200", committed)  # as the boards judged it
    logs = [results / p for p in ("b20/ke-a.log", "b20/ke-b.log", "b21/ke8-a.log", "b21/ke9-a.log")]
    own_logs = [results / p for p in ("b22/ke10-a.log", "b22/ke10-b.log", "b23/ke11-a.log")]  # written by verify
    fresh, read = tmp_path / "fresh", tmp_path / "read"
    shutil.copytree(proposed, fresh, ignore=shutil.ignore_patterns(".tune-moe"))
    shutil.copytree(proposed, read, ignore=shutil.ignore_patterns(".tune-moe"))
    for folder, its_logs in ((fresh, logs), (read, logs + own_logs)):
        subprocess.run([sys.executable, str(repo / "benchmarks" / "judged_from_logs.py"), str(folder), "2026-12-03",
                        *map(str, its_logs)], check=True, capture_output=True)
    ledger = confirm.read_ledger(proposed)
    assert len(ledger) == 182 and len({v.on for v in ledger}) == 5
    assert (fresh / confirm.LEDGER).read_text().splitlines() == (proposed / confirm.LEDGER).read_text().splitlines()[:104]
    for kept, logged in zip(ledger[104:], confirm.read_ledger(read)[104:], strict=True):  # the log prints 0.1 µs
        assert (kept.file, kept.m, kept.new, kept.old, kept.on, kept.mem_mhz) == (
            logged.file, logged.m, logged.new, logged.old, logged.on, logged.mem_mhz)
        assert kept.when.startswith(logged.when) and all(abs(getattr(kept, k) - getattr(logged, k)) <= 0.05 + 1e-9
                                                         for k in ("default_us", "old_us", "new_us"))
    shutil.copy(proposed / confirm.LEDGER, fresh / confirm.LEDGER)
    names = sorted(p.name for p in proposed.glob("E=*.json") if not p.name.endswith(provenance.SUFFIX))
    changes = {name: [confirm.Change(m, read_config_file(committed / name)[m], c, 100.0, 100.0, 90.0)
                      for m, c in read_config_file(proposed / name).items()
                      if read_config_file(committed / name)[m] != c] for name in names}
    twelfth = dataclasses.replace(BOARD, unit="GPU-twelfth")
    written = confirm.write(fresh, committed, tmp_path / "out", changes, twelfth, "2026-12-04")
    assert written.taken == 0 and len(written.earlier) == 5
    assert sum("confirmed here (old/new 1.111x) but not on" in line for line in written.lines) == 26
    assert len(confirm.read_ledger(fresh)) == 182 + 26
