"""What vLLM 0.33's own selection code runs for Step-3.5-Flash's MoE layers (tuning/vllm/probe.py).

The grid runs in one probe subprocess (about a minute: importing vLLM dominates); its answers are
saved as a test artifact under the test's tmp folder. The facts below were read in vLLM's
oracle/fp8.py, oracle/unquantized.py and the experts classes; they are the claims this project
publishes, and vLLM's answers decide them.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import itertools
import json
import subprocess
import sys
import textwrap
import time
import typing
from dataclasses import asdict
from pathlib import Path

import pytest

from tuning.vllm.probe import probe
from tuning.vllm.rules import MOE_BACKENDS, LayerRuntime, ServeFacts, normalize_moe_backend

REPO = Path(__file__).resolve().parent.parent
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM 0.33 installed")

LAYOUTS = {  # name: (tp, dp, ep)
    "TP1": (1, 1, False), "TP2": (2, 1, False), "TP4": (4, 1, False), "TP8": (8, 1, False),
    "TP2+EP": (2, 1, True), "TP4+EP": (4, 1, True), "TP8+EP": (8, 1, True),
    "DP2+EP": (1, 2, True), "DP4+EP": (1, 4, True), "DP8+EP": (1, 8, True),
    "DP2": (1, 2, False), "DP4": (1, 4, False),
}
EP_LAYOUTS = [name for name, (_, _, ep) in LAYOUTS.items() if ep]
REFINED = ["TP4", "TP8", "DP4"]  # 1280 / 4 or 8 is not a multiple of 128
WHOLE_BLOCKS = ["TP1", "TP2", "DP2", *EP_LAYOUTS]
ENVS = {
    "none": (),
    "DG=0": (("VLLM_USE_DEEP_GEMM", "0"),),
    "DG=1": (("VLLM_MOE_USE_DEEP_GEMM", "1"), ("VLLM_USE_DEEP_GEMM", "1")),
    "E8M0=0": (("VLLM_USE_DEEP_GEMM_E8M0", "0"),),
    "BI=1": (("VLLM_BATCH_INVARIANT", "1"),),
}
BF16_ENVS = ("none", "BI=1")  # the unquantized oracle reads no DeepGEMM variable
# Every --moe-backend value vLLM 0.33 accepts, but "humming" and "hpc": whether those run depends on optional
# packages (humming, hpc) that a vLLM 0.33 install does not bring, so vLLM's answer depends on the machine.
BACKENDS = tuple(b for b in MOE_BACKENDS if b not in ("humming", "hpc"))
ACTS = ("silu", "swiglustep")


def grid_keys() -> list[tuple[str, ...]]:
    keys = itertools.product(("sm90", "sm100"), ("bf16", "fp8"), LAYOUTS, ACTS, BACKENDS, ENVS)
    return [k for k in keys if k[1] == "fp8" or k[5] in BF16_ENVS]


def serve_for(arch, dtype, layout, backend, env) -> ServeFacts:
    tp, dp, ep = LAYOUTS[layout]
    return ServeFacts(arch=arch, dtype=dtype, tp=tp, dp=dp, ep=ep, moe_backend=backend, env=ENVS[env])


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict[tuple[str, ...], LayerRuntime]:
    if not HAS_VLLM:
        pytest.skip("needs vLLM 0.33 installed")
    keys = grid_keys()
    start = time.monotonic()
    answers = probe([(serve_for(a, d, lay, b, e), act) for a, d, lay, act, b, e in keys])
    seconds = time.monotonic() - start
    out = tmp_path_factory.mktemp("vllm_probe") / "grid.json"
    rows = [{"key": dict(zip(("arch", "dtype", "layout", "activation", "moe_backend", "env"), k)),
             **asdict(r)} for k, r in zip(keys, answers)]
    out.write_text(json.dumps({"seconds": round(seconds, 1), "rows": rows}, indent=1))
    print(f"\nvllm_probe: {len(keys)} cases in {seconds:.1f} s -> {out}")
    return dict(zip(keys, answers))


def at(grid, arch, dtype, layout, act, *, backend="auto", env="none") -> LayerRuntime:
    return grid[(arch, dtype, layout, act, backend, env)]


def runs(r: LayerRuntime) -> tuple:
    return r.backend, r.experts, r.n, r.block


# -- the module itself ------------------------------------------------------------------------------

def test_import_is_light():
    code = "import sys, tuning.vllm.probe; print(sorted({'vllm', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("version, says", [("0.35.0", "vLLM 0.35.0 is installed; the probe reads vLLM 0.33 and 0.34"),
                                           ("0.34.0", "vLLM 0.34.0: internals differ"),
                                           ("0.33.0", "vLLM 0.33.0: internals differ")])
def test_other_vllm_fails_in_one_line(tmp_path, monkeypatch, version, says):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        probe([(ServeFacts(arch="sm90", dtype="fp8"), "silu")])
    assert says in str(err.value) and "\n" not in str(err.value)


@needs_vllm
def test_normalize_is_vllms():
    from vllm.config.kernel import KernelConfig, MoEBackend
    from vllm.engine.arg_utils import EngineArgs

    cli_type = _moe_backend_cli_type(inspect.getsource(EngineArgs.add_cli_args))
    values = typing.get_args(MoEBackend)
    assert set(BACKENDS) <= set(values)
    for value in values:
        for raw in (value, value.upper(), value.replace("_", "-"), value.title().replace("_", "-")):
            assert normalize_moe_backend(raw) == cli_type(raw) == KernelConfig(moe_backend=raw).moe_backend == value


def _moe_backend_cli_type(source: str):
    """The ``type=`` vLLM's CLI gives --moe-backend: ``moe_backend_kwargs["type"] = lambda ...``."""
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda)
                and ast.unparse(node.targets[0]) == "moe_backend_kwargs['type']"):
            return eval(compile(ast.Expression(node.value), "arg_utils", "eval"))  # noqa: S307
    raise AssertionError("vLLM's CLI no longer normalises --moe-backend with a lambda")


