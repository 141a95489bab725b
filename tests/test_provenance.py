"""Provenance sidecars: one record, written and read back whole; checks before a run touches a file."""

import json

import pytest

from conftest import provenance_for
from tuning import provenance
from tuning.configs import TileConfig, write_config_file
from tuning.errors import UsageError
from tuning.outputs import check_writable
from tuning.provenance import Provenance

EP4 = "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
BF16_TP4 = "E=288,N=320,device_name=NVIDIA_H200.json"
A = TileConfig(16, 64, 128, 1, 4, 3)
CONFIGS = {1: A, 64: TileConfig(64, 128, 128, 16, 8, 4)}
SOFTWARE = {"triton": "3.8.0", "vllm": "0.33.0", "kernel_sha256": "0" * 64}


def ours(tmp_path, name=EP4, **software):
    path = tmp_path / name
    write_config_file(path, CONFIGS, software.get("triton", "3.8.0"))
    provenance.write(path, provenance_for(path, CONFIGS, **software))
    return path


def test_sidecar_name(tmp_path):
    assert provenance.sidecar_path(tmp_path / EP4) == tmp_path / (
        "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].provenance.json")
    assert provenance.sidecar_path(tmp_path / BF16_TP4).name == "E=288,N=320,device_name=NVIDIA_H200.provenance.json"


def test_round_trip_is_exact(tmp_path):
    path = ours(tmp_path)
    record = provenance.read(path)
    assert record == provenance_for(path, CONFIGS)
    data = json.loads(provenance.sidecar_path(path).read_text())
    assert data["tool"] == "tune-moe" and data["software"]["triton"] == "3.8.0"
    assert Provenance.from_json(data, "x") == record


def test_no_sidecar_is_none_and_a_bad_one_is_one_line(tmp_path):
    path = tmp_path / EP4
    assert provenance.read(path) is None
    for text, match in (("{not json", "corrupt JSON"), ("[]", "not a tune-moe sidecar"),
                        (json.dumps({"tool": "benchmark_moe.py"}), "not a tune-moe sidecar"),
                        (json.dumps({"tool": "tune-moe", "file": EP4}), "missing required key 'layouts'")):
        provenance.sidecar_path(path).write_text(text)
        with pytest.raises(UsageError, match=match) as err:
            provenance.read(path)
        assert "\n" not in str(err.value)


def test_a_sidecar_that_is_a_link_to_nothing_or_a_folder_is_one_line(tmp_path):
    """A sidecar link whose file is gone is refused, not taken for no sidecar."""
    path = tmp_path / EP4
    side = provenance.sidecar_path(path)
    side.symlink_to("gone.json")
    with pytest.raises(UsageError) as err:
        provenance.read(path)
    assert str(err.value) == (f"{side}: a link to gone.json, which does not exist or loops; remove it or put the "
                              "sidecar tune-moe wrote there")
    side.unlink()
    side.mkdir()
    with pytest.raises(UsageError) as err:
        provenance.read(path)
    assert str(err.value) == f"{side}: a folder, not a file; remove it or put the sidecar tune-moe wrote there"


