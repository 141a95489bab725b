"""Layouts, the shapes vLLM asks for under each (facts.md's table), vLLM's file names, memory fit and the plan."""

from pathlib import Path

import pytest

from tuning import fit as fitting
from tuning.errors import UsageError
from tuning.gpus import get_gpu
from tuning.models import load_model
from tuning.plan import Job, format_plan, make_plan
from tuning.shapes import (BATCH_SIZES, Layout, MoeShape, Refusal, default_layouts, parse_layout, parse_version,
                           shape_for, shapes_from_file_names)

FIXTURES = Path(__file__).parent / "fixtures" / "foundation"
BF16 = load_model("stepfun-ai/Step-3.5-Flash")
FP8 = load_model("stepfun-ai/Step-3.5-Flash-FP8")
H200, H20 = get_gpu("H200"), get_gpu("H20")


def model_for(dtype):
    return FP8 if dtype == "fp8" else BF16


# --- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text,layout,name", [
    ("TP4", Layout(tp=4), "TP4"),
    ("tp1", Layout(tp=1), "TP1"),
    ("DP4+EP", Layout(dp=4, ep=True), "DP4+EP"),
    ("TP2+EP", Layout(tp=2, ep=True), "TP2+EP"),
    ("DP2+TP2+EP", Layout(tp=2, dp=2, ep=True), "DP2+TP2+EP"),
    ("TP2+DP2+EP", Layout(tp=2, dp=2, ep=True), "DP2+TP2+EP"),
    (" dp8 + ep ", Layout(dp=8, ep=True), "DP8+EP"),
    ("DP4+EP4", Layout(dp=4, ep=True), "DP4+EP"),
])
def test_parse_layout(text, layout, name):
    parsed = parse_layout(text)
    assert parsed == layout
    assert parsed.name == name
    assert parse_layout(parsed.name) == parsed


@pytest.mark.parametrize("text", ["", "TP", "TP4+", "XP4", "TP4,DP4", "TP0", "DP0+EP", "EP", "TP1+EP", "TP-2",
                                  "TP4+EPX"])
def test_parse_layout_refuses_bad_strings(text):
    with pytest.raises(UsageError) as err:
        parse_layout(text)
    assert f"layout {text!r}" in str(err.value)
    assert "DP4+EP" in str(err.value)  # every refusal shows a layout that works


def test_parse_layout_refuses_an_ep_size_that_is_not_tp_times_dp():
    # vLLM's EP size is always tp*dp; 'TP4+EP8' would be planned as EP4 (E=72) while the user meant E=36.
    with pytest.raises(UsageError):
        parse_layout("TP4+EP8")


def test_layout_gpus_and_vllm_flags():
    assert Layout(tp=4).gpus == 4 and Layout(tp=2, dp=2, ep=True).gpus == 4
    assert Layout(tp=1).vllm_flags() == []
    assert Layout(tp=4).vllm_flags() == ["--tensor-parallel-size", "4"]
    assert Layout(dp=4, ep=True).vllm_flags() == ["--data-parallel-size", "4", "--enable-expert-parallel"]
    assert Layout(tp=2, dp=2, ep=True).vllm_flags() == [
        "--tensor-parallel-size", "2", "--data-parallel-size", "2", "--enable-expert-parallel"]


@pytest.mark.parametrize("gpus,names", [
    (1, ["TP1"]),
    (2, ["TP1", "TP2", "TP2+EP", "DP2+EP"]),
    (3, ["TP1", "TP2", "TP2+EP", "DP2+EP"]),
    (4, ["TP1", "TP2", "TP4", "TP2+EP", "TP4+EP", "DP2+EP", "DP4+EP"]),
    (8, ["TP1", "TP2", "TP4", "TP8", "TP2+EP", "TP4+EP", "TP8+EP", "DP2+EP", "DP4+EP", "DP8+EP"]),
])
def test_default_layouts(gpus, names):
    layouts = default_layouts(gpus)
    assert [lay.name for lay in layouts] == names
    assert all(lay.gpus <= gpus for lay in layouts)


# --- shapes: facts.md "Deployment layouts -> shapes" -----------------------------------------

