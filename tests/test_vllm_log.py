"""Reading vLLM 0.33 server logs: config lines, backend lines, the proof check, agreement with preflight's
per-layer-kind prediction, and the loop back to tuning."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tuning.errors import UsageError
from tuning.vllm.log import (
    TRITON_BACKENDS,
    Predicted,
    agreement,
    jit_compiles,
    missing_config_files,
    prove_default,
    prove_tuned,
    read_log,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLED = "/usr/lib/python3/dist-packages/vllm/model_executor/layers/fused_moe/configs"
EP4 = "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
TP4 = "E=288,N=320,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[64,64].json"
EP8 = "E=36,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
PREFIX = "(EngineCore_DP0 pid=123) (Worker_TP0 pid=456)"


def missing_line(name: str, folder: str | None = "/srv/tune-moe/kernels_configs/NVIDIA_H200") -> str:
    paths = ([f"{folder}/{name}"] if folder else []) + [f"{BUNDLED}/{name}"]
    return (f"{PREFIX} WARNING 11-29 05:40:01 [fused_moe.py:1165] Using default MoE config. Performance might be "
            f"sub-optimal! Config file not found at {', '.join(paths)}")


def loaded_line(path: str) -> str:
    return f"{PREFIX} INFO 11-29 05:40:01 [fused_moe.py:1152] Using configuration from {path} for MoE layer."


def test_real_vllm_lines_give_names_paths_and_backends():
    # Lines as vLLM 0.33 writes them (captured from its get_moe_configs and the FP8 oracle's message).
    log = "\n".join([
        "(APIServer pid=100) INFO 11-29 05:39:58 [api_server.py:1] vLLM API server version 0.33.0",
        missing_line(EP4),
        loaded_line("/srv/tune-moe/kernels_configs/NVIDIA_H200/" + TP4),
        f"{PREFIX} INFO 11-29 05:40:00 [fp8.py:422] Using FLASHINFER_CUTLASS Fp8 MoE backend out of potential "
        "backends: ['FLASHINFER_CUTLASS', 'TRITON', 'DEEPGEMM'].",
        missing_line(EP4),  # every node's first rank warns once: counted once
    ])
    facts = read_log(log)
    assert facts.missing == [EP4]
    assert facts.searched == [f"/srv/tune-moe/kernels_configs/NVIDIA_H200/{EP4}", f"{BUNDLED}/{EP4}"]
    assert facts.loaded == ["/srv/tune-moe/kernels_configs/NVIDIA_H200/" + TP4]
    assert facts.backends == ["FLASHINFER_CUTLASS (Fp8)"]


def test_folder_with_spaces_and_commas_does_not_shift_the_name():
    folder = "/data/my configs, v2/NVIDIA_H200"
    facts = read_log(missing_line(EP4, folder) + "\n" + loaded_line(f"{folder}/{TP4}"))
    assert facts.missing == [EP4]
    assert facts.loaded == [f"{folder}/{TP4}"]


def test_without_tuned_folder_and_with_colour_and_carriage_returns():
    coloured = ("\x1b[0;36m(EngineCore_DP0 pid=1)\x1b[0;0m \x1b[33mWARNING\x1b[0m"
                + missing_line(EP4, None)[len(PREFIX):])
    progress = "Loading safetensors checkpoint shards:  50% Completed | 1/2\r" + loaded_line(f"/k/{TP4}")
    facts = read_log(coloured + "\x1b[0m\n" + progress + "\r\n")
    assert facts.missing == [EP4]
    assert facts.searched == [f"{BUNDLED}/{EP4}"]
    assert facts.loaded == [f"/k/{TP4}"]


def test_backend_names_with_spaces():
    log = (f"{PREFIX} INFO [unquantized.py:266] Using FlashInfer CUTLASS Unquantized MoE backend out of potential "
           "backends: ['FlashInfer CUTLASS', 'TRITON'].\n"
           f"{PREFIX} INFO [fp8.py:422] Using TRITON Fp8 MoE backend out of potential backends: ['TRITON'].")
    facts = read_log(log)
    assert facts.backends == ["FlashInfer CUTLASS (Unquantized)", "TRITON (Fp8)"]
    assert facts.backend_names == ["FlashInfer CUTLASS", "TRITON"]


def test_tuned_proof_passes_only_for_files_from_the_tuned_folder(tmp_path):
    folder = tmp_path / "NVIDIA_H200"
    ok = prove_tuned(read_log(loaded_line(f"{folder}/{EP4}") + "\nUsing TRITON Fp8 MoE backend"), [EP4], folder,
                     tmp_path / "log")
    assert ok.ok and ok.problems == () and ok.backends == ("TRITON (Fp8)",)

    elsewhere = prove_tuned(read_log(loaded_line(f"{BUNDLED}/{EP4}")), [EP4], folder, tmp_path / "log")
    assert not elsewhere.ok and "not from the tuned folder" in elsewhere.problems[0]


def test_tuned_proof_names_every_defaulted_file_and_the_way_back(tmp_path):
    log = missing_line(EP4) + "\n" + missing_line(EP8)
    proof = prove_tuned(read_log(log), [EP4], tmp_path, tmp_path / "serve.log")
    assert not proof.ok
    assert EP4 in proof.problems[0] and EP8 in proof.problems[0]
    assert f"--from-vllm-log {tmp_path / 'serve.log'}" in proof.problems[0]


def test_non_triton_backend_explains_the_silence(tmp_path):
    log = "Using FLASHINFER_CUTLASS Fp8 MoE backend out of potential backends: ['FLASHINFER_CUTLASS', 'TRITON']."
    proof = prove_tuned(read_log(log), [EP4], tmp_path, tmp_path / "log")
    assert not proof.ok
    assert proof.problems == (f"vLLM ran only the FLASHINFER_CUTLASS (Fp8) MoE backend, which reads no Triton tuned "
                              f"file, so {EP4} was never looked up",)

    silent = prove_tuned(read_log("Using TRITON Fp8 MoE backend"), [EP4], tmp_path, tmp_path / "log")
    assert "never reported a config" in silent.problems[0]


def backend_line(name: str, quant: str = "Unquantized") -> str:
    return f"{PREFIX} INFO 11-29 05:40:00 [unquantized.py:266] Using {name} {quant} MoE backend out of potential " \
           f"backends: ['{name}']."


def test_only_triton_proves_the_tuned_configs_ran_as_tuned(tmp_path):
    assert TRITON_BACKENDS == ("TRITON",)
    folder = tmp_path / "NVIDIA_H200"
    name = "E=288,N=320,device_name=NVIDIA_H200.json"
    loaded = loaded_line(f"{folder}/{name}")
    assert prove_tuned(read_log(backend_line("TRITON") + "\n" + loaded), [name], folder, tmp_path / "log").ok
    batched = prove_tuned(read_log(backend_line("BATCHED_TRITON") + "\n" + loaded), [name], folder, tmp_path / "log")
    assert not batched.ok and batched.loaded == (f"{folder}/{name}",)
    assert batched.problems == (f"vLLM ran the BATCHED_TRITON MoE backend and read {name}: that backend runs the "
                                "batched kernel, where M means tokens per expert, not the tokens the file's batch "
                                "keys mean, so reading a tuned file does not prove the tuned configs ran as tuned "
                                "(only TRITON, vLLM's TritonExperts, runs them as tuned)",)


SILU, STEP = "SiLU layers", "SwiGLU-step layers"


def test_agreement_one_backend_line_covers_both_layer_kinds():
    log = read_log("\n".join([backend_line("TRITON", "Fp8")] * 4 + [loaded_line(f"/k/{TP4}")]))
    assert agreement(log, [Predicted(SILU, "TRITON", TP4), Predicted(STEP, "TRITON", TP4)]) == ()


def test_agreement_two_kinds_two_backends_both_logged():
    log = read_log(backend_line("FLASHINFER_CUTLASS", "Fp8") + "\n" + backend_line("DEEPGEMM", "Fp8"))
    assert agreement(log, [Predicted(SILU, "FLASHINFER_CUTLASS"), Predicted(STEP, "DEEPGEMM")]) == ()
    only_one = read_log(backend_line("FLASHINFER_CUTLASS", "Fp8"))
    assert agreement(only_one, [Predicted(SILU, "FLASHINFER_CUTLASS"), Predicted(STEP, "DEEPGEMM")]) == (
        "vLLM's log disagrees with preflight on the MoE backend: vLLM logged FLASHINFER_CUTLASS; preflight predicted "
        "SiLU layers: FLASHINFER_CUTLASS; SwiGLU-step layers: DEEPGEMM",)


def test_agreement_names_a_file_preflight_did_not_predict_and_the_predicted_ones():
    log = read_log("\n".join([backend_line("TRITON", "Fp8"), loaded_line(f"/k/{TP4}"), missing_line(EP4)]))
    assert agreement(log, [Predicted(SILU, "TRITON", TP4), Predicted(STEP, "TRITON", TP4)]) == (
        f"vLLM's log disagrees with preflight on the tuned files: vLLM looked up {EP4}, which preflight did not predict "
        f"(preflight predicted SiLU layers: {TP4}; SwiGLU-step layers: {TP4})",)
    # a file vLLM looked up and did not find still counts as looked up: the default run of --ab agrees
    defaulted = read_log(backend_line("TRITON", "Fp8") + "\n" + missing_line(TP4, None))
    assert agreement(defaulted, [Predicted(SILU, "TRITON", TP4), Predicted(STEP, "TRITON", TP4)]) == ()


def test_agreement_with_space_named_backends_and_batched_triton():
    log = read_log(backend_line("FlashInfer CUTLASS") + "\n" + backend_line("TRITON"))
    assert agreement(log, [Predicted(SILU, "FlashInfer CUTLASS"), Predicted(STEP, "TRITON")]) == ()
    # BATCHED_TRITON looks a file up that preflight does not count as read as tuned: not a disagreement
    batched = read_log(backend_line("BATCHED_TRITON") + "\n" + loaded_line(f"/k/{TP4}"))
    assert agreement(batched, [Predicted(SILU, "BATCHED_TRITON"), Predicted(STEP, "BATCHED_TRITON")]) == ()


def test_default_proof_wants_the_warning_for_every_expected_file(tmp_path):
    assert prove_default(read_log(missing_line(EP4, None)), [EP4], tmp_path).ok
    loaded = prove_default(read_log(loaded_line(f"/k/{EP4}")), [EP4], tmp_path)
    assert not loaded.ok and "baseline server loaded /k/" in loaded.problems[0]


def test_missing_config_files_errors_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="cannot read it"):
        missing_config_files(tmp_path / "absent.log")
    clean = tmp_path / "clean.log"
    clean.write_text(loaded_line(f"/k/{EP4}") + "\n")
    with pytest.raises(UsageError, match="no missing MoE config"):
        missing_config_files(clean)


def plan_files(output: str) -> list[str]:
    section = output.split("Shapes (", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in section.splitlines() if line.strip().endswith(".json")]


def test_from_vllm_log_tunes_exactly_the_missing_shapes(tmp_path):
    log = tmp_path / "vllm-serve-tuned.log"
    log.write_text("\n".join([
        "(APIServer pid=100) INFO 11-29 05:39:58 [api_server.py:1] vLLM API server version 0.33.0",
        missing_line(EP4),
        missing_line(TP4, "/srv/with space, and comma"),
        loaded_line(f"/srv/tune-moe/kernels_configs/NVIDIA_H200/{EP8}"),  # found: must not be tuned again
        missing_line(EP4),
    ]) + "\n")
    done = subprocess.run([sys.executable, "-m", "tuning.cli", "--gpu", "H200", "--dtype", "fp8",
                           "--from-vllm-log", str(log), "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(plan_files(done.stdout)) == sorted([EP4, TP4])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM installed")
def test_lines_written_by_vllms_own_code(tmp_path):
    """vLLM's get_moe_configs and logger write the lines; read_log must find what they say."""
    tuned = tmp_path / "tuned dir"
    tuned.mkdir()
    (tuned / "E=288,N=320,device_name=NVIDIA_H200.json").write_text('{"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, '
                                                                     '"BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, '
                                                                     '"num_warps": 4, "num_stages": 3}}')
    script = textwrap.dedent("""
        from vllm.platforms import current_platform
        type(current_platform).get_device_name = classmethod(lambda cls, device_id=0: "NVIDIA H200")
        import vllm.logger
        vllm.logger._configure_vllm_root_logger()
        from vllm.utils.system_utils import decorate_logs
        from vllm.model_executor.layers.fused_moe import fused_moe
        decorate_logs("EngineCore_DP0")
        fused_moe.get_moe_configs(72, 1280, "fp8_w8a8", 128, 128)
        fused_moe.get_moe_configs(288, 320, None)
    """)
    env = {"VLLM_TUNED_CONFIG_FOLDER": str(tuned), "VLLM_LOGGING_LEVEL": "INFO", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    facts = read_log(done.stdout + done.stderr)
    assert facts.missing == [EP4]
    assert facts.searched[0] == f"{tuned}/{EP4}"
    assert facts.loaded == [f"{tuned}/E=288,N=320,device_name=NVIDIA_H200.json"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM installed")
def test_vllm_0_33_looks_up_no_down_file():
    """vLLM 0.33's own get_moe_configs takes no ``down_moe`` (a `_down.json` is 0.34's, looked up by its
    TritonExperts), and the rule the log check uses says 0.33 looks none up, on the layer 0.34 would."""
    import inspect

    from vllm.model_executor.layers.fused_moe import fused_moe

    from tuning.vllm.rules import LayerRuntime, looks_up_down_file

    assert "down_moe" not in inspect.signature(fused_moe.get_moe_configs).parameters
    r = LayerRuntime(backend="TRITON", experts="TritonExperts", error=None, n=640, block=(128, 128), e8m0=True)
    assert not looks_up_down_file(r, vllm_version="0.33.0", dtype="fp8")
    assert looks_up_down_file(r, vllm_version="0.34.0", dtype="fp8")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM installed")
def test_jit_compiles_reads_the_lines_vllms_own_jit_monitor_logs():
    """vLLM 0.33's ``_handle_jit_event`` writes the line (verbose: every compile, with its details; otherwise the
    first only); ``jit_compiles`` reads one compile per line, with and without the details, and nothing else."""
    import logging

    import vllm.utils.jit_monitor as jm

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(f"{PREFIX} WARNING 12-01 05:38:46 [jit_monitor.py:135] "
                                               f"{record.getMessage()}")
    jm.logger.addHandler(handler)
    saved = jm._mode, jm._verbose
    try:
        jm._mode, jm._verbose = "warn", True
        for _ in range(2):
            jm._handle_jit_event(backend="Triton", event="kernel JIT compilation", fn_name="fused_moe_kernel",
                                 detail="constexprs={BLOCK_SIZE_M=16, BLOCK_SIZE_N=64}; key='x'")
        jm._handle_jit_event(backend="CuTeDSL", event="JIT compilation", fn_name="grouped_gemm")
        jm._verbose = False
        jm._handle_jit_event(backend="Triton", event="kernel JIT compilation", fn_name="moe_align_block_size")
    finally:
        jm._mode, jm._verbose = saved
        jm.logger.removeHandler(handler)
    text = "\n".join([loaded_line("/x/E=1.json"), *lines])
    assert len(lines) == 4 and jit_compiles(text) == ["fused_moe_kernel", "fused_moe_kernel", "grouped_gemm",
                                                      "moe_align_block_size"]
