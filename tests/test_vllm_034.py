"""vLLM 0.34.0: its own fused_moe.py, fetched from the PyPI wheel with range requests (tests/wheel_member.py),
loaded on its own and run under Triton's interpreter.

What differs from 0.33 for the tuned kernel (line numbers in 0.34's vllm/model_executor/layers/fused_moe/):
invoke_fused_moe_triton_kernel reads block-FP8 weights through a TMA descriptor on compute capability 9.x and
10.x where the tiles divide them (fused_moe.py:883-905, the kernel's USE_TMA_B), unless the config says
"USE_TMA": false; a_desc and C_IS_SORTED serve only the sorted-activation path of an optional `_down.json`
file (experts/triton_moe.py:436-485), which no Step-3.5-Flash file sets. The remote-slot drop under EP and
stride_bsn are 0.33's. fp16 stands in for bf16 under the interpreter.
"""

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tuning import launch
from tuning.configs import TileConfig
from tuning.errors import UsageError
from tuning.inputs import TOLERANCE, build_problem
from tuning.vllm.kernel import KernelSource
from tuning.routing import Routing
from tuning.runner import Runner
from tuning.shapes import MoeShape
from tuning.vllm.triton_pins import KNOWN, _pinned_version, _wheel_metadata, flashinfer_pin, mismatch, target_triton
from tuning.vllm.probe import probe
from tuning.vllm.rules import launch_rules, layer_runtime
from tuning.vllm.source import KNOWN_SOURCES, read_signature
from test_kernel_interpreter import EP, FP8_EP, H200
from test_vllm_probe import grid_keys, serve_for, unbuildable_cases
from wheel_member import FUSED_MOE, Recorder, release_fixtures, top_level_function

WHEEL = "vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl"
URL = f"https://files.pythonhosted.org/packages/0b/2c/55f3b76ceadbfc6d515f16b1c17e2e69136c8e54d47be2a94b9f7326f9bb/{WHEEL}"
METADATA = "vllm-0.34.0.dist-info/METADATA"
SHA256 = {FUSED_MOE: next(sha for sha, v in KNOWN_SOURCES.items() if v == "0.34.0"),
          METADATA: "e49898cce18b89b041bb28b90154c9737d9ae0856a0edca8ef96c27c2963d581"}
NEW_PARAMS = ["b_desc", "a_desc", "USE_TMA_B", "USE_TMA_A", "C_IS_SORTED"]

FP8_BLOCK = MoeShape(8, 8, 128, 256, 2, "fp8", (128, 128))  # whole 128 blocks, as the EP and TP2 shards
FP8_REFINED = MoeShape(8, 8, 64, 256, 2, "fp8", (32, 32))  # a refined block, as TP8's [32, 32]
TMA_TILE = TileConfig(16, 64, 128, 1, 4, 3)  # N tile 64 divides 2N = 256 (w13) and K = 256 (w2)


cache, src, wheel = release_fixtures(URL, SHA256)


@pytest.fixture(scope="module")
def kernel(src):
    return KernelSource(str(src)).load()


class _CudaWeights(ast.NodeTransformer):
    """Replaces the one term of 0.34's TMA decision a CPU cannot meet, ``B.device.type == "cuda"``, by True; the
    rest of invoke_fused_moe_triton_kernel is vLLM's code."""

    hits = 0

    def visit_Compare(self, cmp):
        if ast.unparse(cmp) == "B.device.type == 'cuda'":
            self.hits += 1
            return ast.copy_location(ast.Constant(True), cmp)
        return self.generic_visit(cmp)


# --- the signature, the source and the Triton it runs ---------------------------------------------------


def test_signature_is_0_33s_and_the_tma_parameters(kernel, src, fused_moe_py):
    assert kernel.vllm_version == "0.34.0"
    v033 = read_signature(fused_moe_py)
    assert [p for p in kernel.params if p not in v033.params] == NEW_PARAMS
    assert [p for p in v033.params if p not in kernel.params] == []
    assert read_signature(src).params == kernel.params  # the torch-free check reads what Triton reads


def test_the_file_tells_its_release_and_is_refused_as_another(src):
    with pytest.raises(UsageError, match=r"is vLLM 0\.34\.0's fused_moe\.py \(by its sha256\), not vLLM 0\.33's"):
        read_signature(src, "0.33")


def test_wheel_pins_triton_3_8_as_the_known_table_does(wheel, src, kernel):
    loaded = KernelSource(str(wheel)).load()
    assert loaded.vllm_version == "0.34.0" and loaded.source_sha256 == kernel.source_sha256 == SHA256[FUSED_MOE]
    pin = target_triton("0.34", str(wheel))
    assert (pin.vllm, pin.torch, pin.triton) == ("0.34.0", "2.14.0", "3.8.0") and "vLLM wheel METADATA" in pin.how
    known = KNOWN["0.34.0"]
    assert (known.torch, known.triton) == (pin.torch, pin.triton)
    assert mismatch(pin, "3.8.0") is None


def test_wheel_pins_the_flashinfer_the_table_names(wheel):
    """A 0.34 bake-off that times FlashInfer-CUTLASS with another FlashInfer says so (backend_advice.flashinfer_note):
    the table it reads is this METADATA's pin."""
    version, requires = _wheel_metadata(wheel)
    assert version == "0.34.0" and _pinned_version(requires, "flashinfer-python") == flashinfer_pin("0.34") == "0.7.3"


# --- the launch -------------------------------------------------------------------------------------------


