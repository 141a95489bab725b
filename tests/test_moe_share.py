"""The fused MoE's share of a step: read from torch-profiler traces, estimated from the geometry, and the gain the
tuned file's provenance predicts from it."""

import dataclasses
import gzip
import json
from pathlib import Path

import pytest

from conftest import provenance_for
from tuning.serve import moe_share, gain as serve_gain
from tuning import provenance
from tuning.configs import read_config_file
from tuning.gpus import get_gpu
from tuning.serve.model_folder import published_config
from tuning.shapes import MoeShape

H200 = get_gpu("H200")
TP4 = MoeShape(288, 288, 320, 4096, 8, "bf16")
TILE = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3}


def kernel(name: str, dur: float) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": 0, "dur": dur, "args": {"stream": 7}}


def test_the_share_is_fused_moe_kernel_time_over_all_gpu_kernel_time(tmp_path):
    with gzip.open(tmp_path / "rank0.1.pt.trace.json.gz", "wt") as f:  # the worker's trace, as vLLM writes it
        json.dump({"traceEvents": [kernel("fused_moe_kernel", 300.0), kernel("nvjet_tst_64x8", 500.0),
                                   {"ph": "X", "cat": "cpu_op", "name": "fused_moe_kernel", "dur": 9000.0}]}, f)
    (tmp_path / "frontend.pt.trace.json").write_text(json.dumps({"traceEvents": [
        {"ph": "X", "cat": "python_function", "name": "generate", "dur": 1e6}]}))  # CPU only: no kernels
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.json").write_text(json.dumps([kernel("fused_moe_kernel", 100.0),
                                                            kernel("flash_fwd", 100.0)]))
    (tmp_path / "broken.json.gz").write_bytes(b"not gzip")
    share = moe_share.measure(tmp_path)
    assert share.measured and share.value == pytest.approx(400 / 1000)
    assert share.how.startswith("measured: fused_moe_kernel's share of GPU kernel time") and "2 trace file(s)" in share.how


def test_no_kernels_no_measurement(tmp_path):
    (tmp_path / "cpu.json").write_text(json.dumps({"traceEvents": []}))
    assert moe_share.measure(tmp_path) is None


def reduced_cfg(layers: int) -> dict:
    moe = list(range(1, layers))
    return {**published_config("bf16"), "num_hidden_layers": layers,
            "moe_layers_enum": ",".join(map(str, moe)), "moe_intermediate_size": 320}


def test_the_estimate_grows_with_moe_layers_and_shrinks_under_tensor_parallel_elsewhere():
    few, many = (moe_share.estimate(reduced_cfg(n), TP4, H200, m=32, logit_rows=32) for n in (4, 24))
    assert 0 < few.value < many.value < 1 and not few.measured
    assert few.how.startswith("estimate (not measured): weights-only roofline of one step at M=32 on H200, 3 MoE of 4")
    full_tp1 = moe_share.estimate(published_config("bf16"), TP4, H200, m=32, logit_rows=32)
    full_tp4 = moe_share.estimate(published_config("bf16"), TP4, H200, m=32, logit_rows=32, tp=4)
    assert full_tp4.value > full_tp1.value  # attention and the LM head split four ways, the MoE shard as given


def test_the_decode_estimate_follows_the_weights_read():
    """At M=1 every linear layer is memory-bound: the share is the MoE's bytes over all bytes read per step."""
    cfg = reduced_cfg(4)
    share = moe_share.estimate(cfg, TP4, H200, m=1, logit_rows=1).value
    moe_bytes = 3 * (8 * 3 * 320 * 4096 * 2 + 4096 * 2 + 8 * 320 * 2 + 8 * (2 * 320 + 4096) * 2)  # 8 experts a layer
    attn = sum(moe_share._attention_params(cfg, i) for i in range(4))
    rest = (attn + 3 * 4096 * 1280 * 3 + 3 * 4096 * 11264) * 2 + 3 * 4096 * 288 * 4 + 128896 * 4096 * 2
    assert share == pytest.approx(moe_bytes / (moe_bytes + rest), rel=1e-6)


def test_the_prediction_takes_the_speedup_at_the_nearest_tuned_batch_size(tmp_path):
    path = tmp_path / "E=288,N=320,device_name=NVIDIA_H200.json"
    path.write_text(json.dumps({str(m): TILE for m in (16, 32, 64)}))
    assert moe_share.predict(path, 32, moe_share.Share(0.5, True, "")) is None  # no sidecar: no prediction
    prov = provenance_for(path, read_config_file(path))
    rows = tuple(dataclasses.replace(r, speedup={16: 1.1, 32: 1.25, 64: 1.4}[r.m]) for r in prov.rows)
    provenance.write(path, dataclasses.replace(prov, rows=rows))
    p = moe_share.predict(path, 40, moe_share.Share(0.5, True, "measured"))
    assert (p.key, p.kernel_speedup, p.m) == (32, 1.25, 40)
    assert p.gain == pytest.approx(1 / (0.5 + 0.5 / 1.25))
    Path(str(path).replace(".json", ".provenance.json")).write_text("{broken")
    assert moe_share.predict(path, 40, moe_share.Share(0.5, True, "")) is None


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "serve-v026"


def step(t: float, grid: int, moe_us: float, rest_us: float, layers: int = 2) -> list[dict]:
    """One step's kernels from time t: a gate-up and a down fused-MoE call per layer, then the rest."""
    out = []
    for _ in range(2 * layers):
        out.append({**kernel("fused_moe_kernel", moe_us / (2 * layers)), "ts": t, "args": {"grid": [grid, 1, 1]}})
        t += moe_us / (2 * layers)
    return out + [{**kernel("flash_fwd", rest_us), "ts": t}]