# layout -> (E per GPU, N, fp8 block under vLLM 0.33)
TABLE = {
    "TP1": (288, 1280, (128, 128)),
    "TP2": (288, 640, (128, 128)),
    "TP4": (288, 320, (64, 64)),
    "TP8": (288, 160, (32, 32)),
    "DP2+EP": (144, 1280, (128, 128)),
    "TP2+EP": (144, 1280, (128, 128)),
    "DP4+EP": (72, 1280, (128, 128)),
    "TP4+EP": (72, 1280, (128, 128)),
    "DP2+TP2+EP": (72, 1280, (128, 128)),
    "DP8+EP": (36, 1280, (128, 128)),
    "TP8+EP": (36, 1280, (128, 128)),
}


@pytest.mark.parametrize("layout", TABLE)
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_shape_for_every_layout_of_the_table(layout, dtype):
    e, n, block = TABLE[layout]
    shape = shape_for(model_for(dtype), parse_layout(layout), dtype, "0.33")
    assert shape == MoeShape(e, 288, n, 4096, 8, dtype, block if dtype == "fp8" else None)
    assert shape.expert_parallel == (e < 288)
    suffix = f",dtype=fp8_w8a8,block_shape=[{block[0]},{block[1]}]" if dtype == "fp8" else ""
    assert shape.file_name("NVIDIA_H200") == f"E={e},N={n},device_name=NVIDIA_H200{suffix}.json"


@pytest.mark.parametrize("layout", ["TP4", "TP8"])
@pytest.mark.parametrize("version", ["0.16", "0.16.0", "0.20", "0.26", "0.26.0", "0.32"])
def test_older_vllm_refuses_fp8_tp_shards_the_block_does_not_divide(layout, version):
    r = shape_for(FP8, parse_layout(layout), "fp8", version)
    assert isinstance(r, Refusal) and r.layout == parse_layout(layout)
    tp = parse_layout(layout).tp
    assert f"1280/{tp}={1280 // tp}" in r.reason
    assert "FP8 block 128" in r.reason
    assert f"DP{tp}+EP" in r.reason and "vLLM >= 0.33" in r.reason


@pytest.mark.parametrize("backend", ["auto", "triton", "deep_gemm", "flashinfer_cutlass"])
def test_vllm_0_26_refuses_fp8_tp_shards_whatever_the_backend(backend):
    """0.26's Fp8MoEMethod.create_weights raises before any backend is asked (quantization/fp8.py:562)."""
    for layout in ("TP4", "TP8", "DP4", "DP2+TP4"):
        assert isinstance(shape_for(FP8, parse_layout(layout), "fp8", "0.26", moe_backend=backend), Refusal)
    assert shape_for(FP8, Layout(tp=2), "fp8", "0.26", moe_backend=backend).block_shape == (128, 128)
    assert shape_for(BF16, Layout(tp=4), "bf16", "0.26", moe_backend=backend) == MoeShape(288, 288, 320, 4096, 8,
                                                                                             "bf16", None)


def test_older_vllm_keeps_what_the_block_divides():
    assert shape_for(FP8, Layout(tp=2), "fp8", "0.16") == MoeShape(288, 288, 640, 4096, 8, "fp8", (128, 128))
    assert shape_for(FP8, Layout(dp=4, ep=True), "fp8", "0.16") == MoeShape(72, 288, 1280, 4096, 8, "fp8", (128, 128))
    assert shape_for(BF16, Layout(tp=4), "bf16", "0.16") == MoeShape(288, 288, 320, 4096, 8, "bf16", None)


@pytest.mark.parametrize("version", ["0.33", "v0.33.1", "0.34", "1.0"])
def test_newer_vllm_refines_the_block(version):
    assert shape_for(FP8, Layout(tp=4), "fp8", version).block_shape == (64, 64)


@pytest.mark.parametrize("layout,n", [("TP4", 384), ("TP8", 256), ("TP2", 640), ("DP4+EP", 1280)])
def test_explicit_moe_backend_pads_the_shard_to_whole_blocks(layout, n):
    shape = shape_for(FP8, parse_layout(layout), "fp8", "0.33", moe_backend="deep_gemm")
    assert (shape.n, shape.block_shape) == (n, (128, 128))
    assert shape.file_name("NVIDIA_H200") == (
        f"E={shape.num_experts},N={n},device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json")


