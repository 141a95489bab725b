"""The bake-off's expert paths on the CPU: vLLM 0.33's own Triton kernels (fused_moe_kernel and the helper
kernels of deep_gemm_utils.py, utils.py, fp8_utils.py and activation.py, loaded from vLLM's source) under
Triton's interpreter, at tiny shapes, against the float reference of the whole layer.

The interpreter converts float32 to e4m3 wrongly where rounding carries into the next binade (124.4 -> 64,
not 128; see test_quant_kernel_matches_torch_but_the_interpreters_carry), so about 2% of the quantised values
are off by 2x here and the end-to-end tolerance is 0.2 rather than the GPU's ``bakeoff.TOLERANCE``. fp16
stands in for bf16 (the interpreter mishandles bf16 dots). DeepGEMM and FlashInfer are float stand-ins that
check their contracts (tests/fakes_moe.py); the real ones run on the GPU only.
"""

import sys
import types
from dataclasses import replace

import pytest
import torch

from fakes_moe import FakeDeepGemm, FakeFlashInfer, is_power_of_two
from tuning.bakeoff import layer_inputs as li
from tuning.bakeoff import moe_ops
from tuning.configs import TileConfig
from tuning.errors import UsageError
from tuning.inputs import quant_groups
from tuning.shapes import MoeShape, parse_layout

CPU_TOLERANCE = 0.2
EP = MoeShape(4, 8, 128, 256, 2, "fp8", (128, 128))  # half the experts on this GPU (DP2+EP)
TP = MoeShape(8, 8, 128, 256, 2, "fp8", (128, 128))
REFINED = MoeShape(8, 8, 192, 256, 2, "fp8", (64, 64))  # a refined TP shard


@pytest.fixture(scope="module")
def kernel(fused_moe_py):
    from tuning.vllm.kernel import KernelSource

    return KernelSource(str(fused_moe_py)).load()


@pytest.fixture(scope="module")
def helpers(fused_moe_py):
    from tuning.bakeoff.vllm_helpers import VllmSource, load_helpers

    return load_helpers(VllmSource())


def setup_layer(shape, m, dp=1, scale=None):
    fw = li.float_weights(shape, 0, "cpu", torch.float16)
    b = li.batch(shape, m, dp, 0, "cpu", torch.float16)
    if scale:
        b = li.Batch(b.hidden * scale, b.topk_ids, b.topk_weights, b.expert_map, b.local_rows)
    return fw, b


def test_quant_kernel_matches_torch_but_the_interpreters_carry(helpers):
    x = torch.randn(6, 256) * 3
    q, s = moe_ops.group_quant(helpers, x, 128, use_ue8m0=False)
    q_ref, s_ref = quant_groups(x, 128)
    assert torch.allclose(s, s_ref)
    diff = q.float() != q_ref.float()
    assert diff.float().mean() < 0.05
    # every mismatch is the interpreter's lost carry (a value rounding up to a power of two comes out halved),
    # or a subnormal e4m3 value
    halved, subnormal = q.float() * 2 == q_ref.float(), q_ref.float().abs() < 2 ** -6
    assert (halved | subnormal)[diff].all()
    q8, s8 = moe_ops.group_quant(helpers, x, 128, use_ue8m0=True)
    assert is_power_of_two(s8) and (s8 >= s_ref).all() and (s8 < 2 * s_ref).all()  # ceil to a power of two


@pytest.mark.parametrize("shape,m,dp", [(TP, 1, 1), (TP, 12, 1), (EP, 12, 2), (REFINED, 10, 1)])
@pytest.mark.parametrize("activation", ["silu", "swiglustep"])
@pytest.mark.parametrize("e8m0", [True, False])
def test_triton_path_end_to_end(kernel, helpers, shape, m, dp, activation, e8m0):
    """quant -> align (naive at M=1) -> w13 -> activation -> quant -> w2 with routed weights -> sum over top-k."""
    from tuning.bakeoff.path_triton import TritonPath

    fw, b = setup_layer(shape, m, dp)
    path = TritonPath(kernel, helpers, shape, li.quantised(fw, shape.block_shape), b,
                      config=TileConfig(16, 64, 64, 1, 4, 2), activation=activation, e8m0=e8m0, capability=0)
    rel, _ = li.errors(path.run(), li.reference(fw, b, activation))
    assert rel < CPU_TOLERANCE
    assert path.fused_silu_quant == (activation == "silu" and not e8m0 and shape.block_shape == (128, 128))
    path.stand_in_ops()  # runs on the same tensors


