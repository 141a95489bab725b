"""validate-serve --reduced: the hub-free folder and the one-GPU serve of a layout's per-GPU MoE shape.

Real components only: the written folder is read by transformers' AutoConfig and tokenizer, by the
``tokenizers`` library, and (tests marked ``slow``) by vLLM 0.33's own ``EngineArgs.create_model_config`` on the
exact serve command, its MoE backend selection (``vllm_probe``) and its ``vllm bench serve`` random dataset.
"""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from tuning.serve import model_folder, reduced
from tuning.vllm import probe as vllm_probe
from tuning.errors import UsageError
from tuning.models import BUILTIN, load_model
from tuning.serve.recipe import RECIPE_FLAGS, BenchSpec, ServeSpec
from tuning.shapes import Layout, MoeShape, parse_layout
from tuning.vllm.rules import ACTIVATIONS, ServeFacts
from tuning.serve.workloads import WORKLOADS

# (layout, dtype, --moe-backend): experts and width one GPU of the layout holds, and the file it reads on an H200
CASES = {
    ("TP4", "bf16", "auto"): (288, 320, "E=288,N=320,device_name=NVIDIA_H200.json"),
    ("TP8", "bf16", "auto"): (288, 160, "E=288,N=160,device_name=NVIDIA_H200.json"),
    ("DP4+EP", "bf16", "auto"): (72, 1280, "E=72,N=1280,device_name=NVIDIA_H200.json"),
    ("TP4", "fp8", "auto"): (288, 320, "E=288,N=320,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[64,64].json"),
    ("DP4+EP", "fp8", "triton"): (72, 1280,
                                  "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"),
}
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM installed")


def plan(case, folder: Path, layers: int = 12) -> reduced.Reduced:
    layout, dtype, backend = case
    return reduced.plan(parse_layout(layout), dtype, layers=layers, folder=folder, version="0.33", moe_backend=backend)


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_the_shard_is_the_layouts(case, tmp_path):
    experts, width, name = CASES[case]
    r = plan(case, tmp_path / "model")
    o = r.overrides()
    assert (o["moe_num_experts"], o["moe_intermediate_size"]) == (experts, width)
    assert r.shape.file_name("NVIDIA_H200") == name
    assert o["num_hidden_layers"] == 12 and o["moe_layers_enum"] == "1,2,3,4,5,6,7,8,9,10,11"
    assert o["mlp_layer_types"] == ["dense"] + ["sparse"] * 11
    assert o["swiglu_limits"] == [0.0] * 10 + [7.0, 7.0] and o["swiglu_limits_shared"][-2:] == [16.0, 16.0]
    g = r.geometry()  # what preflight reads: the published config with the overrides applied
    assert (g.num_experts, g.moe_intermediate_size, g.moe_layers, g.top_k) == (experts, width, tuple(range(1, 12)), 8)
    assert r.model_args()[:3] == ("--load-format", "dummy", "--hf-overrides")
    assert json.loads(r.model_args()[3]) == o


def test_reduced_layers_are_bounded_and_refusals_are_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"--reduced-layers 3: must be 4 to 45"):
        reduced.plan(Layout(tp=4), "bf16", layers=3, folder=tmp_path, version="0.33", moe_backend="auto")
    with pytest.raises(UsageError, match=r"layout TP4: vLLM 0.16 needs the per-GPU expert width"):
        reduced.plan(Layout(tp=4), "fp8", layers=8, folder=tmp_path, version="0.16", moe_backend="auto")
    assert not any(tmp_path.iterdir())


