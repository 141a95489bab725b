"""The backend advice is data: the committed file's schema, the rule that fills it from a bake-off (per serve
configuration, what vLLM 0.33 runs on each layer kind, summed), and its round trip."""

import json
from pathlib import Path

import pytest

from tuning.vllm import backend_advice as adv
from tuning.bakeoff.layer import Measured
from tuning.errors import UsageError
from tuning.shapes import parse_layout

LAYOUTS = ("TP2", "TP4", "TP8", "DP2+EP", "DP4+EP", "DP8+EP")


RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "bakeoff-h200"
B28 = Path(__file__).parents[1] / "benchmarks" / "results" / "b28"
B30 = Path(__file__).parents[1] / "benchmarks" / "results" / "b30"
B30_RUNS = ("tp8k", "ep2", "ep4", "ep8")
B31 = Path(__file__).parents[1] / "benchmarks" / "results" / "b31"


def test_committed_file_is_what_the_recorded_bake_off_gives(tmp_path, capsys):
    """data/backend_advice/vllm-0.33.json is the H200 bake-off's measurements (benchmarks/results/b30, §8) under the
    current rule: re-deriving it from the recorded rows changes nothing. Every layout comes from a run with vLLM
    0.33's own CUDA ops and FlashInfer-CUTLASS, timed with the tuned files as committed now, up to its prefill step
    (t33: TP2/TP4/TP8 to 8192; e33-2/4/8: DP2/DP4/DP8+EP to 16384/32768/65536). Its picks are those of the earlier
    runs on other boards (§4d, tp-b14 and ep-b14, and §2o's tp2-b16), which timed M up to 4096."""
    from tuning.cli import main

    out = tmp_path / "advice.json"
    assert main(["compare-backends", "--gpu", "H200", "--from-json",
                 *(str(B30 / f"{r}.json") for r in ("t33", "e33-2", "e33-4", "e33-8")),
                 "--write-advice", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(adv.data_file("0.33").read_text())
    assert "TP4 (measured 2026-12-04" in capsys.readouterr().out
    table = adv.load(adv.data_file("0.33"))
    assert sorted(layout for _, layout in table) == sorted(LAYOUTS)
    assert {layout: (a.measured, a.serve_config) for (_, layout), a in table.items()} == {
        "TP2": (True, "auto"), "TP4": (True, "deep_gemm_e8m0_off"), "TP8": (True, "deep_gemm_e8m0_off"),
        "DP2+EP": (True, "triton"), "DP4+EP": (True, "triton"), "DP8+EP": (True, "triton")}
    earlier = [RESULTS / "tp-b14.json", RESULTS / "ep-b14.json", RESULTS / "tp2-b16.json"]
    empty = tmp_path / "earlier.json"  # a file of its own: the committed one's entries were timed at more sizes
    empty.write_text(json.dumps({**json.loads(adv.data_file("0.33").read_text()), "entries": []}))
    assert main(["compare-backends", "--gpu", "H200", "--from-json", *map(str, earlier),
                 "--write-advice", str(empty)]) == 0
    capsys.readouterr()
    before = {e["layout"]: e["serve_config"] for e in json.loads((tmp_path / "earlier.json").read_text())["entries"]}
    assert before == {layout: a.serve_config for (_, layout), a in table.items()}
    assert json.loads(adv.data_file("0.33").read_text())["status"] == "measured"
    assert "N=384 instead of 320: 20% more expert weight memory" in table[("H200", "TP4")].line()
    assert "(measured 2026-12-04: M 1-4096: triton; M 32768-32768: deep_gemm)" in table[("H200", "DP4+EP")].line()
    for (_, layout), a in table.items():
        assert a.provenance["vllm_ops"]["stand_ins"] == {}
        assert ((a.provenance["flashinfer_build"] or {}).get("build") == "block-scale path only") == ("EP" in layout)
    assert adv.advice_for("H200", parse_layout("DP4+EP"), "fp8", "0.33.0").flags() == "--moe-backend triton"
    assert adv.advice_for("H200", parse_layout("TP4"), "fp8", "0.33.0").flags() == \
        "VLLM_USE_DEEP_GEMM_E8M0=0 --moe-backend deep_gemm"
    assert adv.advice_for("H200", parse_layout("TP4"), "bf16", "0.33.0") == adv.BF16
    assert adv.advice_for("B200", parse_layout("TP4"), "fp8", "0.33.0") is None
    # the bf16 line is Hopper's: on a B200 vLLM runs FlashInfer TRT-LLM for bf16 (0.34 on both layer kinds)
    assert adv.advice_for("H20", parse_layout("TP4"), "bf16", "0.34.0") == adv.BF16
    assert adv.advice_for("B200", parse_layout("TP4"), "bf16", "0.34.0") is None


def test_the_0_34_file_is_what_its_recorded_bake_off_gives(tmp_path, capsys):
    """data/backend_advice/vllm-0.34.json is the bake-off of every FP8 layout with vLLM 0.34's expert paths (its
    kernel, which reads block-FP8 weights through TMA, its CUDA ops and bundled DeepGEMM, and FlashInfer-CUTLASS on
    the EP layouts' SiLU layers; benchmarks/README §8), re-derived from the recorded rows, each layout timed up to
    its prefill step (TP 8192, DP2/4/8+EP 16384/32768/65536). A serve on 0.34 reads it; a release with no advice of
    its own gets the nearest release's, labelled as such."""
    from tuning.cli import main

    out = tmp_path / "advice.json"
    assert main(["compare-backends", "--gpu", "H200", "--from-json", *(str(B30 / f"{r}.json") for r in B30_RUNS),
                 "--write-advice", str(out)]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text()) == json.loads(adv.data_file("0.34").read_text())
    assert adv.releases() == ["0.34", "0.33"] and adv.release_of(adv.data_file("0.34")) == "0.34"
    table = adv.load(adv.data_file("0.34"))
    assert {layout: a.serve_config for (_, layout), a in table.items()} == {
        "TP2": "auto", "TP4": "deep_gemm_e8m0_off", "TP8": "deep_gemm_e8m0_off",
        "DP2+EP": "triton", "DP4+EP": "triton", "DP8+EP": "triton"}
    for (_, layout), a in table.items():
        assert a.provenance["vllm_ops"]["stand_ins"] == {} and a.provenance["deep_gemm"] == "2.8.1"
        assert a.provenance["kernel"].startswith("vLLM 0.34.0 fused_moe_kernel")
        assert ((a.provenance["flashinfer_build"] or {}).get("build") == "block-scale path only") == ("EP" in layout)
    tp2 = adv.advice_for("H200", parse_layout("TP2"), "fp8", "0.34.0")
    assert tp2.line() == "backend advice for TP2 on H200: (no --moe-backend: vLLM's default) (measured 2026-12-04: " \
                         "M 1-4096: auto; M 8192-8192: deep_gemm)"  # under 0.33 DeepGEMM was fastest at M = 4096
    assert "M 4096-8192: deep_gemm" in adv.advice_for("H200", parse_layout("TP2"), "fp8", "0.33.0").line()
    ep = adv.advice_for("H200", parse_layout("DP2+EP"), "fp8", "0.34.0")
    assert ep.line() == ("backend advice for DP2+EP on H200: --moe-backend triton (measured 2026-12-04: M 1-4096: "
                         "triton; M 16384-16384: deep_gemm; FlashInfer-CUTLASS timed with FlashInfer 0.7.2.post1; "
                         "vLLM 0.34.0 pins 0.7.3)")  # under 0.33 DeepGEMM was fastest at M = 4096 here too
    assert "M 4096-16384: deep_gemm" in adv.advice_for("H200", parse_layout("DP2+EP"), "fp8", "0.33.0").line()
    later = adv.advice_for("H200", parse_layout("DP4+EP"), "fp8", "0.35.1")
    assert later == ("backend advice for DP4+EP on H200: not measured under vLLM 0.35 (tune-moe compare-backends with "
                     "vLLM 0.35's sources measures it); under vLLM 0.34: --moe-backend triton (measured 2026-12-04: "
                     "M 1-32768: triton; FlashInfer-CUTLASS timed with FlashInfer 0.7.2.post1; vLLM 0.34.0 pins 0.7.3)")


def test_a_second_board_gives_the_0_34_tp_picks_again(tmp_path, capsys):
    """tp8k2 (benchmarks/results/b31, another H200) timed 0.34's TP layouts at tp8k's sizes: the same pick per layout
    and the same range where DeepGEMM with E8M0 leads (M = 8192)."""
    from tuning.cli import main

    committed = json.loads(adv.data_file("0.34").read_text())
    out = tmp_path / "advice.json"
    out.write_text(json.dumps({**committed, "entries": []}))
    assert main(["compare-backends", "--gpu", "H200", "--from-json", str(B31 / "tp8k2.json"),
                 "--write-advice", str(out)]) == 0
    capsys.readouterr()
    again = adv.load(out)
    table = adv.load(adv.data_file("0.34"))
    assert sorted(layout for _, layout in again) == ["TP2", "TP4", "TP8"]
    for key, a in again.items():
        assert a.serve_config == table[key].serve_config
        assert a.line() == table[key].line()


def test_a_release_without_advice_gets_the_nearest_releases():
    assert adv.nearest_first(["0.34", "0.33"], "0.26") == ["0.33", "0.34"]
    assert adv.nearest_first(["0.34", "0.33"], "0.35") == ["0.34", "0.33"]
    assert adv.nearest_first(["0.36", "0.34", "0.33"], "0.35") == ["0.36", "0.34", "0.33"]  # as near: the newer
    assert adv.nearest_first(["0.34", "0.33"], "v1.0") == ["0.34", "0.33"]
    assert "under vLLM 0.33:" in adv.advice_for("H200", parse_layout("DP4+EP"), "fp8", "0.26.0")
    assert "under vLLM 0.34:" in adv.advice_for("H200", parse_layout("DP4+EP"), "fp8", "0.35.1")


def test_write_advice_refuses_a_file_of_another_release(tmp_path, capsys):
    """A bake-off of 0.34's expert paths never lands in 0.33's advice, nor the other way round: one line, exit 2, the
    file as it was."""
    from tuning.cli import main

    target = tmp_path / "advice.json"
    target.write_text(adv.data_file("0.33").read_text())
    assert main(["compare-backends", "--gpu", "H200", "--from-json", str(B28 / "bo34b.json"),
                 "--write-advice", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "holds vLLM 0.33's advice, and this bake-off ran vLLM 0.34's expert paths; write to "
        f"{adv.data_file('0.34')} or a new file")
    assert target.read_text() == adv.data_file("0.33").read_text()
    assert main(["compare-backends", "--gpu", "H200", "--from-json", str(B28 / "bo34b.json"),
                 str(RESULTS / "tp-b14.json"), "--write-advice", str(tmp_path / "new.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "these bake-offs ran different vLLM releases" in err[0]
    assert not (tmp_path / "new.json").exists()


def test_a_failure_reads_as_its_first_clause_in_the_advice():
    long = ("MissingJITCacheError: JIT compilation is disabled via FLASHINFER_DISABLE_JIT environment variable, but "
            "the required module is not found in the JIT cache. Please add the missing module")
    assert adv.brief(long) == "MissingJITCacheError: JIT compilation is disabled via FLASHINFER_DISABLE_JIT " \
                              "environment variable"
    for whole in ("skipped (--no-flashinfer)", "numerics: relative error 0.300 > 0.1",
                  "DeepGEMM not importable (ImportError: libcuda.so.1)"):
        assert adv.brief(whole) == whole
    assert adv.brief("x" * 150) == "x" * 99 + "…"


def test_a_tie_names_vllms_default_and_stand_ins_can_hold_the_pick_back():
    assert adv.fastest({"auto": 102.0, "triton": 102.0, "deep_gemm": 150.0, "deep_gemm_e8m0_off": 100.0}) == "auto"
    assert adv.fastest({"auto": 104.0, "triton": 104.0, "deep_gemm": 150.0, "deep_gemm_e8m0_off": 100.0}) == \
        "deep_gemm_e8m0_off"
    # Triton 120 µs of which 40 are the harness's stand-ins; DeepGEMM 100 µs with none
    us = {(a, m, b): v for a in adv.ACTIVATIONS for m in (1, 64)
          for b, v in (("triton_tuned", 120.0), ("deepgemm_e8m0", 100.0), ("hybrid", 130.0))}
    got = [Measured("TP2", a, m, b, "fp8 E=288 N=640 [128,128]", us=v, standin_us=40.0 if b != "deepgemm_e8m0" else None)
           for (a, m, b), v in us.items()]
    (entry,) = adv.entries_from(got, "H200", {"date": "2026-12-01"})
    assert entry["serve_config"] == "deep_gemm" and entry["measured"]
    assert "without the time of this harness's stand-ins for vLLM's CUDA ops auto would be" in entry["why"]
    assert entry["us_without_standins"]["1"]["auto"] == 160.0 and entry["note"] == ""


@pytest.mark.parametrize("text,match", [
    ("{", "not a readable backend-advice file"),
    ('{"schema": 2, "entries": []}', "not a schema-1 backend-advice file"),
    ('{"schema": 1, "entries": [{"gpu": "H200", "layout": "TP4", "serve_config": "fast", "measured": false, '
     '"why": "x"}]}', "serve_config one of auto, triton"),
    ('{"schema": 1, "entries": [{"gpu": "H200", "layout": "TP4", "serve_config": "auto", "measured": true, '
     '"why": "x"}]}', "a measured entry needs its provenance"),
    ('{"schema": 1, "entries": [{"gpu": "H200", "layout": "TP3x", "serve_config": "auto", "measured": false, '
     '"why": "x"}]}', "cannot read"),
])
def test_a_bad_file_is_one_line(tmp_path, text, match):
    path = tmp_path / "advice.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=match):
        adv.load(path)


def test_each_serve_configuration_runs_what_vllm_runs_per_layer_kind():
    ep, tp4 = parse_layout("DP4+EP"), parse_layout("TP4")
    cols = {c: tuple(adv.column(adv.layer_runtime(adv.facts(ep, c), a)) for a in adv.ACTIVATIONS)
            for c in adv.SERVE_CONFIGS}
    assert cols == {"auto": ("flashinfer", "deepgemm_e8m0"), "triton": ("triton_tuned", "triton_tuned"),
                    "deep_gemm": ("deepgemm_e8m0", "deepgemm_e8m0"), "deep_gemm_e8m0_off": ("hybrid", "hybrid")}
    assert adv.column(adv.layer_runtime(adv.facts(tp4, "auto"), "silu")) == "triton_tuned"
    assert adv.reads_tuned_file(tp4, "deep_gemm_e8m0_off") and not adv.reads_tuned_file(tp4, "deep_gemm")


def rows(layout, us):
    """Measured rows from {(activation, m, backend): µs}."""
    return [Measured(layout, a, m, b, "shape", us=v) for (a, m, b), v in us.items()]


EP_US = {**{("silu", m, "flashinfer"): 100.0 * m for m in (1, 64, 1024)},
         **{(a, m, "deepgemm_e8m0"): 90.0 * m for a in adv.ACTIVATIONS for m in (1, 64, 1024)},
         **{(a, m, "triton_tuned"): {1: 10.0, 64: 50.0 * 64, 1024: 200.0 * 1024}[m]
            for a in adv.ACTIVATIONS for m in (1, 64, 1024)},
         **{(a, m, "hybrid"): 95.0 * m for a in adv.ACTIVATIONS for m in (1, 64, 1024)}}


def test_fastest_per_m_ranges_and_the_one_pick():
    table = adv.costs(rows("DP4+EP", EP_US), "DP4+EP")
    assert table[1] == {"auto": 100 + 90, "triton": 20, "deep_gemm": 180, "deep_gemm_e8m0_off": 190}
    assert [adv.fastest(table[m]) for m in (1, 64, 1024)] == ["triton", "triton", "deep_gemm"]
    assert adv.ranges(table) == [{"m_min": 1, "m_max": 64, "fastest": "triton"},
                                 {"m_min": 1024, "m_max": 1024, "fastest": "deep_gemm"}]
    assert adv.overall(table) == "triton"  # 1x, 1x, 2.2x against deep_gemm's 9x, 1.8x, 1x
    missing = {k: v for k, v in EP_US.items() if k != ("silu", 64, "flashinfer")}
    assert adv.costs(rows("DP4+EP", missing), "DP4+EP")[64]["auto"] is None


def unmeasured(tmp_path) -> Path:
    """The committed advice file with every entry as before any bake-off: its configuration, unmeasured."""
    data = json.loads(adv.data_file("0.33").read_text())
    data["entries"] = [{"gpu": e["gpu"], "layout": e["layout"], "serve_config": e["serve_config"], "measured": False,
                        "why": "not measured yet"} for e in data["entries"]]
    path = tmp_path / "unmeasured.json"
    path.write_text(json.dumps(data))
    return path


def test_a_bake_off_becomes_measured_entries_the_readers_load(tmp_path):
    prov = {"date": "2026-12-01", "gpu_name": "NVIDIA H200"}
    entries = adv.entries_from(rows("DP4+EP", EP_US), "H200", prov)
    assert [e["layout"] for e in entries] == ["DP4+EP"] and entries[0]["serve_config"] == "triton"
    path, base = tmp_path / "advice.json", unmeasured(tmp_path)
    merged = adv.merged(entries, base, "0.33")
    path.write_text(json.dumps(merged))
    table = adv.load(path)
    assert len(table) == len(LAYOUTS)
    order = [e["layout"] for e in json.loads(base.read_text())["entries"]]
    assert [e["layout"] for e in merged["entries"]] == order  # replaced in place: a re-timed layout's diff is its own
    added = adv.merged([{**entries[0], "layout": "DP16+EP"}], base, "0.33")
    assert [e["layout"] for e in added["entries"]] == [*order, "DP16+EP"]
    a = table[("H200", "DP4+EP")]
    assert a.measured and a.provenance == prov and "measured 2026-12-01: M 1-64: triton; M 1024-1024: deep_gemm" in a.line()
    assert not table[("H200", "DP2+EP")].measured  # untouched, and a partial entry keeps its configuration:
    partial = adv.entries_from(rows("DP2+EP", {k: v for k, v in EP_US.items() if k[2] != "flashinfer"}), "H200", prov)
    kept = adv.merged(partial, base, "0.33")
    assert [(e["serve_config"], e["measured"]) for e in kept["entries"] if e["layout"] == "DP2+EP"] == [("triton", False)]


def test_an_entry_says_when_flashinfer_was_not_the_one_its_release_pins():
    """vLLM 0.34 pins FlashInfer 0.7.3; a bake-off that timed FlashInfer-CUTLASS with 0.7.2.post1 says so in the
    advice line. The pinned one says nothing, and a layout where FlashInfer was not timed gets no advice."""
    def note(layout, us, **prov):
        (entry,) = adv.entries_from(rows(layout, us), "H200", {"date": "2026-12-04", **prov})
        return entry.get("note")

    other = note("DP4+EP", EP_US, vllm="0.34.0", flashinfer="0.7.2.post1")
    assert other == "FlashInfer-CUTLASS timed with FlashInfer 0.7.2.post1; vLLM 0.34.0 pins 0.7.3"
    assert note("DP4+EP", EP_US, vllm="0.33.0", flashinfer="0.7.2.post1") == ""
    assert note("DP4+EP", EP_US, flashinfer="0.7.2.post1") == ""  # a bake-off that did not record its release
    no_fi = {**EP_US, **{("silu", m, "flashinfer"): None for m in (1, 64, 1024)}}  # not timed: no pick, no note
    assert note("DP4+EP", no_fi, vllm="0.34.0", flashinfer="0.7.2.post1") is None
    a = adv._entry({**adv.entries_from(rows("DP4+EP", EP_US), "H200", {"date": "2026-12-04", "vllm": "0.34.0",
                                                                         "flashinfer": "0.7.2.post1"})[0]}, "test")
    assert a.line().endswith("; FlashInfer-CUTLASS timed with FlashInfer 0.7.2.post1; vLLM 0.34.0 pins 0.7.3)")


def test_compare_backends_writes_its_rows_and_merges_advice_from_finished_layouts(tmp_path):
    import argparse

    from tuning.bakeoff.compare import finish, serve_command

    args = argparse.Namespace(json_out=str(tmp_path / "b.json"), write_advice=str(tmp_path / "advice.json"))
    unmeasured(tmp_path).rename(args.write_advice)  # an existing file: the advice merges into it
    partial = rows("DP2+EP", {("silu", 1, "triton_tuned"): 5.0})  # cut by the time limit: no advice from it
    prov = {"date": "2026-12-01"}
    assert finish(args, rows("DP4+EP", EP_US) + partial, ["DP4+EP"], prov, "H200", "0.33") == 0
    first = adv.load(tmp_path / "advice.json")
    assert first[("H200", "DP4+EP")].measured and not first[("H200", "DP2+EP")].measured
    data = json.loads((tmp_path / "b.json").read_text())
    assert len(data["rows"]) == len(EP_US) + 1 and data["configs"]["DP4+EP"]["1"]["triton"] == 20
    # a later call merges into the file the first wrote
    assert finish(args, rows("DP2+EP", {k: v for k, v in EP_US.items()}), ["DP2+EP"], prov, "H200", "0.33") == 0
    both = adv.load(tmp_path / "advice.json")
    assert both[("H200", "DP4+EP")].measured and both[("H200", "DP2+EP")].measured
    bad = [Measured("TP4", "silu", 1, "deepgemm_e8m0", "s", failure="numerics: relative error 0.300 > 0.1")]
    assert finish(argparse.Namespace(json_out=None, write_advice=None), bad, [], prov, "H200", "0.33") == 1
    line = serve_command("DP4+EP", "deep_gemm_e8m0_off", tmp_path)
    assert line == (f"VLLM_USE_DEEP_GEMM_E8M0=0 VLLM_TUNED_CONFIG_FOLDER={tmp_path.resolve()} vllm serve "
                    "stepfun-ai/Step-3.5-Flash-FP8 --data-parallel-size 4 --enable-expert-parallel --moe-backend deep_gemm")
    assert serve_command("TP4", "auto", tmp_path).endswith("--tensor-parallel-size 4")


def test_from_json_refuses_a_file_that_is_not_a_bake_off(tmp_path, capsys):
    from tuning.cli import main

    bad = tmp_path / "other.json"
    bad.write_text('{"rows": []}')
    out = tmp_path / "advice.json"
    assert main(["compare-backends", "--gpu", "H200", "--from-json", str(bad), "--write-advice", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a compare-backends --json-out file" in err[0] and not out.exists()


def corrupted(tmp_path, change, name="ep4.json") -> Path:
    """b30/ep4.json (vLLM 0.34's DP4+EP bake-off on an H200) copied into tmp_path with ``change`` applied."""
    data = json.loads((B30 / "ep4.json").read_text())
    change(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def refused(capsys, argv, target: Path, before: str | None) -> str:
    """compare-backends exits 2 with one line on stderr, prints nothing and leaves --write-advice's file as it was."""
    from tuning.cli import main

    assert main(["compare-backends", *argv, "--write-advice", str(target)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tune-moe: error: ") and captured.out == ""
    assert "internal error" not in err[0] and "Traceback" not in captured.err
    if before is None:
        assert not target.exists()
    else:
        assert target.read_text() == before
    return err[0]


def test_from_json_refuses_a_bake_off_measured_on_another_gpu(tmp_path, capsys):
    """A recorded bake-off's GPU is its provenance's gpu_name: replayed under another --gpu, its H200 times would be
    filed as that GPU's advice and its serve lines would name that GPU's tuned folder. Refused in one line naming the
    file, its GPU and the --gpu it was measured on; so are files of different GPUs given together. Every
    H200-family board is an H200 (vLLM's device name)."""
    from tuning.cli import main

    target = tmp_path / "advice.json"
    target.write_text(adv.data_file("0.34").read_text())
    before = target.read_text()
    line = refused(capsys, ["--gpu", "B200", "--from-json", str(B30 / "ep4.json")], target, before)
    assert line == (f"tune-moe: error: --from-json {B30 / 'ep4.json'}: measured on NVIDIA H200, not on --gpu B200 "
                    "(NVIDIA B200); give --gpu H200")
    assert "give --gpu H200" in refused(capsys, ["--gpu", "H20", "--from-json", str(B30 / "ep4.json")],
                                        tmp_path / "new.json", None)
    b200 = corrupted(tmp_path, lambda d: d["provenance"].update(gpu_name="NVIDIA B200"), "ep4-b200.json")
    line = refused(capsys, ["--gpu", "H200", "--from-json", str(B30 / "ep4.json"), str(b200)], target, before)
    assert line == (f"tune-moe: error: --from-json: these bake-offs ran on different GPUs ({B30 / 'ep4.json'}: NVIDIA "
                    f"H200, {b200}: NVIDIA B200); give each GPU's files alone, with its --gpu")
    assert "measured on NVIDIA B200, not on --gpu H200 (NVIDIA H200); give --gpu B200" in \
        refused(capsys, ["--gpu", "H200", "--from-json", str(b200)], target, before)
    a100 = corrupted(tmp_path, lambda d: d["provenance"].update(gpu_name="NVIDIA A100-SXM4-80GB"), "ep4-a100.json")
    assert "measured on NVIDIA A100-SXM4-80GB, not on --gpu H200 (NVIDIA H200); give files measured on NVIDIA H200" \
        in refused(capsys, ["--gpu", "H200", "--from-json", str(a100)], target, before)
    nvl = corrupted(tmp_path, lambda d: d["provenance"].update(gpu_name="NVIDIA H200 NVL"), "ep4-nvl.json")
    assert main(["compare-backends", "--gpu", "H200", "--from-json", str(nvl)]) == 0
    assert "DP4+EP (measured 2026-12-04" in capsys.readouterr().out


def _row(i, **change):
    def apply(d):
        d["rows"][i].update(change)
    return apply


def _drop(i, key):
    def apply(d):
        del d["rows"][i][key]
    return apply


@pytest.mark.parametrize("change,words", [
    (_row(3, m="abc"), "row 3 'm' is 'abc', not an integer >= 1"),
    (_row(3, m=0), "row 3 'm' is 0, not an integer >= 1"),
    (_row(3, m=True), "row 3 'm' is True, not an integer >= 1"),
    (_row(5, backend="cutlass"), "row 5 'backend' is 'cutlass', not one of triton_tuned, triton_default"),
    (_row(5, activation="gelu"), "row 5 'activation' is 'gelu', not one of silu, swiglustep"),
    (_row(7, us="fast"), "row 7 'us' is 'fast', not µs > 0 or null"),
    (_row(7, us=-1.0), "row 7 'us' is -1.0, not µs > 0 or null"),
    (_row(7, us=0), "row 7 'us' is 0, not µs > 0 or null"),  # no kernel takes no time; the advice divides by it
    (_row(7, rel_error=[0.1]), "row 7 'rel_error' is [0.1], not a number or null"),
    (_row(7, failure=3), "row 7 'failure' is 3, not a string or null"),
    (_row(7, speed=1.0), "row 7 has the unknown field 'speed'"),
    (_drop(2, "layout"), "row 2 has no 'layout' (a layout name)"),
    (lambda d: d["rows"].__setitem__(4, ["DP4+EP", "silu"]), "row 4 is list, not an object of layout, activation"),
    (_row(6, layout="TP99"), "row 6 'layout' is 'TP99', which compare-backends cannot time (expert width 1280 does "
                             "not split over TP99)"),
    (_row(6, layout="DP4-EP"), "row 6 'layout' is 'DP4-EP', not a layout name such as TP4 or DP4+EP"),
    (_row(6, layout="dp4+ep"), "row 6 'layout' is 'dp4+ep', written DP4+EP by compare-backends"),
    (lambda d: d["provenance"].update(finished_layouts=["TP99"]),
     "its provenance lists the layout 'TP99', which compare-backends cannot time"),
    (lambda d: d["provenance"].update(layouts=["DP4+EP", "TP99"]), "its provenance lists the layout 'TP99'"),
    (lambda d: d["provenance"].update(layouts="DP4+EP"), "its provenance's \"layouts\" is 'DP4+EP', not a list"),
    (lambda d: d["provenance"].update(finished_layouts=["DP4+EP", "DP8+EP"]),
     "its provenance says DP8+EP finished, and no row measured it"),
    (lambda d: d["provenance"].update(finished_layouts="DP4+EP"), 'its provenance has no "finished_layouts"'),
    (lambda d: d["provenance"].pop("gpu_name"), 'its provenance has no "gpu_name" (the GPU it was measured on)'),
    (lambda d: d["provenance"].update(vllm=0.34), "its provenance's \"vllm\" is 0.34, not a vLLM version such as "
                                                  "0.34.0"),
    (lambda d: d.pop("provenance"), 'not a compare-backends --json-out file (it needs "rows", a list, and '
                                    '"provenance", an object)'),
    (lambda d: d.update(rows={"0": {}}), "not a compare-backends --json-out file"),
])
def test_from_json_refuses_a_malformed_file_in_one_line(tmp_path, capsys, change, words):
    """A --json-out file with a malformed row, a layout the bake-off cannot time, or a provenance it needs missing
    (b30/ep4.json copied and corrupted) is refused before any table is printed or advice written: one line naming
    the file and the first problem, exit 2, the advice file as it was."""
    bad = corrupted(tmp_path, change)
    target = tmp_path / "advice.json"
    target.write_text(adv.data_file("0.34").read_text())
    line = refused(capsys, ["--gpu", "H200", "--from-json", str(B30 / "e33-4.json"), str(bad)], target,
                   target.read_text())
    assert line.startswith(f"tune-moe: error: --from-json {bad}: ") and words in line, line
    assert refused(capsys, ["--gpu", "H200", "--from-json", str(bad)], tmp_path / "new.json", None) == line


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '"rows"', "{\"rows\": [], \"provenance\": []}",
                                  "[" * 200_000 + "]" * 200_000])  # nested deeper than Python's JSON reader goes
def test_from_json_refuses_a_file_that_is_not_json_of_a_bake_off(tmp_path, capsys, text):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    line = refused(capsys, ["--gpu", "H200", "--from-json", str(bad)], tmp_path / "new.json", None)
    assert f"--from-json {bad}: not a compare-backends --json-out file" in line


def test_the_serve_lines_a_tune_prints_follow_the_advice(tmp_path):
    """After a tune, each recipe layout's serve line carries the advised --moe-backend and variables, says what
    each layer kind then runs (vLLM's own selection code where importable), and names a tuned file the advised
    serve reads that the run did not write, with the tune that writes it."""
    from tuning import gpus
    from tuning.advice import serve_lines
    from tuning.models import load_model
    from tuning.plan import make_plan

    h200 = gpus.get_gpu("H200")
    fp8 = make_plan(load_model("stepfun-ai/Step-3.5-Flash-FP8"), h200, "fp8",
                    [parse_layout("TP4"), parse_layout("DP4+EP")], 4, (1, 64), vllm_version="0.33.0")
    tp4, ep = serve_lines(fp8, tmp_path)
    assert tp4.startswith(f"VLLM_USE_DEEP_GEMM_E8M0=0 VLLM_TUNED_CONFIG_FOLDER={tmp_path.resolve()} vllm serve "
                          "stepfun-ai/Step-3.5-Flash-FP8 --tensor-parallel-size 4")
    assert "--moe-backend deep_gemm" in tp4.splitlines()[0]
    assert "# SiLU layers: DEEPGEMM (TritonOrDeepGemmExperts), reads the tuned file" in tp4
    assert ("it reads a tuned file this run did not write (N=384 block [128, 128]): tune-moe --gpu H200 --dtype fp8 "
            "--layouts TP4 --moe-backend deep_gemm --vllm-version 0.33.0") in tp4
    assert "# backend advice for TP4 on H200: VLLM_USE_DEEP_GEMM_E8M0=0 --moe-backend deep_gemm (measured" in tp4
    assert "--moe-backend triton" in ep.splitlines()[0] and "did not write" not in ep
    assert "(measured 2026-12-04: M 1-4096: triton; M 32768-32768: deep_gemm)" in ep
    padded = make_plan(load_model("stepfun-ai/Step-3.5-Flash-FP8"), h200, "fp8", [parse_layout("TP4")], 4, (1,),
                       vllm_version="0.33.0", moe_backend="deep_gemm")
    (line,) = serve_lines(padded, tmp_path)
    assert "did not write" not in line
    bf16 = make_plan(load_model("stepfun-ai/Step-3.5-Flash"), h200, "bf16", [parse_layout("TP4")], 4, (1,),
                     vllm_version="0.33.0")
    (line,) = serve_lines(bf16, tmp_path)
    assert "--moe-backend" not in line and f"# {adv.BF16}" in line
    # no advice was measured under vLLM 0.26: a tune for it serves with vLLM's default, the note labels 0.33's
    # measurement as such, and says whose rules answered
    old = make_plan(load_model("stepfun-ai/Step-3.5-Flash-FP8"), h200, "fp8", [parse_layout("DP4+EP")], 4, (1,),
                    vllm_version="0.26.0")
    (line,) = serve_lines(old, tmp_path)
    assert "--moe-backend" not in line.splitlines()[0]
    assert ("# backend advice for DP4+EP on H200: not measured under vLLM 0.26 (tune-moe compare-backends with vLLM "
            "0.26's sources measures it); under vLLM 0.33: --moe-backend triton (measured 2026-12-04") in line
    assert line.endswith("; this tune targets vLLM 0.26.0, whose per-kind choice it does not model)")
    # a tune for 0.34 is served as 0.34's own bake-off says (section 2z)
    tp4 = make_plan(load_model("stepfun-ai/Step-3.5-Flash-FP8"), h200, "fp8", [parse_layout("TP4")], 4, (1,),
                    vllm_version="0.34.0")
    (line,) = serve_lines(tp4, tmp_path)
    assert line.startswith("VLLM_USE_DEEP_GEMM_E8M0=0 ") and "--moe-backend deep_gemm" in line.splitlines()[0]
    assert "(measured 2026-12-04: M 1-1: deep_gemm_e8m0_off; M 4-256: auto; M 1024-4096: deep_gemm_e8m0_off; " \
           "M 8192-8192: deep_gemm" in line
    ep34 = make_plan(load_model("stepfun-ai/Step-3.5-Flash-FP8"), h200, "fp8", [parse_layout("DP4+EP")], 4, (1,),
                     vllm_version="0.34.0")
    (line,) = serve_lines(ep34, tmp_path)  # 0.34's own EP bake-off (section 8), no longer 0.33's labelled
    assert "--moe-backend triton" in line.splitlines()[0] and "not measured under" not in line
    assert "FlashInfer-CUTLASS timed with FlashInfer 0.7.2.post1; vLLM 0.34.0 pins 0.7.3" in line
    # a tune given --moe-backend is served with it, whatever the advice says
    named = make_plan(load_model("stepfun-ai/Step-3.5-Flash-FP8"), h200, "fp8", [parse_layout("DP4+EP")], 4, (1,),
                      vllm_version="0.26.0", moe_backend="triton")
    (line,) = serve_lines(named, tmp_path)
    assert "--moe-backend triton" in line.splitlines()[0]
    assert "# SwiGLU-step layers: TRITON (TritonExperts), reads the tuned file" in line
    assert "FLASHINFER" not in line and "DEEPGEMM" not in line
    named = make_plan(load_model("stepfun-ai/Step-3.5-Flash-FP8"), h200, "fp8", [parse_layout("TP4")], 4, (1,),
                      vllm_version="0.33.0", moe_backend="triton")
    (line,) = serve_lines(named, tmp_path)
    assert "--moe-backend triton" in line.splitlines()[0] and not line.startswith("VLLM_USE_DEEP_GEMM_E8M0")
    assert "# backend advice for TP4 on H200: VLLM_USE_DEEP_GEMM_E8M0=0 --moe-backend deep_gemm" in line


def test_from_json_refuses_an_advice_target_that_is_not_an_advice_file(tmp_path, capsys):
    from tuning.cli import main

    target = tmp_path / "notes.json"
    target.write_text('{"not": "advice"}')
    assert main(["compare-backends", "--gpu", "H200", "--from-json", str(RESULTS / "tp.json"),
                 "--write-advice", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a schema-1 backend-advice file" in err[0]
    assert target.read_text() == '{"not": "advice"}'


def test_advice_timed_with_configs_since_re_tuned_names_the_batch_sizes_to_re_time(tmp_path):
    """Each entry keeps the tuned Triton config it timed per M. Against the committed files every entry is fresh
    (the bake-offs of benchmarks/README §4d and §2o timed them). Where a file holds another config at some M, the
    advice says which batch sizes moved, and how to re-time the layout: at every batch size it was timed at,
    since a new entry replaces the whole layout."""
    from tuning.configs import TileConfig, read_config_file, write_config_file

    committed = Path(__file__).parents[1] / "kernels_configs" / "vllm-0.33" / "NVIDIA_H200"
    table = adv.load(adv.data_file("0.33"))
    stale = {key: entry.stale(committed) for key, entry in table.items()}
    assert {key: ms for key, ms in stale.items() if ms} == {}
    for key, entry in table.items():
        assert ("re-time the layout" in entry.line(committed)) == bool(stale[key])
    dp8 = table[("H200", "DP8+EP")]
    label = "fp8 E=36 N=1280 [128,128]"
    name = "E=36,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
    assert dp8.batch_sizes == (1, 16, 64, 256, 1024, 4096, 65536)
    timed = {int(m): TileConfig.from_short(c) for m, c in dp8.timed_configs[label].items()}
    assert all(timed[m] == c for m, c in read_config_file(committed / name).items() if m in timed)
    folder = tmp_path / "NVIDIA_H200"
    folder.mkdir()
    write_config_file(folder / name, timed, "3.8.0")
    assert dp8.stale(folder) == [] and "re-time" not in dp8.line(folder)
    timed[64] = next(c for c in timed.values() if c != timed[64])
    write_config_file(folder / name, timed, "3.8.0")
    assert dp8.stale(folder) == [64]
    assert dp8.line(folder).endswith(
        "; timed at M=64 with tuned configs the files no longer hold: re-time the layout with tune-moe "
        "compare-backends --gpu H200 --layouts DP8+EP --batch-sizes 1,16,64,256,1024,4096,65536)")
    assert "re-time" not in dp8.line()  # no folder named: the advice as measured
    assert dp8.stale(tmp_path / "empty") == []  # no file for the shape: nothing to compare


def test_write_advice_refuses_a_bake_off_that_leaves_out_batch_sizes_of_the_entry_it_replaces(tmp_path, capsys):
    """A new entry replaces the whole layout and its pick weighs every M, so a bake-off that writes it must time
    every batch size the old entry was timed at: refused in one line before anything is timed, whether the rows
    come from the GPU or from --from-json, and the advice file is left as it was."""
    from tuning.cli import main

    target = tmp_path / "advice.json"
    target.write_text(adv.data_file("0.33").read_text())
    before = target.read_text()
    assert main(["compare-backends", "--gpu", "H200", "--layouts", "TP4,DP4+EP", "--batch-sizes", "16,2048",
                 "--write-advice", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        f"--write-advice: TP4's entry in {target} was also timed at M=1,4,32,64,128,256,512,1024,4096,8192, and a "
        "new entry replaces the whole layout (its pick weighs every M); time them all (--batch-sizes "
        "1,4,16,32,64,128,256,512,1024,2048,4096,8192) or leave out --write-advice")
    ep = json.loads((RESULTS / "ep-fi.json").read_text())
    ep["rows"] = [r for r in ep["rows"] if r["m"] != 4096]
    cut = tmp_path / "ep-cut.json"
    cut.write_text(json.dumps(ep))
    assert main(["compare-backends", "--gpu", "H200", "--from-json", str(cut), "--write-advice", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DP4+EP's entry" in err[0] and "also timed at M=4096," in err[0]
    assert target.read_text() == before
    assert adv.uncovered("H200", "DP4+EP", (1, 16, 64, 256, 1024, 4096, 32768), target) == []
    assert adv.uncovered("H200", "DP4+EP", (16,), target) == [1, 64, 256, 1024, 4096, 32768]


ONE_KIND = Path(__file__).parents[1] / "benchmarks" / "results" / "b26" / "cb.json"  # --kinds silu on TP4


def test_a_bake_off_of_one_layer_kind_says_the_serves_are_not_compared(tmp_path, capsys):
    """Every serve configuration runs both layer kinds, so rows of one kind (--kinds silu, as in b26/cb.json) give
    no configuration a time: one line says so and how to time both, where a table of "--" and "fastest None" was."""
    from tuning.bakeoff.compare import _summary
    from tuning.cli import main

    data = json.loads(ONE_KIND.read_text())
    assert {r["activation"] for r in data["rows"]} == {"silu"} and data["provenance"]["finished_layouts"] == ["TP4"]
    line = ("  per serve configuration: not compared, SwiGLU-step layers were not timed (--kinds silu); a serve runs "
            "both kinds: time them with --kinds silu,swiglustep")
    assert main(["compare-backends", "--gpu", "H200", "--from-json", str(ONE_KIND)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert line in out and "None" not in "\n".join(out)
    assert not any("fastest" in o or "overall" in o or "vllm serve" in o for o in out)
    us = {("silu", m, b): 10.0 * m for m in (1, 64) for b in ("triton_tuned", "deepgemm_e8m0", "hybrid")}
    _summary("TP4", rows("TP4", us), tmp_path)
    assert line in capsys.readouterr().out.splitlines()
    _summary("TP4", rows("TP4", {("swiglustep", 1, "triton_tuned"): 5.0}), tmp_path)
    assert ("not compared, SiLU layers were not timed (--kinds swiglustep); a serve runs both kinds: time them with "
            "--kinds silu,swiglustep") in capsys.readouterr().out
    # both kinds, but an M without SwiGLU-step rows: no configuration has a time there; its row and range say so
    both = {**us, **{("swiglustep", 1, b): 10.0 for b in ("triton_tuned", "deepgemm_e8m0", "hybrid")}}
    _summary("TP4", rows("TP4", both), tmp_path)
    out = capsys.readouterr().out
    assert "None" not in out and "not compared" not in out
    assert "  M 64-64: fastest none, no configuration timed" in out.splitlines()
    assert "vLLM's default first): auto" in out and out.count("vllm serve") == len(adv.SERVE_CONFIGS)
    assert adv.fastest(adv.costs(rows("TP4", us), "TP4")[1]) is None  # the rule still answers None


def test_write_advice_refuses_a_bake_off_of_one_layer_kind(tmp_path, capsys):
    """Advice from one layer kind would replace a measured entry with one that has no configuration timed ("fastest
    None" per range): refused in one line before anything is timed, from the GPU or from --from-json, and no file
    is written."""
    from tuning.cli import main

    new = tmp_path / "advice.json"
    assert main(["compare-backends", "--gpu", "H200", "--layouts", "TP4", "--batch-sizes",
                 "1,4,16,32,64,128,256,512,1024,2048,4096", "--kinds", "silu", "--no-flashinfer",
                 "--write-advice", str(new)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "--write-advice: the advice weighs one layer of each kind per serve configuration, and SwiGLU-step layers "
        "were not timed (--kinds silu); time them all (--kinds silu,swiglustep) or leave out --write-advice")
    assert not new.exists()
    assert main(["compare-backends", "--gpu", "H200", "--from-json", str(ONE_KIND), "--write-advice", str(new)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"SwiGLU-step layers were not timed (TP4 in {ONE_KIND}: --kinds silu)" in err[0]
    assert not new.exists() and "None" not in captured.out
    target = tmp_path / "committed.json"
    target.write_text(adv.data_file("0.33").read_text())
    assert main(["compare-backends", "--gpu", "H200", "--from-json", str(ONE_KIND), "--write-advice", str(target)]) == 2
    assert target.read_text() == adv.data_file("0.33").read_text()


def test_the_readmes_advice_table_states_the_committed_measurements():
    """README's backend table gives, per layout, the range over M of vLLM's default against the advised
    configuration: each range is the committed advice file's, to two decimals."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for (_, layout), a in adv.load(adv.data_file("0.33")).items():
        data = next(e for e in json.loads(adv.data_file("0.33").read_text())["entries"] if e["layout"] == layout)
        if a.serve_config == "auto":
            continue  # the default itself: nothing to compare
        ratios = [v["auto"] / v[a.serve_config] for v in data["us"].values() if v.get("auto") and v.get(a.serve_config)]
        assert f"{min(ratios):.2f}–{max(ratios):.2f}× ({layout})" in readme, layout