def test_swiglustep_clamps_where_silu_does_not(kernel, helpers):
    """With large activations the clamped SwiGLU differs from SiLU; the path follows the one it runs."""
    from tuning.bakeoff.path_triton import TritonPath

    fw, b = setup_layer(TP, 8, scale=8.0)
    ref_step, ref_silu = li.reference(fw, b, "swiglustep"), li.reference(fw, b, "silu")
    assert li.errors(ref_step, ref_silu)[0] > 0.5
    path = TritonPath(kernel, helpers, TP, li.quantised(fw, (128, 128)), b, config=TileConfig(16, 64, 64, 1, 4, 2),
                      activation="swiglustep", e8m0=False, capability=0)
    out = path.run()
    assert li.errors(out, ref_step)[0] < CPU_TOLERANCE < li.errors(out, ref_silu)[0]


@pytest.mark.parametrize("shape,m,dp", [(EP, 12, 2), (TP, 5, 1)])
@pytest.mark.parametrize("activation", ["silu", "swiglustep"])
@pytest.mark.parametrize("e8m0", [True, False])
def test_deepgemm_path_end_to_end(helpers, shape, m, dp, activation, e8m0):
    """count -> ep_scatter (prefix-sum layout for SiLU, m_indices for SwiGLU-step) -> GEMM -> fused SiLU+quant or
    swiglustep + column-major quant -> GEMM -> ep_gather, as DeepGemmExperts.apply runs them on Hopper."""
    from tuning.bakeoff.path_deepgemm import DeepGemmPath, deepgemm_weights

    dg = FakeDeepGemm()
    fw, b = setup_layer(shape, m, dp)
    w = deepgemm_weights(dg, li.quantised(fw, (128, 128)), e8m0)
    assert is_power_of_two(w.w13_scale) or not e8m0
    path = DeepGemmPath(dg, helpers, shape, w, b, activation=activation, e8m0=e8m0)
    assert path.m_sum % 128 == 0 and path.m_sum >= m * shape.top_k
    rel, _ = li.errors(path.run(), li.reference(fw, b, activation))
    assert rel < CPU_TOLERANCE
    assert [c["psum"] for c in dg.calls] == [activation == "silu"] * 2
    assert all(c["ue8m0"] == e8m0 and c["align"] == 128 for c in dg.calls)
    assert dg.alignment == 128  # the alignment scope is restored


def test_count_expert_num_tokens_drops_remote_slots(helpers):
    ids = torch.tensor([[0, 5], [3, 1], [7, 3], [2, 6]], dtype=torch.int32)
    emap = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1], dtype=torch.int32)
    assert moe_ops.count_expert_num_tokens(helpers, ids, 4, emap).tolist() == [1, 1, 1, 2]
    assert moe_ops.count_expert_num_tokens(helpers, ids, 8, None).tolist() == [1, 1, 1, 2, 0, 1, 1, 1]


