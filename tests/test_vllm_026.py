"""vLLM 0.26.0, the release the validation serve runs: its own fused_moe.py, fetched from the PyPI wheel with
range requests (tests/wheel_member.py), loaded on its own and run under Triton's interpreter.

What differs from 0.33 (line numbers in 0.26's vllm/model_executor/layers/fused_moe/): the kernel has no USE_TD
(fused_moe.py:295-349); under EP the remote experts' slots are aligned too and their blocks write zeros
(experts/triton_moe.py:293-305, fused_moe.py:418); stride_bsn is passed for a single N block (fused_moe.py:833);
FP8 TP4/TP8 shards are refused (quantization/fp8.py:562). get_default_config (fused_moe.py:1239) and the config
file's name and loading (fused_moe.py:1035-1112) are 0.33's for bf16 and block FP8. fp16 stands in for bf16
under the interpreter.
"""

import ast
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tuning import launch
from tuning.configs import TileConfig
from tuning.errors import UsageError
from tuning.inputs import build_problem
from tuning.vllm.kernel import KernelSource
from tuning.routing import Routing
from tuning.runner import Runner
from tuning.shapes import BATCH_SIZES, Layout, MoeShape, shape_for
from tuning.models import load_model
from tuning.vllm.triton_pins import mismatch, target_triton
from tuning.vllm.rules import ServeFacts, layer_runtime
from tuning.vllm.source import KNOWN_SOURCES, read_signature
from test_kernel_interpreter import EP, FP8_EP, FP8_TP, H200, TP, assert_default_config_matches
from wheel_member import FUSED_MOE, OFFLINE, Recorder, fetch_member, release_fixtures, top_level_function

WHEEL = "vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl"
URL = f"https://files.pythonhosted.org/packages/20/96/86edd288415aafc2952bbb969b5ef4e8c58e5525185b60320730276921e6/{WHEEL}"
METADATA = "vllm-0.26.0.dist-info/METADATA"
SHA256 = {FUSED_MOE: next(sha for sha, v in KNOWN_SOURCES.items() if v == "0.26.0"),
          METADATA: "3d4bb60795893f064bf3d3b9dce702ff853131e9cc489047762dff6959215cf1"}

FP8_ONE_N_BLOCK = MoeShape(8, 16, 128, 64, 2, "fp8", (64, 64))  # w2's scales have one N block: stride_bsn differs


cache, src, wheel = release_fixtures(URL, SHA256)


@pytest.fixture(scope="module")
def kernel(src):
    return KernelSource(str(src), "0.26").load()


# --- the signature and the source ---------------------------------------------------------------------


def test_signature_is_accepted_and_lacks_only_use_td(kernel, src, fused_moe_py):
    assert kernel.vllm_version == "0.26" and "USE_TD" not in kernel.params
    v033 = read_signature(fused_moe_py)
    assert [p for p in v033.params if p not in kernel.params] == ["USE_TD"]
    assert [p for p in kernel.params if p not in v033.params] == []
    assert read_signature(src, "0.26").params == kernel.params  # the torch-free check reads what Triton reads


def test_the_file_tells_its_release_and_is_refused_as_another(src):
    assert KernelSource(str(src)).load().vllm_version == "0.26.0"
    with pytest.raises(UsageError, match=r"is vLLM 0\.26\.0's fused_moe\.py \(by its sha256\), not vLLM 0\.33's"):
        read_signature(src, "0.33")


def test_wheel_loads_and_pins_triton_3_6(wheel, src, kernel):
    loaded = KernelSource(str(wheel)).load()
    assert loaded.vllm_version == "0.26.0" and loaded.origin == f"wheel {wheel}"
    assert loaded.source_sha256 == kernel.source_sha256 == SHA256[FUSED_MOE]
    pin = target_triton("0.26", str(wheel))
    assert (pin.vllm, pin.torch, pin.triton) == ("0.26.0", "2.11.0", "3.6.0")
    assert "vLLM wheel METADATA" in pin.how
    assert mismatch(pin, "3.6.0") is None  # the H200 machine's own Triton
    assert mismatch(pin, "3.8.0") == ("vLLM 0.26.0 runs Triton 3.6.0 (torch 2.11.0 pins it) "
                                      "but this node compiles with Triton 3.8.0")


# --- vLLM 0.26's default config ---------------------------------------------------------------------


def _vllm_default(src: Path):
    platform = SimpleNamespace(is_rocm=lambda: False)
    return top_level_function(src, "get_default_config", {"current_platform": platform, "Any": Any,
                                                 "envs": SimpleNamespace(VLLM_BATCH_INVARIANT=False),
                                                 "should_moe_wna16_use_cuda": None})


