"""vLLM 0.33's own CUDA ops in the bake-off: finding and loading its compiled libraries (on this CPU box they do
not load: the bake-off keeps its stand-ins), the check each op passes against its stand-in, and the expert paths
calling the ops that passed, exactly as vLLM's wrappers do.

The real ops need an NVIDIA GPU; here ``fakes_moe.fake_cuda_ops`` stands in for them, with the argument names and
order of the schemas vLLM 0.33's libraries register, so a wrapper passing an argument out of place fails.
"""

import inspect

import pytest
import torch

from fakes_moe import FakeDeepGemm, fake_cuda_ops
from tuning import launch
from tuning.bakeoff import moe_ops, vllm_ops
from tuning.bakeoff import layer_inputs as li
from tuning.configs import TileConfig
from tuning.errors import UsageError
from tuning.inputs import quant_groups
from tuning.bakeoff.ops_gate import alignment_mismatch, close_mismatch, gate, quant_mismatch
from tuning.shapes import MoeShape

EP = MoeShape(4, 8, 128, 256, 2, "fp8", (128, 128))  # half the experts on this GPU
TP = MoeShape(8, 8, 128, 256, 2, "fp8", (128, 128))


@pytest.fixture(scope="module")
def helpers():
    from tuning.bakeoff.vllm_helpers import VllmSource, load_helpers

    return load_helpers(VllmSource())


@pytest.fixture(scope="module")
def kernel(fused_moe_py):
    from tuning.vllm.kernel import KernelSource

    return KernelSource(str(fused_moe_py)).load()


def fake_ops(helpers, calls=None, **replace) -> vllm_ops.VllmOps:
    return vllm_ops.VllmOps("fake", {**fake_cuda_ops(helpers, calls), **replace})


# ---- loading -------------------------------------------------------------------------------------------------

def test_on_a_box_without_a_gpu_nothing_loads_and_the_reason_is_one_line(tmp_path):
    ops, why = vllm_ops.load(None, helpers=None, experts=288, top_k=8)
    assert ops is None and "\n" not in why
    if vllm_ops.installed_folder() is None:
        assert why.startswith("vLLM is not installed here and --vllm-ops was not given")
    else:  # the installed vLLM's libraries need libcuda
        assert why.startswith(f"vLLM's CUDA ops did not load from {vllm_ops.installed_folder()} (")
    for lib in vllm_ops.LIBRARIES:
        (tmp_path / lib).write_bytes(b"\x7fELF not a library")
    ops, why = vllm_ops.load(str(tmp_path), helpers=None, experts=288, top_k=8)
    assert ops is None and why.startswith(f"vLLM's CUDA ops did not load from {tmp_path} (both libraries: OSError: ")
    assert "\n" not in why and why.count("OSError") == 1  # the same cause for both libraries, said once


def test_the_schemas_are_the_ones_vllms_libraries_register():
    """vllm_ops.SCHEMAS (what an op must be registered as before it is used) equals the schema text compiled
    into the installed vLLM 0.33's two libraries, up to whitespace."""
    import re

    folder = vllm_ops.installed_folder()
    assert folder is not None, "the tests need vLLM 0.33 installed (.ci/run installs it)"
    registered = {}
    for lib, (_, names) in vllm_ops.LIBRARIES.items():
        text = (folder / lib).read_bytes()
        for name in names:
            found = re.findall(rb"\x00(" + re.escape(name.encode()) + rb"\([^\x00]*\) -> \(\))\x00", text)
            registered[name] = {" ".join(t.decode().split()).replace(" )", ")") for t in found}
    assert registered == {name: {schema} for name, schema in vllm_ops.SCHEMAS.items()}


def test_vllm_ops_folder_is_checked_before_torch(tmp_path):
    with pytest.raises(UsageError, match=r"--vllm-ops .*nope: no such folder; give the folder holding"):
        vllm_ops.check_folder(str(tmp_path / "nope"))
    (tmp_path / "_C_stable_libtorch.abi3.so").write_bytes(b"")
    with pytest.raises(UsageError, match=r"no _moe_C_stable_libtorch.abi3.so there; .*pack-ops"):
        vllm_ops.check_folder(str(tmp_path))