def _platform(capability: int) -> SimpleNamespace:
    """vLLM's current_platform as a GPU of that compute capability answers (0: not CUDA)."""
    return SimpleNamespace(is_cuda=lambda: capability > 0, is_rocm=lambda: False,
                           is_device_capability=lambda c: c == capability,
                           is_device_capability_family=lambda c: capability > 0 and c // 10 == capability // 10)


def _same(mine, theirs) -> bool:
    if isinstance(mine, torch.Tensor):
        return mine is theirs
    if type(mine).__name__ == "TensorDescriptor":
        return type(theirs) is type(mine) and mine.base is theirs.base and \
            (list(mine.shape), list(mine.strides), list(mine.block_shape)) == \
            (list(theirs.shape), list(theirs.strides), list(theirs.block_shape))
    return mine == theirs


@pytest.mark.parametrize("shape,capability,tma", [
    (FP8_BLOCK, 90, True), (FP8_REFINED, 90, True), (FP8_EP, 90, True), (FP8_BLOCK, 100, True),
    (FP8_BLOCK, 0, False), (EP, 90, False),
])
def test_launch_equals_0_34s_own_invoke(kernel, src, shape, capability, tma):
    """Argument for argument (the weights' TMA descriptor field by field) and bit for bit, both GEMMs, as 0.34's
    invoke_fused_moe_triton_kernel launches them on a GPU of that compute capability."""
    import triton
    import triton.language as tl

    from tuning.vllm.rules import launch_rules

    platform = _platform(capability)
    ours, theirs = Recorder(kernel.fn), Recorder(kernel.fn)
    cuda = _CudaWeights()
    invoke = top_level_function(src, "invoke_fused_moe_triton_kernel", {
        "torch": torch, "triton": triton, "tl": tl, "Any": Any, "fused_moe_kernel": theirs,
        "current_platform": platform, "set_triton_allocator": lambda device: None,
        "enable_swap_ab": lambda bm, bn: platform.is_device_capability(90) and bm < 64 and bn >= 64,
        "resolve_moe_use_td": lambda: False, "warn_if_moe_use_td_ineffective": lambda *a, **k: None,
    }, cuda)
    assert cuda.hits == 1
    p = build_problem(shape, 16, Routing(), 4, torch.device("cpu"), torch.float16)
    al = launch.align(p.topk_ids, TMA_TILE.BLOCK_SIZE_M, shape.global_experts, p.expert_map, kernel)
    for gemm in (launch.w13(p), launch.w2(p)):
        gemm.c.fill_(float("nan"))
        launch.invoke(replace(kernel, fn=ours), gemm, al, TMA_TILE, block_shape=shape.block_shape,
                      capability=capability)
        out = gemm.c.clone()
        gemm.c.fill_(float("nan"))
        invoke(gemm.a, gemm.b, gemm.c, gemm.a_scale, gemm.b_scale, gemm.topk_weights, al.sorted_token_ids,
               al.expert_ids, al.num_tokens_post_padded, gemm.topk_weights is not None, gemm.top_k,
               TMA_TILE.to_dict(), compute_type=tl.float16, use_fp8_w8a8=shape.dtype == "fp8",
               use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=False,
               block_shape=list(shape.block_shape) if shape.block_shape else None)
        assert torch.equal(out.nan_to_num(), gemm.c.nan_to_num()) and out.abs().nan_to_num().sum() > 0
    for (grid, mine), (their_grid, vllm) in zip(ours.calls, theirs.calls, strict=True):
        assert grid == their_grid and mine.keys() == vllm.keys()
        for name, value in mine.items():
            assert _same(value, vllm[name]), (name, value, vllm[name])
    assert [named["USE_TMA_B"] for _, named in ours.calls] == [tma, tma]
    assert launch_rules("0.34").tma_weights and not launch_rules("0.33").tma_weights


def test_a_tile_that_does_not_divide_the_weights_reads_them_by_pointer(kernel):
    """BLOCK_SIZE_N 256 does not divide w13's 2N = 128 rows of FP8_REFINED: vLLM's condition sends that GEMM to the
    pointer path and keeps the descriptor for w2, whose K = 256 rows it divides."""
    p = build_problem(FP8_REFINED, 4, Routing(), 0, torch.device("meta"))
    rule, cfg = launch_rules(kernel.vllm_version), TileConfig(16, 256, 128, 1, 4, 3)
    block_k = min(cfg.BLOCK_SIZE_K, *FP8_REFINED.block_shape)
    tiles = {"block_shape": FP8_REFINED.block_shape, "config": cfg, "block_k": block_k}
    assert not launch.tma_weights(rule, True, p.w13, **tiles, capability=90)
    assert launch.tma_weights(rule, True, p.w2, **tiles, capability=90)
    assert launch.tma_weights(rule, True, p.w2, **tiles, capability=100)
    assert not launch.tma_weights(launch_rules("0.33"), True, p.w2, **tiles, capability=90)
    assert not launch.tma_weights(rule, True, p.w2, **tiles, capability=80)  # an A100
    assert not launch.tma_weights(rule, False, p.w2, **tiles, capability=90)  # bf16


@pytest.mark.parametrize("shape", [FP8_BLOCK, FP8_REFINED, FP8_EP])
def test_the_tma_launch_equals_the_float_reference(kernel, shape, monkeypatch):
    """The kernel as an H200 runs it under 0.34 (weights through the descriptor) against the float reference; the
    pointer path on the same inputs gives the same bits."""
    runner = Runner(kernel, shape, 24, H200, Routing(), seed=2)
    runner.capability = 90
    err = runner.check(TMA_TILE)
    assert err <= TOLERANCE["fp8"] and err < 5e-3
    tma_out = runner.problem.c3.clone()
    monkeypatch.setattr(launch, "tma_weights", lambda *a, **k: False)
    assert runner.check(TMA_TILE) == err
    torch.testing.assert_close(runner.problem.c3, tma_out, rtol=0, atol=0, equal_nan=True)  # EP: remote rows unwritten


def test_the_pool_compiles_the_tma_kernels_an_h200_worker_launches(tmp_path, monkeypatch, src):
    """The compile pool, told only the H200 target, compiles 0.34's kernels with the weights' TMA descriptors
    (built on meta tensors, as the pool builds every launch), and the worker's sm90 launch finds them."""
    from test_compile_share import assert_the_pool_compiles_the_h200_variant

    p, cfg = build_problem(FP8_BLOCK, 16, Routing(), 0, torch.device("meta")), TileConfig(16, 64, 128, 1, 4, 3)
    assert all(launch.tma_weights(launch_rules("0.34.0"), True, w, block_shape=(128, 128), config=cfg, block_k=128,
                                  capability=90) for w in (p.w13, p.w2))  # the helper's shape and tile
    assert_the_pool_compiles_the_h200_variant(tmp_path, monkeypatch, src)


# --- the command line ---------------------------------------------------------------------------------


def test_dry_run_plans_0_34s_fp8_files(tune, src):
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--vllm-src", str(src), "--dry-run")
    assert rc == 0 and err == ""
    assert out.startswith("Plan: stepfun-ai/Step-3.5-Flash-FP8 fp8 on 8xH200 (NVIDIA_H200, sm90), vLLM 0.34.0 "
                          "launch rules")
    assert "E=288,N=320,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[64,64].json" in out
    assert ("\nWeights: vLLM 0.34.0 reads block-FP8 weights through a TMA descriptor on sm90 wherever the N and K "
            "tiles divide them, and the search times that launch\n") in out
    assert "Triton: vLLM 0.34.0 runs Triton 3.8.0 (torch 2.14.0 pins it; known table)" in out
    assert f"Kernel: vLLM 0.34.0 fused_moe_kernel (source {src}, sha256 {SHA256[FUSED_MOE][:12]}): 51 parameters" in out
    rc, bf16, _ = tune("--gpu", "H200", "--dtype", "bf16", "--vllm-src", str(src), "--dry-run")
    assert rc == 0 and "Weights:" not in bf16  # bf16 weights are read by pointer in every release
    # the `_down.json` 0.34 reads for TP2's SiLU layers (TP4/TP8 refine the block, EP has an expert map; sm90 only)
    assert ("\nDown files: vLLM 0.34.0 also reads E=288,N=640,device_name=NVIDIA_H200,dtype=fp8_w8a8,"
            "block_shape=[128,128]_down.json (TP2) for the SiLU layers (an optional sorted-activation path of the "
            "down projection); tune-moe writes none: on the H200 that path measured 0.94-0.98x of the plain one for "
            "E=288 N=640 (benchmarks/README §2z)\n") in out
    for flags in (("--gpu", "B200", "--vllm-src", str(src)), ("--gpu", "H200", "--vllm-version", "0.33.0"),
                  ("--gpu", "H200", "--vllm-src", str(src), "--layouts", "TP4,DP4+EP")):
        rc, other, _ = tune(*flags, "--dtype", "fp8", "--dry-run")
        assert rc == 0 and "Down files" not in other, flags


# --- what vLLM 0.34 runs per MoE layer kind ------------------------------------------------------------------


@pytest.fixture(scope="module")
def site_034(cache) -> Path:
    """vLLM 0.34.0's package, installed without its dependencies beside this environment's vLLM 0.33 (both pin
    torch 2.14.0): the probe's subprocess, with it first on PYTHONPATH, imports 0.34. Kept in pytest's cache."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vLLM 0.33 installed (0.34's package is imported with 0.33's dependencies)")
    site = cache / "site"
    if not (site / "vllm" / "__init__.py").is_file():
        partial = cache / "site.partial"
        shutil.rmtree(partial, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                               "--target", str(partial), "vllm==0.34.0"], capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 and any(s in proc.stderr for s in ("NewConnectionError", "Temporary failure",
                                                                    "Network is unreachable")):
            pytest.skip(f"offline: cannot install vLLM 0.34.0 from PyPI ({proc.stderr.strip().splitlines()[-1]})")
        assert proc.returncode == 0, proc.stderr
        partial.rename(site)
    return site


def test_the_mirror_answers_as_vllm_0_34_on_every_row(site_034, monkeypatch):
    """vLLM 0.34's own selection code over the probe's 7392 serve rows: the mirror, told the serve runs 0.34, gives
    its answer on every row; 0.34 differs from 0.33 only where FlashInfer TRT-LLM now takes the B200 bf16
    SwiGLU-step layers (experts/trtllm_bf16_moe.py:140-143)."""
    monkeypatch.setenv("PYTHONPATH", str(site_034))

    def verdict(r) -> tuple:
        return r.backend, r.experts, r.n, r.block, r.e8m0, (r.error or "").split(":")[0]

    keys = grid_keys()
    serves = [(replace(serve_for(a, d, lay, b, e), vllm="0.34.0"), act) for a, d, lay, act, b, e in keys]
    theirs = probe(serves)
    wrong = [f"{k}: mirror {verdict(layer_runtime(s, act))}; vLLM {verdict(r)}"
             for k, (s, act), r in zip(keys, serves, theirs) if verdict(layer_runtime(s, act)) != verdict(r)]
    assert not wrong, f"{len(wrong)} of {len(keys)} rows differ:\n" + "\n".join(wrong[:40])
    moved = [k for k, (s, act), r in zip(keys, serves, theirs)
             if verdict(layer_runtime(replace(s, vllm="0.33"), act)) != verdict(r)]
    assert moved and {(k[0], k[1], k[3]) for k in moved} == {("sm100", "bf16", "swiglustep")}
    assert {theirs[keys.index(k)].backend for k in moved} == {"FlashInfer TRTLLM"}


def test_the_mirror_refuses_the_shards_vllm_0_34_cannot_build(site_034, monkeypatch):
    """0.34 keeps 0.33's FusedMoEConfig assert and create_weights' block check: the mirror, told the serve runs
    0.34, answers as 0.34's own code on the uneven and unrefinable shards (TP3, TP16's 80 FP8 columns, ...)."""
    monkeypatch.setenv("PYTHONPATH", str(site_034))
    cases = unbuildable_cases("0.34.0")
    theirs = probe(cases)
    for (serve, act), r in zip(cases, theirs):
        ours = layer_runtime(serve, act)
        assert (ours.backend, ours.experts, ours.n, ours.block, (ours.error or "").split(":")[0]) == \
            (r.backend, r.experts, r.n, r.block, (r.error or "").split(":")[0]), (serve, act, ours, r)
    assert sum(r.error is not None for r in theirs) > len(cases) // 3


def test_the_serve_mirror_reads_and_plans_as_vllm_0_34(site_034, monkeypatch):
    """vLLM 0.34's own parser (its flag table too) and ``_set_cudagraph_sizes``, which ends in
    ``_split_cudagraph_capture_sizes`` (config/vllm.py): the mirror, told the serve runs 0.34, reads and plans every
    command as it does, 0.33's commands and those with 0.34's split keys."""
    from test_preflight import ACCEPTED_ODD, COMMANDS, COMMANDS_034, GPUS, REFUSED, mirror_differences

    from tuning.vllm import serve_command, probe as vllm_probe

    monkeypatch.setenv("PYTHONPATH", str(site_034))
    assert serve_command.serve_flags("0.34") == vllm_probe.serve_flags()
    assert set(serve_command.serve_flags("0.34")) > set(serve_command.serve_flags("0.33"))
    rows, wrong = mirror_differences("0.34", COMMANDS + COMMANDS_034 + REFUSED + ACCEPTED_ODD)
    assert rows == 2 * len(GPUS) * len(COMMANDS + COMMANDS_034 + REFUSED + ACCEPTED_ODD) and not wrong, "\n".join(wrong)
    answers = vllm_probe.serve_plans([(c, "sm90", 141, 1) for c in REFUSED + ACCEPTED_ODD])
    assert ["error" in a for a in answers] == [True] * len(REFUSED) + [False] * len(ACCEPTED_ODD)
    answer = vllm_probe.preflight(["stepfun-ai/Step-3.5-Flash", "-tp", "8"], "sm100", 180, {})  # a 0.34 node's
    sizes = answer["plan"]["capture_sizes"]
    assert (len(sizes), sizes[-1]) == (91, 8192) and [r["backend"] for r in answer["layers"]] == ["FlashInfer TRTLLM"] * 2


def test_preflight_of_a_0_34_b200_serve_counts_its_wider_cuda_graphs(capsys):
    """On SM100 0.34 captures prefill graphs to 8192 tokens and decode graphs to 8192 (0.33: 1024 for both), so
    the fused MoE's padded batch sizes run to 8192 under CUDA graphs; on H200 the list is 0.33's. 0.33 is answered
    by the installed vLLM, 0.34 by the mirror."""
    from tuning.cli import main

    serve = ["--", "vllm", "serve", "stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "8"]
    sizes = {}
    for gpu, release in (("B200", "0.33.0"), ("B200", "0.34.0"), ("H200", "0.33.0"), ("H200", "0.34.0")):
        main(["preflight", "--gpu", gpu, "--vllm-version", release, *serve])
        out = capsys.readouterr().out
        assert ("answered by vLLM's own code" if release == "0.33.0" else  # the installed vLLM answers for 0.33
                "answered by tune-moe's mirror of vLLM 0.34's rules") in out
        sizes[gpu, release] = re.search(r"(\d+) CUDA-graph sizes up to (\d+)", out).groups()
    assert sizes == {("B200", "0.33.0"): ("83", "1024"), ("B200", "0.34.0"): ("91", "8192"),
                     ("H200", "0.33.0"): ("51", "512"), ("H200", "0.34.0"): ("51", "512")}


def test_the_image_recipe_on_vllm_0_34_copies_its_folder_and_0_34s_loader_reads_every_file(site_034, tmp_path):
    """The build step of docker/Dockerfile.vllm-tuned with vLLM 0.34.0 as the image's vLLM: it picks
    kernels_configs/vllm-0.34, and 0.34's own get_moe_configs returns every file as written."""
    from test_committed_configs import dockerfile_script

    root = Path(__file__).resolve().parents[1] / "kernels_configs"
    env = {**os.environ, "PYTHONPATH": str(site_034), "DEVICE": "NVIDIA_H200", "TUNE_MOE_CONFIGS": str(root),
           "VLLM_TUNED_CONFIG_FOLDER": str(tmp_path / "configs")}
    done = subprocess.run([sys.executable, "-c", dockerfile_script()], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in (root / "vllm-0.34" / "NVIDIA_H200").glob("E=*.json") if "provenance" not in p.name)
    assert len(names) == 12
    assert done.stdout.splitlines() == [f"vLLM 0.34.0 loads vllm-0.34/NVIDIA_H200/{n}" for n in names]