def test_ep_size_must_divide_the_experts():
    for text, size in (("DP5+EP", 5), ("TP7+EP", 7), ("DP5+TP2+EP", 10)):
        r = shape_for(FP8, parse_layout(text), "fp8")
        assert isinstance(r, Refusal)
        assert f"288 experts do not split over {size} EP ranks" in r.reason


def test_tp_must_divide_the_expert_width():
    for dtype in ("bf16", "fp8"):
        r = shape_for(model_for(dtype), Layout(tp=3), dtype)
        assert isinstance(r, Refusal)
        assert "expert width 1280 does not split over TP3" in r.reason


def test_fp8_block_that_cannot_be_refined_is_refused():
    # 1280/16 = 80: gcd(128, 128, 80, 4096) = 16 < 32, vLLM's floor.
    r = shape_for(FP8, Layout(tp=16), "fp8", "0.33")
    assert isinstance(r, Refusal) and "gcd 16 < 32" in r.reason and "--moe-backend triton (pads the shard)" in r.reason
    assert shape_for(BF16, Layout(tp=16), "bf16").n == 80


@pytest.mark.parametrize("backend", ["triton", "deep_gemm"])
def test_an_explicit_backend_pads_the_fp8_shard_it_cannot_refine(backend):
    """resolve_fp8_moe_weight_block_shape: an explicit backend pads a shard it cannot refine to whole blocks
    (pad_tp_shard_to_weight_blocks), Triton too once the refinement is below 32; the mirror says the same."""
    from tuning.vllm.rules import ServeFacts, layer_runtime

    shape = shape_for(FP8, Layout(tp=16), "fp8", "0.33", backend)
    assert (shape.n, shape.block_shape) == (128, (128, 128))
    r = layer_runtime(ServeFacts(arch="sm90", dtype="fp8", tp=16, moe_backend=backend), "silu")
    assert (r.n, r.block) == (shape.n, shape.block_shape)


def test_fp8_needs_a_block_fp8_checkpoint():
    r = shape_for(BF16, Layout(tp=2), "fp8")
    assert isinstance(r, Refusal)
    assert "no block-FP8 weights" in r.reason and "-FP8" in r.reason


def test_unknown_dtype_and_version():
    with pytest.raises(UsageError, match="--dtype int8: unknown; use one of bf16, fp8"):
        shape_for(BF16, Layout(tp=2), "int8")
    for bad in ("garbage", "0", "latest", ""):
        with pytest.raises(UsageError, match="MAJOR.MINOR"):
            parse_version(bad)
    assert parse_version("0.33.0rc2") == (0, 33)


@pytest.mark.parametrize("text", ["DP4", "DP2+TP2"])
def test_dp_without_ep_splits_the_expert_width_over_all_ranks(text):
    assert shape_for(BF16, parse_layout(text), "bf16") == MoeShape(288, 288, 320, 4096, 8, "bf16", None)
    assert shape_for(FP8, parse_layout(text), "fp8").block_shape == (64, 64)


# --- file names against vLLM -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_moe():
    return pytest.importorskip("vllm.model_executor.layers.fused_moe.fused_moe", reason="vLLM is not installed")


SHAPES = [shape_for(model_for(d), parse_layout(lay), d, "0.33") for lay in TABLE for d in ("bf16", "fp8")]
SHAPES += [shape_for(FP8, Layout(tp=4), "fp8", "0.33", "deep_gemm")]


@pytest.mark.parametrize("device", ["NVIDIA_H200", "NVIDIA_H20", "NVIDIA_H20-3e", "NVIDIA_B200"])
def test_file_name_is_vllms_get_config_file_name(fused_moe, monkeypatch, device):
    monkeypatch.setattr(fused_moe, "get_device_name_as_file_name", lambda device_id=0: device)
    for shape in SHAPES:
        block = list(shape.block_shape) if shape.block_shape else None
        assert shape.file_name(device) == fused_moe.get_config_file_name(
            shape.num_experts, shape.n, shape.vllm_dtype, block)


def test_shapes_from_file_names_round_trip():
    names = [s.file_name("NVIDIA_H200") for s in SHAPES]
    back = shapes_from_file_names(names, FP8, "NVIDIA_H200")
    assert back == SHAPES