def test_compare_backends_refuses_a_missing_ops_folder_in_one_line(tune):
    rc, out, err = tune("compare-backends", "--gpu", "H200", "--vllm-ops", "nope")
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "--vllm-ops nope: no such folder" in err


def test_the_fakes_take_the_arguments_of_the_registered_schemas(helpers):
    for name, fn in fake_cuda_ops(helpers).items():
        schema = torch._C.parse_schema(vllm_ops.SCHEMAS[name])
        assert list(inspect.signature(fn).parameters) == [a.name for a in schema.arguments], name
    assert set(vllm_ops.SCHEMAS) == set(moe_ops.STAND_INS) == {n for _, ns in vllm_ops.LIBRARIES.values() for n in ns}


def test_status_and_record_name_each_op(helpers):
    ops = fake_ops(helpers)
    ops.refuse("moe_sum", "disagrees with its stand-in: x")
    table = vllm_ops.status(ops, "")
    assert table["moe_sum"] == "disagrees with its stand-in: x" and table["silu_and_mul"] is None
    rec = vllm_ops.record(ops, "")
    assert rec["folder"] == "fake" and "moe_sum" not in rec["vllm"] and set(rec["stand_ins"]) == {"moe_sum"}
    assert vllm_ops.record(None, "why")["stand_ins"] == {n: "why" for n in moe_ops.STAND_INS}


# ---- the comparisons of the check ------------------------------------------------------------------------------