def test_what_a_file_tuned_under_0_33_meets_under_0_34(tmp_path):
    """``launch_changes`` per file kind, and preflight's drift line for a file tuned under 0.33 that a 0.34 serve
    reads (and verify's, re-timing it with 0.34's kernel): block FP8 changes its launch, bf16 does not (0.26
    against 0.33 differs for EP files)."""
    from conftest import provenance_for
    from tuning import gpus, provenance, verify
    from tuning.serve import preflight
    from tuning.configs import read_config_file, write_config_file
    from tuning.vllm.rules import launch_changes

    fp8_ep, bf16_ep = MoeShape(72, 288, 1280, 4096, 8, "fp8", (128, 128)), MoeShape(72, 288, 1280, 4096, 8, "bf16")
    fp8_tp = MoeShape(288, 288, 640, 4096, 8, "fp8", (128, 128))
    assert launch_changes("0.33.0", "0.34.0", fp8_ep) == ["reads block-FP8 weights through a TMA descriptor"]
    assert launch_changes("0.33.0", "0.34.0", bf16_ep) == []
    assert launch_changes("0.34", "0.33", fp8_tp) == [
        "reads block-FP8 weights by pointer, not through a TMA descriptor"]
    assert launch_changes("0.26.0", "0.33.0", bf16_ep) == ["drops the remote experts' slots"]
    node = preflight.Node(gpu=gpus.get_gpu("H200"), env={}, config_dir=tmp_path, vllm_version="0.34.0")
    lines = {}
    for name in ("E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json",
                 "E=72,N=1280,device_name=NVIDIA_H200.json"):
        write_config_file(tmp_path / name, {1: TMA_TILE}, "3.8.0")
        provenance.write(tmp_path / name, provenance_for(tmp_path / name, read_config_file(tmp_path / name)))
        lines[name] = [d for d in preflight._drift(tmp_path / name, node) if d.startswith("tuned for vLLM")]
        lines[name] += [d for d in verify._drift(tmp_path / name, "0.34.0").splitlines()[1:] if "launch:" in d]
    assert list(lines.values()) == [
        ["tuned for vLLM 0.33.0, the serve runs vLLM 0.34.0, which reads block-FP8 weights through a TMA descriptor: "
         "tune it for 0.34.0",
         "  launch: tuned under vLLM 0.33.0; vLLM 0.34.0, whose kernel re-times it, reads block-FP8 weights through a "
         "TMA descriptor: its entries may lose to that release's default; tune for it"],
        []]  # a bf16 file 0.34 launches as 0.33 does is a tune for 0.34 (kernels_configs/vllm-0.34 holds them)