@needs_vllm
def test_env_facts():
    import vllm.envs as envs
    from vllm.config import ParallelConfig

    assert "VLLM_USE_FLASHINFER_MOE_FP8" not in envs.environment_variables
    assert ParallelConfig.__dataclass_fields__["all2all_backend"].default == "allgather_reducescatter"


# -- the grid ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_grid_is_complete(grid):
    assert len(grid) == 2 * 12 * 2 * len(BACKENDS) * (5 + 2) == 7392  # fp8 with 5 env variants, bf16 with 2
    for r in grid.values():
        assert (r.error is None) == (r.backend is not None) == (r.experts is not None) == (r.n is not None)
        assert r.error is None or r.error.split(":")[0].isidentifier()


@pytest.mark.slow
def test_hopper_fp8_tp_layouts(grid):
    for act in ACTS:
        assert runs(at(grid, "sm90", "fp8", "TP4", act)) == ("TRITON", "TritonExperts", 320, (64, 64))
        assert runs(at(grid, "sm90", "fp8", "TP8", act)) == ("TRITON", "TritonExperts", 160, (32, 32))
        assert runs(at(grid, "sm90", "fp8", "TP2", act)) == ("TRITON", "TritonExperts", 640, (128, 128))
        assert runs(at(grid, "sm90", "fp8", "DP4", act)) == runs(at(grid, "sm90", "fp8", "TP4", act))
        # --moe-backend deep_gemm pads the shard to whole 128 blocks instead of refining
        assert runs(at(grid, "sm90", "fp8", "TP4", act, backend="deep_gemm")) == (
            "DEEPGEMM", "TritonOrDeepGemmExperts", 384, (128, 128))
        assert runs(at(grid, "sm90", "fp8", "TP8", act, backend="deep_gemm"))[2:] == (256, (128, 128))
        assert runs(at(grid, "sm90", "fp8", "TP4", act, backend="triton")) == runs(at(grid, "sm90", "fp8", "TP4", act))