def _ids(m=9, experts=12, top_k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(m, experts, generator=gen).topk(top_k, dim=1).indices.to(torch.int32)


def _with(al: launch.Alignment, **kw) -> launch.Alignment:
    from dataclasses import replace

    return replace(al, **kw)


@pytest.mark.parametrize("expert_map", [None, torch.tensor([-1] * 4 + list(range(4)) + [-1] * 4, dtype=torch.int32)])
def test_alignment_comparison_ignores_order_within_an_expert_only(expert_map):
    ids = _ids()
    want = launch.align(ids, 4, 12, expert_map)
    assert alignment_mismatch(want, want, ids.numel()) is None
    total = int(want.num_tokens_post_padded)
    # the same slots per expert in another order (each expert's rows reversed, padding included)
    order, experts = want.sorted_token_ids.clone(), want.expert_ids[:total // 4].repeat_interleave(4)
    for e in experts.unique():
        rows = (experts == e).nonzero().flatten()
        order[rows] = order[rows.flip(0)]
    assert alignment_mismatch(_with(want, sorted_token_ids=order), want, ids.numel()) is None
    # a slot moved to the next expert's rows, its place padded
    wrong = want.sorted_token_ids.clone()
    first = int(((experts != experts[0]) & (wrong[:total] == ids.numel())).nonzero()[0])  # a padding row of expert 2
    wrong[first], wrong[0] = wrong[0], ids.numel()
    assert alignment_mismatch(_with(want, sorted_token_ids=wrong), want, ids.numel()) == \
        "an expert's set of token slots differs from the stand-in's"
    swapped = want.expert_ids.clone()
    swapped[0] = swapped[0] + 1
    assert alignment_mismatch(_with(want, expert_ids=swapped), want, ids.numel()).startswith("block 0 goes to expert")
    more = want.num_tokens_post_padded + 4
    assert alignment_mismatch(_with(want, num_tokens_post_padded=more), want, ids.numel()) == \
        f"padded total {total + 4}, the stand-in's {total}"
    negative = want.sorted_token_ids.clone()
    negative[negative == ids.numel()] = -1  # padding the kernel would read as a token
    assert alignment_mismatch(_with(want, sorted_token_ids=negative), want, ids.numel()) is not None


def test_quant_comparison_allows_one_e4m3_step_and_nothing_more():
    x = torch.randn(5, 256) * 3
    q, s = quant_groups(x, 128)
    assert quant_mismatch(q, s, q, s, 128, scale_rtol=1e-6) is None
    bits = q.view(torch.uint8).clone()
    bits[0, 0] += 1  # the neighbouring e4m3 value
    assert quant_mismatch(bits.view(moe_ops.FP8), s, q, s, 128, scale_rtol=1e-6) is None
    doubled = (q.float() * 2).clamp(-448, 448).to(moe_ops.FP8)
    assert quant_mismatch(doubled, s, q, s, 128, scale_rtol=1e-6).endswith("differ by more than one e4m3 step")
    assert quant_mismatch(q, s * 1.01, q, s, 128, scale_rtol=1e-6).startswith("scales differ")
    assert quant_mismatch(q[:, :128], s[:, :1], q, s, 128, scale_rtol=1e-6).startswith("outputs (5, 128)")


def test_close_comparison_says_where():
    a = torch.ones(3, 4)
    assert close_mismatch(a, a + 1e-4, rtol=1e-3, atol=0) is None
    b = a.clone()
    b[1, 2] = 2
    assert close_mismatch(b, a, rtol=1e-3, atol=0) == \
        "1 of 12 values differ beyond rtol 0.001, atol 0 (at [1, 2]: 2, the stand-in's 1)"


# ---- the check, with the fakes ------------------------------------------------------------------------------

def test_the_check_keeps_ops_that_agree_and_refuses_the_rest(helpers):
    calls = []
    ops = fake_ops(helpers, calls)
    gate(ops, helpers, device="cpu", experts=32, top_k=4)
    assert ops.refused == {} and set(calls) == set(moe_ops.STAND_INS)

    def no_silu(result, input):  # gate * up: the activation forgotten
        result.copy_(input[:, :input.shape[1] // 2] * input[:, input.shape[1] // 2:])

    def raises(input, output, topk_ids=None, expert_map=None):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")

    def keeps_remote_slots(input, output, topk_ids=None, expert_map=None):
        output.copy_(input.float().sum(dim=1))

    ops = fake_ops(helpers, silu_and_mul=no_silu, moe_sum=raises)
    gate(ops, helpers, device="cpu", experts=32, top_k=4)
    assert set(ops.refused) == {"silu_and_mul", "moe_sum"} and not ops.has("moe_sum")
    assert ops.refused["silu_and_mul"].startswith("disagrees with its stand-in: ") and "values differ" in \
        ops.refused["silu_and_mul"]
    assert ops.refused["moe_sum"] == "failed on a small input (RuntimeError: CUDA error: no kernel image is " \
                                     "available for execution on the device)"
    ops = fake_ops(helpers, moe_sum=keeps_remote_slots)
    gate(ops, helpers, device="cpu", experts=32, top_k=4)
    assert ops.refused["moe_sum"].startswith("disagrees with its stand-in: with an expert map: ")


# ---- the expert paths on vLLM's ops ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,dp,activation,e8m0", [(EP, 2, "silu", False), (TP, 1, "silu", True),
                                                      (EP, 2, "swiglustep", True)])
def test_triton_path_runs_vllms_ops_and_times_no_stand_in(kernel, helpers, shape, dp, activation, e8m0):
    from tuning.bakeoff.path_triton import TritonPath

    fw, b = li.float_weights(shape, 0, "cpu", torch.float16), li.batch(shape, 12, dp, 0, "cpu", torch.float16)
    calls = []
    path = TritonPath(kernel, helpers, shape, li.quantised(fw, shape.block_shape), b,
                      config=TileConfig(16, 64, 64, 1, 4, 2), activation=activation, e8m0=e8m0, capability=0,
                      ops=fake_ops(helpers, calls))
    assert path.stand_ins == () and path.stand_in_ops is None
    calls.clear()
    rel, _ = li.errors(path.run(), li.reference(fw, b, activation))
    assert rel < 0.2
    assert sorted(set(calls)) == sorted(path.cuda_ops)  # every CUDA op of the call is vLLM's, and no other
    fused = activation == "silu" and not e8m0
    assert ("silu_and_mul_per_block_quant" in calls) == fused and ("silu_and_mul" in calls) == (
        activation == "silu" and not fused)


def test_triton_path_times_only_the_stand_ins_left(kernel, helpers):
    from tuning.bakeoff.path_triton import TritonPath

    fw, b = li.float_weights(EP, 0, "cpu", torch.float16), li.batch(EP, 12, 2, 0, "cpu", torch.float16)
    ops = fake_ops(helpers)
    ops.refuse("silu_and_mul_per_block_quant", "disagrees")
    ops.refuse("silu_and_mul", "disagrees")
    path = TritonPath(kernel, helpers, EP, li.quantised(fw, EP.block_shape), b, config=TileConfig(16, 64, 64, 1, 4, 2),
                      activation="silu", e8m0=False, capability=0, ops=ops)
    # the fused op's stand-in is silu_and_mul's stand-in then vLLM's quantisation: only the former is timed
    assert path.stand_ins == ("silu_and_mul_per_block_quant",) and path._timed == ["silu_and_mul"]
    path.stand_in_ops()
    rel, _ = li.errors(path.run(), li.reference(fw, b, "silu"))
    assert rel < 0.2
    naive = TritonPath(kernel, helpers, TP, li.quantised(li.float_weights(TP, 0, "cpu", torch.float16), (128, 128)),
                       li.batch(TP, 1, 1, 0, "cpu", torch.float16), config=TileConfig(16, 64, 64, 1, 4, 2),
                       activation="swiglustep", e8m0=True, capability=0)
    # M=1 over 8 experts: vLLM's naive assignment calls no moe_align_block_size, so there is none to stand in for
    assert naive.stand_ins == ("per_token_group_fp8_quant", "moe_sum") and naive._timed == ["moe_sum"]


@pytest.mark.parametrize("activation", ["silu", "swiglustep"])
def test_deepgemm_path_quantises_with_vllms_op(helpers, activation):
    from tuning.bakeoff.path_deepgemm import DeepGemmPath, deepgemm_weights

    fw, b = li.float_weights(EP, 0, "cpu", torch.float16), li.batch(EP, 12, 2, 0, "cpu", torch.float16)
    dg, calls = FakeDeepGemm(), []
    path = DeepGemmPath(dg, helpers, EP, deepgemm_weights(dg, li.quantised(fw, (128, 128)), False), b,
                        activation=activation, e8m0=False, ops=fake_ops(helpers, calls))
    assert path.stand_ins == ()
    calls.clear()
    rel, _ = li.errors(path.run(), li.reference(fw, b, activation))
    assert rel < 0.2
    # the prepare step's quantisation, and with SwiGLU-step the column-major one after the activation
    assert calls == ["per_token_group_fp8_quant"] * (1 if activation == "silu" else 2)


def test_the_header_says_which_ops_are_vllms_and_why_the_others_are_not(helpers, capsys):
    from types import SimpleNamespace

    from tuning.bakeoff.compare import _ops_table

    ops = fake_ops(helpers)
    ops.refuse("moe_sum", "disagrees with its stand-in: with an expert map: 3 of 3328 values differ")
    _ops_table(SimpleNamespace(ops=ops, ops_why=""), moe_ops.STAND_INS)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "vLLM's CUDA ops (from fake):" and "  moe_align_block_size: vLLM's own" in lines
    assert [ln for ln in lines if ln.startswith("  moe_sum:")] == [
        f"  moe_sum: stand-in, {moe_ops.STAND_INS['moe_sum']} -- disagrees with its stand-in: with an expert map: "
        "3 of 3328 values differ"]
    _ops_table(SimpleNamespace(ops=None, ops_why="vLLM is not installed here"), moe_ops.STAND_INS)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "vLLM's CUDA ops (not loaded: vLLM is not installed here):" and len(lines) == 6
    assert all(" stand-in, " in ln for ln in lines[1:])
