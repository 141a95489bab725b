"""``tune-moe`` planning from the command line: dry runs, narrowing, logs, and one-line refusals that write nothing.

Most cases call ``tuning.cli.main`` in-process; the cases that need a real PATH (no nvidia-smi, or a fake one)
and the "nothing written" checks run the installed console script, all at once, each in its own folder.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuning.shapes import BATCH_SIZES

FIXTURES = Path(__file__).parent / "fixtures" / "foundation"
TUNE_MOE = Path(sys.executable).with_name("tune-moe")
EP4 = "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
TP4 = "E=288,N=320,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[64,64].json"
BF16_EP4 = "E=72,N=1280,device_name=NVIDIA_H200.json"
BUNDLED = "/usr/lib/python3/dist-packages/vllm/model_executor/layers/fused_moe/configs"
BATCH_LINE = "Batch sizes (M): " + " ".join(map(str, BATCH_SIZES))


def install_fake_smi(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / "bin" / "nvidia-smi", bin_dir / "nvidia-smi")
    os.chmod(bin_dir / "nvidia-smi", 0o755)


def smi_rows(name: str, count: int, mib: int = 143771) -> str:
    return "\n".join(f"{i}, {name}, {mib}, 570.86.15" for i in range(count))


def missing_line(name: str) -> str:
    # As vLLM 0.33's get_moe_configs logs it: the tuned folder's path, then vLLM's bundled one.
    return ("(EngineCore_DP0 pid=123) (Worker_TP0 pid=456) WARNING 11-29 05:40:01 [fused_moe.py:1165] Using default "
            "MoE config. Performance might be sub-optimal! Config file not found at "
            f"/srv/tune-moe/kernels_configs/NVIDIA_H200/{name}, {BUNDLED}/{name}")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tune-moe: error: ")
    return lines[0]


# --- dry runs --------------------------------------------------------------------------------


def test_fp8_dry_run_on_h200(tune):
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run")
    assert rc == 0 and err == ""
    assert out.startswith("Plan: stepfun-ai/Step-3.5-Flash-FP8 fp8 on 8xH200 (NVIDIA_H200, sm90)")
    assert f"  {EP4}\n" in out
    assert f"  {TP4}\n" in out
    assert "layouts TP4+EP, DP4+EP" in out
    assert BATCH_LINE in out
    assert "Jobs: 6 shapes x 18 batch sizes = 108 (shape, M) jobs" in out
    assert "Dry run: nothing tuned." in out and "kernels_configs/vllm-0.33/NVIDIA_H200/" in out


def test_vllm_016_refuses_fp8_tp4(tune):
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--vllm-version", "0.16")
    assert rc == 0 and err == ""
    assert ("TP4: refused by vLLM 0.16: vLLM 0.16 needs the per-GPU expert width 1280/4=320 to be a multiple of "
            "the FP8 block 128; use DP4+EP") in out
    assert "block_shape=[64,64]" not in out and "block_shape=[32,32]" not in out
    assert f"  {EP4}\n" in out
    assert "Jobs: 4 shapes x 18 batch sizes = 72 (shape, M) jobs" in out


def test_vllm_016_with_only_tp4_is_an_error(tune):
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--vllm-version", "0.16", "--layouts", "TP4")
    assert rc == 2 and out == ""
    line = one_error_line(err)
    assert "layout TP4: vLLM 0.16 needs" in line and "use DP4+EP" in line


def test_bf16_does_not_fit_4xh20(tune):
    rc, out, err = tune("--gpu", "H20", "--dtype", "bf16", "--num-gpus", "4", "--dry-run")
    assert rc == 2
    assert "No layout fits stepfun-ai/Step-3.5-Flash bf16 on 4xH20." in out
    assert "TP4 on 4xH20: 98 GB weights per GPU of a 88 GB budget" in out
    assert one_error_line(err) == (
        "tune-moe: error: no layout fits stepfun-ai/Step-3.5-Flash bf16 on 4xH20; would fit: "
        "bf16 on 8xH20 (TP8 or DP8+EP), fp8 (stepfun-ai/Step-3.5-Flash-FP8) on 4xH20")


def test_layouts_and_batch_sizes_narrow_the_plan(tune):
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--layouts", "TP4", "--batch-sizes", "16,1")
    assert rc == 0 and err == ""
    assert "Shapes (1), each a file vLLM loads:" in out
    assert f"  {TP4}\n" in out and EP4 not in out
    assert "Batch sizes (M): 1 16\n" in out
    assert "Jobs: 1 shapes x 2 batch sizes = 2 (shape, M) jobs" in out
    assert out.count(" on 4xH200: ") == 1  # only TP4 was considered


def test_shape_selects_by_experts_and_width(tune):
    rc, out, _ = tune("--gpu", "H200", "--dtype", "bf16", "--dry-run", "--shape", "E=72,N=1280")
    assert rc == 0
    assert "Shapes (1)" in out and f"  {BF16_EP4}\n" in out
    rc, _, err = tune("--gpu", "H200", "--dtype", "bf16", "--dry-run", "--shape", "E=999,N=1")
    assert rc == 2 and "--shape E=999,N=1 matches none of the plan's shapes" in one_error_line(err)


def test_num_gpus_defaults_to_8_without_gpus(tune):
    _, out, _ = tune("--gpu", "B200", "--dtype", "bf16", "--dry-run")
    assert "on 8xB200 (NVIDIA_B200, sm100)" in out
    assert "TP8 on 8xB200" in out and "DP8+EP on 8xB200" in out
    rc, out, _ = tune("--gpu", "B200", "--dtype", "fp8", "--dry-run", "--num-gpus", "2", "--moe-backend", "triton")
    assert rc == 0 and "on 2xB200" in out
    layouts = [line.split(" on ")[0].strip() for line in out.splitlines()
               if " on 1xB200: " in line or " on 2xB200: " in line]
    assert layouts == ["TP1", "TP2", "TP2+EP", "DP2+EP"]
    assert "  E=288,N=640,device_name=NVIDIA_B200,dtype=fp8_w8a8,block_shape=[128,128].json\n" in out


def test_num_gpus_defaults_to_the_gpus_present(tune, tmp_path, monkeypatch):
    install_fake_smi(tmp_path / "smi-bin")
    monkeypatch.setenv("PATH", str(tmp_path / "smi-bin"))
    monkeypatch.setenv("FAKE_NVIDIA_SMI_ROWS", smi_rows("NVIDIA H200", 4))
    rc, out, _ = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run")
    assert rc == 0
    assert "on 4xH200" in out and "TP8" not in out and "E=36," not in out
    assert "Jobs: 4 shapes x 18 batch sizes = 72 (shape, M) jobs" in out


def test_another_model_from_its_config(tune):
    rc, out, _ = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--model", str(FIXTURES / "deepseek_v3"),
                      "--layouts", "TP8,DP8+EP")
    assert rc == 0
    assert "  E=256,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json\n" in out
    assert "  E=32,N=2048,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json\n" in out
    assert "routed over 256 global experts" in out


def test_from_vllm_log_lists_exactly_the_missing_shapes(tune, tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text("\n".join(["(APIServer pid=100) INFO vLLM API server version 0.33.0",
                              missing_line(EP4), missing_line(TP4), missing_line(EP4)]) + "\n")
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--from-vllm-log", str(log))
    assert rc == 0 and err == ""
    listed = [line.strip() for line in out.splitlines() if line.startswith("  E=")]
    assert sorted(listed) == sorted([EP4, TP4])
    assert "Jobs: 2 shapes x 18 batch sizes = 36 (shape, M) jobs" in out


def test_from_vllm_log_without_missing_configs_is_an_error(tune, tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text("(EngineCore_DP0 pid=123) INFO 11-29 05:40:01 [fused_moe.py:1152] Using configuration from "
                   "/k/x.json for MoE layer.\n")
    rc, _, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--from-vllm-log", str(log))
    assert rc == 2 and "vLLM reported no missing MoE config" in one_error_line(err)
    rc, _, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--from-vllm-log", str(tmp_path / "none.log"))
    assert rc == 2 and "cannot read it" in one_error_line(err)


def test_from_vllm_log_does_not_add_shapes_the_log_did_not_name(tune, tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text(missing_line(BF16_EP4) + "\n")
    _, out, _ = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--from-vllm-log", str(log))
    assert EP4 not in out


def test_from_vllm_log_with_per_tensor_fp8_is_one_line(tune, tmp_path):
    """--quantization fp8 on the bf16 checkpoint: vLLM asks for dtype=fp8_w8a8 without a block_shape."""
    log = tmp_path / "vllm.log"
    log.write_text(missing_line("E=288,N=320,device_name=NVIDIA_H200,dtype=fp8_w8a8.json") + "\n")
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--from-vllm-log", str(log))
    assert rc == 2 and "per-tensor FP8" in one_error_line(err) and "-FP8" in err


def test_from_vllm_log_plans_a_logged_shape_outside_the_node_with_its_layouts(tune, tmp_path):
    """A log of a bf16 TP16 serve (two nodes) names N=80: a shape of the model, planned with the layout that runs it;
    a shape the model runs on no layout (another model's log) and --layouts beside the log are one line each."""
    log = tmp_path / "vllm.log"
    log.write_text(missing_line("E=288,N=80,device_name=NVIDIA_H200.json") + "\n")
    rc, out, err = tune("--gpu", "H200", "--dtype", "bf16", "--dry-run", "--from-vllm-log", str(log))
    assert rc == 0 and "bf16 E=288 N=80, K=4096, top-8; layouts TP16" in out
    log.write_text(missing_line("E=100,N=100,device_name=NVIDIA_H200.json") + "\n")
    rc, out, err = tune("--gpu", "H200", "--dtype", "bf16", "--dry-run", "--from-vllm-log", str(log))
    assert rc == 2 and "E=100,N=100,device_name=NVIDIA_H200.json, which no TP/DP/EP layout of " \
                       "stepfun-ai/Step-3.5-Flash runs" in one_error_line(err)
    rc, out, err = tune("--gpu", "H200", "--dtype", "bf16", "--dry-run", "--from-vllm-log", str(log), "--layouts", "TP8")
    assert rc == 2 and "drop --layouts" in one_error_line(err)


def test_an_explicit_moe_backend_plans_only_what_reads_a_tuned_file(tune):
    """vllm_rules.layer_runtime per layer kind: FlashInfer-CUTLASS cannot run the SwiGLU-step layers (vLLM will not
    start), Marlin reads no Triton file, and deep_gemm's Triton fallback reads the padded file with E8M0 off."""
    base = ("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--layouts", "TP4", "--num-gpus", "4", "--moe-backend")
    rc, out, err = tune(*base, "flashinfer_cutlass")
    assert rc == 2 and "layout TP4: vLLM will not start with --moe-backend flashinfer_cutlass: SwiGLU-step layers: " \
                       "ValueError: FP8 MoE backend FLASHINFER_CUTLASS does not support" in one_error_line(err)
    rc, out, err = tune(*base, "marlin")
    assert rc == 2 and "no MoE layer kind runs the Triton kernel (SiLU layers MARLIN, SwiGLU-step layers MARLIN)" \
                       in one_error_line(err)
    rc, out, err = tune(*base, "deep_gemm")
    assert rc == 0 and "E=288,N=384,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json" in out
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--num-gpus", "4", "--moe-backend", "marlin")
    assert rc == 2 and "  TP2, TP4, TP2+EP, TP4+EP, DP2+EP, DP4+EP: not planned: with --moe-backend marlin" in out
    assert "would fit" not in out and "TP1 on 1xH200" in out  # a layout that does not fit says so, not planned
    assert "with --moe-backend marlin no layout reads a Triton tuned file (above); tune for a backend that runs " \
           "vLLM's Triton kernel: auto, triton or deep_gemm" in one_error_line(err)


def test_the_default_backend_plans_only_layouts_a_serve_reads_a_tuned_file_in(tune):
    """Under --moe-backend auto (vllm_rules.layer_runtime, checked against vLLM's own selection in
    tests/test_vllm_probe.py): on a B200, vLLM 0.33 runs FlashInfer TRT-LLM and DeepGEMM (UE8M0) for the FP8 TP2 and
    expert-parallel layouts, so only the refined TP4/TP8 shards are tuned; the rest is named with the flag that
    plans it."""
    rc, out, err = tune("--gpu", "B200", "--dtype", "fp8", "--dry-run")
    assert rc == 0, err
    assert ("  TP2, TP2+EP, TP4+EP, TP8+EP, DP2+EP, DP4+EP, DP8+EP: not planned: with --moe-backend auto vLLM 0.33.0 "
            "runs SiLU layers FLASHINFER_TRTLLM, SwiGLU-step layers DEEPGEMM on B200, and no MoE layer kind runs the "
            "Triton kernel: no tuned file is read (--moe-backend triton plans the layout for a serve that passes it)"
            ) in out
    assert "Shapes (2)" in out and "= 36 (shape, M) jobs" in out
    assert "E=288,N=320,device_name=NVIDIA_B200,dtype=fp8_w8a8,block_shape=[64,64].json" in out
    rc, out, err = tune("--gpu", "B200", "--dtype", "fp8", "--dry-run", "--layouts", "DP4+EP", "--num-gpus", "4")
    assert rc == 2 and one_error_line(err).startswith("tune-moe: error: layout DP4+EP: with --moe-backend auto vLLM "
                                                       "0.33.0 runs ")
    rc, out, err = tune("--gpu", "B200", "--dtype", "fp8", "--dry-run", "--layouts", "DP4+EP", "--num-gpus", "4",
                        "--moe-backend", "triton")
    assert rc == 0 and "E=72,N=1280,device_name=NVIDIA_B200,dtype=fp8_w8a8,block_shape=[128,128].json" in out


def test_the_default_backend_says_which_layer_kinds_and_serves_read_each_file(tune):
    """A shape a default serve reads on some layer kinds, or only under another serve, says so: B200 bf16 under vLLM
    0.33 (SiLU layers on FlashInfer TRT-LLM), the H200's FP8 expert-parallel shapes (FlashInfer-CUTLASS and
    DeepGEMM under auto; DeepGEMM's Triton fallback with E8M0 off, and --moe-backend triton as the backend advice
    says). A shape vLLM's default reads on both kinds gets no note."""
    rc, out, err = tune("--gpu", "B200", "--dtype", "bf16", "--dry-run")
    assert rc == 0, err
    assert "Shapes (4)" in out and ("      with --moe-backend auto only the SwiGLU-step layers read it on TP4 (SiLU "
                                    "layers: FlashInfer TRTLLM)\n") in out
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run")
    assert rc == 0 and "Shapes (6)" in out and "= 108 (shape, M) jobs" in out
    assert ("      with --moe-backend auto no MoE layer reads it on TP4+EP, DP4+EP (SiLU layers: FLASHINFER_CUTLASS, "
            "SwiGLU-step layers: DEEPGEMM); read with VLLM_USE_DEEP_GEMM_E8M0=0 (SwiGLU-step layers, through "
            "DeepGEMM's Triton fallback); or --moe-backend triton (both MoE layer kinds, the backend advice for "
            "DP4+EP)\n") in out
    tp2 = out.split("E=288,N=640,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json\n")[1]
    assert tp2.splitlines()[1].startswith("  E=288,N=320,")  # the next file follows: no note under TP2's shape


def test_the_plan_names_the_file_an_advised_serve_reads_and_the_tune_that_adds_it(tune):
    """The H200's backend advice serves FP8 TP4 and TP8 with VLLM_USE_DEEP_GEMM_E8M0=0 --moe-backend deep_gemm, which
    reads the padded shard's file, not the refined one the default plan tunes: the plan says so, and the tune it
    names plans exactly that file. Without advice (a B200) nothing is said."""
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run")
    assert rc == 0, err
    padded = "E=288,N=384,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
    line = (f"  TP4: the backend advice serves it with VLLM_USE_DEEP_GEMM_E8M0=0 --moe-backend deep_gemm, which reads "
            f"{padded}; tune-moe --gpu H200 --dtype fp8 --layouts TP4 --moe-backend deep_gemm --vllm-version 0.33.0 "
            "tunes it\n")
    assert "\nAdvised serves that read a file this plan does not tune:\n" + line in out
    assert "  TP8: the backend advice serves it with" in out and "TP2: the backend advice" not in out
    command = line.split("; ")[1].removesuffix(" tunes it\n").split()
    rc, out, err = tune(*command[1:], "--dry-run")
    assert rc == 0 and f"Shapes (1), each a file vLLM loads:\n  {padded}\n" in out, err
    rc, out, _ = tune("--gpu", "B200", "--dtype", "fp8", "--dry-run")
    assert rc == 0 and "Advised serves" not in out


def test_the_default_backend_refuses_a_plan_no_serve_reads(tune):
    """vLLM 0.34 runs FlashInfer TRT-LLM for bf16 on a B200 on both layer kinds: a default serve reads no tuned file,
    so the tune stops in one line naming the flag that plans a Triton serve, and writes nothing."""
    rc, out, err = tune("--gpu", "B200", "--dtype", "bf16", "--dry-run", "--vllm-version", "0.34.0")
    assert rc == 2 and "No layout reads a Triton tuned file with --moe-backend auto." in out
    assert one_error_line(err) == ("tune-moe: error: with --moe-backend auto vLLM 0.34.0 runs no MoE layer of these "
                                   "layouts on Triton on B200 (above), so no tuned file would be read; pass "
                                   "--moe-backend triton to tune for a serve that passes it")
    rc, out, err = tune("--gpu", "B200", "--dtype", "bf16", "--dry-run", "--vllm-version", "0.34.0",
                        "--moe-backend", "triton")
    assert rc == 0 and "Shapes (4)" in out


def test_a_dry_run_for_another_vllm_says_the_tune_needs_its_kernel(tune):
    rc, out, _ = tune("--gpu", "H200", "--dtype", "bf16", "--dry-run", "--layouts", "TP4", "--num-gpus", "4",
                      "--vllm-version", "0.34.0")
    assert rc == 0
    assert "Kernel: the installed vLLM is 0.33.0, not 0.34.0; a tune needs --vllm-src with vLLM 0.34.0's " \
           "fused_moe.py or wheel" in out


def test_vllm_triton_use_td_is_refused(tune, monkeypatch):
    monkeypatch.setenv("VLLM_TRITON_USE_TD", "1")
    rc, _, err = tune("--gpu", "H200", "--dtype", "bf16", "--dry-run")
    assert rc == 2 and "VLLM_TRITON_USE_TD" in one_error_line(err)


def test_batch_sizes_vllm_adds_to_the_18(tune):
    rc, out, _ = tune("--gpu", "H200", "--dtype", "bf16", "--dry-run", "--layouts", "TP4", "--num-gpus", "4",
                      "--batch-sizes", "vllm,8192,32768")
    assert rc == 0 and "Batch sizes (M): 1 2 4 8 16 24 32 48 64 96 128 256 512 1024 1536 2048 3072 4096 8192 32768" in out


def test_num_gpus_zero_is_refused(tune):
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--num-gpus", "0")
    assert rc == 2 and out == ""
    assert "--num-gpus 0: must be at least 1" in one_error_line(err)


def test_fp8_of_a_bf16_checkpoint_says_so(tune):
    rc, out, err = tune("--gpu", "H200", "--dtype", "fp8", "--dry-run", "--model", "stepfun-ai/Step-3.5-Flash")
    assert rc == 2
    line = one_error_line(err)
    assert "no block-FP8 weights" in line and "-FP8" in line


# --- bad input, in-process: one line, the problem and the fix --------------------------------


@pytest.mark.parametrize("argv,expected", [
    (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--max-evals", "0"], "--max-evals 0: must be at least 1"),
    (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--num-gpus", "-1"], "--num-gpus -1: must be at least 1"),
    (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--num-gpus", "eight"], "argument --num-gpus: invalid int value"),
    (["--dtype", "fp8", "--dry-run"], "the following arguments are required: --gpu"),
    (["--gpu", "H200", "--dtype", "fp8", "--strategy", "random"], "argument --strategy: invalid choice"),
    (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--layouts", "TP4,XP2"], "cannot read 'XP2'"),
    (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--batch-sizes", ","], "--batch-sizes ','"),
    (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--batch-sizes", "1,,2"], "--batch-sizes '1,,2'"),
    (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--layouts", "TP4,,TP8"], "an empty item between commas"),
    (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--out", ""], "--out is empty"),
])
def test_more_bad_input_in_process(tune, argv, expected):
    rc, out, err = tune(*argv)
    assert rc == 2 and out == ""
    assert expected in one_error_line(err)


# --- the installed console script: PATH, nvidia-smi, and nothing written ---------------------

# case -> (arguments, nvidia-smi rows or None for no nvidia-smi on PATH, what stderr must say)
MISSING, CORRUPT, LLAMA = "missing/config.json", FIXTURES / "corrupt" / "config.json", FIXTURES / "llama"
BAD = {
    "unknown-gpu": (["--gpu", "A100", "--dtype", "fp8", "--dry-run"], None,
                    ["--gpu A100: unknown GPU", "use one of H200, H20, H20-3e, B200"]),
    "unknown-dtype": (["--gpu", "H200", "--dtype", "int8", "--dry-run"], None,
                      ["--dtype int8: unknown", "use one of bf16, fp8"]),
    "model-missing": (["--gpu", "H200", "--dtype", "bf16", "--dry-run", "--model", MISSING], None,
                      [f"--model {MISSING}: no such config.json", "pass a config.json path"]),
    "model-corrupt": (["--gpu", "H200", "--dtype", "bf16", "--dry-run", "--model", str(CORRUPT)], None,
                      [f"--model {CORRUPT}: not readable JSON", "pass the model's Hugging Face config.json"]),
    "model-not-moe": (["--gpu", "H200", "--dtype", "bf16", "--dry-run", "--model", str(LLAMA)], None,
                      ["model_type 'llama' is not a known MoE architecture", "tuning.models.ARCHITECTURES"]),
    "layout-dp5-ep": (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--layouts", "DP5+EP"], None,
                      ["layout DP5+EP: 288 experts do not split over 5 EP ranks", "use an EP size that divides 288"]),
    "layout-tp3": (["--gpu", "H200", "--dtype", "bf16", "--dry-run", "--layouts", "TP3"], None,
                   ["layout TP3: expert width 1280 does not split over TP3", "use a TP size that divides 1280"]),
    "layout-tp16": (["--gpu", "H200", "--dtype", "bf16", "--dry-run", "--layouts", "TP16", "--num-gpus", "8"], None,
                    ["--layouts TP16 need more than the 8 GPUs of the node", "raise --num-gpus"]),
    "batch-sizes": (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--batch-sizes", "1,x,16"], None,
                    ["--batch-sizes '1,x,16'", "write integers from 1 to 1048576 separated by commas"]),
    "batch-sizes-zero": (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--batch-sizes", "0,16"], None,
                         ["--batch-sizes '0,16'", "write integers from 1 to"]),
    "routing": (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--routing", "zipf:steep"], None,
                ["--routing 'zipf:steep'", "use uniform or zipf:<s>"]),
    "vllm-version": (["--gpu", "H200", "--dtype", "fp8", "--dry-run", "--vllm-version", "garbage"], None,
                     ["--vllm-version 'garbage'", "MAJOR.MINOR, e.g. 0.33"]),
    "bf16-4xh20": (["--gpu", "H20", "--dtype", "bf16", "--num-gpus", "4", "--dry-run"], None,
                   ["fits stepfun-ai/Step-3.5-Flash bf16 on 4xH20", "bf16 on 8xH20",
                    "fp8 (stepfun-ai/Step-3.5-Flash-FP8) on 4xH20"]),
    "no-gpu": (["--gpu", "H200", "--dtype", "fp8"], None,
               ["--gpu H200: this node has no NVIDIA GPU", "--dry-run"]),
    "wrong-gpu": (["--gpu", "H200", "--dtype", "fp8"], smi_rows("NVIDIA H20", 8, 97871),
                  ["this node has 8x NVIDIA H20, not NVIDIA H200", "pass the --gpu that matches", "--dry-run"]),
}
GOOD = {
    "dry-run": (["--gpu", "H200", "--dtype", "fp8", "--dry-run"], None),
    "dry-run-4xh200": (["--gpu", "H200", "--dtype", "fp8", "--dry-run"], smi_rows("NVIDIA H200 NVL", 4)),
}


@pytest.fixture(scope="module")
def console_runs(tmp_path_factory):
    """Every console-script case, started together; each gets (rc, stdout, stderr, folder before, folder after)."""
    if not TUNE_MOE.exists():
        pytest.skip(f"no console script at {TUNE_MOE}; pip install -e .")
    started = {}
    for case, (argv, rows, *_) in {**BAD, **GOOD}.items():
        cwd = tmp_path_factory.mktemp(case)
        bin_dir = cwd / "bin"
        if rows is None:
            bin_dir.mkdir()
        else:
            install_fake_smi(bin_dir)
        env = {**os.environ, "PATH": str(bin_dir), "FAKE_NVIDIA_SMI_ROWS": rows or ""}
        before = snapshot(cwd)
        proc = subprocess.Popen([str(TUNE_MOE), *argv], cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started[case] = (proc, cwd, before)
    results = {}
    for case, (proc, cwd, before) in started.items():
        out, err = proc.communicate(timeout=120)
        results[case] = (proc.returncode, out, err, cwd, before, snapshot(cwd))
    return results


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(console_runs, case):
    rc, out, err, cwd, before, after = console_runs[case]
    assert rc == 2, (out, err)
    line = one_error_line(err)
    for words in BAD[case][2]:
        assert words in line
    assert not (cwd / "kernels_configs").exists()
    assert after == before


def test_console_dry_run_writes_nothing(console_runs):
    rc, out, err, cwd, before, after = console_runs["dry-run"]
    assert rc == 0 and err == ""
    assert f"  {EP4}\n" in out and f"  {TP4}\n" in out
    assert BATCH_LINE in out and "= 108 (shape, M) jobs" in out
    assert "on 8xH200" in out
    assert not (cwd / "kernels_configs").exists() and after == before


def test_console_dry_run_counts_the_gpus_nvidia_smi_reports(console_runs):
    rc, out, err, cwd, before, after = console_runs["dry-run-4xh200"]
    assert rc == 0 and err == ""
    assert "on 4xH200" in out and "TP8" not in out
    assert "= 72 (shape, M) jobs" in out
    assert after == before


def test_plan_notes_which_fp8_shape_a_tp_serve_runs(tune):
    """Auto backend: the refined block, with a pointer to the padded shape; deep_gemm: the padded shape, which
    DeepGEMM runs by default (E8M0 on) and Triton only with VLLM_USE_DEEP_GEMM_E8M0=0 (N <= 512: TP4, TP8)."""
    rc, out, _ = tune("--gpu", "H200", "--dtype", "fp8", "--layouts", "TP4", "--num-gpus", "4", "--dry-run")
    assert rc == 0 and TP4 in out and "(--moe-backend deep_gemm pads the shard instead)" in out
    rc, out, _ = tune("--gpu", "H200", "--dtype", "fp8", "--layouts", "TP2,TP4,TP8", "--num-gpus", "8",
                      "--moe-backend", "deep_gemm", "--dry-run")
    notes = {ln.split()[2]: ln for ln in out.splitlines() if ln.startswith("      fp8 ")}
    assert set(notes) == {"N=640", "N=384", "N=256"}
    assert all("runs DeepGEMM at every M" in notes[n] and "VLLM_USE_DEEP_GEMM_E8M0=0" in notes[n]
               for n in ("N=384", "N=256"))
    assert "pads" not in notes["N=640"]
    rc, out, _ = tune("--gpu", "H200", "--dtype", "fp8", "--layouts", "TP16", "--num-gpus", "16",
                      "--moe-backend", "triton", "--dry-run")  # Triton runs the padded TP16 file at every M
    assert rc == 0 and "pads the 80-wide shard to whole FP8 blocks; layouts TP16" in out and "DeepGEMM" not in out


def test_blackwell_plan_says_the_same_of_the_padded_shape(tune):
    """On B200 as on H200, vLLM 0.33 runs DeepGEMM whenever deep_gemm is chosen and E8M0 is on."""
    rc, out, _ = tune("--gpu", "B200", "--dtype", "fp8", "--layouts", "TP4", "--num-gpus", "4",
                      "--moe-backend", "deep_gemm", "--dry-run")
    assert rc == 0 and "E=288,N=384,device_name=NVIDIA_B200,dtype=fp8_w8a8,block_shape=[128,128].json" in out
    assert "pads the 320-wide shard" in out and "runs DeepGEMM at every M" in out


@pytest.mark.parametrize("command", [None, *__import__("tuning.cli", fromlist=["COMMANDS"]).COMMANDS])
def test_every_command_prints_its_help(command, capsys):
    """`tune-moe [COMMAND] --help` renders every option's help (argparse %-formats each one) and exits 0."""
    from tuning import cli

    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"] if command else ["--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help to the terminal
    assert out.startswith("usage: tune-moe") and "internal error" not in out
    if command == "validate-serve":
        assert "agree within 3% on the workload's metric" in out
        assert "decode: 128-token prompts" in out and "decode: decode:" not in out


def test_the_dependencies_a_missing_import_is_told_to_install_are_pyproject_s():
    """A Python that lacks a dependency is told to install exactly what pyproject.toml requires for it."""
    tomllib = pytest.importorskip("tomllib")
    from tuning.errors import DEPENDENCIES, missing_dependency

    required = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert sorted(DEPENDENCIES.values()) == sorted(required["project"]["dependencies"])
    error = ModuleNotFoundError("No module named 'pynvml'", name="pynvml")
    assert "-m pip install 'nvidia-ml-py>=12.535'" in str(missing_dependency(error))
    assert missing_dependency(ModuleNotFoundError("No module named 'tuning.nope'", name="tuning.nope")) is None
    assert missing_dependency(ValueError("ray")) is None


def test_a_reader_that_goes_away_is_no_error():
    """`tune-moe ... | head -1`: the output's reader closes the pipe early; the command ends quietly (141, as a shell
    reports SIGPIPE), with nothing on stderr."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "tuning.cli", "--gpu", "H200", "--dtype", "fp8", "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command has written anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""
