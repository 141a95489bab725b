"""``tune-moe preflight``: the recipe's serve commands against the committed configs, answered by vLLM 0.33's
own parser and selection code; the mirrors used without vLLM give the same answers; bad input is one line."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from tuning.vllm import batch_plan, serve_command, probe as vllm_probe
from tuning.serve import preflight
from tuning.cli import main
from tuning.gpus import get_gpu
from tuning.errors import UsageError
from tuning.shapes import BATCH_SIZES

pytestmark = pytest.mark.slow
vllm = pytest.importorskip("vllm", reason="preflight's answers are vLLM 0.33's own")

ROOT = Path(__file__).resolve().parents[1] / "kernels_configs"
H200 = ROOT / "vllm-0.33" / "NVIDIA_H200"
RECIPE = ["--reasoning-parser", "step3p5", "--tool-call-parser", "step3p5", "--enable-auto-tool-choice",
          "--trust-remote-code"]
MTP = ["--hf-overrides", '{"num_nextn_predict_layers": 1}',
       "--speculative-config", '{"method": "step3p5_mtp", "num_speculative_tokens": 1}']


def run(capsys, gpu: str, serve: list[str], folder: Path | None = H200) -> tuple[int, str, str]:
    env = [f"VLLM_TUNED_CONFIG_FOLDER={folder}"] if folder else []
    code = main(["preflight", "--gpu", gpu, "--", *env, "vllm", "serve", *serve])
    out, err = capsys.readouterr()
    return code, out, err


def test_tp4_bf16_recipe_reads_the_tuned_file_on_both_layer_kinds(capsys):
    code, out, _ = run(capsys, "H200", ["stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "4", *RECIPE])
    assert code == 0, out
    assert "answered by vLLM's own code" in out
    assert "SiLU layers: TRITON (TritonExperts), N=320" in out and "SwiGLU-step layers: TRITON (TritonExperts), N=320" in out
    assert f"found {H200 / 'E=288,N=320,device_name=NVIDIA_H200.json'}" in out
    assert "51 CUDA-graph sizes up to 512" in out and "max_num_batched_tokens 8192" in out
    assert re.search(r"M 200-384 \(16 sizes\) +-> key 256 ", out) and re.search(r"M 8192 +-> key 4096 ", out)


def test_hf_overrides_reshape_the_experts_as_vllm_loads_them(capsys):
    """A reduced one-GPU serve (validate-serve --reduced): the width and experts its --hf-overrides set."""
    overrides = '{"num_hidden_layers": 12, "moe_num_experts": 288, "moe_intermediate_size": 320}'
    code, out, _ = run(capsys, "H200", ["stepfun-ai/Step-3.5-Flash", "--load-format", "dummy", "--hf-overrides",
                                        overrides, *RECIPE])
    assert "answered by vLLM's own code" in out and "(tp 1, dp 1)" in out
    assert "SiLU layers: TRITON (TritonExperts), N=320" in out and "SwiGLU-step layers: TRITON (TritonExperts), N=320" in out
    assert f"found {H200 / 'E=288,N=320,device_name=NVIDIA_H200.json'}" in out
    assert "fix: tune-moe" not in out  # no layout of the tuner's plan is this serve


def test_dp4_ep_fp8_runs_no_triton_file_by_default(capsys):
    code, out, _ = run(capsys, "H200", ["stepfun-ai/Step-3.5-Flash-FP8", "--data-parallel-size", "4",
                                        "--enable-expert-parallel", *RECIPE])
    assert code == 0, out
    assert "SiLU layers: FLASHINFER_CUTLASS (FlashInferExperts), N=1280" in out
    assert "SwiGLU-step layers: DEEPGEMM (TritonOrDeepGemmExperts), N=1280" in out
    assert out.count("reads no Triton tuned file") == 2
    assert "fused-MoE M per step: 4 ... 32768 (all 4 DP ranks' tokens reach each expert rank)" in out


def test_dp4_ep_fp8_with_triton_reads_e72_and_flags_the_prefill_sizes(capsys):
    """The committed E=72 file holds the prefill step of all four DP ranks (4 x 8192 tokens: benchmarks/README §7);
    a serve with a larger prefill chunk reaches sizes beyond it, which preflight flags with the tune that adds them."""
    serve = ["stepfun-ai/Step-3.5-Flash-FP8", "--data-parallel-size", "4", "--enable-expert-parallel",
             "--moe-backend", "triton", *RECIPE]
    code, out, _ = run(capsys, "H200", serve)
    assert code == 0, out
    assert "tuned file E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json" in out
    assert re.search(r"M 32768 +-> key 32768 ", out)
    code, out, _ = run(capsys, "H200", [*serve, "--max-num-batched-tokens", "32768"])
    assert code == 1
    assert "batch sizes 131072 are more than 2x away from the nearest tuned key" in out
    assert ("fix: tune-moe --gpu H200 --dtype fp8 --layouts DP4+EP --num-gpus 4 --moe-backend triton "
            f"--batch-sizes vllm,131072 --out {H200} --vllm-version 0.33.0") in out


def test_mtp_adds_the_verify_steps_to_the_captured_sizes(capsys):
    code, out, _ = run(capsys, "H200", ["stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "4", *RECIPE, *MTP])
    assert code == 0, out
    assert "1 speculative tokens per step" in out
    plan = batch_plan.batch_plan(serve_command.parse(["vllm", "serve", "m", "--speculative-config",
                                                      '{"num_speculative_tokens": 2}']), "sm90", 141, "0.33")
    assert {3, 6, 12, 24}.issubset(plan.capture_sizes)  # 1, 2, 4 and 8 requests of three tokens each


def test_deep_gemm_tp4_runs_deep_gemm_on_both_kinds_and_no_file(capsys):
    code, out, _ = run(capsys, "H200", ["stepfun-ai/Step-3.5-Flash-FP8", "--tensor-parallel-size", "4",
                                        "--moe-backend", "deep_gemm", *RECIPE])
    assert code == 0, out
    assert out.count("DEEPGEMM (TritonOrDeepGemmExperts), N=384, block [128, 128]") == 2
    assert out.count("reads no Triton tuned file") == 2  # E8M0 is on: DeepGEMM at every M


def test_deep_gemm_without_e8m0_reads_the_padded_file(capsys):
    code = main(["preflight", "--gpu", "H200", "--", f"VLLM_TUNED_CONFIG_FOLDER={H200}", "VLLM_USE_DEEP_GEMM_E8M0=0",
                 "vllm", "serve", "stepfun-ai/Step-3.5-Flash-FP8", "--tensor-parallel-size", "4",
                 "--moe-backend", "deep_gemm"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tuned file E=288,N=384,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json" in out


def test_b200_fp8_tp4_is_triton_and_untuned_here(capsys, tmp_path):
    code, out, _ = run(capsys, "B200", ["stepfun-ai/Step-3.5-Flash-FP8", "--tensor-parallel-size", "4", *RECIPE],
                       folder=tmp_path)
    assert code == 1
    assert out.count("TRITON (TritonExperts), N=320, block [64, 64]") == 2
    assert "E=288,N=320,device_name=NVIDIA_B200,dtype=fp8_w8a8,block_shape=[64,64].json is not in" in out
    assert "max_num_batched_tokens 16384" in out and "up to 1024" in out
    assert (f"fix: tune-moe --gpu B200 --dtype fp8 --layouts TP4 --num-gpus 4 --batch-sizes vllm,16384 --out {tmp_path} "
            "--vllm-version 0.33.0") in out


def test_the_fix_tunes_for_the_serves_release_not_the_installed_one(capsys, tmp_path):
    """A 0.34 serve checked where 0.33 is installed: a bare tune-moe would tune for 0.33 (the installed vLLM)."""
    code = main(["preflight", "--gpu", "B200", "--vllm-version", "0.34.0", "--", f"VLLM_TUNED_CONFIG_FOLDER={tmp_path}",
                 "vllm", "serve", "stepfun-ai/Step-3.5-Flash-FP8", "--tensor-parallel-size", "4"])
    out = capsys.readouterr().out
    assert code == 1 and "is not in" in out
    assert (f"fix: tune-moe --gpu B200 --dtype fp8 --layouts TP4 --num-gpus 4 --batch-sizes vllm,16384 --out {tmp_path} "
            "--vllm-version 0.34.0") in out


def test_the_fix_is_a_tune_that_plans_the_file_the_serve_reads(capsys, tmp_path):
    """A B200 FP8 TP2 serve reads its tuned file only through VLLM_USE_DEEP_GEMM_E8M0=0 (DeepGEMM's Triton fallback on
    the SwiGLU-step layers), which the tune's default plan does not count there: the fix tunes the same file under
    --moe-backend triton, and that command plans exactly it."""
    code = main(["preflight", "--gpu", "B200", "--", f"VLLM_TUNED_CONFIG_FOLDER={tmp_path}", "VLLM_USE_DEEP_GEMM_E8M0=0",
                 "vllm", "serve", "stepfun-ai/Step-3.5-Flash-FP8", "--tensor-parallel-size", "2"])
    out = capsys.readouterr().out
    name = "E=288,N=640,device_name=NVIDIA_B200,dtype=fp8_w8a8,block_shape=[128,128].json"
    assert code == 1 and f"{name} is not in" in out
    fix = next(line for line in out.splitlines() if line.startswith("fix: "))
    assert fix == (f"fix: tune-moe --gpu B200 --dtype fp8 --layouts TP2 --num-gpus 2 --moe-backend triton --batch-sizes "
                   f"vllm,16384 --out {tmp_path} --vllm-version 0.33.0")
    assert main([*fix.split()[2:], "--dry-run"]) == 0
    assert f"Shapes (1), each a file vLLM loads:\n  {name}\n" in capsys.readouterr().out


def test_an_unset_tuned_folder_is_no_tune_to_fix(capsys, monkeypatch):
    """The files are there; the serve is only not told where: the problem names the export, and no tune is offered."""
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER", raising=False)  # preflight reads this shell's VLLM_* too
    code, out, _ = run(capsys, "H200", ["stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "4"], folder=None)
    assert code == 1 and re.search(r"found \S*vllm-0.33/NVIDIA_H200/E=288,N=320,device_name=NVIDIA_H200.json", out)
    assert "problem: VLLM_TUNED_CONFIG_FOLDER is not set for the serve" in out and f"={H200.resolve()}" in out
    assert "fix: tune-moe" not in out


@pytest.mark.parametrize("serve,message", [
    (["stepfun-ai/Step-3.5-Flash", "--tensor-paralel-size", "4"], "unrecognized arguments: --tensor-paralel-size"),
    (["stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "four"], "invalid int value: 'four'"),
    (["some/other-model"], "neither a built-in name"),
    (["stepfun-ai/Step-3.5-Flash", "--quantization", "fp8"], "per-tensor FP8"),
])
def test_bad_serve_commands_are_one_line(capsys, serve, message):
    code, out, err = run(capsys, "H200", serve)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_shards_vllm_cannot_build_are_reported_without_a_tune(capsys):
    """FP8 over TP16 leaves 80 columns a GPU, which vLLM can neither refine (gcd 16 < 32) nor load as 128 blocks, and
    TP3 does not split the 1280 columns: vLLM will not start, and no tune is offered (it would fix nothing)."""
    code, out, _ = run(capsys, "H200", ["stepfun-ai/Step-3.5-Flash-FP8", "-tp", "16"])
    assert code == 1
    assert ("SiLU layers: vLLM refuses to start: ValueError: The output_size of gate's and up's weight = 80 is not "
            "divisible by weight quantization block_n = 128.") in out
    assert "fix: tune-moe" not in out
    assert ("problem: SiLU layers: vLLM will not start: ValueError: The output_size of gate's and up's weight = 80 "
            "is not divisible by weight quantization block_n = 128; add --enable-expert-parallel (each GPU then "
            "holds whole experts), lower -tp, or serve with an explicit --moe-backend (vLLM pads the shard to "
            "whole blocks)") in out
    # vLLM 0.26 neither refines nor pads (tests/test_vllm_026.py reads its source): FP8 TP4 does not start there
    code = main(["preflight", "--gpu", "H200", "--vllm-version", "0.26", "--", "vllm", "serve",
                 "stepfun-ai/Step-3.5-Flash-FP8", "-tp", "4"])
    out = capsys.readouterr().out
    assert code == 1 and ("problem: SwiGLU-step layers: vLLM will not start: ValueError: The output_size of gate's "
                          "and up's weight = 320 is not divisible by weight quantization block_n = 128; add "
                          "--enable-expert-parallel (each GPU then holds whole experts), lower -tp, or serve with "
                          "vLLM 0.33 or later (it refines the block or pads the shard)") in out
    assert "(the installed vLLM is 0.33.0, the serve runs 0.26); of vLLM 0.26's own rules only its FP8 shard rule " \
           "is mirrored" in out
    for fixed in (["-tp", "4", "--enable-expert-parallel"], ["-tp", "2"]):  # what the line offers starts
        main(["preflight", "--gpu", "H200", "--vllm-version", "0.26", "--", "vllm", "serve",
              "stepfun-ai/Step-3.5-Flash-FP8", *fixed])
        assert "will not start" not in capsys.readouterr().out
    code, out, _ = run(capsys, "H200", ["stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "3"])
    assert code == 1 and "vLLM will not start: AssertionError: assert self.intermediate_size % tp_size == 0 " \
                         "(fused_moe/config.py:" in out
    code, out, _ = run(capsys, "H200", ["stepfun-ai/Step-3.5-Flash-FP8", "-tp", "16", "--moe-backend", "triton"])
    assert "SiLU layers: TRITON (TritonExperts), N=128, block [128, 128]" in out  # padded to whole blocks


def test_config_dir_against_the_serves_variable(capsys, tmp_path):
    """--config-dir names the folder the serve is meant to read; a different VLLM_TUNED_CONFIG_FOLDER set for the
    serve wins in vLLM, so preflight checks that one and says to export the other, offering no tune into it."""
    code, out, _ = run(capsys, "H200", ["stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "4"],
                       folder=tmp_path)
    assert code == 1 and "fix: tune-moe --gpu H200 --dtype bf16 --layouts TP4" in out  # no --config-dir: a tune
    code = main(["preflight", "--gpu", "H200", "--config-dir", str(H200), "--", f"VLLM_TUNED_CONFIG_FOLDER={tmp_path}",
                 "vllm", "serve", "stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "4"])
    out = capsys.readouterr().out
    assert code == 1 and f"is not in {tmp_path}" in out
    assert (f"problem: the serve's VLLM_TUNED_CONFIG_FOLDER={tmp_path} is not --config-dir {H200}, and vLLM reads the "
            f"variable (checked above); export VLLM_TUNED_CONFIG_FOLDER={H200.resolve()}") in out
    assert "fix: tune-moe" not in out
    code = main(["preflight", "--gpu", "H200", "--config-dir", str(H200), "--", f"VLLM_TUNED_CONFIG_FOLDER={H200}",
                 "vllm", "serve", "stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "4"])
    assert code == 0 and "is not --config-dir" not in capsys.readouterr().out
    assert main(["preflight", "--gpu", "H200", "--config-dir", str(next(H200.glob("*.json"))), "--", "vllm", "serve",
                 "stepfun-ai/Step-3.5-Flash"]) == 2
    assert "a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("command,message", [
    (["vllm", "serve"], "names no model (vLLM would serve its own default)"),
    (["vllm", "serve", "-tp", "4"], "names no model"),
    (["vllm serve stepfun-ai/Step-3.5-Flash -tp 4"], "came as one word"),
    (["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "stepfun-ai/Step-3.5-Flash"],
     "write the api_server command as vllm serve MODEL"),
])
def test_serve_commands_in_another_form_are_one_line(capsys, command, message):
    assert main(["preflight", "--gpu", "H200", "--", *command]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and err.count("\n") == 1


def test_bad_preflight_arguments_are_one_line(capsys, tmp_path):
    serve = ["--", "vllm", "serve", "stepfun-ai/Step-3.5-Flash"]
    for argv, message in ((["preflight", "--gpu", "H200"], "pass the serve command after '--'"),
                          (["preflight", "--gpu", "H200", "--config-dir", str(tmp_path / "nope"), "--", "vllm", "serve",
                            "stepfun-ai/Step-3.5-Flash"], "no such folder"),
                          # vLLM 0.33 (installed) reads the command; 0.34's is read by the mirror
                          (["preflight", "--gpu", "B200", *serve, "-cc.max_decode_cudagraph_capture_requests=8"],
                           "vLLM refuses the serve command: vllm serve: error: "),
                          (["preflight", "--gpu", "B200", "--vllm-version", "0.34.0", *serve,
                            "-cc.cudagraph_mode=sometimes"], "cudagraph_mode 'sometimes' is not one of NONE, PIECEWISE"),
                          (["preflight", "--gpu", "B200", "--vllm-version", "0.34.0", *serve, "--spec-tokens", "2",
                            "--speculative-config", '{"num_speculative_tokens": 3}'], "are mutually exclusive"),
                          (["preflight", "--gpu", "B200", "--vllm-version", "0.34.0", *serve,
                            "-cc.decode_cudagraph_capture_request_sizes+", "1,64",
                            "-cc.max_decode_cudagraph_capture_requests=8"], "holds 64, above"),
                          (["preflight", "--gpu", "B200", "--vllm-version", "0.34.0", *serve, "--speculative-config",
                            '{"num_speculative_tokens_per_batch_size": [[1, 8, 3]]}'], "dynamic speculative decoding")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


# ---- the mirrors answer as vLLM does ------------------------------------------------------------------

COMMANDS = [
    ["m"], ["m", "-tp", "4"], ["m", "--max-num-seqs", "64"], ["m", "--max_num_batched_tokens", "2048"],
    ["m", "--enforce-eager"], ["m", "--performance-mode", "throughput"], ["m", "--performance-mode", "interactivity"],
    ["m", "--compilation-config", '{"cudagraph_capture_sizes": [1, 3, 8, 9000]}'],
    ["m", "--compilation-config", '{"max_cudagraph_capture_size": 64}'],
    ["m", "--speculative-config", '{"method": "step3p5_mtp", "num_speculative_tokens": 1}'],
    ["m", "--speculative-config", '{"method": "step3p5_mtp", "num_speculative_tokens": 3}', "--max-num-seqs", "100"],
    ["m", "--data-parallel-size", "4", "--enable-expert-parallel", "--moe-backend", "Deep-Gemm"],
    ["m", "-tp", "2", "--enable-expert-parallel", "--disable-expert-parallel", "--quantization", "fp8"],
    ["m", "--load-format", "dummy", "--hf-overrides", '{"moe_num_experts": 72, "moe_intermediate_size": 1280}'],
    # how FlexibleArgumentParser rewrites words: -O levels, dotted keys (KEY+ appends a list), 16k; the shorthands
    ["m", "-O0"], ["m", "-O", "1"], ["m", "-O3", "-cc.cudagraph_mode=FULL_DECODE_ONLY"], ["m", "-cc.mode=none"],
    ["m", "--compilation-config.cudagraph_mode", "piecewise", "--max-num-batched-tokens", "16k"],
    ["m", "--cudagraph-capture-sizes", "1", "2", "4", "24", "--max-num-seqs", "16"],
    ["m", "--max-cudagraph-capture-size", "128"],
    ["m", "-cc.cudagraph_capture_sizes+", "1,2,3", "-cc.cudagraph_capture_sizes+", "5"],
    ["m", "--spec-method", "step3p5_mtp", "--spec-tokens", "2"],
    ["m", "--speculative-config.method", "step3p5_mtp", "--speculative-config.num_speculative_tokens", "4",
     "--max-num-seqs", "48"],
    ["m", "--served-model-name", "a", "b", "--hf-token", "--max-num-seqs", "32"],  # nargs + and ?
    # what vLLM refuses: a bad mode, a shorthand beside its JSON key, sizes beside an inconsistent maximum
    ["m", "-cc.cudagraph_mode=sometimes"], ["m", "--spec-tokens", "2", "--speculative-config.num_speculative_tokens", "3"],
    ["m", "--cudagraph-capture-sizes", "1", "-cc.cudagraph_capture_sizes+", "2"],
    ["m", "-cc.cudagraph_capture_sizes+", "1,8", "-cc.max_cudagraph_capture_size=16"],
]
# vLLM 0.34's split capture sizes, and adaptive verification; 0.33's parser refuses the keys
COMMANDS_034 = [
    ["m", "-cc.max_decode_cudagraph_capture_requests=64"],
    ["m", "-cc.prefill_cudagraph_capture_token_sizes+", "1,64,512,2048", "--max-num-seqs", "128"],
    ["m", "-cc.max_prefill_cudagraph_capture_tokens=4096", "-cc.max_decode_cudagraph_capture_tokens=2048"],
    ["m", "-cc.decode_cudagraph_capture_request_sizes+", "1,2,3,100", "-cc.cudagraph_mode=FULL_DECODE_ONLY"],
    ["m", "--speculative-config", '{"method": "step3p5_mtp", "num_speculative_tokens": 3, '
                                  '"enable_adaptive_verification": true}'],
    ["m", "--spec-method", "eagle", "--spec-model", "x", "--spec-tokens", "3", "--max-num-seqs", "256"],
    ["m", "-cc.prefill_cudagraph_capture_token_sizes+", "1,512", "-cc.max_prefill_cudagraph_capture_tokens=64"],
    ["m", "-cc.max_decode_cudagraph_capture_requests=8", "-cc.max_cudagraph_capture_size=64"],
]
GPUS = (("sm90", 141), ("sm90", 96), ("sm100", 180))
# Sizes vLLM's configs refuse (pydantic bounds on ParallelConfig, SchedulerConfig and SpeculativeConfig;
# _set_cudagraph_sizes' asserts) and graph sizes below 1: each refused by vLLM's code and by the mirror.
REFUSED = [
    ["m", "-tp", "0"], ["m", "-tp", "-2"], ["m", "--data-parallel-size", "0"], ["m", "--max-num-seqs", "-5"],
    ["m", "--max-num-batched-tokens", "-1"],
    ["m", "--speculative-config", '{"method": "mtp", "num_speculative_tokens": "x"}'],
    ["m", "--speculative-config", '{"method": "mtp", "num_speculative_tokens": [3]}'],
    ["m", "--speculative-config", '{"method": "mtp", "num_speculative_tokens": -3}'],
    ["m", "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 0}'],
    ["m", "--spec-method", "mtp", "--spec-tokens", "0"],
    ["m", "--compilation-config", '{"cudagraph_capture_sizes": [-4, 0]}'],
    ["m", "--compilation-config", '{"cudagraph_capture_sizes": []}'],
    ["m", "--compilation-config", '{"max_cudagraph_capture_size": 0}'],
    ["m", "--compilation-config", '{"max_cudagraph_capture_size": "--5"}'],
    ["m", "--compilation-config", '{"max_cudagraph_capture_size": "\u00b2"}'],
]
# Odd values vLLM takes: 0 for "unset", whole numbers as strings or floats, no graphs at all
ACCEPTED_ODD = [
    ["m", "--max-num-seqs", "0"], ["m", "--max-num-batched-tokens", "0"],
    ["m", "--speculative-config", '{"method": "mtp", "num_speculative_tokens": "2"}'],
    ["m", "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2.0}'],
    ["m", "--compilation-config", '{"max_cudagraph_capture_size": " 16 "}'],
    ["m", "--compilation-config", '{"max_cudagraph_capture_size": 0}', "--enforce-eager"],
    ["m", "--compilation-config", '{"cudagraph_capture_sizes": []}', "-O0"],
]


def mirror_differences(release: str, commands: list[list[str]]) -> tuple[int, list[str]]:
    """The serve mirror (``serve_command.parse``, ``batch_plan``) against the installed vLLM's parser and
    ``_set_cudagraph_sizes`` for each command x GPU x MTP modules (1: the recipe's override; 3: the checkpoint's):
    the rows compared, and those that differ (a refusal must be a refusal on both sides)."""
    rows = [(argv, arch, mem, mtp) for argv in commands for arch, mem in GPUS for mtp in (1, 3)]
    wrong = []
    for (argv, arch, mem, mtp), theirs in zip(rows, vllm_probe.serve_plans(rows)):
        try:
            cmd = serve_command.parse(["vllm", "serve", *argv], release)
            plan = batch_plan.batch_plan(cmd, arch, mem, release, mtp)
            ours = {"command": {k: v for k, v in vars(cmd).items() if k != "argv"},
                    "plan": {"max_num_seqs": plan.max_num_seqs, "max_num_batched_tokens": plan.max_num_batched_tokens,
                             "capture_sizes": list(plan.capture_sizes)}}
        except UsageError as e:
            ours = {"error": str(e)}
        if ("error" in ours, "error" in theirs) == (True, True):
            continue
        if ours != theirs:
            wrong.append(f"{argv} {arch} {mem} GB, {mtp} MTP: mirror {ours}; vLLM {theirs}")
    return len(rows), wrong


def test_the_serve_mirror_reads_and_plans_as_vllm():
    rows, wrong = mirror_differences("0.33", COMMANDS)
    assert rows == 2 * len(GPUS) * len(COMMANDS) and not wrong, "\n".join(wrong)
    assert all("error" in a for a in vllm_probe.serve_plans([(c, "sm90", 141, 1) for c in COMMANDS_034[:4]]))


def test_sizes_vllm_refuses_are_refused_and_odd_ones_read_alike():
    rows, wrong = mirror_differences("0.33", REFUSED + ACCEPTED_ODD)
    assert rows == 2 * len(GPUS) * len(REFUSED + ACCEPTED_ODD) and not wrong, "\n".join(wrong)
    answers = vllm_probe.serve_plans([(c, "sm90", 141, 1) for c in REFUSED + ACCEPTED_ODD])
    assert ["error" in a for a in answers] == [True] * len(REFUSED) + [False] * len(ACCEPTED_ODD)


def test_the_mirrors_bounds_are_vllms_fields():
    """serve_command.BOUNDS (the mirror's) against the pydantic bounds of vLLM 0.33's own config fields."""
    pytest.importorskip("vllm")
    import annotated_types
    import vllm.config

    for key, (cls, least) in serve_command.BOUNDS.items():
        bounds = getattr(vllm.config, cls).__pydantic_fields__[key].metadata
        assert bounds in ([annotated_types.Ge(ge=least)], [annotated_types.Gt(gt=least - 1)]), (key, bounds)


def test_the_committed_flag_list_is_vllms_parser():
    assert serve_command.serve_flags("0.33") == vllm_probe.serve_flags()


def test_the_flags_tune_moe_emits_are_vllms():
    from tuning.serve.recipe import MTP_FLAGS, RECIPE_FLAGS

    flags = serve_command.serve_flags()
    emitted = [w for w in (*RECIPE_FLAGS, *MTP_FLAGS, "--tensor-parallel-size", "--data-parallel-size",
                           "--enable-expert-parallel", "--moe-backend", "--port", "--load-format", "--hf-overrides",
                           "--profiler-config") if w.startswith("--")]
    assert all(f in flags for f in emitted), [f for f in emitted if f not in flags]
    import vllm.envs as envs

    from tuning.configs import TUNED_VAR

    for name in (TUNED_VAR, "VLLM_USE_DEEP_GEMM", "VLLM_MOE_USE_DEEP_GEMM", "VLLM_USE_DEEP_GEMM_E8M0",
                 "VLLM_BATCH_INVARIANT", "VLLM_TRITON_USE_TD", "VLLM_USE_FLASHINFER_SAMPLER", "VLLM_LOGGING_LEVEL"):
        assert name in envs.environment_variables, name
    assert "VLLM_USE_FLASHINFER_MOE_FP8" not in envs.environment_variables


def test_tokens_per_step_multiply_by_the_dp_ranks_only_under_ep():
    plan = batch_plan.BatchPlan(max_num_seqs=8, max_num_batched_tokens=64, capture_sizes=(1, 2, 4, 8))
    ep = serve_command.ServeCommand(model="m", dp=4, ep=True)
    assert preflight.engine_tokens(ep, plan) == [4, 8, 16, 32, 256]
    assert preflight.engine_tokens(serve_command.ServeCommand(model="m", dp=4), plan) == [1, 2, 4, 8, 64]
    assert preflight.far(32768, BATCH_SIZES) and not preflight.far(8192, BATCH_SIZES)
    assert get_gpu("B200").arch == "sm100"


def test_preflight_reads_the_backend_advice_file(capsys, tmp_path, monkeypatch):
    """The advice line comes from data/backend_advice.json, as committed (the H200 bake-off) and as another run
    rewrites it; bf16 gets the one line that needs no bake-off."""
    import json

    from tuning.vllm import backend_advice

    serve = ["stepfun-ai/Step-3.5-Flash-FP8", "--data-parallel-size", "4", "--enable-expert-parallel", *RECIPE]
    _, out, _ = run(capsys, "H200", serve)
    assert "advice: backend advice for DP4+EP on H200: --moe-backend triton (measured 2026-12-04: M 1-4096: " \
           "triton; M 32768-32768: deep_gemm)" in out  # timed with the files as committed: nothing to re-time
    data = json.loads(backend_advice.data_file("0.33").read_text())
    entry = next(e for e in data["entries"] if e["layout"] == "DP4+EP")
    entry.update(measured=True, serve_config="deep_gemm_e8m0_off", provenance={"date": "2026-12-01"},
                 ranges=[{"m_min": 1, "m_max": 96, "fastest": "triton"},
                         {"m_min": 128, "m_max": 4096, "fastest": "deep_gemm_e8m0_off"}])
    (tmp_path / "vllm-0.33.json").write_text(json.dumps(data))
    monkeypatch.setattr(backend_advice, "FOLDER", tmp_path)
    _, out, _ = run(capsys, "H200", serve)
    assert ("advice: backend advice for DP4+EP on H200: VLLM_USE_DEEP_GEMM_E8M0=0 --moe-backend deep_gemm "
            "(measured 2026-12-01: M 1-96: triton; M 128-4096: deep_gemm_e8m0_off") in out
    _, out, _ = run(capsys, "H200", ["stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "4", *RECIPE])
    assert f"advice: {backend_advice.BF16}" in out


def test_every_fix_is_a_tune_whose_plan_holds_the_files_the_serve_misses(capsys, tmp_path):
    """Across GPUs, both checkpoints, TP and EP layouts, --moe-backend auto/triton/deep_gemm and DeepGEMM's E8M0 on and
    off (vLLM 0.34's rules, which the mirror answers here without a subprocess): wherever preflight finds a tuned file
    missing, its fix line is a tune-moe command that runs, and its dry run plans every file the serve misses. A serve
    whose weights do not fit says so first and offers no tune (the tune plans no such layout)."""
    layouts = {"TP2": ["--tensor-parallel-size", "2"], "TP4": ["--tensor-parallel-size", "4"],
               "TP8": ["--tensor-parallel-size", "8"], "TP4+EP": ["--tensor-parallel-size", "4", "--enable-expert-parallel"],
               "DP4+EP": ["--data-parallel-size", "4", "--enable-expert-parallel"]}
    fixed = refused = unfit = 0
    for gpu, model, layout, backend, e8m0 in itertools.product(
            ("H200", "H20", "B200"), ("stepfun-ai/Step-3.5-Flash", "stepfun-ai/Step-3.5-Flash-FP8"), layouts,
            ("auto", "triton", "deep_gemm"), ("1", "0")):
        argv = ["preflight", "--gpu", gpu, "--vllm-version", "0.34.0", "--", f"VLLM_TUNED_CONFIG_FOLDER={tmp_path}",
                f"VLLM_USE_DEEP_GEMM_E8M0={e8m0}", "vllm", "serve", model, *layouts[layout], "--moe-backend", backend]
        code = main(argv)
        out, err = capsys.readouterr()
        row = f"{gpu} {model} {layout} {backend} E8M0={e8m0}"
        missing = set(re.findall(r"problem: [^:]+: (E=\S+\.json) is not in ", out))
        fix = [line.removeprefix("fix: ") for line in out.splitlines() if line.startswith("fix: ")]
        if "problem: the weights do not fit: " in out:
            first = next(line for line in out.splitlines() if line.startswith("problem: "))
            assert not fix and first.startswith("problem: the weights do not fit: "), row
            unfit += 1
            continue
        if "vLLM will not start" in out or not missing:  # a backend that cannot run a layer kind: no tune fixes it
            refused += "vLLM will not start" in out
            assert not fix and code in (0, 1), row
            continue
        assert len(fix) == 1, f"{row}\n{out}"
        words = fix[0].split()
        assert words[0] == "tune-moe" and main([*words[1:], "--dry-run"]) == 0, f"{row}: {fix[0]}"
        planned = set(re.findall(r"^  (E=\S+\.json)$", capsys.readouterr().out, re.M))
        assert missing <= planned, f"{row}: {fix[0]} plans {planned}, the serve misses {missing}"
        fixed += 1
    assert fixed > 60 and refused > 0 and unfit > 0, (fixed, refused, unfit)