@pytest.mark.parametrize("key, value, problem", [
    ("confirmed", {"m": 4}, "key 'confirmed' {'m': 4} is not a list of confirmed entries"),
    ("confirmed", [{"m": 4, "config": "x", "replaces": "y", "on": "GPU-0", "old_us": 2.0, "new_us": "fast"}],
     "key 'confirmed.0.new_us' is not a finite number"),
    ("confirmed", [{"m": 4, "config": "x", "replaces": "y", "on": "GPU-0", "old_us": 2.0, "new_us": 1.0,
                    "also_confirmed_on": {"GPU-1": None}}],
     "key 'confirmed.0.also_confirmed_on' holds 'GPU-1', whose old/new is not a finite number"),
    ("defaulted", {"m": 4}, "key 'defaulted' {'m': 4} is not a list of entries set back to vLLM's default"),
    ("defaulted", [{"m": 4, "config": "x", "replaces": "y", "readings": 3, "boards": 2}],
     "missing required key 'defaulted.0.speedup'"),
    ("defaulted", [{"m": 4, "config": "x", "replaces": "y", "readings": 0, "boards": 2, "speedup": 0.99}],
     "key 'defaulted.0.readings' 0 is not a positive count"),
    ("defaulted", [{"m": 4, "config": "x", "replaces": "y", "readings": 3, "boards": 2, "speedup": "tie"}],
     "key 'defaulted.0.speedup' is not a finite number"),
    ("layouts", ["TP4+EP", 4], "key 'layouts' ['TP4+EP', 4] is not a list of the layouts it was tuned for "
                               '(e.g. ["TP4"])'),
    ("software", {"cuda": "13.0", "torch": "2.11.0", "triton": "3.8.0", "vllm": 0.33},
     "key 'software.vllm' 0.33 is not a vLLM version (MAJOR.MINOR[.PATCH])"),
    ("results", {"\u0661": {}}, "results key '\u0661' is not a batch size"),
])
def test_sidecar_keys_a_command_reads_later_are_checked_when_it_is_read(tmp_path, key, value, problem):
    path = ours(tmp_path)
    side = provenance.sidecar_path(path)
    side.write_text(json.dumps({**json.loads(side.read_text()), key: value}))
    with pytest.raises(UsageError) as err:
        provenance.read(path)
    assert str(err.value) == f"{side}: {problem}; regenerate the sidecar with tune-moe"


def test_a_vllm_version_with_a_patch_or_a_local_part_is_read(tmp_path):
    path = ours(tmp_path)
    side = provenance.sidecar_path(path)
    for version in ("0.33", "0.33.0", "0.33.0rc1", "0.33.0+cu130", "v0.34.1"):
        data = json.loads(side.read_text())
        side.write_text(json.dumps({**data, "software": {**data["software"], "vllm": version}}))
        assert provenance.read(path).run.vllm == version


def test_check_writable_new_file(tmp_path):
    new = check_writable(tmp_path / EP4, SOFTWARE)
    assert new.configs == {} and new.held == {}


def test_check_writable_merges_into_a_file_of_the_same_software(tmp_path):
    path = ours(tmp_path)
    existing = check_writable(path, SOFTWARE)
    assert existing.configs == CONFIGS and [r.m for r in existing.rows] == [1, 64]
    assert existing.held == CONFIGS  # each entry is the incumbent of its batch size


def test_a_partial_re_tune_keeps_the_layouts_the_file_was_tuned_for(tmp_path):
    """Re-tuning a few batch sizes for one layout must not drop the file's other layouts from its record."""
    from tuning.gpus import get_gpu
    from tuning.models import load_model
    from tuning.plan import make_plan
    from tuning.shapes import BATCH_SIZES, parse_layout

    path = tmp_path / EP4
    write_config_file(path, CONFIGS, "3.8.0")
    provenance.write(path, provenance_for(path, CONFIGS, layouts=("TP4+EP", "DP4+EP")))
    plan = make_plan(load_model("stepfun-ai/Step-3.5-Flash-FP8"), get_gpu("H200"), "fp8",
                     [parse_layout("DP4+EP"), parse_layout("DP8+EP")], 8, BATCH_SIZES, vllm_version="0.33.0")
    shape = next(s for s in plan.shapes if plan.file_name(s) == EP4)
    existing = check_writable(path, SOFTWARE)
    assert existing.layouts == ("TP4+EP", "DP4+EP")
    assert existing.with_layouts(plan, shape) == ("TP4+EP", "DP4+EP")
    assert check_writable(tmp_path / "new.json", SOFTWARE).with_layouts(plan, shape) == ("DP4+EP",)


def test_check_writable_refuses_another_triton_unless_overwrite(tmp_path):
    path = ours(tmp_path, triton="3.6.0")
    with pytest.raises(UsageError) as err:
        check_writable(path, SOFTWARE)
    assert "other software (triton 3.6.0; this run: 3.8.0)" in str(err.value) and "--overwrite" in str(err.value)
    replaced = check_writable(path, SOFTWARE, overwrite=True)
    assert replaced.configs == {} and replaced.rows == ()
    assert replaced.held == CONFIGS  # not merged, but the replacement is timed against them


