"""validate-serve: the recipe's commands, and the serve orchestration against a fake ``vllm`` (no GPU, no model).

Preflight answers from tune-moe's mirror of vLLM's rules here (``vllm_probe.preflight`` answers None, as
for a vLLM whose internals moved), so no test but the one marked ``slow`` spends ~20 s importing vLLM.
"""

import importlib.util
import dataclasses
import json
import os
import shlex
import statistics
import signal
import socket
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import provenance_for
from tuning.serve import ab
from tuning import cli, provenance
from tuning.vllm import probe as vllm_probe
from tuning.vllm.backend_advice import advice_for
from tuning.configs import read_config_file
from tuning.errors import UsageError
from tuning.serve.envfile import read_env_file
from tuning.models import load_model
from tuning.serve.recipe import BenchSpec, ServeSpec
from tuning.shapes import BATCH_SIZES, parse_layout
from tuning.serve.workloads import WORKLOADS

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fixtures" / "fake_vllm"
RECIPE = ["--reasoning-parser", "step3p5", "--tool-call-parser", "step3p5", "--enable-auto-tool-choice",
          "--trust-remote-code"]
MTP = ["--hf-overrides", '{"num_nextn_predict_layers": 1}',
       "--speculative-config", '{"method": "step3p5_mtp", "num_speculative_tokens": 1}']
TP4_BF16 = "E=288,N=320,device_name=NVIDIA_H200.json"
EP4_FP8 = "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
EP4_BF16 = "E=72,N=1280,device_name=NVIDIA_H200.json"
TILE = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3}
CONFIG = json.dumps({str(m): TILE for m in BATCH_SIZES})  # a valid tuned file at vLLM's batch sizes
VLLMS_OWN_PREFLIGHT = vllm_probe.preflight
# validate-serve in a subprocess, preflight from the mirror
MIRROR_CLI = ("import sys; from tuning import cli; from tuning.vllm import probe as vllm_probe; "
              "vllm_probe.preflight = lambda *a: None; sys.exit(cli.main(sys.argv[1:]))")


# -- the commands ----------------------------------------------------------------------------------


def test_tp4_bf16_is_the_recipes_command():
    spec = ServeSpec(model="stepfun-ai/Step-3.5-Flash", layout=parse_layout("TP4"), dtype="bf16", port=8000)
    assert spec.argv() == ["vllm", "serve", "stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "4", *RECIPE,
                           "--port", "8000"]


def test_dp4_ep_fp8_with_mtp_backend_and_extra_args():
    spec = ServeSpec(model="/models/Step-3.5-Flash-FP8", layout=parse_layout("dp4+ep"), dtype="fp8", port=9001, mtp=True,
                     moe_backend="triton", extra_args=("--max-model-len", "32768"))
    assert spec.argv() == ["vllm", "serve", "/models/Step-3.5-Flash-FP8", "--data-parallel-size", "4",
                           "--enable-expert-parallel", *RECIPE, *MTP, "--moe-backend", "triton", "--port", "9001",
                           "--max-model-len", "32768"]


