"""vLLM 0.33's real fused_moe_kernel, loaded from vLLM's own source file, under Triton's interpreter.

fp16 stands in for bf16 (the interpreter mishandles bf16 dots); bf16 is proven on the GPU
(benchmarks/kernel_default.md).
"""

import math
from dataclasses import replace

import pytest
import torch

from tuning import launch
from tuning.configs import TileConfig
from tuning.errors import UsageError
from tuning.gpus import get_gpu
from tuning.jobs import FailureKind
from tuning.inputs import TOLERANCE, build_problem, expert_map, reference, route
from tuning.routing import Routing
from tuning.vllm.kernel import KernelSource, load_from_path
from tuning.roofline import roofline
from tuning.runner import Runner
from tuning.shapes import MoeShape

H200 = get_gpu("H200")
TP = MoeShape(16, 16, 64, 128, 2, "bf16")  # all experts local
EP = MoeShape(8, 16, 64, 128, 2, "bf16")  # half the experts on this GPU
FP8_TP = MoeShape(16, 16, 128, 256, 2, "fp8", (64, 64))
FP8_EP = MoeShape(8, 16, 128, 256, 2, "fp8", (64, 64))


@pytest.fixture(scope="module")
def kernel(fused_moe_py):
    return KernelSource(str(fused_moe_py)).load()


def test_loads_vllm_source_with_its_version(kernel):
    assert kernel.vllm_version.startswith("0.33")
    for name in ("naive_block_assignment", "SWAP_AB", "USE_TD", "SPLIT_K", "group_n", "group_k"):
        assert name in kernel.params
    assert kernel.align_op is None  # loaded on its own: vLLM itself is not imported


def test_unknown_signature_is_refused_naming_the_version(fused_moe_py, tmp_path):
    swap = "    SWAP_AB: tl.constexpr,\n"
    src = fused_moe_py.read_text().replace(swap, swap + "    FUTURE_FLAG: tl.constexpr,\n", 1)
    assert "FUTURE_FLAG" in src
    path = tmp_path / "fused_moe.py"
    path.write_text(src)
    with pytest.raises(UsageError, match=r"vLLM 9\.9.*FUTURE_FLAG"):
        load_from_path(path, "9.9")


@pytest.mark.parametrize("source,match", [
    ("import os\n\n\ndef helper():\n    pass\n", "lacks a @triton.jit fused_moe_kernel and get_default_config"),
    ("@triton.jit(do_not_specialize=nope)\ndef fused_moe_kernel(a_ptr):\n    pass\n\n\n"
     "def get_default_config(M):\n    return {}\n", "its kernels do not load \\(NameError"),
    ("@triton.jit\ndef fused_moe_kernel(a_ptr):\n    pass\n\n\ndef get_default_config(M):\n    return {}\n",
     "has a signature this launcher does not know"),
])
def test_a_refused_source_leaves_nothing_in_the_cache(tmp_path, monkeypatch, source, match):
    cache = tmp_path / "home" / ".cache" / "tune-moe"
    monkeypatch.setattr("tuning.vllm.kernel.CACHE_DIR", cache)
    path = tmp_path / "fused_moe.py"
    path.write_text(source)
    with pytest.raises(UsageError, match=match):
        load_from_path(path, "0.33")
    assert not (tmp_path / "home").exists()


def test_installed_vllm_on_a_host_without_a_driver_loads_its_file_on_its_own(fused_moe_py):
    """vLLM swaps Triton for a placeholder where no GPU driver is active; its kernel is then a plain function."""
    from tuning.vllm.kernel import load_installed

    if torch.cuda.is_available():
        pytest.skip("a GPU host: vLLM imports the real Triton")
    kernel = load_installed()
    assert kernel.origin == f"source {fused_moe_py}"
    assert "a_ptr" in kernel.params and kernel.align_op is None