@pytest.mark.parametrize("name,match", [
    ("E=72,N=1280,device_name=NVIDIA_H20,dtype=fp8_w8a8,block_shape=[128,128].json",
     "is for NVIDIA_H20, not NVIDIA_H200"),
    ("E=72,N=1280,device_name=NVIDIA_H200,dtype=int8_w8a16.json", "dtype int8_w8a16 is not tuned"),
    ("E=72,N=1280.json", "not a vLLM fused-MoE config file name"),
    ("E=72,N=1280,device_name=NVIDIA_H200,block_shape=[128].json", "not a vLLM fused-MoE config file name"),
])
def test_shapes_from_file_names_refuses(name, match):
    with pytest.raises(UsageError, match=match):
        shapes_from_file_names([name], FP8, "NVIDIA_H200")


# --- memory fit ------------------------------------------------------------------------------


def test_weights_per_gpu():
    assert fitting.weights_per_gpu_gb(BF16, Layout(tp=1), "bf16") == pytest.approx(393.62)
    assert fitting.weights_per_gpu_gb(FP8, Layout(tp=1), "fp8") == pytest.approx(196.81)
    assert fitting.weights_per_gpu_gb(BF16, Layout(tp=4), "bf16") == pytest.approx(393.62 / 4)
    # EP splits only the experts; the rest (6.56B parameters) is replicated by DP.
    rest = 196.81e9 - BF16.expert_params
    assert fitting.weights_per_gpu_gb(BF16, Layout(dp=4, ep=True), "bf16") == pytest.approx(
        (BF16.expert_params / 4 + rest) * 2 / 1e9)


def test_bf16_on_4xh20_fits_nowhere_and_names_what_would():
    for layout in default_layouts(4):
        verdict = fitting.fit(BF16, layout, "bf16", H20)
        assert not verdict.fits and verdict.kv_gb < fitting.MIN_KV_GB
    assert fitting.alternatives(BF16, "bf16", H20, 4) == [
        "bf16 on 8xH20 (TP8 or DP8+EP)", "fp8 (stepfun-ai/Step-3.5-Flash-FP8) on 4xH20"]


def test_tp4_bf16_fits_an_h200():
    verdict = fitting.fit(BF16, Layout(tp=4), "bf16", H200)
    assert verdict.fits
    assert verdict.weights_gb == pytest.approx(98.4, abs=0.1)
    assert verdict.kv_gb == pytest.approx(141 * 0.92 - 6 - 98.4, abs=0.1)
    assert verdict.why(H200) == ("TP4 on 4xH200: 98 GB weights per GPU of a 130 GB budget, 25 GB left for "
                                 "KV cache: fits (needs >= 10 GB)")


def test_tp1_fp8_does_not_fit_an_h200():
    verdict = fitting.fit(FP8, Layout(tp=1), "fp8", H200)
    assert not verdict.fits
    assert verdict.weights_gb == pytest.approx(196.81)
    assert "does not fit" in verdict.why(H200)


def test_alternatives_name_the_smallest_node_that_fits():
    # fp8 on H20 (88 GB budget): 2 GPUs hold 98 GB each, too much; 4 hold 49 GB. No dtype change is offered for fp8.
    assert not fitting.fit(FP8, Layout(tp=2), "fp8", H20).fits
    assert fitting.alternatives(FP8, "fp8", H20, 1) == ["fp8 on 4xH20 (TP4 or DP4+EP)"]
    assert fitting.alternatives(FP8, "fp8", H20, 2) == ["fp8 on 4xH20 (TP4 or DP4+EP)"]


def test_alternatives_name_the_layouts_of_this_node_first():
    # --layouts TP1 of bf16 on an 8-GPU H200 node: TP4 and TP8 fit on the same node, no 16-GPU node is needed.
    alts = fitting.alternatives(BF16, "bf16", H200, 8)
    assert alts == ["bf16 on this node (8xH200) with --layouts TP4,TP8,TP4+EP,TP8+EP,DP4+EP,DP8+EP",
                    "fp8 (stepfun-ai/Step-3.5-Flash-FP8) on 2xH200"]
    assert not any("16xH200" in a for a in alts)
    plan = make_plan(BF16, H200, "bf16", [Layout(tp=1)], 8, BATCH_SIZES, vllm_version="0.33")
    assert plan.shapes == {} and plan.alternatives == alts