def test_aligned_m_follows_compute_aligned_m_and_alignment():
    assert moe_ops.aligned_m(1, 8, 72, 128) == (8 + 8 * 127, 128)  # at most 8 experts active at M=1
    assert moe_ops.aligned_m(1024, 8, 72, 128) == (-(-(8192 + 72 * 127) // 128) * 128, 128)
    assert moe_ops.aligned_m(4, 8, 72, 128, theoretical=lambda m, g: 64) == (32 + 32 * 63, 64)


def stub_flashinfer(monkeypatch):
    core = types.ModuleType("flashinfer.fused_moe.core")
    core.ActivationType = types.SimpleNamespace(Swiglu=3)
    for name, mod in (("flashinfer", types.ModuleType("flashinfer")),
                      ("flashinfer.fused_moe", types.ModuleType("flashinfer.fused_moe")),
                      ("flashinfer.fused_moe.core", core)):
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize("layout,shape", [("DP2+EP", EP), ("TP2", TP)])
def test_flashinfer_call_as_flashinfer_experts_makes_it(monkeypatch, layout, shape):
    from tuning.bakeoff.path_flashinfer import FlashInferPath, flashinfer_weights

    stub_flashinfer(monkeypatch)
    fi = FakeFlashInfer()
    fw, b = setup_layer(shape, 6, 2 if "EP" in layout else 1)
    q = li.quantised(fw, (128, 128))
    dead = replace(q, w13_scale=q.w13_scale.clone().fill_(1e-30))  # dead blocks: clamped as vLLM does for FlashInfer
    assert flashinfer_weights(dead).w13_scale.min() >= 1e-10
    w = flashinfer_weights(q)
    assert torch.equal(w.w13[:, : shape.n], q.w13[:, shape.n:]) and torch.equal(w.w13[:, shape.n:], q.w13[:, : shape.n])
    path = FlashInferPath(fi, shape, w, b, parse_layout(layout))
    out = path.run()
    kw = fi.kwargs
    assert kw["use_deepseek_fp8_block_scale"] is True and kw["input_sf"] is None and kw["activation_type"] == 3
    assert kw["input"].dtype == b.hidden.dtype  # unquantised: the kernel quantises
    assert (kw["ep_size"], kw["tp_size"]) == ((2, 1) if "EP" in layout else (1, 2))
    assert kw["quant_scales"][0] is w.w13_scale and kw["swiglu_limit"] is None
    assert li.errors(out, li.reference(fw, b, "silu"))[0] < 0.1  # float stand-in: weight quantisation only


def test_vllm_helpers_from_a_stash_folder(tmp_path, fused_moe_py):
    from tuning.bakeoff.vllm_helpers import FILES, LATER, VllmSource, _installed, load_helpers

    (LATER_FILE,) = LATER

    for rel in FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(_installed(rel).read_text())
    src = VllmSource(str(tmp_path))
    assert src.version().startswith("0.33") and src.fused_moe.endswith("fused_moe.py")
    helpers = load_helpers(src)
    assert hasattr(helpers, "_fwd_kernel_ep_scatter_2")
    assert not hasattr(helpers, "_silu_mul_quant_sorted_kernel")  # 0.34's, not in 0.33's experts/triton_moe.py
    (tmp_path / LATER_FILE).unlink()  # optional: a stash made before 0.34 lacks it
    assert hasattr(load_helpers(VllmSource(str(tmp_path))), "_fwd_kernel_ep_scatter_2")
    with pytest.raises(UsageError, match="no vllm/model_executor/layers/activation.py there"):
        (tmp_path / "vllm/model_executor/layers/activation.py").unlink()
        load_helpers(VllmSource(str(tmp_path)))


def test_a_source_without_the_kernels_is_refused():
    from tuning.bakeoff.vllm_helpers import jit_functions

    with pytest.raises(UsageError, match="lacks the @triton.jit function"):
        jit_functions("import triton\n\n\ndef _count_expert_num_tokens():\n    pass\n", ("_count_expert_num_tokens",),
                      "x.py")


def test_flashinfer_is_timed_only_when_its_module_needs_no_build(tmp_path, monkeypatch):
    """FlashInfer 0.7.2's own lookup (jit/env.py get_aot_artifacts, the JIT cache folder) decides; without a built
    module the bake-off records why instead of compiling 248 files inside a timed run."""
    import argparse
    import json

    from flashinfer.jit import env

    from tuning.bakeoff import path_flashinfer as pf
    from tuning.bakeoff.compare import load_backends

    monkeypatch.setattr(env, "FLASHINFER_JIT_DIR", tmp_path / "jit")
    monkeypatch.setattr(env, "FLASHINFER_AOT_DIR", tmp_path / "aot")
    args = argparse.Namespace(deep_gemm_path=None, no_flashinfer=False, flashinfer_jit=False)
    missing: dict = {}
    assert load_backends(args, missing)[1] is None
    assert "fused_moe_90 is not built" in missing["flashinfer"] and "flashinfer_blockscale.py build" in \
        missing["flashinfer"] and pf.build_record() is None
    missing = {}
    assert load_backends(argparse.Namespace(**{**vars(args), "flashinfer_jit": True}), missing)[1] is not None
    assert "flashinfer" not in missing

    jit = tmp_path / "jit" / "fused_moe_90"
    jit.mkdir(parents=True)
    (jit / "fused_moe_90.so").write_bytes(b"")
    assert pf.missing_module() is None
    (jit / "fused_moe_90.so").unlink()
    aot = tmp_path / "aot" / "fused_moe_90"
    aot.mkdir(parents=True)
    (aot / "fused_moe_90.so").write_bytes(b"")
    (aot / "BUILD.json").write_text(json.dumps({"build": "block-scale path only", "sources_built": 28}))
    missing = {}
    assert load_backends(args, missing)[1] is not None and "flashinfer" not in missing
    assert pf.build_record() == {"build": "block-scale path only", "sources_built": 28}