def test_print_command_tp4_mtp_with_env_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tune-moe-node.env").write_text("# written by node-check\nexport HF_HOME=/models/hf\n"
                                                "export VLLM_TUNED_CONFIG_FOLDER=/elsewhere\n"
                                                "export HF_TOKEN=hf_s3cr3t\n")
    code = cli.main(["validate-serve", "--layout", "TP4", "--dtype", "bf16", "--gpu", "H200", "--mtp",
                     "--port", "8123", "--print-command", "--out", "runs"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0] == "export HF_HOME=/models/hf"
    assert lines[1] == "# HF_TOKEN is set from the env file (not shown)"
    assert lines[2] == f"export VLLM_TUNED_CONFIG_FOLDER={tmp_path / 'kernels_configs' / 'vllm-0.33' / 'NVIDIA_H200'}"
    assert shlex.split(lines[3]) == ["vllm", "serve", "stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "4",
                                     *RECIPE, *MTP, "--port", "8123", "--jit-monitor-verbose"]
    served = ServeSpec(model="stepfun-ai/Step-3.5-Flash", layout=parse_layout("TP4"), dtype="bf16", port=8123)
    assert lines[4] == ("# then, once GET /health answers 200, warm-up passes on other prompts (discarded), --seed "
                        "1001, 1002, ...: until two in a row agree within 3% on output tok/s and vLLM compiled no "
                        "kernel during the second (--jit-monitor-verbose logs each), at most 4:")
    assert shlex.split(lines[5]) == BenchSpec(seed=1001).argv(served, tmp_path / "runs" / "bench-tuned-warmup1.json")
    assert lines[6] == "# then the measured pass:"
    assert shlex.split(lines[7]) == BenchSpec().argv(served, tmp_path / "runs" / "bench-tuned.json")
    assert lines[-1].endswith(f"kernels_configs/vllm-0.33/NVIDIA_H200/{TP4_BF16} for MoE layer.")


def test_print_command_fp8_dp4_ep_model_override_and_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["validate-serve", "--layout", "DP4+EP", "--dtype", "fp8", "--gpu", "H200", "--model",
                     "/models/fp8", "--configs", "baked", "--moe-backend", "triton", "--no-bench", "--print-command"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines == [f"export VLLM_TUNED_CONFIG_FOLDER={tmp_path / 'baked'}",
                     shlex.join(["vllm", "serve", "/models/fp8", "--data-parallel-size", "4",
                                 "--enable-expert-parallel", *RECIPE, "--moe-backend", "triton", "--port", "8000"]),
                     f"# vLLM must log: Using configuration from {tmp_path / 'baked' / EP4_FP8} for MoE layer."]


def test_environment_adds_the_env_file_and_the_tuned_folder_and_hides_secrets(tmp_path):
    env = (("HF_TOKEN", "hf_s3cr3t"), ("VLLM_TUNED_CONFIG_FOLDER", "/from/env/file"), ("NCCL_DEBUG", "WARN"))
    spec = ServeSpec(model="m", layout=parse_layout("TP4"), dtype="bf16", port=8000, tuned_folder=tmp_path, env=env)
    base = {"PATH": "/bin", "VLLM_TUNED_CONFIG_FOLDER": "/from/shell"}
    assert spec.environ(base) == {"PATH": "/bin", "HF_TOKEN": "hf_s3cr3t", "NCCL_DEBUG": "WARN",
                                  "VLLM_TUNED_CONFIG_FOLDER": str(tmp_path)}
    baseline = ServeSpec(model="m", layout=parse_layout("TP4"), dtype="bf16", port=8000, tuned_folder=None, env=env)
    assert "VLLM_TUNED_CONFIG_FOLDER" not in baseline.environ(base)
    assert spec.shown_env()["HF_TOKEN"] == "<hidden>"


def test_bench_command_is_the_recipes_and_overridable():
    serve = ServeSpec(model="stepfun-ai/Step-3.5-Flash", layout=parse_layout("TP4"), dtype="bf16", port=8000)
    assert BenchSpec().argv(serve, Path("/o/bench-tuned.json")) == [
        "vllm", "bench", "serve", "--backend", "vllm", "--model", "stepfun-ai/Step-3.5-Flash",
        "--endpoint", "/v1/completions", "--dataset-name", "random", "--random-input-len", "2048",
        "--random-output-len", "1024", "--max-concurrency", "10", "--num-prompts", "100",
        "--host", "127.0.0.1", "--port", "8000", "--save-result", "--result-dir", "/o", "--result-filename",
        "bench-tuned.json"]
    short = BenchSpec(num_prompts=5, max_concurrency=2, extra_args=("--seed", "1")).argv(serve, Path("/o/r.json"))
    assert short[short.index("--num-prompts") + 1] == "5" and short[short.index("--max-concurrency") + 1] == "2"
    assert short[-2:] == ["--seed", "1"]


def test_bench_options_ignore_eos_seed_and_profile_come_before_the_extra_args():
    serve = ServeSpec(model="m", layout=parse_layout("TP4"), dtype="bf16", port=8000)
    words = BenchSpec(ignore_eos=True, seed=1, profile=True, extra_args=("--x", "y")).argv(serve, Path("/o/r.json"))
    assert words[-6:] == ["--ignore-eos", "--seed", "1", "--profile", "--x", "y"]
    assert "--ignore-eos" not in BenchSpec().argv(serve, Path("/o/r.json"))


@pytest.mark.parametrize("name, m", [("decode", 32), ("prefill", 8192), ("recipe", 10)])
def test_workloads_know_the_tokens_per_fused_moe_call(name, m):
    w = WORKLOADS[name]
    assert w.tokens_per_step(8192) == m
    assert w.ignore_eos == (name != "recipe")
    assert w.primary == ("total_token_throughput" if name == "prefill" else "output_throughput")
    assert WORKLOADS["prefill"].tokens_per_step(2048) == 2048  # a smaller prefill chunk


@pytest.mark.parametrize("layout, dtype, backend, names", [
    ("TP4", "bf16", "auto", [TP4_BF16]),
    ("DP4+EP", "fp8", "auto", []),  # SiLU: FlashInfer-CUTLASS, SwiGLU-step: DeepGEMM: no Triton file is read
    ("DP4+EP", "fp8", "triton", [EP4_FP8]),
    ("TP4", "fp8", "auto", ["E=288,N=320,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[64,64].json"]),
    ("TP4", "fp8", "deep_gemm", []),  # DeepGEMM at every M: E8M0 is on by default
])
def test_expected_files_follow_vllms_rules_per_layer_kind(layout, dtype, backend, names, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate-serve", "--layout", layout, "--dtype", dtype, "--gpu", "H200", "--moe-backend", backend,
                     "--vllm-version", "0.33", "--print-command"]) == 0
    must = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# vLLM must log")]
    assert [line.rsplit("/", 1)[1].removesuffix(" for MoE layer.") for line in must] == names


@pytest.mark.parametrize("version, names", [
    ("0.33", ["E=288,N=160,device_name=NVIDIA_B200.json"]),  # SiLU: FlashInfer TRT-LLM, SwiGLU-step: Triton
    ("0.34", []),  # 0.34 runs the SwiGLU-step layers on FlashInfer TRT-LLM too (the mirror's 0.34 row)
])
def test_expected_files_follow_the_serves_release(version, names, tmp_path, monkeypatch, capsys):
    """A B200 bf16 TP8 serve: the lines a run waits for come from the mirror of the release it serves."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate-serve", "--layout", "TP8", "--dtype", "bf16", "--gpu", "B200", "--vllm-version", version,
                     "--print-command"]) == 0
    must = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# vLLM must log")]
    assert [line.rsplit("/", 1)[1].removesuffix(" for MoE layer.") for line in must] == names


def test_print_command_refuses_a_serve_vllm_will_not_start(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate-serve", "--layout", "TP4", "--dtype", "fp8", "--gpu", "H200", "--moe-backend",
                     "flashinfer_cutlass", "--print-command"]) == 2
    err = capsys.readouterr().err
    assert "SwiGLU-step layers: vLLM 0.33" in err and "will not start this serve" in err and err.count("\n") == 1


def test_env_file_is_parsed_without_a_shell(tmp_path):
    env = tmp_path / "node.env"
    env.write_text("export A='x y'\nexport B=\"$A-${HOME}\"\nC=plain # comment\n\nexport D='$A'\nexport E=\n"
                   "export F=a#b\nexport G= # empty\n")
    assert dict(read_env_file(env, {"HOME": "/root"})) == {"A": "x y", "B": "x y-/root", "C": "plain", "D": "$A",
                                                           "E": "", "F": "a#b", "G": ""}
    env.write_text("export OK=1\nexport X=$(touch /tmp/pwned)\n")
    with pytest.raises(UsageError, match=r"node.env:2: command substitution"):
        read_env_file(env, {})
    env.write_text("export H=two words\n")
    with pytest.raises(UsageError, match=r"node.env:1: the value has unquoted spaces"):
        read_env_file(env, {})
    env.write_text("source /etc/profile\n")
    with pytest.raises(UsageError, match=r"node.env:1: not an 'export NAME=value' line"):
        read_env_file(env, {})


SH_VALUES = [  # each file's values as sh assigns them: quotes, escapes and $NAME, an expansion never re-read
    ["X='{\"a\":1}'", 'Y="$X"'], ["A='a\\b'", "B=$A"], ["A=1", "C='x'\"$A\""], ['A="a\\$b"'],
    ["A=\"it's\"", "B=$A"], ['A="x y"', "B=$A"], ["export A=1 # c", "B=${A}2"], ["A=a\\ b"], ['A="a\\nb"'],
    ["A='$HOME'"], ["A=$"], ["A=x$"], ['A="q\\"q"'], ["A=\\'x"], ["A=${UNSET}z"], ["A='a'\"b\"c"],
]


@pytest.mark.skipif(shutil.which("bash") is None, reason="compares with bash")
@pytest.mark.parametrize("lines", SH_VALUES, ids=[" ".join(v) for v in SH_VALUES])
def test_env_file_values_are_the_shells(tmp_path, lines):
    env = tmp_path / "node.env"
    env.write_text("\n".join(lines) + "\n")
    names = list(dict.fromkeys(line.removeprefix("export ").split("=")[0] for line in lines))
    script = f"set -a; . {env}; " + "; ".join(f'printf "%s\\0" "${name}"' for name in names)
    shell = subprocess.run(["bash", "-c", script], env={}, capture_output=True, text=True, check=True).stdout
    assert dict(read_env_file(env, {})) == dict(zip(names, shell.split("\0")[:-1]))


def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["validate-serve", "--dtype", "bf16", "--gpu", "H200", "--print-command"]
    assert cli.main([*base, "--layout", "TP3+XP"]) == 2
    assert cli.main([*base, "--layout", "TP4", "--env-file", "absent.env"]) == 2
    assert cli.main(["validate-serve", "--layout", "TP4", "--dtype", "fp8", "--gpu", "H200", "--model", "x",
                     "--vllm-version", "0.16", "--print-command"]) == 2
    assert cli.main([*base, "--layout", "TP4", "--moe-backend", "tritn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("tune-moe: error: ") for line in err)
    assert "DP4+EP" in err[2]  # vLLM 0.16 refuses FP8 TP4: the fix names the recipe's layout
    assert "--moe-backend 'tritn': not a vLLM 0.33 value; use one of auto, triton, batched_triton" in err[3]


def test_moe_backend_is_normalised_as_vllm_does(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate-serve", "--layout", "DP4+EP", "--dtype", "fp8", "--gpu", "H200", "--moe-backend",
                     "Deep-Gemm", "--no-bench", "--print-command"]) == 0
    out, err = capsys.readouterr()
    assert "--moe-backend deep_gemm --port 8000" in out
    assert "what vLLM runs per MoE layer kind, and which tuned file each reads: tune-moe preflight --gpu H200 -- " \
           f"VLLM_TUNED_CONFIG_FOLDER={tmp_path / 'kernels_configs' / 'vllm-0.33' / 'NVIDIA_H200'} vllm serve" in err


# -- the orchestration, against tests/fixtures/fake_vllm/vllm ---------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def fake_nvidia_smi(folder: Path) -> Path:
    """An ``nvidia-smi`` answering validate-serve's query: $FAKE_GPUS (default 8) GPUs of $FAKE_VLLM_GPU (H200)."""
    folder.mkdir(exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text('#!/bin/sh\ni=0\nwhile [ "$i" -lt "${FAKE_GPUS:-8}" ]; do\n'
                   '  echo "$i, NVIDIA ${FAKE_VLLM_GPU:-H200}, 143771, 580.95.05"; i=$((i + 1))\ndone\n')
    smi.chmod(0o755)
    return folder


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake vllm and a fake nvidia-smi (8 GPUs) first on PATH; a tuned folder holding the TP4 bf16 file; pids
    of every fake process and a log of every benchmark; preflight answered by the mirror."""
    monkeypatch.chdir(tmp_path)
    gpus = fake_nvidia_smi(tmp_path / "gpu-bin")
    monkeypatch.setenv("PATH", f"{FAKE}{os.pathsep}{gpus}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER", raising=False)
    monkeypatch.setattr(vllm_probe, "preflight", lambda *args: None)
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_VLLM_PIDS", str(pids))
    monkeypatch.setenv("FAKE_VLLM_BENCH_LOG", str(tmp_path / "bench.jsonl"))
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / TP4_BF16).write_text(CONFIG)
    yield {"dir": tmp_path, "configs": folder, "pids": pids, "out": tmp_path / "out"}
    started = [int(p) for p in pids.read_text().split()] if pids.exists() else []
    left = [p for p in started if alive(p)]
    for pid in left:  # never leave them behind, even when the check below fails
        os.kill(pid, signal.SIGKILL)
    assert not left, "fake vllm processes outlived validate-serve"


def argv(fake, *extra) -> list[str]:
    return ["validate-serve", "--layout", "TP4", "--dtype", "bf16", "--gpu", "H200", "--configs",
            str(fake["configs"]), "--port", str(free_port()), "--out", str(fake["out"]), "--grace", "2",
            "--timeout", "20", *extra]


def report(fake) -> dict:
    return json.loads((fake["out"] / "report.json").read_text())


def fp8_ep(args: list[str]) -> list[str]:
    args[args.index("TP4")], args[args.index("bf16")] = "DP4+EP", "fp8"
    return args


def test_serve_proves_the_tuned_file_and_benchmarks(fake, capsys):
    (fake["dir"] / "tune-moe-node.env").write_text("export HF_TOKEN=hf_s3cr3t\n")  # found in the working folder
    log = fake["dir"] / "logs" / "serve.log"
    assert cli.main(argv(fake, "--log", str(log), "--num-prompts", "3")) == 0
    out = capsys.readouterr().out
    assert "PASS" in out
    # preflight's per-layer-kind table, printed before the server started
    table = out.split("what vLLM runs per MoE layer kind):", 1)[1].split("starting the tuned server", 1)[0]
    assert "SiLU layers: TRITON (TritonExperts), N=320" in table
    assert "SwiGLU-step layers: TRITON (TritonExperts), N=320" in table
    assert f"found {fake['configs'] / TP4_BF16}" in table
    rep = report(fake)
    (run,) = rep["runs"]
    assert rep["ok"] and run["outcome"] == "ok" and run["log"] == str(log) and run["problems"] == []
    assert rep["expected_files"] == [TP4_BF16]
    assert [(k["kind"], k["backend"], k["file"]) for k in rep["preflight"]["layers"]] == [
        ("SiLU layers", "TRITON", TP4_BF16), ("SwiGLU-step layers", "TRITON", TP4_BF16)]
    assert run["proof"]["loaded"] == [str(fake["configs"] / TP4_BF16)]
    assert run["proof"]["backends"] == ["TRITON (Unquantized)"]  # logged once for both layer kinds
    assert run["kinds"] == [{"kind": kind, "backend": "TRITON", "backend_logged": True, "file": TP4_BF16,
                             "log": f"loaded {fake['configs'] / TP4_BF16}"} for kind in ("SiLU layers",
                                                                                      "SwiGLU-step layers")]
    assert run["metrics"]["output_throughput"] == 850.0 and run["metrics"]["completed"] == 3
    saved = json.loads(Path(run["result_file"]).read_text())
    assert saved["output_throughput"] == 850.0 and saved["num_prompts"] == 3
    md = (fake["out"] / "report.md").read_text()
    assert "| output tok/s | 811.94 | 850.00 | +4.7% |" in md
    assert "## Preflight: what vLLM runs per MoE layer kind" in md and "SiLU layers: TRITON (TritonExperts)" in md
    assert f"| tuned | SwiGLU-step layers | TRITON | yes | `{TP4_BF16}` | loaded {fake['configs'] / TP4_BF16} |" in md
    assert "POST /v1/completions" in log.read_text()
    assert rep["env"]["HF_TOKEN"] == "<hidden>" and "s3cr3t" not in (fake["out"] / "report.json").read_text()


PAIRS3 = ["default-1", "tuned-1", "tuned-2", "default-2", "default-3", "tuned-3"]  # the order alternates per pair
MEASURED_NOISE = (0, 0.02, -0.01, 0.03, 0.01, -0.02)  # the fake's noise on each measured pass of PAIRS3


def assert_warmed_until_steady(run: dict, stem: Path) -> None:
    """Three warm-up passes, discarded: the fake's cold first one, then two that agree (so the server is warm)."""
    warm = [json.loads(stem.with_name(f"{stem.name}-warmup{i}.json").read_text()) for i in (1, 2, 3)]
    assert [w["output_throughput"] for w in run["warmup"]] == [w["output_throughput"] for w in warm]
    assert warm[0]["output_throughput"] < warm[1]["output_throughput"] == warm[2]["output_throughput"]
    assert run["steady"] is True


def bench_log(fake) -> list[dict]:
    return [json.loads(line) for line in (fake["dir"] / "bench.jsonl").read_text().splitlines()]


def assert_ab_of_three_pairs(rep: dict) -> tuple[dict, dict]:
    """The fake's measured throughputs (tuned 850, default 800, with its per-run noise) and the A/B's statistics
    on them: the paired ratio, its interval, the verdict and the pair order; returns the report's A/B and
    the measured throughputs by run."""
    measured = {r["name"]: r["metrics"]["output_throughput"] for r in rep["runs"]}
    noise = dict(zip(PAIRS3, MEASURED_NOISE))
    assert measured == pytest.approx({n: (850.0 if n.startswith("tuned") else 800.0) * (1 + noise[n]) for n in PAIRS3})
    a = rep["ab"]
    expected = ab.paired_ratio("output tok/s", [measured[f"tuned-{i}"] for i in (1, 2, 3)],
                               [measured[f"default-{i}"] for i in (1, 2, 3)])
    ratio = a["ratios"]["output_throughput"]
    assert (ratio["estimate"], ratio["low"], ratio["high"]) == pytest.approx((expected.estimate, expected.low,
                                                                              expected.high))
    assert a["verdict"] == ab.verdict(expected, "output tok/s").text and a["outcome"] == "better"
    assert a["order"] == ["1: default then tuned", "2: tuned then default", "3: default then tuned"]
    return a, measured


def test_ab_interleaves_warmed_pairs_and_reports_the_interval(fake, monkeypatch):
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(fake["configs"]))  # inherited: the baseline must drop it
    # one per warm pass, in turn: each server's second and third warm-up passes (steady), then its measured pass
    monkeypatch.setenv("FAKE_VLLM_NOISE", ",".join(f"0,0,{x}" for x in MEASURED_NOISE))
    assert cli.main(argv(fake, "--ab", "--ab-servers", "fresh", "--pairs", "3", "--num-prompts", "2")) == 0
    rep = report(fake)
    assert len(fake["pids"].read_text().split()) == 2 * 6  # a fresh server (and its engine core) per run
    assert sorted(p.name for p in fake["out"].glob("vllm-serve-*.log")) == sorted(f"vllm-serve-{n}.log" for n in PAIRS3)
    assert [r["name"] for r in rep["runs"]] == PAIRS3
    assert [(r["arm"], r["pair"]) for r in rep["runs"]] == [(n.split("-")[0], int(n[-1])) for n in PAIRS3]
    # every server: warm-up passes on other prompts (--seed 1001, 1002, ...) until two in a row agree: the cold
    # first one, then two warm ones; then the measured pass, pair k's prompts on both arms (--seed k)
    log = bench_log(fake)
    assert [(b["cold"], b["seed"]) for b in log] == [
        pass_ for n in PAIRS3 for pass_ in [(True, 1001), (False, 1002), (False, 1003), (False, int(n[-1]))]]
    assert [b["tuned"] for b in log[::4]] == [n.startswith("tuned") for n in PAIRS3]
    assert len({b["pid"] for b in log}) == 24  # one vllm bench serve process per pass
    for r in rep["runs"]:
        assert_warmed_until_steady(r, fake["out"] / f"bench-{r['name']}")
        assert Path(r["result_file"]).name == f"bench-{r['name']}.json"
    default = rep["runs"][0]
    assert default["proof"]["missing"] == [TP4_BF16] and default["proof"]["loaded"] == []
    assert "Using default MoE config" in (fake["out"] / "vllm-serve-default-1.log").read_text()
    a, measured = assert_ab_of_three_pairs(rep)
    assert a["ratios"]["median_tpot_ms"]["estimate"] < 1  # TPOT falls as throughput rises
    md = (fake["out"] / "report.md").read_text()
    assert "## A/B: tuned against vLLM's default config (3 pairs, workload recipe)" in md
    assert f"**{a['verdict']}**" in md
    assert "exact bootstrap over the 3 pairs (all 3^3 resamples)" in md
    assert f"| 1 | 800.00 | {measured['tuned-1']:.2f} |" in md
    assert "| output tok/s | 808.00 (800.00-824.00) |" in md
    assert rep["ab_servers"] == "fresh" and a["servers"]["mode"] == "fresh"
    assert "`--ab-servers fresh`: each pair is two fresh servers, one at a time" in md
    assert "This samples server-to-server variation (a server start per run) as well as pass-to-pass." in md


def test_ab_says_when_the_gain_is_inside_the_noise(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_VLLM_NOISE", "0.15,-0.1,0.05,-0.15,0.1,0.0")
    assert cli.main(reduced_args(fake, "--ab", "--pairs", "3", "--num-prompts", "2")) == 0
    a = report(fake)["ab"]
    assert a["outcome"] == "noise"
    assert a["verdict"].startswith("no measurable difference in output tok/s: ")
    assert "too noisy to resolve a 5% change" in a["verdict"] and a["verdict"] in capsys.readouterr().out


def test_ab_stops_at_the_first_failed_server_and_reports_no_verdict(fake, monkeypatch, capsys):
    (fake["configs"] / TP4_BF16).unlink()  # the tuned server of pair 1 fails its proof
    assert cli.main(argv(fake, "--ab", "--ab-servers", "fresh", "--pairs", "3", "--num-prompts", "2")) == 1
    rep = report(fake)
    assert [r["name"] for r in rep["runs"]] == ["default-1", "tuned-1"] and rep["runs"][1]["outcome"] == "proof"
    assert "ab" not in rep and "tuned-1: vLLM used its default MoE config" in capsys.readouterr().err


def served_args(log: str) -> list[str]:
    """The fake server's command line, from the first line of its log."""
    return log.split("args: ", 1)[1].splitlines()[0].split()


def test_resident_ab_keeps_two_servers_up_and_alternates_their_measured_passes(fake, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(fake["configs"]))  # inherited: the default server must drop it
    # one per warm pass, in turn: both servers' second and third warm-up passes, then the measured passes
    monkeypatch.setenv("FAKE_VLLM_NOISE", ",".join(map(str, (0, 0, 0, 0, *MEASURED_NOISE))))
    args = reduced_args(fake, "--ab", "--pairs", "3", "--num-prompts", "2")  # resident is the default
    port = int(args[args.index("--port") + 1])
    assert cli.main(args) == 0
    rep, out = report(fake), fake["out"]
    # two servers, each started once (a server and its engine core each), one log per arm
    assert len(fake["pids"].read_text().split()) == 4
    assert sorted(p.name for p in out.glob("vllm-serve-*.log")) == ["vllm-serve-default.log", "vllm-serve-tuned.log"]
    logs = {arm: (out / f"vllm-serve-{arm}.log").read_text() for arm in ("default", "tuned")}
    for arm, served_port in (("default", port), ("tuned", port + 1)):
        words = served_args(logs[arm])
        assert words[words.index("--port") + 1] == str(served_port)
        assert words[words.index("--gpu-memory-utilization") + 1] == "0.45"
        assert f"Starting vLLM API server on http://127.0.0.1:{served_port}" in logs[arm]
        assert logs[arm].count("POST /v1/completions") == (3 + 3) * 2  # its 3 warm-up and 3 measured passes
    # the default server ran without the tuned folder (it looked in vLLM's own folder only), the tuned one read it
    assert "Using default MoE config" in logs["default"] and str(fake["configs"]) not in logs["default"]
    assert f"Using configuration from {fake['configs'] / TP4_BF16} for MoE layer." in logs["tuned"]
    # the runs keep the fresh A/B's shape: one per measured pass, with its server's proof and warm-up
    assert [r["name"] for r in rep["runs"]] == PAIRS3
    assert [(r["arm"], r["pair"]) for r in rep["runs"]] == [(n.split("-")[0], int(n[-1])) for n in PAIRS3]
    for r in rep["runs"]:
        assert r["log"] == str(out / f"vllm-serve-{r['arm']}.log") and r["outcome"] == "ok"
        assert r["proof"]["loaded"] == ([str(fake["configs"] / TP4_BF16)] if r["arm"] == "tuned" else [])
        assert r["proof"]["missing"] == ([] if r["arm"] == "tuned" else [TP4_BF16])
        assert_warmed_until_steady(r, out / f"bench-{r['arm']}")  # its server's, once
        assert Path(r["result_file"]).name == f"bench-{r['name']}.json"
    assert sorted(p.name for p in out.glob("bench-*.json")) == sorted(
        [*(f"bench-{arm}-warmup{i}.json" for arm in ("default", "tuned") for i in (1, 2, 3)),
         *(f"bench-{n}.json" for n in PAIRS3)])
    # each server warmed until steady (its cold pass, then two that agree; other prompts), then the measured
    # passes on the arm's server in turn, pair k's prompts on both (--seed k)
    log = bench_log(fake)
    warm_ups = [(arm, i == 1, 1000 + i) for arm in (False, True) for i in (1, 2, 3)]
    assert [(b["tuned"], b["cold"], b["seed"]) for b in log] == warm_ups + [
        (n.startswith("tuned"), False, int(n[-1])) for n in PAIRS3]
    assert len({b["pid"] for b in log}) == 12  # one vllm bench serve process per pass
    a, _ = assert_ab_of_three_pairs(rep)
    assert rep["ab_servers"] == "resident"
    assert a["servers"] == {"mode": "resident", "ports": {"default": port, "tuned": port + 1},
                            "gpu_memory_utilization": 0.45}
    assert shlex.split(rep["command"])[-5:] == ["--port", str(port + 1), "--jit-monitor-verbose",
                                                "--gpu-memory-utilization", "0.45"]
    md = (out / "report.md").read_text()
    assert (f"`--ab-servers resident`: two servers up at once, the default one on port {port} and the tuned one on "
            f"port {port + 1}, each with `--gpu-memory-utilization 0.45`, started once") in md
    assert ("This samples pass-to-pass variation on two resident servers, not server-to-server variation; "
            "`--ab-servers fresh` samples that too, at a server start per run.") in md
    warm = md.split("## Warm-up passes (discarded)")[1]
    for arm, rate in (("default", 800.0), ("tuned", 850.0)):  # each server once, after its cold pass (0.6x)
        assert (f"| {arm} | 3 | {0.6 * rate:.2f} (1 compiled), {rate:.2f}, {rate:.2f} | warm: the last two agree "
                "within 3%, the last compiled nothing |") in warm
    assert "Kernels vLLM compiled while serving a measured pass: none" in md
    said = capsys.readouterr().out
    assert said.index("tuned server stopped") < said.index("default server stopped")  # both, after the passes
    assert said.index(f"pair 3 of 3: tuned (port {port + 1})") < said.index("tuned server stopped")


def test_resident_ab_stops_the_default_server_when_the_tuned_one_fails_to_start(fake, capsys):
    args = reduced_args(fake, "--ab", "--pairs", "3", "--num-prompts", "2")
    port = int(args[args.index("--port") + 1])
    with socket.socket() as taken:  # bound, not listening: the port check passes, the tuned server cannot listen
        taken.bind(("127.0.0.1", port + 1))
        assert cli.main(args) == 1
    captured = capsys.readouterr()
    problems = [line for line in captured.err.splitlines() if line.startswith("tune-moe validate-serve:")]
    assert problems == [f"tune-moe validate-serve: tuned: the tuned server exited with status 1 before it was healthy; "
                        f"read the log: {fake['out'] / 'vllm-serve-tuned.log'}"]
    assert "Address already in use" in captured.err  # the log's tail
    rep = report(fake)
    assert [(r["name"], r["outcome"]) for r in rep["runs"]] == [("default", "ok"), ("tuned", "exited")]
    assert rep["runs"][0]["proof"]["missing"] == [TP4_BF16] and not rep["ok"] and "ab" not in rep
    assert [(b["tuned"], b["cold"]) for b in bench_log(fake)] == [(False, True), (False, False), (False, False)]
    # ^ the default's warm-up passes, no more
    assert "default server stopped" in captured.out  # and the fixture finds no fake process left
    assert len(fake["pids"].read_text().split()) == 4


def test_resident_ab_stops_at_a_failed_proof(fake, capsys):
    (fake["configs"] / TP4_BF16).unlink()  # the tuned server fails its proof
    assert cli.main(reduced_args(fake, "--ab", "--pairs", "3", "--num-prompts", "2")) == 1
    rep = report(fake)
    assert [(r["name"], r["outcome"]) for r in rep["runs"]] == [("default", "ok"), ("tuned", "proof")]
    assert "ab" not in rep and "tuned: vLLM used its default MoE config" in capsys.readouterr().err
    assert [(b["tuned"], b["cold"]) for b in bench_log(fake)] == [(False, True), (False, False), (False, False)]


@pytest.mark.parametrize("limit, noise, passes, steady, row", [
    # each pass 9-11% above the last (the fake's cold first pass 40% below): never two within 3%, so at most 4
    (None, "0,0.1,0.2,0.3", [510.0, 850.0, 935.0, 1020.0], False,
     "NOT warm: no two in a row within 3% with the second compiling nothing; its first measured pass may pay "
     "first-use costs"),
    ("1", "0", [510.0], None, "one pass, not checked")])
def test_warm_up_passes_stop_at_their_limit_and_the_report_says_whether_the_server_was_warm(
        fake, monkeypatch, capsys, limit, noise, passes, steady, row):
    monkeypatch.setenv("FAKE_VLLM_NOISE", noise)
    assert cli.main(reduced_args(fake, "--num-prompts", "2", *(["--warmup-passes", limit] if limit else []))) == 0
    (run,) = report(fake)["runs"]
    assert [w["output_throughput"] for w in run["warmup"]] == pytest.approx(passes) and run["steady"] is steady
    assert [b["seed"] for b in bench_log(fake)] == [*range(1001, 1001 + len(passes)), 0]  # then the measured pass
    md = (fake["out"] / "report.md").read_text()
    values = ", ".join(f"{v:.2f}" for v in passes)
    shown = values.replace("510.00", "510.00 (1 compiled)", 1)  # the fake's cold first pass compiles a kernel
    assert f"| tuned | {len(passes)} | {shown} | {row} |" in md.split("## Warm-up passes (discarded)")[1]
    said = capsys.readouterr().out
    assert ("note: the tuned server's 4 warm-up passes never agreed within 3% on output tok/s "
            f"({values}) in a pass that compiled nothing; its first measured passes may still pay first-use costs"
            ) in said if steady is False else "warm-up passes never agreed" not in said


def test_a_pass_that_compiled_is_not_warm_and_a_measured_pass_that_compiled_is_named(fake, monkeypatch, capsys):
    """vLLM's JIT monitor (--jit-monitor-verbose) logs a fused_moe_kernel compile in the server's passes 1, 2
    and 4: passes 2 and 3 agree, but 2 compiled, so the server is warm after 3; the measured pass (4) compiled,
    and the run and the report say so."""
    monkeypatch.setenv("FAKE_VLLM_NOISE", "0")
    monkeypatch.setenv("FAKE_VLLM_JIT_PASSES", "1,2,4")
    assert cli.main(reduced_args(fake, "--num-prompts", "2")) == 0
    (run,) = report(fake)["runs"]
    assert [len(w["jit_compiles"]) for w in run["warmup"]] == [1, 1, 0] and run["steady"] is True
    assert run["compiles"] == ["fused_moe_kernel"]
    md = (fake["out"] / "report.md").read_text()
    assert "| tuned | 3 | 510.00 (1 compiled), 850.00 (1 compiled), 850.00 | warm: the last two agree within 3%, " \
           "the last compiled nothing |" in md
    assert ("Kernels vLLM compiled while serving a measured pass: tuned: 1 (fused_moe_kernel) (those passes paid for "
            "compiles)") in md
    assert "vLLM compiled 1 kernel(s) while serving this pass (fused_moe_kernel x1): " in capsys.readouterr().out


def test_warmup_passes_refusals_are_one_line(fake, capsys):
    for extra, message in ((("--warmup-passes", "0"), "--warmup-passes 0: use 1 to 10 (default 4; 1 runs one warm-up "
                                                      "pass and does not check that the server is warm)"),
                           (("--warmup-passes", "2", "--no-bench"),
                            "--warmup-passes with --no-bench: there is no benchmark to warm up for; drop one")):
        assert cli.main(reduced_args(fake, *extra)) == 2
        assert capsys.readouterr().err == f"tune-moe: error: {message}\n"
        assert not fake["pids"].exists() and not fake["out"].exists()


def test_ab_servers_refusals_are_one_line_and_start_nothing(fake, capsys):
    """Asked for, resident servers that cannot run as asked are refused in one line; left to choose, the A/B
    runs fresh servers and says why."""
    fix = "pass --ab-servers fresh (one server at a time, at the memory vLLM chooses)"
    conflict = ("tune-moe: error: --serve-args sets --gpu-memory-utilization, which --ab-servers resident sets (0.45 "
                f"for each of its two servers); drop it from --serve-args, or {fix}")
    shortfall = ("--ab-servers resident: two servers at --gpu-memory-utilization 0.45 each do not fit: TP4 on 4xH200: "
                 "98 GB weights per GPU of a 63 GB budget, -41 GB left for KV cache (needs >= 10 GB)")
    resident = ("--ab", "--ab-servers", "resident")
    runs = [(reduced_args(fake, "--ab-servers", "fresh"), "tune-moe: error: --ab-servers needs --ab"),
            (reduced_args(fake, *resident, "--serve-args", "--max-model-len 4096 --gpu-memory-utilization 0.8"),
             conflict),
            (reduced_args(fake, *resident, "--serve-args=--gpu_memory_utilization=0.8"), conflict),
            (argv(fake, *resident), f"tune-moe: error: {shortfall}; nothing was started; {fix}")]
    top = reduced_args(fake, *resident)
    top[top.index("--port") + 1] = "65535"
    runs.append((top, f"tune-moe: error: --port 65535: --ab-servers resident also serves on --port + 1; pass a lower "
                      f"--port, or {fix}"))
    for args, message in runs:
        assert cli.main(args) == 2
        assert capsys.readouterr().err == message + "\n"
        assert not fake["pids"].exists() and not fake["out"].exists()
    assert cli.main([*runs[1][0], "--print-command"]) == 2  # refused before anything is printed
    assert capsys.readouterr() == ("", conflict + "\n")
    assert cli.main([*runs[3][0], "--print-command"]) == 0  # printed, with the refusal to come
    assert f"note: validate-serve will refuse this A/B: {shortfall}" in capsys.readouterr().err
    # the same serves without --ab-servers: fresh servers, and the note says why
    for args, why in ((argv(fake, "--ab"), shortfall),
                      (reduced_args(fake, "--ab", "--serve-args", "--gpu-memory-utilization 0.8"),
                       conflict.removeprefix("tune-moe: error: ").removesuffix(f", or {fix}"))):
        assert cli.main([*args, "--print-command"]) == 0
        out, err = capsys.readouterr()
        assert "# --ab --ab-servers fresh: 5 pairs of fresh servers" in out
        assert f"note: fresh A/B servers, one at a time: {why}\n" in err
        assert not fake["pids"].exists() and not fake["out"].exists()


def test_print_command_says_which_ab_servers_run(fake, capsys):
    args = reduced_args(fake, "--ab", "--pairs", "3", "--print-command")
    port = int(args[args.index("--port") + 1])
    order = "default, tuned; tuned, default; default, tuned"
    for extra, served, files, line in (
            ((), [str(port + 1), "--jit-monitor-verbose", "--gpu-memory-utilization", "0.45"],
             ["bench-tuned-warmup1.json", "bench-tuned-1.json"],
             f"# --ab --ab-servers resident: first a default server (VLLM_TUNED_CONFIG_FOLDER unset; vLLM must log its "
             f"default config) on port {port}, then the tuned one above on port {port + 1}, both with "
             f"--gpu-memory-utilization 0.45, each warmed up once (until steady); then 3 pairs of measured passes "
             f"alternate between them in the order {order}; this samples pass-to-pass variation, not "
             f"server-to-server (--ab-servers "
             "fresh: a server start per run)"),
            (("--ab-servers", "fresh", "--serve-args", "--gpu-memory-utilization 0.8"),
             [str(port), "--jit-monitor-verbose", "--gpu-memory-utilization", "0.8"],
             ["bench-tuned-1-warmup1.json", "bench-tuned-1.json"],
             f"# --ab --ab-servers fresh: 3 pairs of fresh servers, one at a time, in the order {order}; the default "
             "server has VLLM_TUNED_CONFIG_FOLDER unset (vLLM must log its default config); this samples "
             "server-to-server variation too (a server start per run)")):
        assert cli.main([*args, *extra]) == 0
        out = capsys.readouterr().out.splitlines()
        serve = shlex.split(next(line for line in out if line.startswith("vllm serve")))
        assert serve[serve.index("--port") + 1:] == served
        benches = [shlex.split(line) for line in out if line.startswith("vllm bench serve")]
        assert [b[b.index("--result-filename") + 1] for b in benches] == files
        assert {b[b.index("--port") + 1] for b in benches} == {served[0]}  # the tuned server's port
        assert out[-1] == line
    assert not fake["out"].exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_a_resident_ab_stops_both_servers(fake, sig, code):
    env = {**os.environ, "FAKE_VLLM_HEALTH_DELAY": "2", "PYTHONPATH": str(REPO)}
    args = reduced_args(fake, "--ab", "--pairs", "3", "--num-prompts", "2")
    args[args.index("--timeout") + 1] = "60"
    proc = subprocess.Popen([sys.executable, "-c", MIRROR_CLI, *args], env=env, cwd=fake["dir"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_pids(fake, 4)  # the default server is healthy and warmed; the tuned one is starting
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == code, err
    assert f"interrupted by {sig.name}; every server was stopped" in err
    assert "tuned server stopped" in out and "default server stopped" in out  # the fixture finds none left
    assert report(fake)["problems"] == [f"interrupted by {sig.name}; every server was stopped"]


def test_missing_config_fails_and_names_the_file(fake, capsys):
    (fake["configs"] / TP4_BF16).unlink()
    assert cli.main(argv(fake)) == 1
    captured = capsys.readouterr()
    before = captured.out.split("starting the tuned server", 1)[0]
    assert f"problem: SiLU layers: {TP4_BF16} is not in {fake['configs']}" in before  # preflight's table
    assert f"has no {TP4_BF16}" in before  # the note: the run goes ahead, its log drives the tuner
    assert f"vLLM used its default MoE config for {TP4_BF16}" in captured.err
    assert ("tune them: tune-moe --gpu H200 --dtype bf16 --vllm-version 0.33.0 --from-vllm-log "
            f"{fake['out']}/vllm-serve-tuned.log") in captured.err
    assert report(fake)["runs"][0]["outcome"] == "proof"
    assert not (fake["out"] / "bench-tuned.json").exists()


def test_the_failed_serves_log_drives_the_tuner(fake):
    assert cli.main(fp8_ep(argv(fake, "--moe-backend", "triton"))) == 1  # the fake looks up the layout's file
    plan = subprocess.run([sys.executable, "-m", "tuning.cli", "--gpu", "H200", "--dtype", "fp8", "--from-vllm-log",
                           str(fake["out"] / "vllm-serve-tuned.log"), "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    shapes = plan.stdout.split("Shapes (", 1)[1].split("\n\n", 1)[0]
    assert [line.strip() for line in shapes.splitlines() if line.strip().endswith(".json")] == [EP4_FP8]


def test_fp8_ep_runs_no_kind_on_triton_and_fails_with_the_per_kind_fix(fake, capsys):
    (fake["configs"] / EP4_FP8).write_text(CONFIG)
    assert cli.main(fp8_ep(argv(fake, "--no-bench"))) == 1
    captured = capsys.readouterr()
    per_kind = ("SiLU layers: FLASHINFER_CUTLASS, reads no Triton tuned file; SwiGLU-step layers: DEEPGEMM, reads no "
                "Triton tuned file (E8M0 is on: DeepGEMM at every M)")
    fix = "with --moe-backend triton vLLM 0.33 runs every MoE layer kind on TRITON, which reads the tuned file"
    assert f"note: {per_kind}: no MoE layer kind runs the tuned Triton kernel, so the check will fail; {fix}" \
        in captured.out.split("starting the tuned server", 1)[0]
    rep = report(fake)
    (run,) = rep["runs"]
    assert rep["expected_files"] == []
    assert run["proof"]["backends"] == ["FLASHINFER_CUTLASS (Fp8)", "DEEPGEMM (Fp8)"]  # the log agrees per kind
    advice = advice_for("H200", parse_layout("DP4+EP"), "fp8", "0.33.0").line(fake["configs"])  # against the serve's files
    assert run["problems"] == [f"no MoE layer kind of this serve runs the tuned Triton kernel ({per_kind}); {fix} "
                               f"({advice})"]
    assert "FlashInfer-CUTLASS MoE backend first" not in captured.out + captured.err  # the old blanket note


def test_a_file_preflight_did_not_predict_fails_the_run(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_VLLM_SHAPES", EP4_FP8)  # the engine also looks this file up
    (fake["configs"] / EP4_FP8).write_text(CONFIG)
    assert cli.main(argv(fake, "--no-bench")) == 1
    (run,) = report(fake)["runs"]
    assert run["outcome"] == "proof"
    assert run["problems"] == [f"vLLM's log disagrees with preflight on the tuned files: vLLM looked up {EP4_FP8}, "
                               f"which preflight did not predict (preflight predicted SiLU layers: {TP4_BF16}; "
                               f"SwiGLU-step layers: {TP4_BF16})"]
    assert f"tuned: {run['problems'][0]}" in capsys.readouterr().err


def test_a_backend_preflight_did_not_predict_fails_the_run(fake, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_BACKEND", "BATCHED_TRITON")  # reads the same file, another kernel
    assert cli.main(argv(fake, "--no-bench")) == 1
    (run,) = report(fake)["runs"]
    assert run["proof"]["loaded"] == [str(fake["configs"] / TP4_BF16)]
    disagree, batched = sorted(run["problems"], key=lambda p: "disagrees" not in p)
    assert disagree == ("vLLM's log disagrees with preflight on the MoE backend: vLLM logged BATCHED_TRITON; "
                        "preflight predicted SiLU layers: TRITON; SwiGLU-step layers: TRITON")
    assert batched.startswith(f"vLLM ran the BATCHED_TRITON MoE backend and read {TP4_BF16}: that backend runs the "
                              "batched kernel, where M means tokens per expert")
    assert [k["backend_logged"] for k in run["kinds"]] == [False, False]


def test_batched_triton_asked_for_is_predicted_but_proves_nothing(fake):
    assert cli.main(argv(fake, "--no-bench", "--moe-backend", "batched_triton")) == 1
    rep = report(fake)
    assert rep["expected_files"] == [] and any("BATCHED_TRITON, looks the tuned file up but runs the batched kernel"
                                               in n for n in rep["notes"])
    (run,) = rep["runs"]
    assert len(run["problems"]) == 1 and "does not prove the tuned configs ran as tuned" in run["problems"][0]


def test_a_serve_vllm_will_not_start_is_refused_before_anything_starts(fake, capsys):
    args = argv(fake, "--moe-backend", "flashinfer-cutlass")
    args[args.index("bf16")] = "fp8"
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tune-moe: error: preflight: vLLM will not start this serve "
                                                   "(SwiGLU-step layers: ValueError: FP8 MoE backend FLASHINFER_CUTLASS")
    assert not fake["pids"].exists() and not fake["out"].exists()


def test_a_layout_that_does_not_fit_is_refused_before_anything_starts(fake, capsys):
    args = argv(fake)
    args[args.index("TP4")] = "TP2"
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err == ("tune-moe: error: layout TP2 does not fit in memory: TP2 on 2xH200: 197 GB weights per GPU of a "
                   "130 GB budget, -73 GB left for KV cache: does not fit (needs >= 10 GB); nothing was started; "
                   "try bf16 on 4xH200 (TP4 or DP4+EP) or fp8 (stepfun-ai/Step-3.5-Flash-FP8) on 2xH200\n")
    assert not fake["pids"].exists() and not fake["out"].exists()


def test_blackwell_bf16_layer_kinds_pick_two_backends_and_the_log_agrees(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_VLLM_GPU", "B200")
    b200 = TP4_BF16.replace("H200", "B200")
    (fake["configs"] / b200).write_text(CONFIG)
    args = argv(fake, "--no-bench")
    args[args.index("H200")] = "B200"
    assert cli.main(args) == 0
    assert ("note: SiLU layers: FlashInfer TRTLLM, reads no Triton tuned file; SwiGLU-step layers: TRITON, reads the "
            f"tuned file {b200}: the tuned configs serve only the layer kinds that read them") in capsys.readouterr().out
    rep = report(fake)
    (run,) = rep["runs"]
    assert rep["ok"] and rep["expected_files"] == [b200]
    assert run["proof"]["backends"] == ["FlashInfer TRTLLM (Unquantized)", "TRITON (Unquantized)"]
    assert [(k["kind"], k["backend"], k["backend_logged"], k["log"]) for k in run["kinds"]] == [
        ("SiLU layers", "FlashInfer TRTLLM", True, "-"),
        ("SwiGLU-step layers", "TRITON", True, f"loaded {fake['configs'] / b200}")]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM installed")
def test_log_agrees_with_vllms_own_preflight_answer(fake, monkeypatch):
    """Preflight answered by vLLM 0.33's own parser and selection code; the fake logs what the mirror says."""
    monkeypatch.setattr(vllm_probe, "preflight", VLLMS_OWN_PREFLIGHT)
    assert cli.main(argv(fake, "--no-bench")) == 0
    rep = report(fake)
    assert rep["preflight"]["answered_by"] == "vLLM's own code"
    assert rep["ok"] and rep["runs"][0]["problems"] == [] and rep["expected_files"] == [TP4_BF16]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM installed")
def test_vllms_own_serve_parser_takes_the_resident_servers_command(fake, capsys):
    """What validate-serve adds to a server's command for its own evidence (--jit-monitor-verbose, the profiler):
    vLLM 0.33's own parser reads the whole command (sm90 patched in), and its flag table says what each stores."""
    assert cli.main(reduced_args(fake, "--ab", "--measure-moe-share", "--workload", "decode", "--print-command")) == 0
    serve = shlex.split(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("vllm serve")))
    assert "--jit-monitor-verbose" in serve and "--profiler-config" in serve
    (answer,) = vllm_probe.serve_plans([(serve[2:], "sm90", 141, 1)])
    assert "error" not in answer and answer["command"]["hf_overrides"]["moe_num_experts"] == 288
    flags = vllm_probe.serve_flags()
    assert flags["--jit-monitor-verbose"] == ["jit_monitor_verbose", 0, True]
    assert flags["--profiler-config"][:2] == ["profiler_config", 1]


# -- --reduced: one GPU for a multi-GPU layout ----------------------------------------------------------


def with_provenance(path: Path, speedup_at: dict[int, float]) -> None:
    """A sidecar saying the tuned file is ``speedup`` x vLLM's default at those batch sizes (1.0 elsewhere)."""
    prov = provenance_for(path, read_config_file(path))
    rows = tuple(dataclasses.replace(r, speedup=speedup_at.get(r.m, 1.0)) for r in prov.rows)
    provenance.write(path, dataclasses.replace(prov, rows=rows))


def reduced_args(fake, *extra) -> list[str]:
    args = argv(fake, "--reduced", *extra)
    return args


def test_reduced_serve_runs_the_layouts_shape_on_one_gpu(fake, monkeypatch, capsys):
    """TP4 emulated: the written folder, the exact command, the proof, decode A/B, the measured MoE share and the
    predicted gain against the measured one."""
    monkeypatch.setenv("FAKE_VLLM_NOISE", "0,0.01,-0.01,0.005,0.0,-0.005")
    monkeypatch.setenv("FAKE_VLLM_MOE_SHARE", "0.5")
    with_provenance(fake["configs"] / TP4_BF16, {32: 1.25})
    assert cli.main(reduced_args(fake, "--workload", "decode", "--num-prompts", "2", "--ab", "--pairs", "3",
                                 "--measure-moe-share")) == 0
    rep, folder = report(fake), fake["out"] / "reduced-model"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "served-config.json", "tokenizer.json",
                                                         "tokenizer_config.json"]
    assert load_model(str(folder / "served-config.json")).num_experts == 288  # TP4: every expert on every GPU
    assert load_model(str(folder)).num_experts == 288  # the published config; the overrides reduce it
    r = rep["reduced"]
    assert (r["layout"], r["experts"], r["width"], r["layers"]) == ("TP4", 288, 320, 12)
    assert shlex.split(rep["command"])[:7] == ["vllm", "serve", str(folder), "--load-format", "dummy",
                                               "--hf-overrides", json.dumps(r["overrides"], separators=(",", ":"))]
    assert "--tensor-parallel-size" not in rep["command"] and rep["gpu"] == "1xH200"
    assert rep["env"]["VLLM_USE_FLASHINFER_SAMPLER"] == "0" and rep["layout"] == "TP4 (reduced, one GPU)"
    assert rep["expected_files"] == [TP4_BF16]  # preflight read the serve's --hf-overrides
    assert [layer["n"] for layer in rep["preflight"]["layers"]] == [320, 320]
    assert [(r["name"], r["arm"]) for r in rep["runs"][-2:]] == [("profile-default", "profile"), ("profile-tuned", "profile")]
    for run in rep["runs"]:  # the fake's engine computed the file from the folder and the overrides
        default = "default" in (run["arm"], run["name"].removeprefix("profile-"))
        assert run["proof"]["loaded" if not default else "missing"] == (
            [str(fake["configs"] / TP4_BF16)] if not default else [TP4_BF16])
    words = shlex.split(rep["bench_command"])
    assert words[words.index("--random-input-len") + 1] == "128" and "--ignore-eos" in words
    assert words[words.index("--max-concurrency") + 1] == "32"
    for arm in ("default", "tuned"):  # a profiled pass on each resident server, deep in decode
        assert list((fake["out"] / f"profile-{arm}").glob("*.pt.trace.json.gz"))
    serve = shlex.split(rep["command"])
    assert json.loads(serve[serve.index("--profiler-config") + 1])["delay_iterations"] == 64
    share = rep["moe_share"]  # the tuned server's, per step: 22 fused-MoE calls (11 MoE layers), 15 whole steps
    assert share["value"] == pytest.approx(0.5) and share["measured"] and share["steps"] == 15
    assert (share["moe_us"], share["busy_us"], share["span_us"]) == pytest.approx((500, 1000, 2000))
    assert rep["moe_profile"]["default"]["moe_us"] == pytest.approx(600)  # FAKE_VLLM_KERNEL_SPEEDUP 1.2
    live = rep["prediction"]["serving"]
    tpot = statistics.median(r["metrics"]["median_tpot_ms"] for r in rep["runs"] if r["arm"] == "default")
    assert (live["kernel_speedup"], live["saved_us"], live["step_ms"]) == pytest.approx((1.2, 100, tpot))
    assert live["step_from"] == "their median TPOT"
    assert live["gain"] == pytest.approx(tpot / (tpot - 0.1))
    served = rep["prediction"]["served"]
    assert (served["m"], served["key"], served["kernel_speedup"]) == (32, 32, 1.25)
    assert served["gain"] == pytest.approx(1 / (0.5 + 0.5 / 1.25))  # Amdahl on the measured share
    full = rep["prediction"]["full"]
    assert not full["share"]["measured"] and full["share"]["value"] > served["share"]["value"]
    md = (fake["out"] / "report.md").read_text()
    assert "## Reduced model: one GPU for TP4" in md and "What it does not:" in md
    assert "- workload decode: M = 32 tokens per step (one decode token for each of 32 requests)" in md
    assert "predicted +11.1%" in md and "this serve's prediction is above the interval" in md
    assert ("- in serving (vLLM's profiler, 15 steps on each server): the fused MoE took 600 us a step on the default "
            "server and 500 us on the tuned one, 1.200x, 100 us saved a step; against the default passes' step of "
            f"{tpot:.2f} ms (their median TPOT): predicted {(tpot / (tpot - 0.1) - 1) * 100:+.1f}%") in md
    assert "| profile-default |" not in md.split("## Warm-up passes")[1]  # profiled on the warm resident servers
    assert "the TP4 serve: `E=288,N=320,device_name=NVIDIA_H200.json` is 1.250x vLLM's default" in md


def test_reduced_print_command_shows_every_command_and_writes_nothing(fake, capsys):
    assert cli.main(reduced_args(fake, "--layout", "DP4+EP", "--print-command", "--ab", "--measure-moe-share",
                                 "--workload", "prefill")) == 0
    out, err = capsys.readouterr()
    out, folder = out.splitlines(), fake["out"] / "reduced-model"
    assert (f"tune-moe preflight --gpu H200 -- VLLM_TUNED_CONFIG_FOLDER={fake['configs']} vllm serve "
            "stepfun-ai/Step-3.5-Flash --load-format dummy --hf-overrides ") in err  # the folder is not written yet
    assert out[0] == (f"# first writes {folder}/: config.json (Step-3.5-Flash's published bf16 config), tokenizer.json, "
                      "tokenizer_config.json, served-config.json (config.json as vLLM sees it after the overrides: "
                      "tune-moe --model takes it)")
    assert "export VLLM_USE_FLASHINFER_SAMPLER=0" in out
    serve = shlex.split(next(line for line in out if line.startswith("vllm serve")))
    overrides = json.loads(serve[serve.index("--hf-overrides") + 1])
    assert (overrides["moe_num_experts"], overrides["moe_intermediate_size"]) == (72, 1280)
    assert "--data-parallel-size" not in serve and "--enable-expert-parallel" not in serve
    benches = [shlex.split(line) for line in out if line.startswith("vllm bench serve")]
    assert [b[b.index("--result-filename") + 1] for b in benches] == ["bench-tuned-warmup1.json", "bench-tuned-1.json"]
    assert all(b[b.index("--random-input-len") + 1] == "8192" and b[b.index("--random-output-len") + 1] == "1"
               and "--ignore-eos" in b for b in benches)
    assert out[-3] == "# vLLM must log: Using configuration from " + str(fake["configs"] / EP4_BF16) + " for MoE layer."
    assert out[-2].startswith("# --ab --ab-servers resident: first a default server (VLLM_TUNED_CONFIG_FOLDER unset; "
                              "vLLM must log its default config) on port ")
    assert out[-1] == ("# --measure-moe-share: both servers above carry --profiler-config (idle until asked); after the "
                       "pairs, one profiled pass on each (--profile --seed 2000 --num-prompts 8), vLLM's torch profiler "
                       f"over the first 16 steps; traces in {fake['out']}/profile-default and {fake['out']}/profile-tuned")
    profiler = json.loads(serve[serve.index("--profiler-config") + 1])  # a prefill workload's steps from the first
    assert (profiler["torch_profiler_dir"], profiler["delay_iterations"]) == (str(fake["out"] / "profile-tuned"), 0)
    assert not fake["out"].exists()


def test_explicit_bench_sizes_make_the_workload_the_run_predicts_and_profiles(fake, capsys):
    """--max-concurrency 128 on the decode workload: the bench sends 128 at a time, and the M per step, the
    profiled pass and the workload the report names are that workload's, not decode's default 32."""
    assert cli.main(reduced_args(fake, "--print-command", "--ab", "--measure-moe-share", "--workload", "decode",
                                 "--max-concurrency", "128", "--num-prompts", "256")) == 0
    out = capsys.readouterr().out.splitlines()
    benches = [shlex.split(line) for line in out if line.startswith("vllm bench serve")]
    assert all(b[b.index("--max-concurrency") + 1] == "128" and b[b.index("--num-prompts") + 1] == "256" for b in benches)
    assert out[-1].startswith("# --measure-moe-share: both servers above carry --profiler-config (idle until asked); "
                              "after the pairs, one profiled pass on each (--profile --seed 2000 --num-prompts 128), "
                              "vLLM's torch profiler over 16 steps after 64; traces in ")
    sized = WORKLOADS["decode"].sized(max_concurrency=128, num_prompts=256, input_len=None)
    assert (sized.tokens_per_step(8192), sized.what) == (128, "128-token prompts, 1024-token outputs with EOS ignored, "
                                                              "128 at a time, 256 prompts")
    assert "for each of 128 requests" in sized.m_phrase(8192) and WORKLOADS["decode"].max_concurrency == 32


@pytest.mark.parametrize("name, output_len, window", [("decode", None, (64, 16)), ("decode", 40, (23, 16)),
                                                      ("decode", 8, (0, 16)), ("recipe", None, (64, 16)),
                                                      ("prefill", None, (0, 16))])
def test_the_profile_window_skips_a_waves_prefill_and_ends_before_its_outputs(name, output_len, window):
    w = WORKLOADS[name].sized(output_len=output_len)
    assert w.profile_window() == window
    delay, steps = window
    assert w.phase == "prefill" or delay + steps < w.output_len or delay == 0


def test_reduced_refuses_a_serve_that_reads_other_files_than_the_layout(fake, capsys):
    """FP8 DP4+EP with vLLM's choice runs FlashInfer/DeepGEMM (no tuned file); one GPU without EP runs Triton."""
    args = fp8_ep(reduced_args(fake))
    assert cli.main(args) == 2
    assert cli.main([*args, "--print-command"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0] == err[1]
    assert err[0] == (f"tune-moe: error: --reduced: the one-GPU serve reads {EP4_FP8} but DP4+EP reads no Triton tuned "
                      "file; nothing was started; DP4+EP reads no Triton tuned file with --moe-backend auto (tune-moe "
                      "preflight shows what each layer kind runs); emulate a Triton serve of it with --moe-backend triton")
    assert not fake["pids"].exists() and not fake["out"].exists()
    (fake["configs"] / EP4_FP8).write_text(CONFIG)
    assert cli.main(fp8_ep(reduced_args(fake, "--moe-backend", "triton", "--no-bench"))) == 0
    rep = report(fake)
    assert rep["runs"][0]["proof"]["loaded"] == [str(fake["configs"] / EP4_FP8)]
    assert rep["env"]["VLLM_USE_DEEP_GEMM"] == "0" and rep["reduced"]["env"]["VLLM_USE_DEEP_GEMM"] == "0"
    assert "the dense FP8 linear layers run CUTLASS, not DeepGEMM" in (fake["out"] / "report.md").read_text()


def test_a_reduced_fp8_serve_keeps_the_users_deepgemm_choice(fake, monkeypatch):
    (fake["configs"] / EP4_FP8).write_text(CONFIG)
    monkeypatch.setenv("VLLM_USE_DEEP_GEMM", "1")
    assert cli.main(fp8_ep(reduced_args(fake, "--moe-backend", "triton", "--no-bench"))) == 0
    rep = report(fake)
    assert "VLLM_USE_DEEP_GEMM" not in rep["env"] and "VLLM_USE_DEEP_GEMM" not in rep["reduced"]["env"]
    assert "CUTLASS" not in (fake["out"] / "report.md").read_text()


def test_a_single_reduced_run_is_not_compared_with_the_recipe(fake):
    assert cli.main(reduced_args(fake, "--num-prompts", "2")) == 0
    rep, md = report(fake), (fake["out"] / "report.md").read_text()
    (run,) = rep["runs"]
    assert run["metrics"]["output_throughput"] == 850.0
    assert [w["output_throughput"] for w in run["warmup"]] == pytest.approx([510.0, 850.0, 850.0])
    assert "| output tok/s | 850.00 |" in md and "recipe 4xH200" not in md.split("## Benchmark")[1]
    assert "a reduced model's numbers do not compare with the recipe's 4xH200 serve" in md
    assert rep["prediction"]["why"].endswith("has no tune-moe provenance (no per-batch speedup to predict from)")


def test_failed_benchmark_requests_fail_the_run(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_VLLM_BENCH_FAILED", "4")
    assert cli.main(argv(fake, "--num-prompts", "10")) == 1
    assert "4 benchmark requests failed; read the server log" in capsys.readouterr().err
    (run,) = report(fake)["runs"]
    assert run["outcome"] == "bench" and run["metrics"]["completed"] == 6


def test_never_healthy_times_out_and_tears_down(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_VLLM_NEVER_HEALTHY", "1")
    args = argv(fake)
    args[args.index("--timeout") + 1] = "1.5"
    started = time.monotonic()
    assert cli.main(args) == 1
    assert time.monotonic() - started < 15
    assert "not healthy after 1.5 s" in capsys.readouterr().err
    assert report(fake)["runs"][0]["outcome"] == "timeout"
    assert len(fake["pids"].read_text().split()) == 2  # the server and its engine core both ran


def test_crash_at_start_reports_exit_and_log_tail(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_VLLM_CRASH", "1")
    assert cli.main(argv(fake)) == 1
    err = capsys.readouterr().err
    assert "exited with status 1 before it was healthy" in err
    assert "| (APIServer" in err and "Engine core initialization failed" in err
    assert report(fake)["runs"][0]["outcome"] == "exited"


def test_delayed_health_is_waited_for(fake, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_HEALTH_DELAY", "1.5")
    assert cli.main(argv(fake, "--no-bench")) == 0
    assert report(fake)["runs"][0]["healthy_after_s"] >= 1.5


def test_sigterm_ignored_by_a_child_ends_in_sigkill(fake, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_IGNORE_TERM", "1")
    monkeypatch.setenv("FAKE_VLLM_NEVER_HEALTHY", "1")
    args = argv(fake)
    args[args.index("--timeout") + 1], args[args.index("--grace") + 1] = "1", "0.5"
    assert cli.main(args) == 1  # the fixture checks that the engine core, deaf to SIGTERM, is gone


def test_busy_port_quiet_logging_and_missing_vllm_are_usage_errors(fake, monkeypatch, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = argv(fake)
        args[args.index("--port") + 1] = str(busy.getsockname()[1])
        assert cli.main(args) == 2
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
    assert cli.main(argv(fake)) == 2
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli.main(argv(fake)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "something already listens there" in err[0]
    assert "hides vLLM's 'Using configuration from' line" in err[1] and "vllm: not on PATH" in err[2]


def refused(fake, capsys, args: list[str], words: str) -> None:
    """validate-serve refuses ``args`` in one line holding ``words``: exit 2, nothing printed, started or written
    (neither --out nor a run folder under serve-runs/)."""
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("tune-moe: error: ") and words in err, err
    assert not fake["pids"].exists() and not fake["out"].exists() and not (fake["dir"] / "serve-runs").exists()


def default_out(args: list[str]) -> list[str]:
    """``args`` without --out: a run would write serve-runs/<run>/."""
    i = args.index("--out")
    return args[:i] + args[i + 2:]


def test_a_node_without_the_layouts_gpus_is_refused_before_anything_starts(fake, monkeypatch, capsys):
    """With --gpu as without it: nvidia-smi missing, failing or finding none, another GPU, or fewer GPUs than the
    layout (of those CUDA_VISIBLE_DEVICES leaves); --print-command starts nothing and needs no GPU."""
    no_gpu = "this node has no NVIDIA GPU (nvidia-smi found none); nothing was started; run on a GPU node"
    args, path = default_out(argv(fake, "--no-bench")), os.environ["PATH"]  # the fixture's: 8 GPUs, as below
    monkeypatch.setenv("PATH", str(FAKE))  # the fake vllm, and no nvidia-smi
    refused(fake, capsys, args, f"--gpu H200: {no_gpu}, or add --print-command to print the commands only")
    without = [w for w in args if w not in ("--gpu", "H200")]
    refused(fake, capsys, without, f"error: {no_gpu}, or add --print-command --gpu GPU to print the commands only")
    assert cli.main([*args, "--print-command"]) == 0  # starts nothing: needs no GPU
    assert capsys.readouterr().out.startswith("export VLLM_TUNED_CONFIG_FOLDER=")
    assert not fake["pids"].exists() and not (fake["dir"] / "serve-runs").exists()
    failing = fake["dir"] / "failing-bin"
    failing.mkdir()
    (failing / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (failing / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{FAKE}{os.pathsep}{failing}")
    refused(fake, capsys, args, f"--gpu H200: {no_gpu}")
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("FAKE_GPUS", "2")
    refused(fake, capsys, args, "TP4 needs 4 GPUs and this node has 2x NVIDIA H200; nothing was started; run on a "
                                "node with 4, or add --reduced to serve TP4's per-GPU shape on one GPU")
    monkeypatch.setenv("FAKE_GPUS", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    refused(fake, capsys, args, "TP4 needs 4 GPUs and this node has 8x NVIDIA H200, 3 of them in "
                                "CUDA_VISIBLE_DEVICES=0,1,2; nothing was started")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("FAKE_VLLM_GPU", "B200")
    refused(fake, capsys, args, "--gpu H200: this node has 8x NVIDIA B200, not NVIDIA H200; nothing was started")
    monkeypatch.setenv("FAKE_VLLM_GPU", "H200")
    monkeypatch.setenv("FAKE_GPUS", "1")  # a reduced serve needs one
    assert cli.main(reduced_args(fake, "--no-bench")) == 0
    assert report(fake)["ok"]


@pytest.mark.parametrize("extra, message", [
    (["--serve-args=--tensor-parallel-size 8"],
     "--serve-args sets --tensor-parallel-size, which --layout TP4 decides; use --layout TP8"),
    (["--serve-args=-tp=8"], "--serve-args sets -tp, which --layout TP4 decides; use --layout TP8"),
    (["--serve-args=-dp 2"], "--serve-args sets -dp, which --layout TP4 decides; use --layout DP2+TP4"),
    (["--serve-args=--enable-expert-parallel"],
     "--serve-args sets --enable-expert-parallel, which --layout TP4 decides; use --layout TP4+EP"),
    (["--serve-args=--tensor_parallel_size 4"],
     "--serve-args sets --tensor-parallel-size, which --layout TP4 decides; drop it from --serve-args"),
    (["--serve-args=-pp 2"], "--serve-args sets -pp, which --layout TP4 decides; drop it from --serve-args "
                             "(validate-serve's layouts have no pipeline parallelism)"),
    (["--reduced", "--serve-args=-tp 4"], "--serve-args sets -tp, which --layout TP4 decides; drop it from "
                                          "--serve-args (--reduced serves the layout's per-GPU shape on one GPU)"),
    (["--serve-args=--port 9000"], "--serve-args sets --port, which --port decides; use --port 9000"),
    (["--serve-args=--host 10.0.0.1"], "--serve-args sets --host, which validate-serve decides (its health check "
                                       "and benchmark reach the server on 127.0.0.1:--port); drop it from --serve-args"),
    (["--serve-args=--dtype float16"], "--serve-args sets --dtype, which validate-serve's --dtype bf16 decides"),
    (["--serve-args=--model /models/other"], "--serve-args sets --model, which --model decides; use --model "
                                             "/models/other"),
    (["--serve-args=--moe-backend triton"],
     "--serve-args sets --moe-backend, which --moe-backend decides; use --moe-backend triton"),
    (["--serve-args=-q fp8"], "--serve-args sets -q, which --dtype bf16 decides (the checkpoint's own weights"),
    (["--serve-args=--dtype float16"], "--serve-args sets --dtype, which validate-serve's --dtype bf16 decides"),
    (["--mtp", "--serve-args=--speculative-config.num_speculative_tokens 2"],
     "--serve-args sets --speculative-config, which --mtp sets (the recipe's MTP flags); drop it from "
     "--serve-args, or drop --mtp"),
    (["--reduced", "--serve-args=--hf-overrides {}"], "--serve-args sets --hf-overrides, which --reduced sets (the "
                                                     "reduced model's layers and experts); drop it from --serve-args"),
    (["--reduced", "--serve-args=--load-format auto"], "--serve-args sets --load-format, which --reduced sets"),
    (["--serve-args=--served-model-name step"], "--serve-args sets --served-model-name, which --model decides (the "
                                                "benchmark asks for the model by it)"),
    (["--serve-args=--no-jit-monitor-verbose"], "--serve-args sets --no-jit-monitor-verbose, which validate-serve "
                                                "sets (each pass counts the compiles vLLM logs)"),
    (["--measure-moe-share", "--serve-args=--profiler-config {}"],
     "--serve-args sets --profiler-config, which --measure-moe-share sets"),
    (["--serve-args=--trust-remote-code"], "--serve-args sets --trust-remote-code, which validate-serve sets (the "
                                           "recipe's flags); drop it from --serve-args"),
    (["--reduced", "--ab", "--ab-servers", "resident", "--serve-args=--device-memory-utilization 0.8"],
     "--serve-args sets --gpu-memory-utilization, which --ab-servers resident sets"),
    (["--serve-args=--frobnicate"], "--serve-args: --frobnicate is not a vLLM 0.33 'vllm serve' option; check the "
                                    "spelling (vllm serve --help lists them)"),
    (["--vllm-version", "0.34", "--serve-args=--frobnicate"], "--serve-args: --frobnicate is not a vLLM 0.34"),
    (["--serve-args=other/model"], "--serve-args: 'other/model' is no option (vLLM would take it for a second model)"),
    (["--model", "stepfun-ai/Step-3.5-Flash-FP8"],
     "--dtype bf16: --model stepfun-ai/Step-3.5-Flash-FP8 is a checkpoint of fp8 weights; pass --dtype fp8"),
])
def test_serve_args_that_set_what_the_run_decides_are_refused_in_one_line(fake, capsys, extra, message):
    """vLLM takes the last of two values: --serve-args setting what validate-serve sets or relies on would serve
    another layout, port, model or dtype than the one checked; refused, as an option vLLM's parser does not have
    is (by the flag table of the serve's release that preflight reads), before anything is printed or started."""
    args = argv(fake, *extra)
    refused(fake, capsys, args, message)
    refused(fake, capsys, default_out(args), message)
    refused(fake, capsys, [*args, "--print-command"], message)


def test_serve_args_that_change_nothing_the_run_relies_on_pass(fake, capsys):
    """An address 127.0.0.1 still reaches (0.0.0.0: every interface) and vLLM's --dtype auto or bfloat16 (the
    activations the files were tuned for) reach the printed command as given."""
    for extra in ("--host 0.0.0.0", "--dtype bfloat16", "--dtype auto --max-num-seqs 64"):
        assert cli.main(argv(fake, f"--serve-args={extra}", "--print-command")) == 0
        assert f" {extra}" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM installed")
def test_vllms_own_parser_reads_the_refused_serve_args_as_validate_serve_does():
    """vLLM 0.33's own serve parser: the options refused above store what validate-serve sets or relies on, and an
    option it does not have is refused there too."""
    from tuning.serve.checks import LAYOUT_OPTIONS, MTP_OPTIONS, RECIPE_OPTIONS, REACH_OPTIONS

    flags = vllm_probe.serve_flags()
    decided = {*LAYOUT_OPTIONS, *MTP_OPTIONS, *RECIPE_OPTIONS, *REACH_OPTIONS, "model", "port", "moe_backend",
               "quantization", "dtype", "load_format", "served_model_name", "jit_monitor_verbose", "profiler_config",
               "gpu_memory_utilization"}
    for flag in ("-tp", "-dp", "-pp", "-ep", "--enable-expert-parallel", "--port", "--host", "--model",
                 "--moe-backend", "-q", "--hf-overrides", "--load-format", "--speculative-config", "--served-model-name",
                 "--no-jit-monitor-verbose", "--profiler-config", "--device-memory-utilization", "--trust-remote-code"):
        assert flags[flag][0] in decided, flag
    (answer,) = vllm_probe.serve_plans([(["stepfun-ai/Step-3.5-Flash", "--frobnicate"], "sm90", 141, 1)])
    assert "unrecognized arguments: --frobnicate" in answer["error"]


@pytest.mark.parametrize("layers", ["0", "1", "2", "-5", "100000"])
def test_reduced_layers_out_of_range_are_refused_alike(fake, capsys, layers):
    message = f"--reduced-layers {layers}: must be 4 to 45 (a dense layer, SiLU MoE layers and 2 clamped ones)"
    for extra in ((), ("--print-command",)):
        refused(fake, capsys, default_out(reduced_args(fake, "--reduced-layers", layers, *extra)), message)


def test_print_command_suggests_preflight_on_the_served_model(fake, capsys):
    assert cli.main(argv(fake, "--model", "someone/Step-3.5-Flash-finetune", "--print-command")) == 0
    note = capsys.readouterr().err.splitlines()[-1]
    assert " vllm serve someone/Step-3.5-Flash-finetune --tensor-parallel-size 4 " in note


def wait_for_pids(fake, count: int) -> None:
    """Until the fake server and its engine core have both started."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if fake["pids"].exists() and len(fake["pids"].read_text().split()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("the fake server never started")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_validate_serve_stops_the_server(fake, sig, code):
    env = {**os.environ, "FAKE_VLLM_NEVER_HEALTHY": "1", "PYTHONPATH": str(REPO)}
    args = argv(fake)
    args[args.index("--timeout") + 1] = "60"
    proc = subprocess.Popen([sys.executable, "-c", MIRROR_CLI, *args], env=env, cwd=fake["dir"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_pids(fake, 2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == code, err
    assert f"interrupted by {sig.name}; every server was stopped" in err
    assert report(fake)["problems"] == [f"interrupted by {sig.name}; every server was stopped"]


def test_second_ctrl_c_skips_the_grace_period(fake):
    env = {**os.environ, "FAKE_VLLM_NEVER_HEALTHY": "1", "FAKE_VLLM_IGNORE_TERM": "1", "PYTHONPATH": str(REPO)}
    args = argv(fake)
    args[args.index("--timeout") + 1], args[args.index("--grace") + 1] = "60", "60"
    proc = subprocess.Popen([sys.executable, "-c", MIRROR_CLI, *args], env=env, cwd=fake["dir"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_pids(fake, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(1)  # teardown has begun; the engine core ignores its SIGTERM
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    proc.communicate(timeout=20)
    assert proc.returncode == 130 and time.monotonic() - started < 10


def test_wrapper_script_help_and_print_command(tmp_path):
    script = REPO / "scripts" / "validate-serve.sh"
    assert os.access(script, os.X_OK)
    help_text = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert help_text.returncode == 0 and help_text.stdout.startswith("validate-serve.sh: serve Step-3.5-Flash")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run([str(script), "--layout", "TP4", "--dtype", "bf16", "--gpu", "H200", "--print-command"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"export VLLM_TUNED_CONFIG_FOLDER={REPO / 'kernels_configs' / 'vllm-0.33' / 'NVIDIA_H200'}" in done.stdout