def test_the_committed_0_34_folder_is_a_tune_for_a_0_34_serve(src, monkeypatch):
    """With vLLM 0.34 installed, preflight finds no drift in kernels_configs/vllm-0.34: its FP8 files were tuned under
    0.34, and its bf16 files under 0.33, whose launch of them 0.34 keeps (another kernel file, one launch). The 0.33
    folder's FP8 files are drift for that serve, on both counts."""
    from tuning import gpus
    from tuning.serve import preflight

    monkeypatch.setattr(preflight, "installed_fused_moe", lambda: src)
    monkeypatch.setattr(preflight, "installed_vllm_version", lambda: "0.34.0")
    root = Path(__file__).resolve().parents[1] / "kernels_configs"
    node = preflight.Node(gpu=gpus.get_gpu("H200"), env={}, config_dir=root / "vllm-0.34" / "NVIDIA_H200",
                          vllm_version="0.34.0")
    files = sorted(f for f in (root / "vllm-0.34" / "NVIDIA_H200").glob("E=*.json") if "provenance" not in f.name)
    assert len(files) == 12
    assert {f.name: preflight._drift(f, node) for f in files} == {f.name: [] for f in files}
    old = root / "vllm-0.33" / "NVIDIA_H200" / "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
    assert preflight._drift(old, node) == [
        "tuned for vLLM 0.33.0, the serve runs vLLM 0.34.0, which reads block-FP8 weights through a TMA descriptor: "
        "tune it for 0.34.0", "tuned on another fused_moe_kernel source than the installed vLLM's"]


