"""The bake-off's driver on the CPU: a tiny block-FP8 model, vLLM's kernels under Triton's interpreter, float
stand-ins for DeepGEMM and FlashInfer; every backend of a layout checked against the float reference and timed
(wall clock here), the hybrid dispatched per M as TritonOrDeepGemmExperts does with E8M0 off."""

import sys
import types

import pytest
import torch

from fakes_moe import FakeDeepGemm, FakeFlashInfer, fake_cuda_ops
from tuning.vllm import backend_advice as adv
from tuning.bakeoff.layer import Bench, run_layout
from tuning.models import ModelGeometry

# TP2: width 320 -> Triton refines to [64,64], DeepGEMM pads to 384; DP2+EP: 2 experts of width 640 (> 512)
TINY = ModelGeometry(name="tiny", model_type="step3p5", num_experts=4, top_k=2, moe_intermediate_size=640,
                     hidden_size=128, num_layers=3, moe_layers=(1, 2), vocab_size=1000, weight_block_size=(128, 128),
                     total_params=0.0)


@pytest.fixture(autouse=True)
def one_sample(monkeypatch):
    """The interpreter is slow: one wall-clock sample per timing (the pipeline is what is under test)."""
    from tuning.bench import Timing

    def once(fn, **_):
        fn()
        return Timing((1.0,))
    monkeypatch.setattr("tuning.bakeoff.layer.measure", once)


@pytest.fixture(scope="module")
def bench(fused_moe_py, tmp_path_factory):
    from tuning.vllm.kernel import KernelSource
    from tuning.bakeoff.vllm_helpers import VllmSource, load_helpers

    core = types.ModuleType("flashinfer.fused_moe.core")
    core.ActivationType = types.SimpleNamespace(Swiglu=3)
    saved = {n: sys.modules.get(n) for n in ("flashinfer", "flashinfer.fused_moe", "flashinfer.fused_moe.core")}
    sys.modules.update({"flashinfer": types.ModuleType("flashinfer"),
                        "flashinfer.fused_moe": types.ModuleType("flashinfer.fused_moe"),
                        "flashinfer.fused_moe.core": core})
    yield Bench(kernel=KernelSource(str(fused_moe_py)).load(), helpers=load_helpers(VllmSource()), model=TINY,
                folder=tmp_path_factory.mktemp("configs"), device_name="NVIDIA_H200", flush_bytes=0,
                dg=FakeDeepGemm(), fi=FakeFlashInfer(), budget_ms=1.0, tolerance=0.25, dtype=torch.float16,
                device="cpu", capability=0)
    for name, mod in saved.items():
        if mod is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod


def by(rows, act, backend):
    return next(r for r in rows if r.activation == act and r.backend == backend)


def test_ep_layout_times_every_backend_vllm_can_run(bench):
    rows = run_layout(bench, "DP2+EP", [130], kinds=("silu",), say=lambda _: None)  # SwiGLU-step: the TP test
    assert {r.backend for r in rows} == {"triton_tuned", "triton_default", "deepgemm_e8m0", "deepgemm_fp32", "hybrid",
                                         "flashinfer"}
    assert by(rows, "silu", "triton_tuned").failure.startswith("no tuned file E=2,N=640,device_name=NVIDIA_H200")
    for r in rows:
        if r.backend != "triton_tuned":
            assert r.failure is None and r.us > 0 and r.rel_error < 0.25, r
    hybrid, fp32 = by(rows, "silu", "hybrid"), by(rows, "silu", "deepgemm_fp32")
    assert hybrid.runs.startswith("DeepGEMM") and hybrid.us == fp32.us  # M >= 128 and N = 640 > 512
    assert by(rows, "silu", "triton_default").standin_us > 0 and by(rows, "silu", "deepgemm_e8m0").standin_us is None