def test_the_share_is_over_the_windows_steps_of_one_kind(tmp_path):
    """Two prefill steps and four decode steps caught in the window: the decode steps (the most common kind) are
    measured, each from its first fused-MoE call to the next step's; the GPU idle time is the span's rest."""
    events = step(0, 900, 4000, 6000) + step(20000, 900, 4000, 6000)
    for i in range(5):  # four whole decode steps: the fifth only closes the fourth
        events += step(40000 + 2000 * i, 64, 300, 700)
    with gzip.open(tmp_path / "rank0.pt.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events[::-1]}, f)  # in any order: read by time
    share = moe_share.measure(tmp_path, moe_calls_per_step=4)
    assert (share.steps, share.value) == (4, pytest.approx(0.3))
    assert (share.moe_us, share.busy_us, share.span_us) == pytest.approx((300, 1000, 2000))
    assert "in 4 steps" in share.how and "the GPU idle 50% of it" in share.how
    whole = moe_share.measure(tmp_path)  # without the calls per step: every kernel of the window
    assert whole.steps == 0 and whole.value == pytest.approx((8000 + 5 * 300) / (20000 + 5 * 1000))
    assert moe_share.measure(tmp_path, moe_calls_per_step=3).steps == 0  # 28 calls are no whole number of steps


def test_the_fp8_serves_decode_steps_ran_the_kernel_as_fast_as_the_tune_timed_it():
    """The profiled tuned server of the FP8 decode A/B (12 layers, 11 MoE; benchmarks/README section 6d): its
    decode steps at M = 128 spent per MoE layer what the tuner timed for the same config at M = 128."""
    steps = [s for s in moe_share._steps_of(RESULTS / "ab-fp8-decode128" / "profile", 22) if s.grid == (2040, 1, 1)]
    rows = [json.loads(line) for line in (RESULTS / "tune-fp8served" / "v026-fp8served.results.jsonl").open()]
    tuned_us = next(r["tuned_us"] for r in rows if r["m"] == 128)
    assert len(steps) == 4
    for s in steps:
        assert s.moe_us / 11 == pytest.approx(tuned_us, rel=0.02)
        assert s.busy_us < 0.7 * s.span_us  # the GPU waited on the host for over 30% of every decode step


def test_the_bf16_prefill_serve_ran_one_kernel_grid_and_saved_nothing_measurable():
    """Both resident servers of the bf16 prefill A/B (benchmarks/README section 6e), profiled: every step of the
    window is one 8192-token chunk (one grid of the fused MoE's first GEMM, in 7 whole steps); the fused MoE's
    time per step is the same on both to 0.1%, and against the measured passes' step time that saving predicts
    nothing the A/B could see."""
    folder = RESULTS / "ab-bf16-prefill"
    report = json.loads((folder / "report.json").read_text())
    profiles = {arm: dataclasses.asdict(moe_share.measure(folder / f"profile-{arm}", 22)) for arm in ("default", "tuned")}
    for arm, p in profiles.items():
        assert {s.grid for s in moe_share._steps_of(folder / f"profile-{arm}", 22)} == {(3990, 1, 1)}
        assert p["steps"] == 7 and p["moe_us"] == pytest.approx(report["moe_profile"][arm]["moe_us"])
    live = serve_gain.in_serving(profiles, report["ab"], "prefill", 8192)
    assert live["kernel_speedup"] == pytest.approx(1.0, abs=0.001)
    tps = report["ab"]["arms"]["default"]["total_token_throughput"]["median"]
    assert live["step_ms"] == pytest.approx(8192e3 / tps) and 80 < live["step_ms"] < 86
    assert live["step_from"] == "8192 tokens at their median total tok/s"
    assert live["gain"] == pytest.approx(1.0, abs=0.001)
    assert serve_gain.in_serving(profiles, None, "prefill", 8192)["gain"] is None  # no A/B: no step time


def test_the_fp8_decode_serve_at_96_ran_both_configs_at_the_tuned_speed_and_saved_what_it_measured():
    """Both resident servers of the FP8 decode A/B at 96 at a time (benchmarks/README section 6f), profiled:
    every step of the window is a decode step at M = 96 (one grid per server: the two configs tile it
    differently); per MoE layer, vLLM's default config ran at the tuner's time for it, the tuned config 2-4%
    slower than timed; the saving in serving predicts a gain inside the A/B's measured interval."""
    folder = RESULTS / "ab-fp8-decode96"
    report = json.loads((folder / "report.json").read_text())
    rows = [json.loads(line) for line in (RESULTS / "tune-fp8served" / "v026-fp8served.results.jsonl").open()]
    tune = next(r for r in rows if r["m"] == 96)
    timed = {"default": tune["default_us"], "tuned": tune["tuned_us"]}
    for arm, within in (("default", 0.01), ("tuned", 0.045)):
        steps = moe_share._steps_of(folder / f"profile-{arm}", 22)
        assert len(steps) == 15 and len({s.grid for s in steps}) == 1
        assert all(s.moe_us / 11 == pytest.approx(timed[arm], rel=within) for s in steps)
    profiles = {arm: dataclasses.asdict(moe_share.measure(folder / f"profile-{arm}", 22)) for arm in ("default", "tuned")}
    live = serve_gain.in_serving(profiles, report["ab"], "decode", 96)
    assert live["kernel_speedup"] == pytest.approx(1.121, abs=0.001)
    assert live["kernel_speedup"] < timed["default"] / timed["tuned"]  # 1.157x as tuned
    assert live["step_from"] == "their median TPOT"
    measured = report["ab"]["ratios"]["output_throughput"]
    assert 1.0 < measured["low"] < live["gain"] < measured["high"]  # measured better, and the saving explains it