def test_the_drivers_read_of_the_kernel_is_what_its_workers_load_without_torch(fused_moe_py):
    """The sweep's driver reads the kernel (installed, or a --vllm-src file) without importing torch, Triton or vLLM:
    the same release, hash and parameters its workers load."""
    import subprocess
    import sys

    code = ("import sys; from tuning.vllm.kernel import KernelSource\n"
            "for k in (KernelSource(None).read(), KernelSource(sys.argv[1]).read()):\n"
            "    print(k.vllm_version, k.source_sha256, ','.join(k.params))\n"
            "print(sorted(m for m in ('torch', 'triton', 'vllm') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, str(fused_moe_py)], capture_output=True, text=True, check=True)
    *read, imported = run.stdout.splitlines()
    loaded = KernelSource(str(fused_moe_py)).load()
    assert read == [f"{loaded.vllm_version} {loaded.source_sha256} {','.join(loaded.params)}"] * 2
    assert imported == "[]"
    with pytest.raises(UsageError, match=f"the installed vLLM is {loaded.vllm_version}, not 0.26;"):
        KernelSource(None, "0.26").read()


def test_missing_source_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        KernelSource(str(tmp_path / "nope.py")).load()


@pytest.mark.parametrize("shape,m,naive", [
    (TP, 1, True),  # 1 * 2 * 4 <= 16: one (token, expert) pair per block
    (TP, 16, False),
    (EP, 4, False),  # an expert map never takes the naive path
    (FP8_TP, 2, True),
    (FP8_TP, 16, False),
    (FP8_EP, 16, False),
])
def test_default_config_matches_float_reference(kernel, shape, m, naive):
    assert_default_config_matches(kernel, shape, m, naive)


def assert_default_config_matches(kernel, shape: MoeShape, m: int, naive: bool) -> None:
    """vLLM's default config for (shape, M) takes the expected path and equals the float reference."""
    runner = Runner(kernel, shape, m, H200, Routing(), seed=1)
    assert (runner.alignment(16).sorted_token_ids is None) is naive
    err = runner.check(runner.default_config())
    assert err <= TOLERANCE[shape.dtype if shape.dtype == "fp8" else "bf16"]
    assert err < 5e-3  # dequantised inputs: only accumulation order and output rounding differ


@pytest.mark.parametrize("config", [
    TileConfig(32, 32, 64, 1, 4, 2),
    TileConfig(16, 128, 64, 16, 4, 3),
    TileConfig(64, 64, 128, 1, 8, 2),
])
def test_other_tiles_match_reference_on_fp8_ep(kernel, config):
    runner = Runner(kernel, FP8_EP, 24, H200, Routing(), seed=2)
    assert runner.check(config) < 5e-3


def test_a_wrong_result_is_rejected_with_its_error(kernel):
    runner = Runner(kernel, TP, 16, H200, Routing(), seed=3)
    runner.problem.w2.mul_(1.5)  # the reference was not built yet: poison the weights afterwards instead
    runner._reference = reference(runner.problem)
    runner.problem.w2.div_(1.5)
    out = runner.evaluate(runner.default_config(), budget_ms=1)
    assert not out.ok and out.failure.kind is FailureKind.NUMERICS and out.error > 0.1


def test_launcher_matches_vllms_own_invoke(kernel, monkeypatch):
    """Our launch of the kernel equals vLLM 0.33's invoke_fused_moe_triton_kernel, bit for bit.

    Without a GPU vLLM swaps Triton for a placeholder, so its launcher is handed the same
    (interpreted) kernel and the real Triton module.
    """
    fm = pytest.importorskip("vllm.model_executor.layers.fused_moe.fused_moe")
    import triton

    monkeypatch.setattr(fm, "fused_moe_kernel", kernel.fn)
    monkeypatch.setattr(fm, "triton", triton)
    p = build_problem(FP8_EP, 16, Routing(), 4, torch.device("cpu"), torch.float16)
    cfg = TileConfig(16, 64, 128, 1, 4, 3)
    al = launch.align(p.topk_ids, cfg.BLOCK_SIZE_M, FP8_EP.global_experts, p.expert_map)
    ours, theirs = p.c1.clone().fill_(0), p.c1.clone().fill_(0)
    launch.invoke(kernel, replace(launch.w13(p), c=ours), al, cfg, block_shape=(64, 64), capability=0)
    import triton.language as tl

    fm.invoke_fused_moe_triton_kernel(
        p.a1, p.w13, theirs, p.a1_scale, p.w13_scale, None, al.sorted_token_ids, al.expert_ids,
        al.num_tokens_post_padded, False, 2, cfg.to_dict(), compute_type=tl.float16, use_fp8_w8a8=True,
        use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=False,
        block_shape=[64, 64])
    assert torch.equal(ours, theirs)
    assert ours.abs().sum() > 0


@pytest.mark.parametrize("shape,block_m", [(TP, 16), (EP, 16), (EP, 32), (FP8_EP, 64)])
def test_alignment_layout(shape, block_m):
    gen = torch.Generator().manual_seed(5)
    ids, _ = route(40, shape, Routing(), gen, "cpu")
    emap = expert_map(shape, "cpu")
    al = launch.align(ids, block_m, shape.global_experts, emap)
    numel, E = ids.numel(), shape.global_experts
    assert al.sorted_token_ids.numel() == min(numel * block_m, numel + E * (block_m - 1)) if numel < E else \
        al.sorted_token_ids.numel() == numel + E * (block_m - 1)
    local = (emap[ids.long()] if emap is not None else ids).reshape(-1).long()
    total = int(al.num_tokens_post_padded)
    assert total % block_m == 0
    body = al.sorted_token_ids[:total].long()
    real = body[body < numel]
    assert sorted(real.tolist()) == (local >= 0).nonzero().squeeze(1).tolist()  # each local slot once
    block_of = torch.arange(total) // block_m
    assert torch.equal(al.expert_ids[block_of[body < numel]].long(), local[real])  # slot sits in its expert's blocks
    counts = torch.bincount(local[local >= 0], minlength=shape.num_experts)
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())