@pytest.mark.slow
def test_hopper_fp8_ep_depends_on_activation(grid):
    for layout in EP_LAYOUTS:
        assert runs(at(grid, "sm90", "fp8", layout, "silu")) == (
            "FLASHINFER_CUTLASS", "FlashInferExperts", 1280, (128, 128))
        # FlashInfer CUTLASS has no swiglustep: the next in vLLM's order is DeepGEMM
        assert runs(at(grid, "sm90", "fp8", layout, "swiglustep")) == (
            "DEEPGEMM", "TritonOrDeepGemmExperts", 1280, (128, 128))
        assert at(grid, "sm90", "fp8", layout, "swiglustep", env="DG=0").backend == "TRITON"
        assert at(grid, "sm90", "fp8", layout, "silu", backend="flashinfer_cutlass").backend == "FLASHINFER_CUTLASS"
        assert "SWIGLUSTEP" in at(grid, "sm90", "fp8", layout, "swiglustep", backend="flashinfer_cutlass").error
        for act in ACTS:
            assert at(grid, "sm90", "fp8", layout, act, env="BI=1").backend == "TRITON"


@pytest.mark.slow
def test_e8m0(grid):
    for arch, dtype in itertools.product(("sm90", "sm100"), ("bf16", "fp8")):
        assert at(grid, arch, dtype, "TP4", "silu").e8m0 is True
    for arch in ("sm90", "sm100"):
        assert at(grid, arch, "fp8", "TP4", "silu", env="E8M0=0").e8m0 is False
        assert at(grid, arch, "fp8", "TP4", "silu", env="DG=0").e8m0 is False


@pytest.mark.slow
def test_forcing_deep_gemm_by_env(grid):
    for arch, act in itertools.product(("sm90", "sm100"), ACTS):
        for layout in REFINED:  # DeepGEMM needs 128x128 blocks; with auto the block was refined
            assert at(grid, arch, "fp8", layout, act, env="DG=1").error.startswith(
                "ValueError: FP8 MoE backend DEEPGEMM does not support")
        for layout in WHOLE_BLOCKS:  # set explicitly, the defaults override vLLM's preferred order
            assert at(grid, arch, "fp8", layout, act, env="DG=1").backend == "DEEPGEMM"
        assert at(grid, arch, "fp8", "TP2", act, backend="deep_gemm", env="DG=0").error.startswith(
            "ValueError: FP8 MoE backend DEEPGEMM does not support")


@pytest.mark.slow
def test_blackwell_fp8(grid):
    for layout in WHOLE_BLOCKS:
        assert runs(at(grid, "sm100", "fp8", layout, "silu"))[:2] == (
            "FLASHINFER_TRTLLM", "TrtLlmFp8ExpertsMonolithic")
        assert at(grid, "sm100", "fp8", layout, "swiglustep").backend == "DEEPGEMM"
    for layout, act in itertools.product(REFINED, ACTS):
        assert at(grid, "sm100", "fp8", layout, act).backend == "TRITON"
    assert runs(at(grid, "sm100", "fp8", "TP4", "silu", backend="flashinfer_trtllm"))[2:] == (384, (128, 128))