@pytest.mark.parametrize("version, read_in", [("0.35", "0.34"), ("0.30", "0.26")])
def test_a_release_whose_launch_was_not_read_says_which_was(tune, version, read_in):
    rc, out, _ = tune("--gpu", "H200", "--dtype", "bf16", "--vllm-version", version, "--dry-run")
    assert rc == 0
    assert out.splitlines()[0].endswith(f"vLLM {version} launch rules (read in vLLM {read_in}'s source; {version}'s "
                                        "own launch is not checked)")


# --- the sorted-activation path of a `_down.json` file -------------------------------------------------------

SORTED_SHAPE = MoeShape(8, 8, 128, 4096, 2, "fp8", (128, 128))  # hidden 4096, as Step-3.5-Flash: the path's floor
DOWN = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4,
        "num_stages": 3, "USE_TMA": True}


@pytest.fixture
def interpretable_libdevice(monkeypatch):
    """Triton's interpreter has no libdevice: 0.34's sorted quantisation kernel calls libdevice.exp, which runs here
    as tl.exp (the interpreter's numpy exp); the rest of the kernel is vLLM's."""
    import triton.language as tl
    from triton.language.extra.cuda import libdevice

    monkeypatch.setattr(libdevice, "exp", lambda x, **_: tl.exp(x))