@pytest.mark.parametrize("shape", [TP, FP8_EP, MoeShape(288, 288, 320, 4096, 8, "bf16"),
                                   MoeShape(72, 288, 1280, 4096, 8, "fp8", (128, 128))], ids=lambda s: s.label)
def test_default_config_is_0_26s_get_default_config(kernel, src, shape):
    vllm_default = _vllm_default(src)
    block = list(shape.block_shape) if shape.block_shape else None
    for m in (1, 4, 16, 64, 256, 4096):
        want = vllm_default(m, shape.num_experts, shape.n, shape.k, shape.top_k, shape.vllm_dtype, block)
        got = Runner(kernel, shape, m, H200, seed=1).default_config() if shape.k <= 256 else \
            TileConfig.from_dict(kernel.default_config(m, shape.num_experts, shape.n, shape.k, shape.top_k,
                                                       shape.vllm_dtype, block))
        assert got == TileConfig.from_dict(want) and want["SPLIT_K"] == 1


def test_default_config_is_the_same_as_0_33s_for_bf16_and_block_fp8(kernel, fused_moe_py):
    v033 = KernelSource(str(fused_moe_py)).load()
    for dtype, block in ((None, None), ("fp8_w8a8", [128, 128]), ("fp8_w8a8", [64, 64]), ("fp8_w8a8", [32, 32])):
        for e, n in ((288, 320), (288, 160), (72, 1280), (36, 1280)):
            for m in BATCH_SIZES:
                assert kernel.default_config(m, e, n, 4096, 8, dtype, block) == \
                    v033.default_config(m, e, n, 4096, 8, dtype, block)


# --- the kernel under the tool's own launch --------------------------------------------------------


@pytest.mark.parametrize("shape,m,naive", [
    (TP, 1, True),
    (TP, 16, False),
    (EP, 4, False),  # remote slots aligned too: their blocks write zeros
    (FP8_TP, 2, True),
    (FP8_TP, 16, False),
    (FP8_EP, 16, False),
])
def test_default_config_matches_float_reference(kernel, shape, m, naive):
    assert_default_config_matches(kernel, shape, m, naive)


# --- an FP8 shard the 128 block does not divide ----------------------------------------------------------------

QUANT_FP8 = "vllm/model_executor/layers/quantization/fp8.py"  # Fp8MoEMethod.create_weights
ORACLE_FP8 = "vllm/model_executor/layers/fused_moe/oracle/fp8.py"  # 0.33 refines or pads here; 0.26 does not
SOURCES = {QUANT_FP8: "26ede801aceeadea1e263b854424ed4fbd0bf5c081bf5beceaf4b877fb1d4fc0",
           ORACLE_FP8: "5321f37783658c5f20280776c5360058805e71e8c3f40dcca5b4e5c1bedf7d59"}


def _source(cache: Path, name: str) -> str:
    try:
        return fetch_member(URL, name, SOURCES[name], cache / name.replace("/", "__")).read_text()
    except OFFLINE as exc:
        pytest.skip(f"offline: cannot fetch vLLM 0.26's {name} from PyPI ({exc})")


def _create_weights_refusals(source: str) -> list[tuple[ast.expr, ast.JoinedStr]]:
    """(condition, message) of each ``if ...: raise ValueError(f"...")`` in Fp8MoEMethod.create_weights."""
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Fp8MoEMethod")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "create_weights")
    return [(n.test, n.body[0].exc.args[0]) for n in ast.walk(fn) if isinstance(n, ast.If) and
            isinstance(n.body[0], ast.Raise) and getattr(n.body[0].exc.func, "id", None) == "ValueError"]


def _evaluate(node: ast.expr, names: dict) -> Any:
    return eval(compile(ast.Expression(node), "<vllm 0.26>", "eval"), {}, names)