@pytest.mark.slow
def test_bf16(grid):
    for layout, act in itertools.product(LAYOUTS, ACTS):
        tp, dp, ep = LAYOUTS[layout]
        width = 1280 if ep else 1280 // (tp * dp)
        assert runs(at(grid, "sm90", "bf16", layout, act)) == ("TRITON", "TritonExperts", width, None)
        assert runs(at(grid, "sm100", "bf16", layout, "swiglustep")) == ("TRITON", "TritonExperts", width, None)
        # Blackwell SiLU: FlashInfer TRT-LLM, whose shard vLLM rounds up to a multiple of 128
        assert runs(at(grid, "sm100", "bf16", layout, "silu")) == (
            "FlashInfer TRTLLM", "TrtLlmBf16ExpertsMonolithic", -(-width // 128) * 128, None)
        assert at(grid, "sm100", "bf16", layout, act, env="BI=1").backend == "TRITON"
        for arch in ("sm90", "sm100"):
            assert at(grid, arch, "bf16", layout, act, backend="marlin") == at(grid, arch, "bf16", layout, act)


@pytest.mark.slow
def test_refused_backends(grid):
    for arch, layout, act in itertools.product(("sm90", "sm100"), LAYOUTS, ACTS):
        fp8 = at(grid, arch, "fp8", layout, act, backend="cutlass").error
        assert fp8 == "ValueError: vLLM CUTLASS FP8 MoE backend is disabled for this configuration."
        assert "is not supported for FP8 MoE" in at(grid, arch, "fp8", layout, act, backend="batched_triton").error
        for backend in ("deep_gemm", "cutlass"):
            assert "not supported for unquantized MoE" in at(grid, arch, "bf16", layout, act, backend=backend).error
        assert at(grid, "sm90", "fp8", layout, act, backend="flashinfer_trtllm").error.endswith(
            "kernel does not support current device cuda.")


@needs_vllm
def test_the_mirror_answers_as_vllm_on_every_row(grid):
    """tuning.vllm.rules (used where vLLM cannot be imported) gives vLLM's answer on every row of the grid."""
    from tuning.vllm.rules import layer_runtime

    def verdict(r: LayerRuntime) -> tuple:  # the message wording aside, every field and the exception type
        return r.backend, r.experts, r.n, r.block, r.e8m0, (r.error or "").split(":")[0]

    wrong = []
    for key, theirs in grid.items():
        arch, dtype, layout, act, backend, env = key
        ours = layer_runtime(serve_for(arch, dtype, layout, backend, env), act)
        if verdict(ours) != verdict(theirs):
            wrong.append(f"{key}: mirror {runs(ours)} {ours.error}; vLLM {runs(theirs)} {theirs.error}")
    assert not wrong, f"{len(wrong)} of {len(grid)} rows differ:\n" + "\n".join(wrong[:40])


UNREADABLE = {"DG=true": (("VLLM_USE_DEEP_GEMM", "true"),), "E8M0=on": (("VLLM_USE_DEEP_GEMM_E8M0", "on"),),
              "MOE_DG=yes": (("VLLM_MOE_USE_DEEP_GEMM", "yes"),), "BI=true": (("VLLM_BATCH_INVARIANT", "true"),),
              "DG=": (("VLLM_USE_DEEP_GEMM", ""),)}


@needs_vllm
def test_a_flag_int_cannot_read_fails_where_vllm_reads_it():
    """vllm.envs reads its boolean variables with bool(int(value)): "true", "on", "" raise where vLLM's selection
    reads them, and the mirror raises on the same rows (and reports E8M0 as vLLM does), not on the others."""
    from tuning.vllm.rules import layer_runtime

    cases = [(ServeFacts(arch=arch, dtype=dtype, tp=LAYOUTS[lay][0], dp=LAYOUTS[lay][1], ep=LAYOUTS[lay][2],
                         moe_backend=backend, env=env), act)
             for arch, dtype, lay, backend, env, act in itertools.product(
                 ("sm90", "sm100"), ("bf16", "fp8"), ("TP2", "TP4", "DP4+EP"),
                 ("auto", "triton", "deep_gemm", "flashinfer_cutlass"), UNREADABLE.values(), ACTS)]
    theirs = probe(cases)
    verdict = lambda r: (r.backend, r.experts, r.n, r.block, r.e8m0, (r.error or "").split(":")[0])  # noqa: E731
    wrong = [f"{s} {act}: mirror {verdict(layer_runtime(s, act))}; vLLM {verdict(t)}"
             for (s, act), t in zip(cases, theirs) if verdict(layer_runtime(s, act)) != verdict(t)]
    assert not wrong, "\n".join(wrong[:20])
    failed = {(s.dtype, s.env[0][0]) for (s, _), t in zip(cases, theirs)
              if (t.error or "").startswith("ValueError: invalid literal for int()")}
    assert ("fp8", "VLLM_USE_DEEP_GEMM") in failed and ("bf16", "VLLM_BATCH_INVARIANT") in failed
    assert ("bf16", "VLLM_USE_DEEP_GEMM") not in failed  # the unquantized oracle reads no DeepGEMM variable


def unbuildable_cases(vllm: str = "0.33") -> list[tuple[ServeFacts, str]]:
    """Serves beyond the grid's layouts whose shards vLLM may refuse to build, and a refined and a padded one."""
    return [(ServeFacts(arch=arch, dtype=dtype, tp=tp, dp=dp, ep=ep, moe_backend=backend, vllm=vllm), act)
            for arch, dtype, (tp, dp), ep, backend, act in itertools.product(
                ("sm90", "sm100"), ("bf16", "fp8"), ((3, 1), (6, 1), (16, 1), (2, 8), (20, 1)), (False, True),
                ("auto", "triton", "deep_gemm"), ACTS)]


@needs_vllm
def test_shards_vllm_refuses_to_build():
    """Beyond the grid's layouts: a TP that does not split the 1280 columns (TP3, TP6) trips FusedMoEConfig's bare
    assert, named by its statement; an FP8 shard that is neither refinable nor whole 128 blocks (TP16's 80, DP8 x TP2
    without EP) fails Fp8MoEMethod.create_weights, unless an explicit Triton-based backend pads it to 128. The mirror
    answers as vLLM on every row."""
    from tuning.vllm.rules import layer_runtime

    cases = unbuildable_cases()
    answers = probe(cases)
    for (serve, act), theirs in zip(cases, answers):
        ours = layer_runtime(serve, act)
        assert (runs(ours), (ours.error or "").split(":")[0]) == (runs(theirs), (theirs.error or "").split(":")[0]), \
            (serve, act, ours, theirs)
    by = {(c.arch, c.dtype, c.tp, c.dp, c.ep, c.moe_backend, act): r for (c, act), r in zip(cases, answers)}
    assert by["sm90", "fp8", 3, 1, False, "auto", "silu"].error == \
        "AssertionError: assert self.intermediate_size % tp_size == 0 (fused_moe/config.py:1352)"
    assert by["sm90", "bf16", 6, 1, False, "auto", "silu"].error.startswith("AssertionError: assert self.intermediate")
    for tp, dp in ((16, 1), (2, 8)):
        assert by["sm90", "fp8", tp, dp, False, "auto", "silu"].error == (
            "ValueError: The output_size of gate's and up's weight = 80 is not divisible by weight quantization "
            "block_n = 128.")
    assert runs(by["sm90", "fp8", 16, 1, False, "triton", "silu"]) == ("TRITON", "TritonExperts", 128, (128, 128))
    assert runs(by["sm90", "fp8", 16, 1, True, "auto", "silu"])[2:] == (1280, (128, 128))  # EP: whole experts
    assert runs(by["sm90", "fp8", 20, 1, False, "auto", "silu"])[2:] == (64, (64, 64))  # refined


@needs_vllm
def test_the_accepted_moe_backends_are_vllms():
    from vllm.config.kernel import MoEBackend

    from tuning.vllm.rules import MOE_BACKENDS

    assert MOE_BACKENDS == typing.get_args(MoEBackend)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm]')")
def test_deepgemm_dispatch_is_vllms():
    # vllm_rules.deepgemm_runs mirrors TritonOrDeepGemmExperts._select_experts_impl (E8M0 on: always DeepGEMM;
    # off: vLLM's _valid_deep_gemm). Both of vLLM's functions run here on meta tensors, E8M0 patched both ways.
    from vllm.model_executor.layers.fused_moe.experts import triton_deep_gemm_moe as tdg
    from vllm.model_executor.layers.fused_moe.experts.deep_gemm_moe import _valid_deep_gemm

    from tuning.vllm.rules import deepgemm_runs

    import torch

    fp8, experts, seen = torch.float8_e4m3fn, 8, set()
    select = tdg.TritonOrDeepGemmExperts._select_experts_impl
    chooser = type("Chooser", (), {"experts": "deep_gemm", "fallback_experts": "triton"})()
    for m, n, k in itertools.product((1, 16, 127, 128, 129, 256, 4096), (160, 256, 320, 384, 512, 640, 1280),
                                     (4096, 4000)):
        hidden = torch.empty(m, k, device="meta", dtype=torch.bfloat16)
        w1 = torch.empty(experts, 2 * n, k, device="meta", dtype=fp8)
        w2 = torch.empty(experts, k, n, device="meta", dtype=fp8)
        assert _valid_deep_gemm(hidden, w1, w2) == deepgemm_runs(m, n, k, e8m0=False), (m, n, k)
        for e8m0 in (True, False):
            original = tdg.is_deep_gemm_e8m0_used
            tdg.is_deep_gemm_e8m0_used = lambda e8m0=e8m0: e8m0
            try:
                vllm_says = select(chooser, hidden, w1, w2) == "deep_gemm"
            finally:
                tdg.is_deep_gemm_e8m0_used = original
            assert vllm_says == deepgemm_runs(m, n, k, e8m0=e8m0), (m, n, k, e8m0)
            seen.add(vllm_says)
    assert seen == {True, False}  # the grid reaches both answers


def test_the_default_plan_is_what_vllms_own_selection_reads(grid, monkeypatch):
    """Under --moe-backend auto the plan keeps a layout only where a serve reads its tuned file (plan._reading_serves:
    auto alone, with E8M0 off on sm90, the backend advice's serve). Decided on vLLM 0.33's own answers instead of the
    mirror, every GPU kind, both checkpoints and every default layout of 8 GPUs give the same plan."""
    import tuning.plan as plan_module
    from tuning.gpus import get_gpu
    from tuning.models import load_model
    from tuning.shapes import BATCH_SIZES, default_layouts

    names = {(tp, dp, ep): name for name, (tp, dp, ep) in LAYOUTS.items()}
    env_names = {value: name for name, value in ENVS.items()}

    def vllms(serve: ServeFacts, act: str) -> LayerRuntime:
        env = env_names[serve.env] if serve.dtype == "fp8" else "none"  # bf16's oracle reads no DeepGEMM variable
        return grid[(serve.arch, serve.dtype, names[(serve.tp, serve.dp, serve.ep)], act, serve.moe_backend, env)]

    def plan_of(gpu, dtype):
        model = load_model("stepfun-ai/Step-3.5-Flash-FP8" if dtype == "fp8" else "stepfun-ai/Step-3.5-Flash")
        p = plan_module.make_plan(model, get_gpu(gpu), dtype, default_layouts(8), 8, BATCH_SIZES,
                                  vllm_version="0.33.0")
        return {s: [lay.name for lay in ls] for s, ls in p.shapes.items()}, sorted(r.layout.name for r in p.refusals)

    kept = {}
    for gpu, dtype in itertools.product(("H200", "H20", "B200"), ("bf16", "fp8")):
        mirror = plan_of(gpu, dtype)
        with monkeypatch.context() as m:
            m.setattr(plan_module, "layer_runtime", vllms)
            theirs = plan_of(gpu, dtype)
        assert mirror == theirs, (gpu, dtype)
        kept[gpu, dtype] = sorted(lay for ls in theirs[0].values() for lay in ls)
    assert kept["B200", "fp8"] == ["TP4", "TP8"]  # FlashInfer TRT-LLM and UE8M0 DeepGEMM on the rest
    assert len(kept["H200", "fp8"]) == 9  # every layout that fits: TP1 does not
    assert len(kept["B200", "bf16"]) == 6  # the SwiGLU-step layers run Triton on every layout