def test_the_sorted_down_path_equals_the_float_reference_and_the_plain_path(site_034, kernel, interpretable_libdevice):
    """vLLM 0.34's sorted-activation path as an H200 runs it (w13 writing slot order, _silu_mul_quant_sorted_kernel,
    w2 reading through an A descriptor with the `_down.json` entry's tiles and w13's BLOCK_SIZE_M), vLLM's kernels
    loaded from its source: against the float reference, and the plain path's output on the same inputs."""
    from tuning.bakeoff.layer_inputs import batch, errors, float_weights, quantised, reference
    from tuning.bakeoff.path_triton import TritonPath
    from tuning.bakeoff.vllm_helpers import VllmSource, load_helpers

    helpers = load_helpers(VllmSource(str(site_034)))
    w = float_weights(SORTED_SHAPE, 0, torch.device("cpu"), torch.float16)
    q, b = quantised(w, (128, 128)), batch(SORTED_SHAPE, 12, 1, 3, torch.device("cpu"), torch.float16)
    ref = reference(w, b, "silu")
    up = TileConfig(16, 64, 128, 1, 4, 3)
    common = dict(config=up, activation="silu", e8m0=True, capability=90)
    plain = TritonPath(kernel, helpers, SORTED_SHAPE, q, b, **common)
    sorted_ = TritonPath(kernel, helpers, SORTED_SHAPE, q, b, down=DOWN, **common)
    assert plain.down is None and sorted_.down == TileConfig(16, 128, 128, 1, 4, 3)
    assert "silu_and_mul" in plain.cuda_ops and "silu_and_mul" not in sorted_.cuda_ops
    calls = Recorder(kernel.fn)
    out_plain = plain.run().clone()
    out_sorted = TritonPath(replace(kernel, fn=calls), helpers, SORTED_SHAPE, q, b, down=DOWN, **common).run()
    (_, first), (_, second) = calls.calls
    assert (first["C_IS_SORTED"], first["USE_TMA_A"], second["C_IS_SORTED"], second["USE_TMA_A"]) == \
        (True, False, False, True)
    assert second["a_desc"].block_shape == [16, 128] and second["BLOCK_SIZE_N"] == 128
    (rel_plain, diff_plain), (rel_sorted, diff_sorted) = errors(out_plain, ref), errors(out_sorted, ref)
    assert diff_sorted < 0.02 and abs(diff_sorted - diff_plain) < 1e-3 and abs(rel_sorted - rel_plain) < 0.01
    torch.testing.assert_close(out_sorted, out_plain, rtol=0.02, atol=0.02)
    assert out_sorted.abs().sum() > 0


@pytest.mark.parametrize("change,runs", [
    ({}, True), ({"down": {**DOWN, "USE_TMA": False}}, False), ({"down": None}, False),
    ({"activation": "swiglustep"}, False), ({"e8m0": False}, False), ({"expert_parallel": True}, False),
    ({"naive": True}, False), ({"capability": 100}, False), ({"block_shape": (64, 64)}, False),
    ({"block_m": 8}, False), ({"hidden": 2048}, False), ({"down": {**DOWN, "BLOCK_SIZE_N": 96}}, False),
    ({"n": 160}, False),
])
def test_when_vllm_0_34_takes_the_sorted_down_path(change, runs):
    from tuning.vllm.rules import sorted_down_runs

    facts = dict(down=DOWN, activation="silu", e8m0=True, expert_parallel=False, naive=False, capability=90,
                 block_shape=(128, 128), block_m=16, hidden=4096, n=640)
    assert sorted_down_runs(**{**facts, **change}) is runs


def test_preflight_names_the_down_file_a_0_34_serve_reads(tmp_path, monkeypatch, capsys):
    """A 0.34 TP2 FP8 serve on the H200 reads `<file>_down.json` for its SiLU layers (not the SwiGLU-step ones, not
    under EP, not under 0.33, not on sm100): preflight names it, says none is there and why tune-moe writes none, and
    says so again where one is; the serve's own files are all it needs."""
    import shutil

    from tuning.cli import main

    folder = tmp_path / "configs"
    shutil.copytree(Path(__file__).parents[1] / "kernels_configs" / "vllm-0.34" / "NVIDIA_H200", folder)
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(folder))
    down = "E=288,N=640,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128]_down.json"

    def pre(gpu, release, *flags) -> str:
        main(["preflight", "--gpu", gpu, "--vllm-version", release, "--", "vllm", "serve",
              "stepfun-ai/Step-3.5-Flash-FP8", *flags])
        return capsys.readouterr().out

    out = pre("H200", "0.34.0", "--tensor-parallel-size", "2")
    (line,) = [li for li in out.splitlines() if "down file" in li]
    assert line == (f"    down file {down}: none, so vLLM 0.34 runs the plain path (tune-moe writes none: the sorted "
                    "path a down file unlocks measured 0.94-0.98x of it on the H200 for this model's E=288 N=640 shard "
                    "(benchmarks/README §2z))")
    assert out.index("SiLU layers") < out.index("down file") < out.index("SwiGLU-step layers")
    assert "\nok: every MoE layer kind" in out
    (folder / down).write_text('{"1024": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, '
                               '"GROUP_SIZE_M": 64, "num_warps": 4, "num_stages": 3, "USE_TMA": true}}')
    out = pre("H200", "0.34.0", "--tensor-parallel-size", "2")
    assert f"    down file {folder / down}: vLLM 0.34 takes the sorted-activation path" in out
    for gpu, release, flags in (("H200", "0.33.0", ["--tensor-parallel-size", "2"]),
                                ("H200", "0.34.0", ["--data-parallel-size", "4", "--enable-expert-parallel"]),
                                ("H200", "0.34.0", ["--tensor-parallel-size", "4"]),  # a refined [64,64] block
                                ("B200", "0.34.0", ["--tensor-parallel-size", "2"])):
        assert "down file" not in pre(gpu, release, *flags), (gpu, release, flags)