def test_check_writable_refuses_a_foreign_file_unless_overwrite(tmp_path):
    path = tmp_path / EP4
    write_config_file(path, CONFIGS, "3.8.0")  # e.g. vLLM's benchmark_moe.py: no sidecar
    with pytest.raises(UsageError) as err:
        check_writable(path, SOFTWARE)
    msg = str(err.value)
    assert "was not written by tune-moe" in msg and provenance.sidecar_path(path).name in msg and "--overwrite" in msg
    replaced = check_writable(path, SOFTWARE, overwrite=True)
    assert replaced.configs == {} and replaced.held == CONFIGS


def test_check_writable_refuses_a_corrupt_file_even_with_overwrite(tmp_path):
    path = ours(tmp_path)
    path.write_text('{"1": ')
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="unreadable or corrupt JSON"):
            check_writable(path, SOFTWARE, overwrite=overwrite)


def test_check_writable_refuses_a_corrupt_sidecar(tmp_path):
    path = ours(tmp_path)
    provenance.sidecar_path(path).write_text("{not json")
    with pytest.raises(UsageError, match="corrupt JSON"):
        check_writable(path, SOFTWARE)


def test_an_expert_parallel_config_picked_on_an_empty_launch_is_named_with_its_re_tune(tmp_path):
    """roofline_us 0 on an expert-parallel shard: the timed draw routed nothing to this GPU, so the config was
    picked on noise (the committed DP8+EP M=1 entries were, until re-tuned). preflight, verify and report say so,
    with the tune that replaces them; a shard without expert parallelism never launches empty."""
    from dataclasses import replace

    from tuning.gpus import get_gpu
    from tuning.serve.preflight import Node, _drift
    from tuning.report import _provenance_lines
    from tuning.verify import _drift as verify_drift

    for name, layouts, expect in ((EP4, ("TP4+EP", "DP4+EP"), (1,)), (BF16_TP4, ("TP4",), ())):
        path = tmp_path / name
        write_config_file(path, CONFIGS, "3.8.0")
        record = provenance_for(path, CONFIGS, layouts=layouts)
        rows = tuple(replace(r, roofline_us=0.0) if r.m == 1 else r for r in record.rows)
        provenance.write(path, replace(record, rows=rows))
        read = provenance.read(path)
        assert read.empty_launches == expect
        note = read.empty_launch_note()
        node = Node(gpu=get_gpu("H200"), env={}, config_dir=tmp_path, vllm_version="0.33.0")
        if not expect:
            assert note is None and not any("no slot" in d for d in _drift(path, node))
            continue
        assert note == ("M=1 tuned on a launch with no slot on this GPU (an old routing draw; its config was picked on "
                        "noise): re-tune with tune-moe --gpu H200 --dtype fp8 --layouts DP4+EP --batch-sizes 1 "
                        "--vllm-version 0.33.0")
        assert note in _drift(path, node)  # a preflight problem for the serves that read the file
        assert f"- Not tuned: {note}" in _provenance_lines(read)
        assert verify_drift(path, "0.33.0").endswith(f"\n  {note}")