@pytest.mark.parametrize("shape,block_m,m", [(TP, 16, 40), (TP, 64, 3), (EP, 32, 40), (FP8_EP, 64, 1000)])
def test_the_pools_meta_alignment_has_the_real_ones_sizes(shape, block_m, m):
    """The compile pool aligns on meta tensors: only sizes and dtypes, which set EM, the grid and Triton's
    specialisation, and they must be the timed run's."""
    gen = torch.Generator().manual_seed(5)
    ids, _ = route(m, shape, Routing(), gen, "cpu")
    emap = expert_map(shape, "cpu")
    real = launch.align(ids, block_m, shape.global_experts, emap)
    meta = launch.align(ids.to("meta"), block_m, shape.global_experts, None if emap is None else emap.to("meta"))
    for r, t in [(real.sorted_token_ids, meta.sorted_token_ids), (real.expert_ids, meta.expert_ids),
                 (real.num_tokens_post_padded, meta.num_tokens_post_padded)]:
        assert t.is_meta and (t.shape, t.dtype, t.stride()) == (r.shape, r.dtype, r.stride())


FP8_PADDED = MoeShape(8, 16, 64, 320, 2, "fp8", (128, 64))  # w2's K rows pad to 384


@pytest.mark.parametrize("shape", [TP, EP, FP8_TP, FP8_EP, FP8_PADDED])
def test_the_pools_meta_problem_has_the_real_ones_sizes(shape):
    """The compile pool builds its problem on meta tensors (FP8 without torch's meta kernels, whose imports
    cost 3.5 s a process on an H200 host): every tensor must have the timed run's size, dtype and strides,
    or the worker's launch would miss the pool's kernels."""
    real = build_problem(shape, 5, Routing(), 0, "cpu")
    meta = build_problem(shape, 5, Routing(), 0, "meta")
    for name, r in vars(real).items():
        if isinstance(r, torch.Tensor):
            t = getattr(meta, name)
            assert t.is_meta and (t.shape, t.dtype, t.stride()) == (r.shape, r.dtype, r.stride()), name


def test_naive_assignment_threshold():
    assert launch.use_naive(9, 8, 288, False) and not launch.use_naive(10, 8, 288, False)
    assert not launch.use_naive(1, 8, 288, True)