def test_alternatives_on_this_node_leave_out_what_vllm_refuses():
    # vLLM 0.16 refuses the FP8 TP4 and TP8 shards; the 4-GPU node still has TP2+EP, DP2+EP and the rest.
    alts = fitting.alternatives(FP8, "fp8", H200, 4, vllm_version="0.16")
    assert alts == ["fp8 on this node (4xH200) with --layouts TP2,TP2+EP,TP4+EP,DP2+EP,DP4+EP"]


# --- the plan --------------------------------------------------------------------------------


def test_fp8_plan_on_8xh200():
    plan = make_plan(FP8, H200, "fp8", default_layouts(8), 8, BATCH_SIZES, vllm_version="0.33")
    names = [plan.file_name(s) for s in plan.shapes]
    assert names == [
        "E=288,N=640,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json",
        "E=288,N=320,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[64,64].json",
        "E=288,N=160,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[32,32].json",
        "E=144,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json",
        "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json",
        "E=36,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json",
    ]
    ep4 = MoeShape(72, 288, 1280, 4096, 8, "fp8", (128, 128))
    assert [lay.name for lay in plan.shapes[ep4]] == ["TP4+EP", "DP4+EP"]
    assert plan.refusals == [] and plan.alternatives == []
    assert [f.layout.name for f in plan.fits if not f.fits] == ["TP1"]
    assert len(plan.jobs) == 6 * 18
    assert plan.jobs[:18] == [Job(list(plan.shapes)[0], m) for m in BATCH_SIZES]
    assert plan.jobs[0].key == "fp8 E=288 N=640 [128,128] M=1"


def test_plan_under_vllm_016_lists_the_refusals():
    plan = make_plan(FP8, H200, "fp8", default_layouts(8), 8, BATCH_SIZES, vllm_version="0.16")
    assert [r.layout.name for r in plan.refusals] == ["TP4", "TP8"]
    assert len(plan.shapes) == 4
    text = format_plan(plan)
    assert "TP4: refused by vLLM 0.16: vLLM 0.16 needs the per-GPU expert width 1280/4=320" in text
    assert "block_shape=[64,64]" not in text
    assert "Jobs: 4 shapes x 18 batch sizes = 72 (shape, M) jobs" in text


def test_plan_batch_sizes_are_sorted_and_unique():
    plan = make_plan(FP8, H200, "fp8", [Layout(tp=4)], 8, (16, 1, 16), vllm_version="0.33")
    assert plan.batch_sizes == (1, 16)
    assert [j.m for j in plan.jobs] == [1, 16]


def test_plan_without_fit_check_keeps_layouts_that_do_not_fit():
    layouts = [Layout(tp=1)]
    assert make_plan(FP8, H200, "fp8", layouts, 8, (1,), vllm_version="0.33").shapes == {}
    forced = make_plan(FP8, H200, "fp8", layouts, 8, (1,), vllm_version="0.33", check_fit=False)
    assert list(forced.shapes) == [MoeShape(288, 288, 1280, 4096, 8, "fp8", (128, 128))]


def test_plan_that_fits_nowhere_says_what_would():
    plan = make_plan(BF16, H20, "bf16", default_layouts(4), 4, BATCH_SIZES, vllm_version="0.33")
    assert plan.shapes == {} and plan.jobs == []
    text = format_plan(plan)
    assert "No layout fits stepfun-ai/Step-3.5-Flash bf16 on 4xH20." in text
    assert "  would fit: bf16 on 8xH20 (TP8 or DP8+EP)" in text
    assert "  would fit: fp8 (stepfun-ai/Step-3.5-Flash-FP8) on 4xH20" in text


def test_alternatives_for_another_model_do_not_name_step_flash():
    deepseek = load_model(str(FIXTURES / "deepseek_v3"))
    alts = fitting.alternatives(deepseek, "bf16", H200, 8)
    assert alts[0] == "bf16 on 16xH200 (TP16 or DP16+EP)"
    assert any(a.startswith("fp8") and a.endswith("on 8xH200") for a in alts)
    assert not any("Step-3.5-Flash" in a for a in alts)