def test_tp_layout_triton_on_the_refined_block_deepgemm_on_the_padded_shard(bench):
    from tuning.configs import TileConfig, write_config_file

    write_config_file(bench.folder / "E=4,N=384,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json",
                      {1: TileConfig(16, 32, 128, 1, 4, 2)}, "3.8.0")
    jobs = []
    bench.precompile = types.SimpleNamespace(all=jobs.extend)
    try:
        rows = run_layout(bench, "TP2", [3], say=lambda _: None)
    finally:
        bench.precompile = None
    # before timing, every Triton config the layout launches goes to the parallel precompiler
    assert {(shape.n, m) for shape, m, _ in jobs} == {(320, 3), (384, 3)}
    assert (bench.folder.name and TileConfig(16, 32, 128, 1, 4, 2)) in {c for _, _, c in jobs}
    assert by(rows, "silu", "triton_default").shape == "fp8 E=4 N=320 [64,64]"
    assert by(rows, "silu", "deepgemm_e8m0").shape == "fp8 E=4 N=384 [128,128]"
    hybrid = by(rows, "swiglustep", "hybrid")  # N = 384 <= 512: Triton with the padded shape's tuned file
    assert hybrid.runs == "Triton " + TileConfig(16, 32, 128, 1, 4, 2).short and hybrid.failure is None
    assert not any(r.backend == "flashinfer" for r in rows)  # no working TP serve runs it (SwiGLU-step refuses)
    assert all(r.failure is None for r in rows if r.backend != "triton_tuned")
    table = adv.costs(rows, "TP2")
    assert set(table[3]) == set(adv.SERVE_CONFIGS) and table[3]["deep_gemm"] > 0
    assert table[3]["auto"] is None  # auto runs the tuned Triton configs here, and there is no tuned file


def test_with_vllms_ops_loaded_no_stand_in_is_timed(bench):
    """Where vLLM's CUDA ops loaded (here: CPU stand-ins for them, called as vLLM's wrappers call the ops), every
    path runs them and no row carries stand-in time."""
    from tuning.bakeoff.vllm_ops import VllmOps

    calls = []
    bench.ops = VllmOps("fake", fake_cuda_ops(bench.helpers, calls))
    try:
        rows = run_layout(bench, "DP2+EP", [12], kinds=("silu",), say=lambda _: None)
    finally:
        bench.ops = None
    assert {"moe_align_block_size", "moe_sum", "per_token_group_fp8_quant", "silu_and_mul"} <= set(calls)
    assert "silu_and_mul_per_block_quant" in calls  # the hybrid's Triton fallback: E8M0 off, [128,128]
    assert by(rows, "silu", "hybrid").runs.startswith("Triton")
    for r in rows:
        if r.backend != "triton_tuned":
            assert r.failure is None and r.us > 0 and r.standin_us is None, r


def test_a_recorded_row_reads_back_as_the_measurement_it_was():
    """Every row of the recorded bake-offs (b30, b31) reads back as the Measured it recorded; a row with a field
    missing, unknown or of the wrong type is a ValueError naming that field."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from tuning.bakeoff.layer import measured_row

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    recorded = [json.loads(p.read_text()) for p in [*sorted((results / "b30").glob("*.json")),
                                                     *sorted((results / "b31").glob("*.json"))]]
    bakeoffs = [data for data in recorded if "rows" in data]  # b31 holds check-deepgemm's report too
    assert len(bakeoffs) >= 16
    for data in bakeoffs:
        for row in data["rows"]:
            assert asdict(measured_row(row)) == row
    row = json.loads((results / "b30" / "ep4.json").read_text())["rows"][0]
    for change, words in (({"m": "abc"}, "'m' is 'abc', not an integer >= 1"), ({"m": 2.0}, "'m' is 2.0"),
                          ({"backend": "tuned"}, "'backend' is 'tuned', not one of triton_tuned"),
                          ({"p80_us": float("nan")}, "'p80_us' is nan, not µs > 0 or null"),
                          ({"calc_diff": "0.1"}, "'calc_diff' is '0.1', not a number or null"),
                          ({"runs": None}, "'runs' is None, not a string"), ({"gpu": "H200"}, "unknown field 'gpu'")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            measured_row({**row, **change})
    with pytest.raises(ValueError, match="has no 'shape'"):
        measured_row({k: v for k, v in row.items() if k != "shape"})
    assert measured_row({k: row[k] for k in ("layout", "activation", "m", "backend", "shape")}).us is None