def test_the_summary_says_what_became_of_each_entry_the_file_held():
    """Kept (and why, when a second head to head undid the replacement the first decided); replaced by a winner
    or by vLLM's default (the times and the ratio, more than KEEP_WITHIN either way); replaced because it fails;
    nothing for a fresh entry. Under the table, how the second head to heads went."""
    from dataclasses import replace

    from tuning.jobs import JobResult
    from tuning.outputs import incumbent_mark, rechecked_note

    default, held = TileConfig(64, 128, 128, 32, 4, 3), TileConfig(64, 128, 128, 16, 4, 4)
    winner = TileConfig(16, 64, 128, 1, 4, 4)
    r = JobResult(file="f.json", m=16, default=default, default_us=144.3, tuned=winner, tuned_us=133.6,
                  tuned_p20_us=133.0, tuned_p80_us=134.0, roofline_us=50.0, bound="memory", error=0.0, evaluated=40,
                  failed=0, seconds=3.0, worker="w", incumbent=held, incumbent_us=135.8)
    assert incumbent_mark(r) == "  (replaces M64-N128-K128-G16-w4-s4: 135.8 -> 133.6 us, 1.016x)"
    assert incumbent_mark(replace(r, tuned=held, tuned_us=135.8)) == "  (kept)"
    by_default = replace(r, tuned=default, tuned_us=803.8, default_us=803.8, incumbent_us=824.0)
    assert incumbent_mark(by_default) == ("  (replaces M64-N128-K128-G16-w4-s4, which vLLM's default beat: "
                                          "824.0 -> 803.8 us, 1.025x)")
    assert incumbent_mark(replace(r, incumbent_us=0.0)) == "  (replaces M64-N128-K128-G16-w4-s4, which fails)"
    assert incumbent_mark(replace(r, incumbent=None, incumbent_us=0.0)) == ""
    assert incumbent_mark(replace(r, incumbent_key=r.m)) == incumbent_mark(r)  # the file's own entry for M
    added = replace(r, incumbent_key=4096)  # a batch size the file lacked: vLLM ran its nearest key's entry
    assert incumbent_mark(added) == "  (replaces key 4096's M64-N128-K128-G16-w4-s4: 135.8 -> 133.6 us, 1.016x)"
    assert incumbent_mark(replace(added, tuned=held, tuned_us=135.8)) == "  (kept key 4096's entry, which vLLM ran here)"
    undone = replace(r, tuned=held, tuned_us=135.8, rechecked="undid")
    assert incumbent_mark(undone) == "  (kept: a second head to head undid its replacement)"
    confirmed = replace(r, rechecked="confirmed")
    assert incumbent_mark(confirmed) == incumbent_mark(r)
    assert rechecked_note([r, undone, confirmed, confirmed]) == \
        "3 replacements timed in a second head to head: 2 confirmed, 1 undone (what vLLM ran kept: the file's entry, " \
        "else its default)"
    clear = replace(r, rechecked="clear")
    assert incumbent_mark(clear) == incumbent_mark(r)
    assert rechecked_note([r, clear, undone, clear]) == (
        "1 replacement timed in a second head to head: 0 confirmed, 1 undone (what vLLM ran kept: the file's "
        "entry, else its default); 2 won the first by more than 5%, samples apart: not timed again")
    assert rechecked_note([clear]) == "1 won the first by more than 5%, samples apart: not timed again"
    fresh = replace(r, incumbent=None, incumbent_us=0.0, tuned=default, tuned_us=803.8, rechecked="undid")
    assert incumbent_mark(fresh) == "  (vLLM's default kept: a second head to head undid the search's pick)"
    assert JobResult.from_json(undone.to_json()) == undone
    old = undone.to_json()
    del old["rechecked"]  # a result from before the field: nothing was rechecked
    assert JobResult.from_json(old).rechecked == ""


def test_each_sidecar_row_names_the_board_that_timed_it(tmp_path):
    """A row written from a job names the board (NVML's UUID in its GPU state) and reads back the same; a job
    without NVML, and a sidecar from before the field, leave it out."""
    from dataclasses import replace

    from tuning.jobs import JobResult
    from tuning.outputs import row

    c = TileConfig(16, 64, 128, 1, 4, 3)
    r = JobResult(file="f.json", m=16, default=c, default_us=144.3, tuned=c, tuned_us=144.3, tuned_p20_us=144.0,
                  tuned_p80_us=145.0, roofline_us=50.0, bound="memory", error=0.0, evaluated=40, failed=0, seconds=3.0,
                  worker="w", gpu_state={"sm_mhz": 1980, "power_w": 400.0, "limit_w": 700.0, "reasons": [],
                                         "mem_mhz": 3201, "unit": "GPU-2e2a7309"})
    assert row(r).unit == "GPU-2e2a7309" and row(replace(r, gpu_state={})).unit is None
    path = tmp_path / "E=288,N=320,device_name=NVIDIA_H200.json"
    write_config_file(path, {16: c}, "3.8.0")
    prov = provenance_for(path, {16: c})
    provenance.write(path, replace(prov, rows=(replace(row(r), m=16),)))
    assert json.loads(provenance.sidecar_path(path).read_text())["results"]["16"]["unit"] == "GPU-2e2a7309"
    assert provenance.read(path).rows[0].unit == "GPU-2e2a7309"
    provenance.write(path, prov)
    assert "unit" not in json.loads(provenance.sidecar_path(path).read_text())["results"]["16"]
    assert provenance.read(path).rows[0].unit is None