def test_swap_ab_rule():
    assert launch.swap_ab(True, TileConfig(16, 64, 128, 1, 4, 3), 90)
    assert not launch.swap_ab(True, TileConfig(64, 64, 128, 1, 4, 3), 90)
    assert not launch.swap_ab(True, TileConfig(16, 32, 128, 1, 4, 3), 90)
    assert not launch.swap_ab(False, TileConfig(16, 64, 128, 1, 4, 3), 90)
    assert not launch.swap_ab(True, TileConfig(16, 64, 128, 1, 4, 3), capability=0)


def test_uniform_routing_statistics():
    shape = MoeShape(72, 288, 1280, 4096, 8, "fp8", (128, 128))
    ids, w = route(4096, shape, Routing(), torch.Generator().manual_seed(0), "cpu")
    assert all(len(set(row)) == 8 for row in ids.tolist())  # top-8 distinct experts per token
    counts = torch.bincount(ids.reshape(-1).long(), minlength=288).float()
    mean = 4096 * 8 / 288
    assert abs(counts.mean().item() - mean) < 1e-6
    assert 0.7 < counts.std().item() / math.sqrt(mean * (1 - 1 / 36)) < 1.3  # binomial spread
    local_share = (ids < 72).float().mean().item()
    assert abs(local_share - 0.25) < 0.01  # faithful EP: a quarter of the slots are this GPU's
    assert torch.allclose(w.sum(1), torch.ones(4096))


@pytest.mark.parametrize("routing", ["uniform", "zipf:1.2"])
def test_an_expert_parallel_draw_is_a_typical_ranks(routing):
    """DP8+EP (36 of 288 experts here): the local slots are M x 8 x 36/288 = M, exactly at small M (a free
    draw at M = 1 routes nothing here one time in three), within 2% at large M; a shard that is not
    expert-parallel draws once, as before."""
    dp8 = MoeShape(36, 288, 1280, 4096, 8, "fp8", (128, 128))
    for m in (1, 2, 3, 4, 8, 16, 4096):
        for seed in range(4):
            ids, _ = route(m, dp8, Routing.parse(routing), torch.Generator().manual_seed(seed), "cpu")
            local = int((ids < 36).sum())
            assert local == m if m < 25 else abs(local - m) <= 0.02 * m
    empty = sum(int((torch.rand(1, 288).topk(8).indices < 36).sum()) == 0 for _ in range(3000)) / 3000
    assert 0.30 < empty < 0.38  # (1 - 36/288)^8 = 0.34: why a free draw will not do
    full = MoeShape(288, 288, 320, 4096, 8, "bf16")
    gen, again = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ids, _ = route(64, full, Routing(), gen, "cpu")
    gumbel = -torch.log(-torch.log(torch.rand(64, 288, generator=again).clamp_(1e-20, 1 - 1e-7)))
    assert torch.equal(ids.long(), gumbel.topk(8, dim=1).indices)


def test_zipf_routing_is_skewed():
    shape = MoeShape(288, 288, 320, 4096, 8, "bf16")
    ids, _ = route(4096, shape, Routing.parse("zipf:1.2"), torch.Generator().manual_seed(0), "cpu")
    counts = torch.bincount(ids.reshape(-1).long(), minlength=288).float().sort(descending=True).values
    assert counts[0] > 5 * counts[144]
    with pytest.raises(UsageError):
        Routing.parse("zipf:x")


def test_roofline_arithmetic():
    shape = MoeShape(72, 288, 1280, 4096, 8, "fp8", (128, 128))
    r = roofline(shape, H200, m=1024, touched_experts=72, pairs=2048)
    weights = 72 * 3 * 1280 * 4096 + 72 * 4 * (20 * 32 + 32 * 10)
    acts = 1024 * 4096 + 2048 * 1280 + 4 * (1024 * 32 + 2048 * 10)
    outs = 2048 * (2560 + 4096) * 2
    assert r.bytes == weights + acts + outs
    assert r.flops == 2 * 2048 * 3 * 1280 * 4096
    assert math.isclose(r.memory_us, r.bytes / 4.8e12 * 1e6)
    assert math.isclose(r.compute_us, r.flops / 1979e12 * 1e6)
    assert r.bound == "memory" and math.isclose(r.percent(2 * r.bound_us), 50.0)