def test_the_sorted_down_rule_has_every_term_of_vllm_0_34s(site_034):
    """vLLM 0.34's condition for the sorted path (experts/triton_moe.py, ``use_sorted_a``), term by term, against the
    fact of ``sorted_down_runs`` / ``reads_down_file`` that stands for it, or why it holds in every serve tune-moe
    plans; a term vLLM adds or drops fails here; and what vLLM reads the entry from."""
    fused = site_034 / "vllm" / "model_executor" / "layers" / "fused_moe"
    tree = ast.parse((fused / "experts" / "triton_moe.py").read_text())
    (cond,) = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
               and [ast.unparse(t) for t in n.targets] == ["use_sorted_a"]]
    terms = [ast.unparse(t) for t in cond.args[0].values]
    covered = {
        "tma_down_config": "down: the `_down.json` entry nearest to M",
        "tma_down_config.pop('USE_TMA', False)": "down['USE_TMA']",
        "self._enable_sorted_a_tma": "True in TritonExperts.__init__",
        "activation == MoEActivation.SILU": "activation == 'silu'",
        "self.activation_config.clamp_limit is None": "Step-3.5-Flash's SiLU layers have no clamp",
        "self._lora_context is None": "no LoRA",
        "not hooked": "no post-GEMM2 hook (no shared-expert fusion into GEMM2)",
        "not self.quantization_emulation": "real FP8, not emulated",
        "is_deep_gemm_e8m0_used()": "e8m0",
        "a2_scale is None": "block FP8 quantises the activation dynamically",
        "sorted_token_ids is not None": "not naive",
        "expert_map is None": "not expert_parallel",
        "workspace2.dtype == torch.bfloat16": "bf16 activations (the checkpoint's)",
        "current_platform.is_cuda()": "capability == 90",
        "current_platform.is_device_capability(90)": "capability == 90",
        "config['BLOCK_SIZE_M'] % 16 == 0": "block_m % 16 == 0",
        "w2.is_contiguous()": "vLLM's weights are contiguous",
        "w2.size(1) >= 4096": "hidden >= 4096",
        "w2.size(1) % tma_down_config['BLOCK_SIZE_N'] == 0": "hidden % down['BLOCK_SIZE_N'] == 0",
        "cache2_dim % 128 == 0": "n % 128 == 0",
    }
    assert sorted(terms) == sorted(covered)
    reading = ast.unparse(next(n for n in ast.walk(tree) if isinstance(n, ast.Assign)
                               and [ast.unparse(t) for t in n.targets] == ["down_configs"]).value)
    assert "self.quant_config.use_fp8_w8a8 and self.block_shape == [128, 128] and (not get_config())" in reading
    assert "down_moe=True" in reading



def test_vllm_0_34_reads_the_down_file_preflight_names(site_034, tmp_path):
    """vLLM 0.34's own get_moe_configs(..., down_moe=True), the device name patched to the H200's, reads the file
    ``down_file_name`` gives for the TP2 shard from VLLM_TUNED_CONFIG_FOLDER, and finds none without it (silently:
    vLLM warns only for the tuned file)."""
    from tuning.vllm.rules import down_file_name

    tuned = "E=288,N=640,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
    entry = {"1024": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 64,
                      "num_warps": 4, "num_stages": 3, "USE_TMA": True}}
    script = """import json, os
from vllm.model_executor.layers.fused_moe import fused_moe
fused_moe.get_device_name_as_file_name = lambda device_id=0: "NVIDIA_H200"
print(json.dumps(fused_moe.get_moe_configs(288, 640, "fp8_w8a8", 128, 128, down_moe=True)))"""
    env = {**os.environ, "PYTHONPATH": str(site_034), "VLLM_TUNED_CONFIG_FOLDER": str(tmp_path)}

    def vllm_reads():
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])

    assert vllm_reads() is None
    (tmp_path / down_file_name(tuned)).write_text(json.dumps(entry))
    assert down_file_name(tuned) == tuned.removesuffix(".json") + "_down.json"
    assert vllm_reads() == entry