def test_an_fp8_shard_the_block_does_not_divide_fails_as_0_26s_create_weights_fails(cache):
    """vLLM 0.26 has no refinement or padding of an FP8 shard (none of 0.33's three functions in its FP8 oracle),
    and its Fp8MoEMethod.create_weights raises where the per-GPU width is not whole 128 blocks. For every TP size
    of 1-16, with and without EP, the mirror's start-up error for a 0.26 serve is the message 0.26's own raise
    renders (its conditions and f-strings evaluated from its source), or none where 0.26 raises none; the plan
    refuses the same layouts, and 0.33 starts FP8 TP4 and TP8 (refined blocks)."""
    oracle = {n.name for n in ast.parse(_source(cache, ORACLE_FP8)).body if isinstance(n, ast.FunctionDef)}
    assert "select_fp8_moe_backend" in oracle
    assert not oracle & {"refine_fp8_moe_block_shape", "resolve_fp8_moe_weight_block_shape",
                         "pad_tp_shard_to_weight_blocks"}
    refusals = _create_weights_refusals(_source(cache, QUANT_FP8))
    assert len(refusals) == 2
    model = load_model("stepfun-ai/Step-3.5-Flash-FP8")
    refused = []
    for tp in range(1, 17):
        for ep in (False, True):
            if model.moe_intermediate_size % (1 if ep else tp) or (ep and model.num_experts % tp):
                continue  # refused before any weight is made
            n = model.moe_intermediate_size // (1 if ep else tp)
            names = {"intermediate_size_per_partition": n, "block_n": 128, "block_k": 128, "tp_size": tp}
            raised = next((_evaluate(msg, names) for test, msg in refusals if _evaluate(test, names)), None)
            for act in ("silu", "swiglustep"):
                got = layer_runtime(ServeFacts(arch="sm90", dtype="fp8", tp=tp, ep=ep, vllm="0.26"), act).error
                assert got == (raised and f"ValueError: {raised}"), (tp, ep, act)
            plan = shape_for(model, Layout(tp=tp, ep=ep), "fp8", "0.26")
            assert hasattr(plan, "reason") == (raised is not None), (tp, ep)
            refused += [f"TP{tp}{'+EP' if ep else ''}"] if raised else []
    assert refused[:2] == ["TP4", "TP8"] and all("+EP" not in name for name in refused)
    for tp in (4, 8):
        assert layer_runtime(ServeFacts(arch="sm90", dtype="fp8", tp=tp, vllm="0.33"), "silu").error is None