def test_fp8_servers_keep_deepgemm_off_unless_the_environment_says(tmp_path):
    """FP8 dense linears leave DeepGEMM (its kernels compile for minutes per server start) unless VLLM_USE_DEEP_GEMM
    is set; bf16 servers get only the sampler variable; the report's text says which."""
    def make(dtype, given=None):
        return reduced.plan(parse_layout("DP4+EP"), dtype, layers=4, folder=tmp_path, version="0.26",
                            moe_backend="triton", given=given)

    assert dict(make("fp8").env) == {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_USE_DEEP_GEMM": "0"}
    assert any(d.startswith("the dense FP8 linear layers run CUTLASS") for d in make("fp8").differs())
    kept = make("fp8", {"VLLM_USE_DEEP_GEMM": "1"})
    assert dict(kept.env) == {"VLLM_USE_FLASHINFER_SAMPLER": "0"} and not any("CUTLASS" in d for d in kept.differs())
    assert dict(make("bf16").env) == {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
    assert make("fp8").as_dict()["env"] == {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_USE_DEEP_GEMM": "0"}


@needs_vllm
def test_vllms_own_rule_puts_the_dense_fp8_layers_on_deepgemm_and_the_reduced_env_takes_them_off(monkeypatch, tmp_path):
    """vLLM 0.33's ``should_use_deepgemm_for_fp8_linear`` on an sm90 platform: the model's block-FP8 dense layers
    (attention output, shared-expert down projection) go to DeepGEMM by default, and not under the variables a
    reduced FP8 server gets."""
    import torch
    from vllm.utils import deep_gemm

    class Hopper:
        @staticmethod
        def support_deep_gemm() -> bool:
            return True

    monkeypatch.setattr(deep_gemm, "current_platform", Hopper())
    monkeypatch.setattr(deep_gemm, "has_deep_gemm", lambda: True)
    monkeypatch.delenv("VLLM_USE_DEEP_GEMM", raising=False)
    geometry = load_model("stepfun-ai/Step-3.5-Flash-FP8")
    shapes = [(geometry.hidden_size, geometry.hidden_size), (geometry.hidden_size, geometry.moe_intermediate_size)]

    def on_deepgemm() -> list[bool]:
        deep_gemm.is_deep_gemm_supported.cache_clear()  # vLLM caches its answer for the process
        try:
            return [deep_gemm.should_use_deepgemm_for_fp8_linear(torch.bfloat16, s) for s in shapes]
        finally:
            deep_gemm.is_deep_gemm_supported.cache_clear()

    assert on_deepgemm() == [True, True]
    r = reduced.plan(parse_layout("DP4+EP"), "fp8", layers=4, folder=tmp_path, version="0.33", moe_backend="triton")
    for name, value in r.env:
        monkeypatch.setenv(name, value)
    assert on_deepgemm() == [False, False]


def test_the_served_config_tunes_the_routing_the_serve_runs(tmp_path):
    """served-config.json is what vLLM sees after the overrides; a TP1 plan of it is the reduced DP4+EP serve's
    fused MoE (72 experts, top-8 over those 72, no expert map) under the DP4+EP file's name."""
    from tuning import gpus
    from tuning.plan import make_plan

    r = reduced.plan(parse_layout("DP4+EP"), "fp8", layers=4, folder=tmp_path / "m", version="0.26",
                     moe_backend="triton")
    r.write()
    served = load_model(str(tmp_path / "m" / reduced.SERVED_CONFIG))
    assert (served.num_experts, served.moe_intermediate_size, served.top_k) == (72, 1280, 8)
    h200 = gpus.get_gpu("H200")
    (shape,) = make_plan(served, h200, "fp8", [parse_layout("TP1")], 1, (1,), vllm_version="0.26.0",
                         moe_backend="triton").shapes
    assert not shape.expert_parallel and shape.global_experts == 72
    assert shape.file_name(h200.device_name) == r.shape.file_name(h200.device_name)
    assert r.shape.expert_parallel and r.shape.global_experts == 288
    (ep,) = [d for d in r.differs() if d.startswith("expert parallel")]
    assert f"tune-moe --model {tmp_path / 'm' / reduced.SERVED_CONFIG} --layouts TP1 --num-gpus 1" in ep


def test_what_the_report_says_it_does_and_does_not_reproduce(tmp_path):
    tp4 = plan(("TP4", "bf16", "auto"), tmp_path)
    assert tp4.reproduces()[1].startswith("top-8 routing over all 288 experts")
    assert not any("expert parallel" in d for d in tp4.differs())
    ep = plan(("DP4+EP", "bf16", "auto"), tmp_path)
    assert len(ep.reproduces()) == 1
    assert any("top-8 over the 72 local experts, not over 288" in d and "about 4x the tokens" in d for d in ep.differs())


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_the_written_folder_is_the_published_geometry(dtype, tmp_path):
    from transformers import AutoConfig

    written = reduced.plan(Layout(tp=4), dtype, layers=8, folder=tmp_path / "m", version="0.33",
                           moe_backend="auto").write()
    assert [p.name for p in written] == ["config.json", "tokenizer.json", "tokenizer_config.json", reduced.SERVED_CONFIG]
    ours, builtin = load_model(str(tmp_path / "m")), load_model(f"stepfun-ai/Step-3.5-Flash{'-FP8' * (dtype == 'fp8')}")
    assert (ours.num_experts, ours.moe_intermediate_size, ours.moe_layers, ours.hidden_size, ours.vocab_size,
            ours.weight_block_size) == (builtin.num_experts, builtin.moe_intermediate_size, builtin.moe_layers,
                                        builtin.hidden_size, builtin.vocab_size, builtin.weight_block_size)
    cfg = AutoConfig.from_pretrained(tmp_path / "m")  # transformers' own class for model_type step3p5
    assert (cfg.num_hidden_layers, cfg.n_routed_experts, cfg.moe_intermediate_size) == (45, 288, 1280)
    assert cfg.mlp_layer_types == ["dense"] * 3 + ["sparse"] * 42  # from moe_layers_enum; MTP layers split off
    assert [i for i, x in enumerate(cfg.swiglu_limits) if x] == [43, 44]
    assert cfg.num_sliding_attention_heads == 96 and cfg.layer_types[:5] == [
        "full_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    quant = json.loads((tmp_path / "m" / "config.json").read_text()).get("quantization_config")
    assert quant == (BUILTIN["stepfun-ai/Step-3.5-Flash-FP8"]["quantization_config"] if dtype == "fp8" else None)


def test_the_tokenizer_round_trips_any_ids_exactly(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    model_folder.write_folder(tmp_path, model_folder.published_config("bf16"))
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert raw.get_vocab_size() == 128896
    ids = [random.Random(7).randrange(len(model_folder.SPECIAL), 128896) for _ in range(3000)] + [5, 6, 7, 8]
    assert raw.encode(raw.decode(ids)).ids == ids
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 128896 and tok.num_special_tokens_to_add() == 0
    vocab = tok.get_vocab()
    assert {vocab["<think>"], vocab["</think>"]} == {5, 6}  # vLLM 0.26's step3p5 reasoning parser needs both
    assert sorted(tok.all_special_ids) == [0, 1, 2, 3, 4] and tok.eos_token_id == 2


@pytest.mark.slow
@needs_vllm
def test_vllm_builds_the_intended_geometry_from_the_serve_command(tmp_path):
    """vLLM 0.33's EngineArgs.create_model_config on the exact serve words, then its backend selection for one GPU:
    the layer kinds, the experts and width per GPU, and the tuned file each MoE layer kind reads."""
    plans = {case: plan(case, tmp_path / "-".join(case)) for case in CASES}
    commands = []
    for case, r in plans.items():
        r.write()
        spec = ServeSpec(model=str(r.folder), layout=Layout(), dtype=r.dtype, model_args=r.model_args(),
                         moe_backend=case[2], port=8000)
        assert spec.argv()[:7] == ["vllm", "serve", str(r.folder), *r.model_args()]
        commands.append(spec.argv()[2:])
    answers = vllm_probe.model_configs(commands)
    cases = []
    for (case, r), got in zip(plans.items(), answers):
        experts, width, name = CASES[case]
        assert "error" not in got, got
        assert (got["architectures"], got["model_type"]) == (["Step3p5ForCausalLM"], "step3p5")
        assert (got["num_experts"], got["intermediate"], got["top_k"], got["hidden"]) == (experts, width, 8, 4096)
        kinds = ["dense" if not x["moe"] else "swiglustep" if x["swiglu_limit"] else "silu" for x in got["layers"]]
        assert kinds == ["dense"] + ["silu"] * 9 + ["swiglustep"] * 2
        assert got["quantization"] == ("fp8" if r.dtype == "fp8" else None)
        assert got["weight_block_size"] == ([128, 128] if r.dtype == "fp8" else None)
        facts = ServeFacts(arch="sm90", dtype=r.dtype, moe_backend=case[2], num_experts=got["num_experts"],
                           intermediate=got["intermediate"], hidden=got["hidden"], top_k=got["top_k"])
        cases += [(facts, act) for act in ACTIVATIONS]
    runtimes = vllm_probe.probe(cases)
    for i, (case, r) in enumerate(plans.items()):
        for facts, rt in zip([c[0] for c in cases[2 * i:2 * i + 2]], runtimes[2 * i:2 * i + 2]):
            assert rt.reads_tuned_file and rt.backend == "TRITON", (case, rt)
            shape = MoeShape(facts.num_experts, facts.num_experts, rt.n, 4096, 8, r.dtype, rt.block)
            assert shape.file_name("NVIDIA_H200") == CASES[case][2] == r.shape.file_name("NVIDIA_H200")


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("workload", WORKLOADS)
def test_a_random_dataset_prompt_is_exactly_its_length(workload, tmp_path):
    """vllm bench serve's own parser and random dataset, with the folder's tokenizer as vLLM loads it."""
    from vllm.benchmarks.datasets import get_samples
    from vllm.benchmarks.serve import add_cli_args
    from vllm.tokenizers import get_tokenizer
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    model_folder.write_folder(tmp_path, model_folder.published_config("fp8"))
    w = WORKLOADS[workload]
    bench = BenchSpec(input_len=w.input_len, output_len=w.output_len, max_concurrency=w.max_concurrency,
                      num_prompts=4, ignore_eos=True, seed=1)
    words = bench.argv(ServeSpec(model=str(tmp_path), layout=Layout(), dtype="fp8", port=8000), tmp_path / "r.json")
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(words[3:])
    tokenizer = get_tokenizer(args.model, tokenizer_mode=args.tokenizer_mode, trust_remote_code=True)
    samples = get_samples(args, tokenizer)
    assert len(samples) == 4 and args.ignore_eos
    assert [(s.prompt_len, len(tokenizer.encode(s.prompt))) for s in samples] == [(w.input_len, w.input_len)] * 4


def test_recipe_flags_follow_the_reduced_model_args(tmp_path):
    r = plan(("TP4", "bf16", "auto"), tmp_path)
    spec = ServeSpec(model=str(r.folder), layout=Layout(), dtype="bf16", model_args=r.model_args(), port=9)
    assert spec.argv() == ["vllm", "serve", str(r.folder), *r.model_args(), *RECIPE_FLAGS, "--port", "9"]
    assert dict(reduced.ENV) == {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