def test_a_found_down_file_in_vllm_0_34s_log_is_what_preflight_predicts(site_034, tmp_path):
    """vLLM 0.34's own get_moe_configs and logger write the lines a TP2 FP8 serve logs with a `_down.json` beside
    its tuned file: the log check (``agreement``) takes the down file as one the layer kinds look up, for both kinds
    (vLLM looks it up for every FP8 [128,128] TritonExperts call, also where the sorted path never runs), and
    without that prediction would report it as a file preflight did not predict."""
    from tuning.serve import preflight as pf
    from tuning.gpus import get_gpu
    from tuning.serve.checks import Preflight
    from tuning.vllm.log import agreement, read_log
    from tuning.vllm.rules import down_file_name

    tuned = "E=288,N=640,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
    entry = {"1": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4,
                   "num_stages": 3}}
    (tmp_path / tuned).write_text(json.dumps(entry))
    (tmp_path / down_file_name(tuned)).write_text(json.dumps({"1": {**entry["1"], "USE_TMA": True}}))
    script = """import vllm.logger
vllm.logger._configure_vllm_root_logger()
from vllm.model_executor.layers.fused_moe import fused_moe
fused_moe.get_device_name_as_file_name = lambda device_id=0: "NVIDIA_H200"
fused_moe.get_moe_configs(288, 640, "fp8_w8a8", 128, 128)
fused_moe.get_moe_configs(288, 640, "fp8_w8a8", 128, 128, down_moe=True)"""
    env = {**os.environ, "PYTHONPATH": str(site_034), "VLLM_TUNED_CONFIG_FOLDER": str(tmp_path),
           "VLLM_LOGGING_LEVEL": "INFO"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = read_log(done.stdout + done.stderr)
    assert facts.loaded == [str(tmp_path / tuned), str(tmp_path / down_file_name(tuned))] and not facts.missing

    node = pf.Node(gpu=get_gpu("H200"), env={"VLLM_TUNED_CONFIG_FOLDER": str(tmp_path)}, config_dir=tmp_path,
                   vllm_version="0.34.0")
    pre = Preflight(pf.check(["vllm", "serve", "stepfun-ai/Step-3.5-Flash-FP8", "--tensor-parallel-size", "2"], node),
                    node)
    predicted = pre.predicted()
    assert [(p.file, p.down_file) for p in predicted] == [(tuned, down_file_name(tuned))] * 2
    assert not [p for p in agreement(facts, predicted) if "tuned files" in p]
    without = [replace(p, down_file=None) for p in predicted]
    (problem,) = [p for p in agreement(facts, without) if "tuned files" in p]
    assert f"vLLM looked up {down_file_name(tuned)}, which preflight did not predict" in problem


def test_the_down_entry_is_the_one_vllm_0_34_picks(site_034, tmp_path):
    """``bakeoff.down_entry`` on vLLM 0.34's own DeepSeek-V3 H200 `_down.json`: the entry nearest to M, ties to the
    first key, as experts/triton_moe.py's ``min(down_configs, key=...)`` over the loaded dict; ``tuned_down`` finds
    the file beside a shape's tuned file, and none where there is none."""
    import json
    import shutil

    from tuning.bakeoff.layer import down_entry, tuned_down

    name = "E=256,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128]_down.json"
    shipped = site_034 / "vllm" / "model_executor" / "layers" / "fused_moe" / "configs" / name
    loaded = {int(k): v for k, v in json.loads(shipped.read_text()).items()}  # get_moe_configs's dict
    for m in (1, 256, 700, 1023, 1024, 2048, 2500, 3072, 3584, 8192):
        assert down_entry(shipped, m) == loaded[min(loaded, key=lambda k: abs(k - m))], m
    assert [bool(down_entry(shipped, m).get("USE_TMA")) for m in (256, 1024, 2048, 3072, 4096)] == \
        [False, True, True, True, False]
    shape = MoeShape(256, 256, 256, 7168, 8, "fp8", (128, 128))
    assert tuned_down(tmp_path, shape, "NVIDIA_H200", 1024) is None
    shutil.copy(shipped, tmp_path / name)
    assert tuned_down(tmp_path, shape, "NVIDIA_H200", 1024)["BLOCK_SIZE_N"] == 128


@pytest.mark.parametrize("release", ["0.33.0", "0.34.0"])
def test_neither_release_bundles_a_file_any_plan_names(release, site_034):
    """preflight says a serve without VLLM_TUNED_CONFIG_FOLDER reads only vLLM's own configs, "none for this model",
    and validate-serve's A/B takes that serve as vLLM's default: neither release bundles a file of any name a plan
    of either checkpoint names (every GPU, every layout of 1-16 GPUs, every --moe-backend that changes a shape, and
    the `_down.json` files 0.34 reads), nor any file for the model's 288 experts."""
    from tuning.gpus import CATALOGUE
    from tuning.models import load_model
    from tuning.plan import make_plan
    from tuning.shapes import default_layouts, parse_layout
    from tuning.vllm.rules import down_file_name

    pkg = site_034 / "vllm" if release == "0.34.0" else Path(importlib.util.find_spec("vllm").origin).parent
    bundled = {p.name for p in (pkg / "model_executor/layers/fused_moe/configs").glob("*.json")}
    assert len(bundled) > 300  # the release's own folder, read
    layouts = default_layouts(8) + [parse_layout(x) for x in ("TP16", "TP16+EP", "DP16+EP")]
    names = set()
    for gpu in CATALOGUE.values():
        for dtype, model in (("bf16", "stepfun-ai/Step-3.5-Flash"), ("fp8", "stepfun-ai/Step-3.5-Flash-FP8")):
            for backend in ("auto", "triton", "deep_gemm"):
                plan = make_plan(load_model(model), gpu, dtype, layouts, 16, (1,), vllm_version=release,
                                 moe_backend=backend, check_fit=False)
                names |= {f(plan.file_name(s)) for s in plan.shapes for f in (str, down_file_name)}
    assert len(names) > 40 and "E=288,N=320,device_name=NVIDIA_H200.json" in names
    assert not names & bundled
    assert not [n for n in bundled if n.startswith("E=288,")]