def test_ep_aligns_the_remote_slots_under_0_26_and_drops_them_under_0_33():
    p = build_problem(EP, 24, Routing(), 3, torch.device("cpu"), torch.float16)
    numel, block = p.topk_ids.numel(), 16
    v026 = launch.align(p.topk_ids, block, EP.global_experts, p.expert_map, SimpleNamespace(vllm_version="0.26",
                                                                                           align_op=None))
    v033 = launch.align(p.topk_ids, block, EP.global_experts, p.expert_map, SimpleNamespace(vllm_version="0.33",
                                                                                           align_op=None))
    for al, slots in ((v026, numel), (v033, int(p.valid.sum()))):
        total = int(al.num_tokens_post_padded)
        body = al.sorted_token_ids[:total]
        assert int((body < numel).sum()) == slots  # every slot the release aligns, once
        assert al.sorted_token_ids.numel() == numel + EP.global_experts * (block - 1)
    blocks = int(v026.num_tokens_post_padded) // block
    assert (v026.expert_ids[:blocks] == -1).any() and not (v033.expert_ids[:int(v033.num_tokens_post_padded) // block]
                                                          == -1).any()


@pytest.mark.parametrize("shape,sm90", [(FP8_EP, False), (FP8_EP, True), (FP8_ONE_N_BLOCK, False), (EP, False)])
def test_launch_equals_0_26s_own_invoke(kernel, src, shape, sm90):
    """Argument for argument and bit for bit, both GEMMs, as 0.26's invoke_fused_moe_triton_kernel launches them
    (its enable_swap_ab answering as an sm90 GPU does, utils.py:576)."""
    import triton
    import triton.language as tl

    ours, theirs = Recorder(kernel.fn), Recorder(kernel.fn)
    invoke = top_level_function(src, "invoke_fused_moe_triton_kernel", {
        "torch": torch, "triton": triton, "tl": tl, "Any": Any, "fused_moe_kernel": theirs,
        "enable_swap_ab": lambda bm, bn: sm90 and bm < 64 and bn >= 64})
    p = build_problem(shape, 16, Routing(), 4, torch.device("cpu"), torch.float16)
    cfg = TileConfig(16, 64, 128, 1, 4, 3)
    al = launch.align(p.topk_ids, cfg.BLOCK_SIZE_M, shape.global_experts, p.expert_map, kernel)
    for gemm in (launch.w13(p), launch.w2(p)):
        gemm.c.fill_(float("nan"))  # every row must be written: the remote experts' rows with zeros
        launch.invoke(replace(kernel, fn=ours), gemm, al, cfg, block_shape=shape.block_shape, capability=90 if sm90 else 0)
        out = gemm.c.clone()
        gemm.c.fill_(float("nan"))
        invoke(gemm.a, gemm.b, gemm.c, gemm.a_scale, gemm.b_scale, gemm.topk_weights, al.sorted_token_ids,
               al.expert_ids, al.num_tokens_post_padded, gemm.topk_weights is not None, gemm.top_k, cfg.to_dict(),
               compute_type=tl.float16, use_fp8_w8a8=shape.dtype == "fp8", use_int8_w8a8=False, use_int8_w8a16=False,
               use_int4_w4a16=False, per_channel_quant=False,
               block_shape=list(shape.block_shape) if shape.block_shape else None)
        assert torch.equal(out, gemm.c) and out.abs().sum() > 0
    for (grid, mine), (their_grid, vllm) in zip(ours.calls, theirs.calls, strict=True):
        assert grid == their_grid and mine.keys() == vllm.keys()
        for name, value in mine.items():
            same = value is vllm[name] if isinstance(value, torch.Tensor) else value == vllm[name]
            assert same, (name, value, vllm[name])
    if shape is FP8_ONE_N_BLOCK:
        assert ours.calls[1][1]["stride_bsn"] == p.w2_scale.stride(1) != 0  # 0.33 passes 0 here


# --- the command line ---------------------------------------------------------------------------------


@pytest.fixture
def tune(tune, monkeypatch):
    """conftest's in-process tune-moe, compiling with Triton 3.6.0: the H200 machine's own, the one 0.26 runs."""
    monkeypatch.setattr("tuning.tune.compiling_triton", lambda: "3.6.0")
    return tune


def test_dry_run_plans_0_26s_bf16_files_and_names_its_triton(tune, src):
    rc, out, err = tune("--gpu", "H200", "--dtype", "bf16", "--vllm-version", "0.26", "--vllm-src", str(src),
                        "--dry-run")
    assert rc == 0 and err == ""
    assert out.startswith("Plan: stepfun-ai/Step-3.5-Flash bf16 on 8xH200 (NVIDIA_H200, sm90), vLLM 0.26 launch rules")
    for name in ("E=288,N=320", "E=288,N=160", "E=72,N=1280", "E=36,N=1280"):
        assert f"  {name},device_name=NVIDIA_H200.json\n" in out
    assert "aligns the remote experts' slots too" in out
    assert ("Triton: vLLM 0.26.0 runs Triton 3.6.0 (torch 2.11.0 pins it; known table); "
            "this node compiles with the same\n") in out
    assert f"Kernel: vLLM 0.26 fused_moe_kernel (source {src}, sha256 {SHA256[FUSED_MOE][:12]}): 45 parameters" in out
    assert "not passed: C_IS_SORTED, USE_TD, USE_TMA_A, USE_TMA_B, a_desc, b_desc, even_Ks, filter_expert" in out
    assert "Jobs: 4 shapes x 18 batch sizes = 72 (shape, M) jobs" in out


def test_dry_run_of_the_wheel_refuses_fp8_tp4_and_tp8(tune, wheel):
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--vllm-src", str(wheel), "--dry-run")
    assert rc == 0 and err == ""
    assert "vLLM 0.26.0 launch rules" in out
    assert "TP4: refused by vLLM 0.26.0: vLLM 0.26.0 needs the per-GPU expert width 1280/4=320" in out
    assert "TP8: refused by vLLM 0.26.0" in out and "block_shape=[64,64]" not in out
    assert "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json" in out
    assert "Triton: vLLM 0.26.0 runs Triton 3.6.0 (torch 2.11.0 pins it; vLLM wheel METADATA" in out


def test_another_releases_file_given_as_0_26_is_one_line(tune, fused_moe_py):
    rc, out, err = tune("--gpu", "H200", "--dtype", "bf16", "--vllm-version", "0.26", "--vllm-src", str(fused_moe_py),
                        "--dry-run")
    assert rc == 2 and out == ""
    assert err == (f"tune-moe: error: --vllm-src {fused_moe_py} is vLLM 0.33.0's fused_moe.py (by its sha256), not "
                   "vLLM 0.26's; pass vLLM 0.26's file or wheel, or --vllm-version 0.33.0\n")


def test_dry_run_reads_the_kernel_source_without_torch(src, tmp_path):
    import subprocess
    import sys

    argv = ["--gpu", "H200", "--dtype", "bf16", "--vllm-version", "0.26", "--vllm-src", str(src), "--dry-run"]
    code = ("import sys\nfrom tuning.cli import main\n"
            f"rc = main({argv!r})\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'triton', 'ray', 'vllm') if m in sys.modules))\n"
            "sys.exit(rc)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin",
                              "HOME": str(tmp_path)})
    assert run.returncode == 0 and "Kernel: vLLM 0.26 fused_moe_kernel" in run.stdout, run.stdout + run.stderr
    assert "IMPORTED []" in run.stdout
