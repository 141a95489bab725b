"""Every ``tune-moe`` command fed bad input from the command line: one line, the right exit code, nothing written.

Each row of ``ROWS`` is an argv (run as ``python -m tuning.cli`` in its own empty folder), the files set up there
first, the exit code and a piece of the one ``tune-moe: error:`` line on stderr. Rows that work are in the table
too (``err=None``), so it documents what each command accepts. Every row runs with ``TUNE_MOE_TRACEBACK=1``, so
an unexpected exception shows up as a traceback and fails its row; with ``HOME`` inside the row's folder and no
GPU tools on ``PATH`` (the rows say what a node without a GPU answers, on any host). Before and after, every
file and folder under the row's folder is checksummed: a refused command must leave it exactly as it was.

Most rows never import torch or vLLM. The rows are started together, slowest first (those importing vLLM),
on as many workers as the host has cores, and each test then checks its row's result.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
H200 = REPO / "kernels_configs" / "vllm-0.33" / "NVIDIA_H200"
EP4 = "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128]"
TINY = "E=16,N=128,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[64,64].json"
BF16_EP4 = "E=72,N=1280,device_name=NVIDIA_H200.json"
GOOD = (H200 / f"{EP4}.json").read_text()
SIDECAR = (H200 / f"{EP4}.provenance.json").read_text()
TINY_MODEL = (FIXTURES / "tiny-moe" / "config.json").read_text()
TINY_CONFIG = json.dumps({"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
                                "num_warps": 4, "num_stages": 3}, "triton_version": "3.8.0"})
FAKE_VLLM = FIXTURES / "fake_vllm"
SCRIPT = "#!/bin/sh\necho hello\n"
BINARY = bytes(range(256)) * 4
NOT_FUSED_MOE = "import os\n\n\ndef helper():\n    return os.getcwd()\n"
TINY_KERNEL = "\n\n\ndef get_default_config(M):\n    return {}\n"  # after a @triton.jit fused_moe_kernel
SMALL_JIT = "@triton.jit\ndef fused_moe_kernel(a_ptr):\n    pass" + TINY_KERNEL


def _missing_line(name: str) -> str:
    # vLLM 0.33's get_moe_configs warning: the tuned folder's path, then vLLM's bundled one.
    return ("(EngineCore_DP0 pid=1) WARNING 11-29 05:40:01 [fused_moe.py:1165] Using default MoE config. "
            "Performance might be sub-optimal! Config file not found at "
            f"/srv/kernels_configs/NVIDIA_H200/{name}, /usr/lib/vllm/configs/{name}\n")


def _with(base: str, **changes) -> str:
    return json.dumps({**json.loads(base), **changes})


def _sidecar(results: dict | None = None, **changes) -> str:
    """EP4's sidecar with top-level keys replaced and results entries changed ({batch key: fields})."""
    data = {**json.loads(SIDECAR), **changes}
    for m, fields in (results or {}).items():
        data["results"][m] = {**data["results"][m], **fields}
    return json.dumps(data)


SIDE = f"c/{EP4}.provenance.json"
SIDE_BAKE = f"kc/NVIDIA_H200/{EP4}.provenance.json"


def _modes_ignored() -> bool:
    """Whether this process writes into a folder without write permission (root does)."""
    with tempfile.TemporaryDirectory() as d:
        ro = Path(d) / "ro"
        ro.mkdir(mode=0o555)
        try:
            return os.access(ro, os.W_OK)
        finally:
            ro.chmod(0o755)


MODES_IGNORED = _modes_ignored()

# vLLM's selection code, imported by preflight's vllm_probe subprocess, imports the humming kernels, which create
# ~/.humming/tmp/lock/launcher.lock (in some runs, not all). The preflight rows that reach vLLM tolerate it;
# test_preflight_writes_nothing says whether it happened (XFAIL) or not (XPASS) until vllm_probe points
# HUMMING_TMP_DIR at a temporary folder.
HUMMING = "home/.humming"

# Costs, for scheduling: most rows import neither; torch rows take seconds, vLLM rows tens of seconds.
FAST, TORCH, VLLM = 0, 1, 2


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    code: int = 2
    err: str | None = ""  # in the one stderr line; None: the command works and prints no error
    files: dict = field(default_factory=dict)  # relative path -> text, bytes, or None for a folder
    out: str | None = None  # in stdout
    absent: str | None = None  # nowhere in stderr
    cost: int = FAST
    env: dict = field(default_factory=dict)  # "{tmp}" stands for the row's folder
    may_write: tuple[str, ...] = ()  # relative paths the command may create or change (rows that work)
    readonly: tuple[str, ...] = ()  # folders made read-only before the run
    xfail: str | None = None  # a defect outside the modules this table's fixes may touch


def row(id: str, *argv: str, **kw) -> Row:
    return Row(id, argv, **kw)


ROWS = [
    # ---- tune-moe (the main job), --dry-run: the plan only -----------------------------------------------------
    row("tune-dry-run-ok", "--gpu", "H200", "--dtype", "fp8", "--dry-run", code=0, err=None, out="Jobs: 6 shapes"),
    row("tune-gpu-lower-case-ok", "--gpu", "h200", "--dtype", "bf16", "--dry-run", code=0, err=None),
    row("tune-gpu-unknown", "--gpu", "H100", "--dtype", "fp8", "--dry-run", err="--gpu H100: unknown GPU; use one of"),
    row("tune-gpu-empty", "--gpu", "", "--dtype", "fp8", "--dry-run", err="unknown GPU"),
    row("tune-dtype-unknown", "--gpu", "H200", "--dtype", "fp16", "--dry-run", err="--dtype fp16: unknown"),
    row("tune-dtype-upper-case", "--gpu", "H200", "--dtype", "FP8", "--dry-run", err="--dtype FP8: unknown"),
    row("tune-required-missing", "--dry-run", err="the following arguments are required: --gpu, --dtype"),
    row("tune-unknown-option", "--gpu", "H200", "--dtype", "fp8", "--bogus", err="unrecognized arguments: --bogus"),
    row("tune-layouts-tp3", "--gpu", "H200", "--dtype", "fp8", "--layouts", "TP3", "--dry-run",
        err="layout TP3: expert width 1280 does not split over TP3"),
    row("tune-layouts-dp5-ep", "--gpu", "H200", "--dtype", "fp8", "--layouts", "DP5+EP", "--dry-run",
        err="288 experts do not split over 5 EP ranks"),
    row("tune-layouts-comma", "--gpu", "H200", "--dtype", "fp8", "--layouts", ",", "--dry-run",
        err="--layouts ',': names no layout"),
    row("tune-layouts-empty", "--gpu", "H200", "--dtype", "fp8", "--layouts", "", "--dry-run",
        err="--layouts '': names no layout"),
    row("tune-layouts-garbage", "--gpu", "H200", "--dtype", "fp8", "--layouts", "TP4,FOO", "--dry-run",
        err="layout 'FOO': cannot read 'FOO'"),
    row("tune-layouts-tp0", "--gpu", "H200", "--dtype", "fp8", "--layouts", "TP0", "--dry-run",
        err="sizes must be >= 1"),
    row("tune-layouts-ep-size", "--gpu", "H200", "--dtype", "fp8", "--layouts", "TP4+EP3", "--dry-run",
        err="write EP or EP4"),
    row("tune-layouts-too-big", "--gpu", "H200", "--dtype", "fp8", "--layouts", "TP16", "--dry-run",
        err="--layouts TP16 need more than the 8 GPUs of the node"),
    row("tune-layouts-tp1-bf16-names-this-node", "--gpu", "H200", "--dtype", "bf16", "--layouts", "TP1",
        "--num-gpus", "8", "--dry-run", err="bf16 on this node (8xH200) with --layouts TP4,TP8,", absent="16xH200"),
    row("tune-bf16-on-4xh20-names-more-gpus", "--gpu", "H20", "--dtype", "bf16", "--num-gpus", "4", "--dry-run",
        err="would fit: bf16 on 8xH20 (TP8 or DP8+EP), fp8 (stepfun-ai/Step-3.5-Flash-FP8) on 4xH20"),
    row("tune-old-vllm-refuses-tp4", "--gpu", "H200", "--dtype", "fp8", "--layouts", "TP4", "--vllm-version", "0.16",
        "--dry-run", err="layout TP4: vLLM 0.16 needs the per-GPU expert width"),
    *(row(f"tune-batch-sizes-{name}", "--gpu", "H200", "--dtype", "fp8", f"--batch-sizes={value}", "--dry-run",
          err=f"--batch-sizes {value!r}: write integers from 1 to")
      for name, value in (("zero", "0"), ("negative", "-1"), ("letter", "a"), ("empty", ""), ("mixed", "1,x"),
                          ("huge", "99999999999999999999999"))),
    row("tune-shape-not-in-plan", "--gpu", "H200", "--dtype", "fp8", "--shape", "E=999,N=1", "--dry-run",
        err="--shape E=999,N=1 matches none of the plan's shapes"),
    row("tune-shape-unreadable", "--gpu", "H200", "--dtype", "fp8", "--shape", "72,1280", "--dry-run",
        err="--shape '72,1280': write E=<experts>,N=<width>"),
    row("tune-shape-ok", "--gpu", "H200", "--dtype", "fp8", "--shape", "E=72,N=1280", "--dry-run", code=0, err=None,
        out="Jobs: 1 shapes"),
    row("tune-moe-backend-vllm-spelling-ok", "--gpu", "H200", "--dtype", "fp8", "--moe-backend", "Deep-Gemm",
        "--dry-run", code=0, err=None, out="N=384"),
    row("tune-moe-backend-unknown", "--gpu", "H200", "--dtype", "fp8", "--moe-backend", "deepgemm", "--dry-run",
        err="--moe-backend 'deepgemm': not a vLLM 0.33 value"),
    *(row(f"tune-routing-{name}", "--gpu", "H200", "--dtype", "fp8", "--routing", value, "--dry-run",
          err=f"--routing {value!r}: use uniform or zipf:<s>")
      for name, value in (("zipf-nan", "zipf:nan"), ("zipf-inf", "zipf:inf"), ("zipf-negative", "zipf:-1"),
                          ("zipf-empty", "zipf:"), ("unknown", "nope"))),
    row("tune-routing-zipf-ok", "--gpu", "H200", "--dtype", "fp8", "--routing", "zipf:1.2", "--dry-run", code=0,
        err=None),
    row("tune-max-evals-zero", "--gpu", "H200", "--dtype", "fp8", "--max-evals", "0", "--dry-run",
        err="--max-evals 0: must be at least 1"),
    row("tune-workers-zero", "--gpu", "H200", "--dtype", "fp8", "--workers", "0", "--dry-run",
        err="--workers 0: must be at least 1"),
    row("tune-num-gpus-zero", "--gpu", "H200", "--dtype", "fp8", "--num-gpus", "0", "--dry-run",
        err="--num-gpus 0: must be at least 1"),
    row("tune-num-gpus-letter", "--gpu", "H200", "--dtype", "fp8", "--num-gpus", "x", "--dry-run",
        err="argument --num-gpus: invalid int value: 'x'"),
    row("tune-strategy-unknown", "--gpu", "H200", "--dtype", "fp8", "--strategy", "fast", "--dry-run",
        err="argument --strategy: invalid choice: 'fast'"),
    row("tune-model-missing-file", "--gpu", "H200", "--dtype", "fp8", "--model", "nope/config.json", "--dry-run",
        err="--model nope/config.json: no such config.json"),
    row("tune-model-folder-without-config", "--gpu", "H200", "--dtype", "fp8", "--model", "ckpt", "--dry-run",
        files={"ckpt/weights.bin": BINARY}, err="--model ckpt: no such config.json"),
    row("tune-model-not-json", "--gpu", "H200", "--dtype", "fp8", "--model", "config.json", "--dry-run",
        files={"config.json": "model_type: step3p5\n"}, err="--model config.json: not readable JSON"),
    row("tune-model-binary", "--gpu", "H200", "--dtype", "fp8", "--model", "config.json", "--dry-run",
        files={"config.json": BINARY}, err="--model config.json: not readable JSON"),
    row("tune-model-json-list", "--gpu", "H200", "--dtype", "fp8", "--model", "config.json", "--dry-run",
        files={"config.json": "[1, 2]"}, err="--model config.json: expected a JSON object"),
    row("tune-model-tiny-ok", "--gpu", "H200", "--dtype", "fp8", "--model", "config.json", "--dry-run",
        files={"config.json": TINY_MODEL}, code=0, err=None, out=TINY.removesuffix(".json")),
    *(row(f"tune-model-{name}", "--gpu", "H200", "--dtype", "fp8", "--model", "config.json", "--dry-run",
          files={"config.json": _with(TINY_MODEL, **change)}, err=err)
      for name, change, err in (
          ("zero-experts", {"moe_num_experts": 0}, "moe_num_experts=0: must be at least 1"),
          ("top-k-above-experts", {"moe_top_k": 99}, "moe_top_k=99 is more than the 16 experts"),
          ("model-type-list", {"model_type": ["step3p5"]}, "is not a known MoE architecture"),
          ("layers-enum-garbage", {"moe_layers_enum": "a,b"}, "moe_layers_enum must list layer numbers"),
          ("layer-types-not-a-list", {"mlp_layer_types": 3}, "mlp_layer_types must be a list"),
          ("layers-absurd", {"num_hidden_layers": 10**12}, "num_hidden_layers=1000000000000 is more than"),
          ("quantization-list", {"quantization_config": [1]}, "quantization_config must be a JSON object"),
          ("block-zero", {"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 0]}},
           "weight_block_size [0, 0] is not two positive integers"),
          ("block-text", {"quantization_config": {"quant_method": "fp8", "weight_block_size": "64"}},
           "weight_block_size '64' is not two positive integers"),
          ("total-params-text", {"total_params": "big"}, "total_params 'big' is not a positive number"),
          ("vocab-text", {"vocab_size": "x"}, "vocab_size must be a whole number"),
      )),
    row("tune-model-qwen-sparse-step-zero", "--gpu", "H200", "--dtype", "bf16", "--model", "config.json", "--dry-run",
        files={"config.json": json.dumps({"model_type": "qwen3_moe", "num_experts": 16, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 128, "hidden_size": 128, "num_hidden_layers": 3,
                                          "decoder_sparse_step": 0})},
        err="decoder_sparse_step must be an integer >= 1"),
    row("tune-model-deepseek-first-dense-text", "--gpu", "H200", "--dtype", "bf16", "--model", "config.json",
        "--dry-run", files={"config.json": json.dumps({
            "model_type": "deepseek_v3", "n_routed_experts": 16, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
            "hidden_size": 128, "num_hidden_layers": 3, "first_k_dense_replace": "1"})},
        err="first_k_dense_replace must be an integer >= 0"),
    row("tune-vllm-version-latest", "--gpu", "H200", "--dtype", "fp8", "--vllm-version", "latest", "--dry-run",
        err="--vllm-version 'latest': write it as MAJOR.MINOR"),
    row("tune-from-log-missing", "--gpu", "H200", "--dtype", "fp8", "--from-vllm-log", "serve.log", "--dry-run",
        err="--from-vllm-log serve.log: cannot read it"),
    row("tune-from-log-folder", "--gpu", "H200", "--dtype", "fp8", "--from-vllm-log", "logs", "--dry-run",
        files={"logs/serve.log": "x\n"}, err="--from-vllm-log logs: cannot read it"),
    row("tune-from-log-nothing-missing", "--gpu", "H200", "--dtype", "fp8", "--from-vllm-log", "serve.log",
        "--dry-run", files={"serve.log": "(APIServer pid=9) INFO 12-04 10:00:00 [fused_moe.py:1152] Using configuration "
                                         "from /x/a.json for MoE layer.\n"},
        err="vLLM reported no missing MoE config; nothing to tune"),
    row("tune-from-log-binary", "--gpu", "H200", "--dtype", "fp8", "--from-vllm-log", "serve.log", "--dry-run",
        files={"serve.log": BINARY}, err="not a vLLM server log (no line of vLLM's logger"),
    row("tune-from-log-empty", "--gpu", "H200", "--dtype", "fp8", "--from-vllm-log", "serve.log", "--dry-run",
        files={"serve.log": ""}, err="not a vLLM server log"),
    row("tune-from-log-other-dtype", "--gpu", "H200", "--dtype", "fp8", "--from-vllm-log", "serve.log", "--dry-run",
        files={"serve.log": _missing_line(BF16_EP4)}, err="names bf16 shapes, not fp8; re-run with --dtype bf16"),
    *(row(f"tune-from-log-two-serves-{dtype}", "--gpu", "H200", "--dtype", dtype, "--from-vllm-log", "serve.log",
          "--dry-run", files={"serve.log": _missing_line(BF16_EP4) + _missing_line(EP4 + ".json")}, code=0, err=None,
          out=f"the log also names 1 {other} shape, not tuned here; tune it with --dtype {other}")
      for dtype, other in (("bf16", "fp8"), ("fp8", "bf16"))),
    row("tune-from-log-ok", "--gpu", "H200", "--dtype", "bf16", "--from-vllm-log", "serve.log", "--dry-run",
        files={"serve.log": _missing_line(BF16_EP4)}, code=0, err=None, out="Jobs: 1 shapes"),
    row("tune-dry-run-writes-nothing-to-a-file-out", "--gpu", "H200", "--dtype", "fp8", "--out", "afile", "--dry-run",
        files={"afile": "x"}, err="--out afile: exists and is not a folder"),

    # ---- tune-moe without --dry-run on a node without a GPU ---------------------------------------------------
    row("tune-no-gpu", "--gpu", "H200", "--dtype", "fp8", err="this node has no NVIDIA GPU (nvidia-smi found none)"),
    row("tune-out-is-a-file", "--gpu", "H200", "--dtype", "fp8", "--out", "afile", files={"afile": "x"},
        err="--out afile: exists and is not a folder"),
    row("tune-out-read-only", "--gpu", "H200", "--dtype", "fp8", "--out", "ro/configs", files={"ro": None},
        readonly=("ro",), err="--out ro/configs: ro is not writable"),
    row("tune-vllm-src-not-a-zip-wheel", "--gpu", "H200", "--dtype", "fp8", "--vllm-src",
        "vllm-0.33.0-cp38-abi3-manylinux1_x86_64.whl", files={"vllm-0.33.0-cp38-abi3-manylinux1_x86_64.whl": "no"},
        err="not a zip file"),
    row("tune-vllm-src-script-no-gpu", "--gpu", "H200", "--dtype", "fp8", "--vllm-src", "run.sh",
        files={"run.sh": SCRIPT}, err="this node has no NVIDIA GPU"),
    # an option naming a path given empty ("$UNSET"): refused, never read as its default
    *(row(f"empty-{'-'.join(argv[:1])}-{option[2:]}", *argv, option, "",
          err=f"{option} is empty (an unset variable?); give it a value, or drop {option} for its default")
      for argv, option in (
          (("--gpu", "H200", "--dtype", "fp8", "--dry-run"), "--model"),
          (("--gpu", "H200", "--dtype", "fp8", "--dry-run"), "--from-vllm-log"),
          (("report", "--configs", str(H200)), "--out"),
          (("report", "--configs", str(H200)), "--readme"),
          (("verify", "--gpu", "H200", "--configs", str(H200), "--against", str(H200)), "--keep-confirmed"),
          (("validate-serve", "--layout", "TP4", "--dtype", "bf16", "--gpu", "H200", "--print-command"), "--env-file"),
          (("validate-serve", "--layout", "TP4", "--dtype", "bf16", "--gpu", "H200", "--print-command"), "--configs"),
          (("bake", "--device", "NVIDIA_H200"), "--target"),
      )),
    # a state folder found in --out: a run that finishes no job and writes no file leaves it as it was
    *(row(f"tune-no-gpu-state-{name}", "--gpu", "H200", "--dtype", "fp8", "--out", "o", files=files, err=err)
      for name, files, err in (
          ("damaged-line", {"o/.tune-moe/results.jsonl": "garbage\n"}, "this node has no NVIDIA GPU"),
          ("binary-results", {"o/.tune-moe/results.jsonl": b"\xff\xfe\x00"}, "this node has no NVIDIA GPU"),
          ("json-list-line", {"o/.tune-moe/results.jsonl": "[1, 2]\n"}, "this node has no NVIDIA GPU"),
          ("results-a-folder", {"o/.tune-moe/results.jsonl": None},
           "o/.tune-moe/results.jsonl is not the file a run keeps there; move it away"),
          ("state-a-file", {"o/.tune-moe": "x"}, "this node has no NVIDIA GPU"),
          ("run-record-written-dicts", {"o/.tune-moe/results.jsonl": "x\n",
                                        "o/.tune-moe/run.json": '{"format": 2, "files": {}, "written": [{}]}'},
           "o/.tune-moe/run.json is not a run record tune-moe wrote"),
          ("run-record-file-not-a-dict", {"o/.tune-moe/results.jsonl": "x\n",
                                          "o/.tune-moe/run.json": '{"format": 2, "files": {"a": 1}}'},
           "o/.tune-moe/run.json is not a run record tune-moe wrote"),
      )),
    # --interpret needs no GPU, so the kernel source itself is read (and refused) before Ray starts; one whose code
    # fails only when run is refused by the workers that run it (test_sweep.py)
    *(row(f"tune-interpret-vllm-src-{name}", "--gpu", "H200", "--dtype", "fp8", "--model", "tiny.json", "--interpret",
          "--vllm-src", src, *extra, files={"tiny.json": TINY_MODEL, **files}, err=err, cost=TORCH)
      for name, src, extra, files, err in (
          ("shell-script", "run.sh", (), {"run.sh": SCRIPT}, "--vllm-src run.sh: cannot tell its vLLM version"),
          ("shell-script-versioned", "run.sh", ("--vllm-version", "0.33"), {"run.sh": SCRIPT},
           "--vllm-src run.sh: not Python source"),
          ("binary", "kernel.so", (), {"kernel.so": BINARY}, "--vllm-src kernel.so: not a readable Python source"),
          ("missing", "fused_moe.py", (), {}, "--vllm-src fused_moe.py: no such file"),
          ("wheel-not-a-zip", "vllm-0.33.0-py3-none-any.whl", (), {"vllm-0.33.0-py3-none-any.whl": "not a zip"},
           "not a vLLM wheel with vllm/model_executor/layers/fused_moe/fused_moe.py"),
          ("folder-without-kernel", "src", (), {"src/README": "x"}, "--vllm-src src/fused_moe.py: no such file"),
          ("python-without-kernel", "fused_moe.py", ("--vllm-version", "0.33"), {"fused_moe.py": NOT_FUSED_MOE},
           "--vllm-src fused_moe.py: lacks a @triton.jit fused_moe_kernel and get_default_config"),
          ("unknown-signature", "fused_moe.py", ("--vllm-version", "0.33"), {"fused_moe.py": SMALL_JIT},
           "fused_moe_kernel of vLLM 0.33 (source fused_moe.py) has a signature this launcher does not know"),
      )),

    # ---- verify ------------------------------------------------------------------------------------------------
    row("verify-no-configs", "verify", "--gpu", "H200", err="kernels_configs/vllm-0.33/NVIDIA_H200: no such folder; "
        "pass --configs with the folder holding the tuned files, or run tune-moe first"),
    row("verify-empty-configs", "verify", "--gpu", "H200", "--configs", "c", files={"c/notes.txt": "x"},
        err="c: no tuned config files; run tune-moe first"),
    row("verify-no-release-folder", "verify", "--gpu", "H200", "--vllm-version", "0.35.0",
        files={f"kernels_configs/vllm-0.33/NVIDIA_H200/{EP4}.json": GOOD},
        err="kernels_configs/vllm-0.35/NVIDIA_H200: no such folder; pass --configs with the folder holding the tuned "
            "files, or run tune-moe first (NVIDIA_H200 is tuned for vLLM 0.33 here: pass --vllm-version or --configs)"),
    row("verify-gpu-unknown", "verify", "--gpu", "A100", err="--gpu A100: unknown GPU"),
    row("verify-configs-is-a-file", "verify", "--gpu", "H200", "--configs", "afile", files={"afile": "x"},
        err="--configs afile: is a file, not a folder"),
    row("verify-files-match-none", "verify", "--gpu", "H200", "--configs", "c", "--files", "E=999",
        files={f"c/{EP4}.json": GOOD}, err="c: no tuned config files matching --files"),
    row("verify-corrupt-json", "verify", "--gpu", "H200", "--configs", "c", files={f"c/{EP4}.json": '{"1": {'},
        err="unreadable or corrupt JSON"),
    row("verify-wrong-schema", "verify", "--gpu", "H200", "--configs", "c",
        files={f"c/{EP4}.json": '{"1": {"BLOCK_SIZE_M": 16}}'}, err="batch 1 must hold exactly the integer fields"),
    row("verify-extra-top-level-key", "verify", "--gpu", "H200", "--configs", "c",
        files={f"c/{EP4}.json": _with(GOOD, tuned_by="me")}, err="key 'tuned_by' is not a batch size"),
    row("verify-batch-key-not-ascii", "verify", "--gpu", "H200", "--configs", "c",
        files={f"c/{EP4}.json": _with(GOOD, **{"\u00b2": json.loads(GOOD)["1"]})}, err="is not a batch size"),
    row("verify-json-list", "verify", "--gpu", "H200", "--configs", "c", files={f"c/{EP4}.json": "[]"},
        err="not a vLLM MoE config (a JSON object of batch sizes)"),
    row("verify-odd-file-name", "verify", "--gpu", "H200", "--configs", "c", files={"c/E=abc.json": GOOD},
        err="E=abc.json: not a vLLM fused-MoE config file name"),
    *(row(f"verify-file-name-{name}", "verify", "--gpu", "H200", "--configs", "c", files={f"c/{file}": GOOD},
          err=f"c/{file}: not a vLLM fused-MoE config file name ({bad}: vLLM writes a positive integer in ASCII "
              "digits there); expected E=..,N=..,device_name=...json; rename or remove it")
      for name, file, bad in (
          ("e-zero", EP4.replace("E=72", "E=0") + ".json", "E=0"),
          ("n-zero", EP4.replace("N=1280", "N=0") + ".json", "N=0"),
          ("block-zero", EP4.replace("[128,128]", "[0,0]") + ".json", "block_shape[0]=0"),
          ("e-not-ascii-digits", EP4.replace("E=72", "E=\u0667\u0662") + ".json", "E=\u0667\u0662"),
          ("e-leading-zero", EP4.replace("E=72", "E=072") + ".json", "E=072"),
      )),
    row("verify-against-missing", "verify", "--gpu", "H200", "--configs", "c", "--against", "old",
        files={f"c/{EP4}.json": GOOD}, err="--against old: not a folder; pass the folder of the files these replace"),
    row("verify-against-corrupt", "verify", "--gpu", "H200", "--configs", "c", "--against", "old",
        files={f"c/{EP4}.json": GOOD, f"old/{EP4}.json": '{"1": {'}, err="unreadable or corrupt JSON"),
    row("verify-keep-confirmed-without-against", "verify", "--gpu", "H200", "--configs", "c", "--keep-confirmed",
        "out", files={f"c/{EP4}.json": GOOD}, err="--keep-confirmed needs --against OLD"),
    row("verify-keep-confirmed-out-is-a-file", "verify", "--gpu", "H200", "--configs", "c", "--against", "old",
        "--keep-confirmed", "out", files={f"c/{EP4}.json": GOOD, f"old/{EP4}.json": GOOD, "out": "x"},
        err="--keep-confirmed out: exists and is not a folder"),
    row("verify-keep-confirmed-no-sidecar", "verify", "--gpu", "H200", "--configs", "c", "--against", "old",
        "--keep-confirmed", "out", files={f"c/{EP4}.json": GOOD, f"old/{EP4}.json": GOOD},
        err="in NEW has no tune-moe sidecar, so the merged file could not say where each entry came from"),
    row("verify-other-device", "verify", "--gpu", "H200", "--configs", "c",
        files={f"c/{EP4.replace('H200', 'H20')}.json": GOOD}, err="is for NVIDIA_H20, not NVIDIA_H200"),
    row("verify-model-does-not-match", "verify", "--gpu", "H200", "--configs", "c", "--model", "tiny.json",
        files={f"c/{EP4}.json": GOOD, "tiny.json": TINY_MODEL}, err="E=72 is not a shape of tiny.json"),
    row("verify-batch-sizes-letter", "verify", "--gpu", "H200", "--configs", "c", "--batch-sizes", "a",
        files={f"c/{EP4}.json": GOOD}, err="--batch-sizes 'a': write integers from 1 to"),
    row("verify-vllm-src-script", "verify", "--gpu", "H200", "--configs", "c", "--vllm-src", "run.sh",
        files={f"c/{EP4}.json": GOOD, "run.sh": SCRIPT}, err="--vllm-src run.sh: cannot tell its vLLM version"),
    row("verify-vllm-src-without-kernel", "verify", "--gpu", "H200", "--configs", "c", "--vllm-src", "fused_moe.py",
        "--vllm-version", "0.33", files={f"c/{EP4}.json": GOOD, "fused_moe.py": NOT_FUSED_MOE}, cost=TORCH,
        err="--vllm-src fused_moe.py: lacks a @triton.jit fused_moe_kernel"),
    row("verify-no-gpu-mirror-loader", "verify", "--gpu", "H200", "--configs", "c",
        files={f"c/{EP4}.json": GOOD, "hide/vllm/__init__.py": "raise ImportError('hidden from this row')\n"},
        env={"PYTHONPATH": "{tmp}/hide" + os.pathsep + str(REPO)}, out="tune-moe's mirror of vLLM's loader",
        err="re-timing tuned vs default needs a H200 GPU and this node has none"),
    row("verify-no-gpu-vllm-loader", "verify", "--gpu", "H200", "--configs", "c", files={f"c/{EP4}.json": GOOD},
        cost=VLLM, out="loaded by vLLM's get_moe_configs: 19 batch sizes",
        err="re-timing tuned vs default needs a H200 GPU and this node has none", absent="active driver"),
    row("verify-interpret-tiny", "verify", "--gpu", "H200", "--configs", "c", "--model", "tiny.json", "--interpret",
        files={f"c/{TINY}": TINY_CONFIG, "tiny.json": TINY_MODEL}, cost=VLLM, code=0, err=None,
        out="1 files, 0 failed", may_write=("home/.cache/tune-moe",)),

    # ---- report ------------------------------------------------------------------------------------------------
    row("report-nothing-here", "report", err="no kernels_configs/vllm-<release>/<device>/ folder with *.provenance.json here"),
    row("report-configs-missing", "report", "--configs", "nope", err="--configs nope: no such folder"),
    row("report-configs-is-a-file", "report", "--configs", "afile", files={"afile": "x"},
        err="--configs afile: no such folder"),
    row("report-configs-without-sidecars", "report", "--configs", "c", files={f"c/{EP4}.json": GOOD},
        err="c holds no *.provenance.json"),
    row("report-corrupt-sidecar", "report", "--configs", "c",
        files={f"c/{EP4}.json": GOOD, f"c/{EP4}.provenance.json": "{"}, err="unreadable or corrupt JSON"),
    row("report-sidecar-without-config", "report", "--configs", "c", files={f"c/{EP4}.provenance.json": SIDECAR},
        err=f"its config {EP4}.json is missing"),
    row("report-sidecar-gpu-count-text", "report", "--configs", "c",
        files={f"c/{EP4}.json": GOOD,
               f"c/{EP4}.provenance.json": _with(SIDECAR, gpu={**json.loads(SIDECAR)["gpu"], "count": "x"})},
        err="regenerate the sidecar with tune-moe"),
    *(row(f"report-sidecar-{name}", "report", "--configs", "c", "--out", "out",
          files={f"c/{EP4}.json": GOOD, SIDE: sidecar}, err=f"{SIDE}: {problem}; regenerate the sidecar with tune-moe")
      for name, sidecar, problem in (
          ("confirmed-text", _sidecar(confirmed="yes"), "key 'confirmed' 'yes' is not a list of confirmed entries"),
          ("confirmed-number", _sidecar(confirmed=[1]), "key 'confirmed.0' 1 is not a confirmed entry (an object)"),
          ("confirmed-empty-entry", _sidecar(confirmed=[{}]), "missing required key 'confirmed.0.m'"),
          ("confirmed-m-text", _sidecar(confirmed=[{"m": "4", "config": "x", "replaces": "y", "on": "GPU-0",
                                                     "old_us": 2.0, "new_us": 1.0}]),
           "key 'confirmed.0.m' '4' is not a batch size"),
          ("layouts-empty", _sidecar(layouts=[], results={"1": {"roofline_us": 0}}),
           """key 'layouts' [] is not a list of the layouts it was tuned for (e.g. ["TP4"])"""),
          ("layouts-text", _sidecar(layouts="TP4+EP", results={"1": {"roofline_us": 0}}),
           """key 'layouts' 'TP4+EP' is not a list of the layouts it was tuned for (e.g. ["TP4"])"""),
          ("layouts-garbage", _sidecar(layouts=["TP4+EP", "FOO"]),
           "key 'layouts' holds 'FOO', which is not a layout (TP4, DP4+EP, ...)"),
          ("batch-key-not-ascii", json.dumps({**json.loads(SIDECAR), "results": {
              ("\u00b2" if m == "1" else m): v for m, v in json.loads(SIDECAR)["results"].items()}}),
           "results key '\u00b2' is not a batch size"),
          ("vllm-garbage", _sidecar(software={**json.loads(SIDECAR)["software"], "vllm": "garbage"}),
           "key 'software.vllm' 'garbage' is not a vLLM version (MAJOR.MINOR[.PATCH])"),
      )),
    row("report-out-is-a-file", "report", "--configs", "c", "--out", "afile",
        files={f"c/{EP4}.json": GOOD, f"c/{EP4}.provenance.json": SIDECAR, "afile": "x"},
        err="--out afile: exists and is not a folder"),
    row("report-plots-is-a-file", "report", "--configs", "c",
        files={f"c/{EP4}.json": GOOD, f"c/{EP4}.provenance.json": SIDECAR, "c/plots": "x"},
        err="--configs c/plots: exists and is not a folder"),
    row("report-readme-missing", "report", "--configs", "c", "--readme", "README.md",
        files={f"c/{EP4}.json": GOOD, f"c/{EP4}.provenance.json": SIDECAR}, err="--readme README.md: cannot read it"),
    row("report-readme-without-markers", "report", "--configs", "c", "--readme", "README.md",
        files={f"c/{EP4}.json": GOOD, f"c/{EP4}.provenance.json": SIDECAR, "README.md": "# hi\n"},
        err="needs exactly one <!-- tune-moe:report:begin -->"),
    row("report-ok", "report", "--configs", "c", "--out", "out",
        files={f"c/{EP4}.json": GOOD, f"c/{EP4}.provenance.json": SIDECAR}, code=0, err=None, cost=TORCH,
        out="wrote out/REPORT.md", may_write=("out", "home/.cache/matplotlib", "home/.config/matplotlib")),

    # ---- bake --------------------------------------------------------------------------------------------------
    row("bake-device-unknown", "bake", "--device", "NVIDIA_A100", "--configs", "kc", "--target", "t",
        files={f"kc/NVIDIA_H200/{EP4}.json": GOOD}, err="--device NVIDIA_A100: no folder kc/NVIDIA_A100; "
                                                        "device folders present: NVIDIA_H200"),
    row("bake-configs-is-the-device-folder", "bake", "--device", "NVIDIA_H200", "--configs", "kc/NVIDIA_H200", "--target",
        "t", files={f"kc/NVIDIA_H200/{EP4}.json": GOOD},
        err="--configs kc/NVIDIA_H200 is NVIDIA_H200's folder itself; pass the folder above it: --configs kc"),
    row("bake-device-escapes", "bake", "--device", "..", "--configs", "kc", "--target", "t",
        files={f"kc/NVIDIA_H200/{EP4}.json": GOOD}, err="--device ..: no folder"),
    row("bake-device-missing", "bake", "--target", "t", err="the following arguments are required: --device"),
    row("bake-target-missing", "bake", "--device", "NVIDIA_H200", "--configs", "kc",
        files={f"kc/NVIDIA_H200/{EP4}.json": GOOD}, err="--target is required"),
    row("bake-target-is-a-file", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target", "afile",
        files={f"kc/NVIDIA_H200/{EP4}.json": GOOD, "afile": "x"}, err="--target afile: exists and is not a folder"),
    row("bake-target-inside-configs", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target",
        "kc/NVIDIA_H200/baked", files={f"kc/NVIDIA_H200/{EP4}.json": GOOD}, err="overlaps the configs folder"),
    row("bake-target-holds-other-files", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target", "t",
        files={f"kc/NVIDIA_H200/{EP4}.json": GOOD, "t/mine.txt": "x"}, err="holds files not from a bake (mine.txt)"),
    row("bake-corrupt-config", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target", "t",
        files={f"kc/NVIDIA_H200/{EP4}.json": "{"}, err="unreadable or corrupt JSON"),
    row("bake-corrupt-sidecar", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target", "t",
        files={f"kc/NVIDIA_H200/{EP4}.json": GOOD, f"kc/NVIDIA_H200/{EP4}.provenance.json": "{"},
        err="corrupt JSON"),
    row("bake-config-is-a-folder", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target", "t",
        files={f"kc/NVIDIA_H200/{EP4}.json/x": "x", SIDE_BAKE: SIDECAR},
        err=f"kc/NVIDIA_H200/{EP4}.json: a folder, not a file; remove it or put the config file tune-moe wrote there"),
    row("bake-sidecar-is-a-folder", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target", "t",
        files={f"kc/NVIDIA_H200/{EP4}.json": GOOD, SIDE_BAKE: None},
        err=f"{SIDE_BAKE}: a folder, not a file; remove it or put the sidecar tune-moe wrote there"),
    row("bake-sidecar-vllm-garbage", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target", "t",
        "--vllm-version", "0.33",
        files={f"kc/NVIDIA_H200/{EP4}.json": GOOD,
               SIDE_BAKE: _sidecar(software={**json.loads(SIDECAR)["software"], "vllm": "garbage"})},
        err=f"{SIDE_BAKE}: key 'software.vllm' 'garbage' is not a vLLM version (MAJOR.MINOR[.PATCH]); regenerate "
            "the sidecar with tune-moe", absent="--vllm-version"),
    row("bake-config-e-zero", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target", "t",
        files={f"kc/NVIDIA_H200/{EP4}.json": GOOD, f"kc/NVIDIA_H200/{EP4.replace('E=72', 'E=0')}.json": GOOD},
        err=f"kc/NVIDIA_H200/{EP4.replace('E=72', 'E=0')}.json: not a vLLM fused-MoE config file name (E=0: vLLM "
            "writes a positive integer in ASCII digits there); expected E=..,N=..,device_name=...json; rename or "
            "remove it"),
    *(row(f"bake-manifest-{name}", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target", "t", "--force",
          files={f"kc/NVIDIA_H200/{EP4}.json": GOOD, "t/mine.txt": "x", "victim.txt": "mine",
                 "t/.tune-moe-bake.json": json.dumps({"tool": "tune-moe", "files": files})},
          err="t/.tune-moe-bake.json: key 'files' is not a list of the file names a bake put in t; delete it (the "
              "folder's files then count as not from a bake) or choose another --target")
      for name, files in (("files-objects", [{}]), ("files-text", "x"), ("files-a-path", ["../victim.txt"]),
                          ("files-dot-dot", [".."]))),
    row("bake-manifest-corrupt", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target", "t",
        files={f"kc/NVIDIA_H200/{EP4}.json": GOOD, "t/.tune-moe-bake.json": "{"},
        err="t/.tune-moe-bake.json: corrupt bake manifest (Expecting property name enclosed in double quotes: line 1 "
            "column 2 (char 1)); delete it (the folder's files then count as not from a bake) or choose another "
            "--target"),
    row("bake-configs-is-a-file", "bake", "--device", "NVIDIA_H200", "--configs", "afile", "--target", "t",
        files={"afile": "x"}, err="--configs afile: is a file, not a folder"),
    row("bake-print-env-without-bake", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--target", "t",
        "--print-env", files={f"kc/NVIDIA_H200/{EP4}.json": GOOD, "t": None}, err="--target t holds no bake"),
    row("bake-dockerfile-ok", "bake", "--device", "NVIDIA_H200", "--configs", "kc", "--dockerfile",
        files={f"kc/NVIDIA_H200/{EP4}.json": GOOD}, code=0, err=None, out="COPY kc/NVIDIA_H200/ /opt/tune-moe/configs/"),
    *(row(f"bake-dockerfile-{name}", "bake", "--device", "NVIDIA_H200", "--configs", configs, "--dockerfile", *extra,
          files={f"{configs}/NVIDIA_H200/{EP4}.json": GOOD}, err=err)
      for name, configs, extra, err in (
          ("target-with-blank", "kc", ("--target", "/opt/a b"), "--target '/opt/a b': the folder in the image must be "
                                                                "an absolute path without blanks"),
          ("target-relative", "kc", ("--target", "rel/x"), "--target 'rel/x': the folder in the image must be"),
          ("configs-with-blank", "k c", (), "--configs k c: the Dockerfile's COPY reads k c/NVIDIA_H200, which is a "
                                            "path with blanks"),
      )),

    # ---- check-deepgemm (imports torch first) ------------------------------------------------------------------
    row("check-deepgemm-json-out-folder", "check-deepgemm", "--json-out", "out", files={"out": None}, cost=TORCH,
        err="--json-out out: is a folder; pass a file path"),
    row("check-deepgemm-experts-zero", "check-deepgemm", "--experts", "0", cost=TORCH,
        err="--experts 0: out of range; use 1..288"),

    # ---- compare-backends --------------------------------------------------------------------------------------
    row("compare-backends-no-gpu", "compare-backends", "--gpu", "H200",
        err="compare-backends times the MoE backends on the GPU, and this node has none"),
    row("compare-backends-gpu-unknown", "compare-backends", "--gpu", "H100", err="--gpu H100: unknown GPU"),
    row("compare-backends-batch-sizes-letter", "compare-backends", "--gpu", "H200", "--batch-sizes", "a",
        err="--batch-sizes 'a': write integers from 1 to"),
    row("compare-backends-layouts-tp3", "compare-backends", "--gpu", "H200", "--layouts", "TP3",
        err="layout TP3: expert width 1280 does not split over TP3"),
    row("compare-backends-layouts-comma", "compare-backends", "--gpu", "H200", "--layouts", ",",
        err="--layouts ',': names no layout"),
    row("compare-backends-json-out-folder", "compare-backends", "--gpu", "H200", "--json-out", "out",
        files={"out": None}, err="--json-out out: is a folder"),
    row("compare-backends-write-advice-folder", "compare-backends", "--gpu", "H200", "--write-advice", "out",
        files={"out": None}, err="--write-advice out: is a folder"),
    row("compare-backends-write-advice-not-advice", "compare-backends", "--gpu", "H200", "--write-advice", "a.json",
        files={"a.json": "{}"}, err="a.json: not a schema-1 backend-advice file"),
    row("compare-backends-budget-zero", "compare-backends", "--gpu", "H200", "--budget-ms", "0",
        err="--budget-ms 0.0: give milliseconds between 0 and 10000"),
    row("compare-backends-budget-letter", "compare-backends", "--gpu", "H200", "--budget-ms", "x",
        err="argument --budget-ms: invalid float value: 'x'"),
    row("compare-backends-kinds-unknown", "compare-backends", "--gpu", "H200", "--kinds", "gelu",
        err="--kinds 'gelu': write silu or swiglustep, separated by commas"),
    row("compare-backends-vllm-src-missing", "compare-backends", "--gpu", "H200", "--vllm-src", "nope",
        err="--vllm-src nope: no such file or folder"),
    row("compare-backends-vllm-ops-missing", "compare-backends", "--gpu", "H200", "--vllm-ops", "nope",
        err="--vllm-ops nope: no such folder; give the folder holding vLLM 0.33's _C_stable_libtorch.abi3.so"),
    row("compare-backends-vllm-ops-without-libraries", "compare-backends", "--gpu", "H200", "--vllm-ops", "ops",
        files={"ops/_C_stable_libtorch.abi3.so": BINARY},
        err="--vllm-ops ops: no _moe_C_stable_libtorch.abi3.so there"),

    # ---- validate-serve --print-command -------------------------------------------------------------------------
    row("serve-print-ok", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "fp8", "--gpu", "H200",
        code=0, err=None, out="vllm serve stepfun-ai/Step-3.5-Flash-FP8 --tensor-parallel-size 4"),
    *(row(f"serve-port-{name}", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "fp8", "--gpu",
          "H200", "--port", port, err=err)
      for name, port, err in (("zero", "0", "--port 0: not a TCP port"), ("too-big", "70000", "--port 70000: not a TCP"),
                              ("letter", "x", "argument --port: invalid int value: 'x'"))),
    *(row(f"serve-{option[2:]}-{value}", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "bf16",
          "--gpu", "H200", option, value, err=f"argument {option}: {value!r} is not a number of seconds")
      for option, value in (("--timeout", "nan"), ("--timeout", "0"), ("--grace", "inf"), ("--grace", "-1"),
                            ("--bench-timeout", "nan"))),
    row("serve-print-configs-a-file", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "bf16",
        "--gpu", "H200", "--configs", "c", files={"c": "x"}, err="--configs c: is a file, not a folder"),
    row("serve-print-deep-gemm-on", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "fp8", "--gpu",
        "H200", env={"VLLM_USE_DEEP_GEMM": "on"},
        err="will not start this serve (ValueError: invalid literal for int() with base 10: 'on'); set "
            "VLLM_USE_DEEP_GEMM to 0 or 1"),
    row("serve-layout-unreadable", "validate-serve", "--print-command", "--layout", "FOO", "--dtype", "fp8", "--gpu",
        "H200", err="layout 'FOO': cannot read 'FOO'"),
    row("serve-layout-tp3", "validate-serve", "--print-command", "--layout", "TP3", "--dtype", "fp8", "--gpu", "H200",
        err="layout TP3: expert width 1280 does not split over TP3"),
    row("serve-dtype-unknown", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "int4", "--gpu",
        "H200", err="--dtype int4: unknown"),
    row("serve-gpu-undetectable", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "fp8",
        err="--gpu: cannot tell the GPU (no NVIDIA GPU found)"),
    row("serve-env-file-missing", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "fp8", "--gpu",
        "H200", "--env-file", "node.env", err="--env-file node.env: no such file"),
    row("serve-env-file-binary", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "fp8", "--gpu",
        "H200", "--env-file", "node.env", files={"node.env": BINARY}, err="--env-file node.env: cannot read it"),
    row("serve-env-file-script", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "fp8", "--gpu",
        "H200", "--env-file", "node.env", files={"node.env": SCRIPT}, err="node.env:2: not an 'export NAME=value' line"),
    row("serve-env-file-command-substitution", "validate-serve", "--print-command", "--layout", "TP4", "--dtype",
        "fp8", "--gpu", "H200", "--env-file", "node.env", files={"node.env": "export A=$(id)\n"},
        err="node.env:1: command substitution is not supported"),
    row("serve-args-unclosed-quote", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "fp8", "--gpu",
        "H200", "--serve-args", "--x 'y", err="No closing quotation"),
    row("serve-bench-input-zero", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "fp8", "--gpu",
        "H200", "--random-input", "0", err="--random-input 0: must be at least 1"),
    row("serve-moe-backend-unknown", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "fp8", "--gpu",
        "H200", "--moe-backend", "deepgemm", err="--moe-backend 'deepgemm'"),
    *(row(f"serve-{name}", "validate-serve", "--print-command", "--layout", "TP4", "--dtype", "bf16", "--gpu", "H200",
          *extra, err=err)
      for name, extra, err in (
          ("pairs-without-ab", ("--pairs", "5"), "--pairs needs --ab"),
          ("pairs-too-few", ("--ab", "--pairs", "2"), "--pairs 2: an A/B needs at least 3 pairs"),
          ("ab-without-bench", ("--ab", "--no-bench"), "--ab with --no-bench"),
          ("share-without-bench", ("--measure-moe-share", "--no-bench"), "--measure-moe-share with --no-bench"),
          ("workload-unknown", ("--workload", "chat"), "argument --workload: invalid choice: 'chat'"),
          ("reduced-with-model", ("--reduced", "--model", "/m"), "--model with --reduced"),
          ("reduced-with-mtp", ("--reduced", "--mtp"), "--mtp with --reduced"),
          ("reduced-layers-alone", ("--reduced-layers", "8"), "--reduced-layers needs --reduced"),
          ("reduced-layers-too-few", ("--reduced", "--reduced-layers", "3"), "--reduced-layers 3: must be 4 to 45"),
          ("reduced-fp8-ep-auto", ("--reduced", "--layout", "DP4+EP", "--dtype", "fp8"),
           "--reduced: the one-GPU serve reads E=72,N=1280"),
      )),
    row("serve-reduced-too-big", "validate-serve", "--layout", "TP1", "--dtype", "bf16", "--gpu", "H200", "--reduced",
        "--reduced-layers", "45", "--out", "run", "--timeout", "5", "--port", "1",
        env={"PATH": "{tmp}/bin" + os.pathsep + str(FAKE_VLLM)}, err="--reduced TP1: 45 layers do not fit on one H200"),
    row("serve-reduced-print-ok", "validate-serve", "--print-command", "--layout", "TP8", "--dtype", "bf16", "--gpu",
        "H200", "--reduced", "--ab", "--workload", "decode", code=0, err=None,
        out='"moe_num_experts":288,"moe_intermediate_size":160}'),
    row("serve-out-is-a-file", "validate-serve", "--layout", "TP4", "--dtype", "bf16", "--gpu", "H200", "--out",
        "afile", "--no-bench", "--timeout", "5", "--port", "1", files={"afile": "x"},
        env={"PATH": "{tmp}/bin" + os.pathsep + str(FAKE_VLLM)}, err="--out afile"),

    # ---- preflight ---------------------------------------------------------------------------------------------
    row("preflight-no-command", "preflight", "--gpu", "H200", err="preflight: pass the serve command after '--'"),
    row("preflight-only-dashes", "preflight", "--gpu", "H200", "--", err="preflight: pass the serve command after"),
    row("preflight-gpu-unknown", "preflight", "--gpu", "H999", "--", "vllm", "serve", "stepfun-ai/Step-3.5-Flash",
        err="--gpu H999: unknown GPU"),
    row("preflight-gpu-undetectable", "preflight", "--", "vllm", "serve", "stepfun-ai/Step-3.5-Flash",
        err="--gpu: cannot tell the GPU"),
    row("preflight-config-dir-missing", "preflight", "--gpu", "H200", "--config-dir", "nope", "--", "vllm", "serve",
        "stepfun-ai/Step-3.5-Flash", err="--config-dir nope: no such folder"),
    row("preflight-unknown-serve-flag", "preflight", "--gpu", "H200", "--", "vllm", "serve",
        "stepfun-ai/Step-3.5-Flash", "--no-such-flag", cost=VLLM, err="unrecognized arguments: --no-such-flag",
        may_write=(HUMMING,)),
    row("preflight-unknown-model", "preflight", "--gpu", "H200", "--", "vllm", "serve", "someone/other-model",
        cost=VLLM, err="model 'someone/other-model' is neither a built-in name", may_write=(HUMMING,)),
    # values vLLM's own configs refuse, read by vLLM 0.33 (installed) and by the mirror (0.34) alike
    *(row(f"preflight-{name}-{release}", "preflight", "--gpu", "H200", "--vllm-version", release, "--", "vllm",
          "serve", "stepfun-ai/Step-3.5-Flash-FP8", *serve, err=err if isinstance(err, str) else err[release],
          cost=VLLM if release == "0.33" else FAST,
          may_write=(HUMMING,))
      for release in ("0.33", "0.34") for name, serve, err in (
          ("tp-negative", ("-tp", "-2"), "--tensor-parallel-size -2: vLLM's ParallelConfig takes a whole number of "
                                         "at least 1"),
          ("dp-zero", ("--data-parallel-size", "0"), "--data-parallel-size 0: vLLM's ParallelConfig takes"),
          ("max-seqs-negative", ("--max-num-seqs", "-5"), "--max-num-seqs -5: vLLM's SchedulerConfig takes"),
          ("spec-tokens-text", ("--speculative-config", '{"method": "mtp", "num_speculative_tokens": "x"}'),
           "num_speculative_tokens 'x': vLLM's SpeculativeConfig takes a whole number of at least 1"),
          ("spec-tokens-list", ("--speculative-config", '{"method": "mtp", "num_speculative_tokens": [3]}'),
           "num_speculative_tokens [3]: vLLM's SpeculativeConfig takes"),
          ("graph-sizes-below-one", ("--compilation-config", '{"cudagraph_capture_sizes": [-4, 0, 8]}'),
           "cudagraph_capture_sizes holds -4, 0: a CUDA graph is captured for 1 token or request or more"),
          ("graph-max-zero", ("--compilation-config", '{"max_cudagraph_capture_size": 0}'),  # vLLM's assert; ours
           {"0.33": "vLLM refuses the serve command: Maximum cudagraph size should be greater than or equal to 1",
            "0.34": "max_cudagraph_capture_size 0: vLLM captures CUDA graphs of at least 1 token"}),
          ("graph-max-superscript", ("--compilation-config", '{"max_cudagraph_capture_size": "\u00b2"}'),
           "max_cudagraph_capture_size"),
      )),
    *(row(f"preflight-deep-gemm-true-{release}", "preflight", "--gpu", "H200", "--vllm-version", release, "--",
          "VLLM_USE_DEEP_GEMM=true", "vllm", "serve", "stepfun-ai/Step-3.5-Flash-FP8", code=1, err=None,
          out="vLLM will not start: ValueError: invalid literal for int() with base 10: 'true'; set VLLM_USE_DEEP_GEMM "
              "to 0 or 1", cost=VLLM if release == "0.33" else FAST, may_write=(HUMMING,))
      for release in ("0.33", "0.34")),
    row("preflight-mtp-layers-text", "preflight", "--gpu", "H200", "--vllm-version", "0.34", "--", "vllm", "serve",
        "m", files={"m/config.json": _with(TINY_MODEL, num_nextn_predict_layers="abc")},
        err="m/config.json: num_nextn_predict_layers='abc' is not a whole number of MTP modules"),
    row("preflight-json-under-a-file", "preflight", "--gpu", "H200", "--vllm-version", "0.34", "--json", "f/r.json",
        "--", "vllm", "serve", "stepfun-ai/Step-3.5-Flash", files={"f": "x"},
        err="--json f/r.json: f is a file, not a folder; pass a file path in a folder"),
]


# ---- running the table ---------------------------------------------------------------------------------------


def _setup(tmp: Path, r: Row) -> None:
    (tmp / "bin").mkdir()  # PATH: no nvidia-smi, nvcc or vllm, whatever the host has
    (tmp / "home").mkdir()
    for rel, content in r.files.items():
        path = tmp / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for rel in r.readonly:
        (tmp / rel).chmod(0o555)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a folder, a link, or a file's sha256 and mode."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = f"folder {path.stat().st_mode:o}"
            else:
                out[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mode:o}"
    return out


def _env(tmp: Path, r: Row) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_", "TUNE_MOE_", "TRITON_", "XDG_", "DG_", "RAY_"))}
    env.update(PATH=str(tmp / "bin"), HOME=str(tmp / "home"), PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1",
               TUNE_MOE_TRACEBACK="1")
    env.update({k: v.replace("{tmp}", str(tmp)) for k, v in r.env.items()})
    return env


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    before: dict
    after: dict


def _run(tmp: Path, r: Row) -> Result:
    _setup(tmp, r)
    before = snapshot(tmp)
    proc = subprocess.run([sys.executable, "-m", "tuning.cli", *r.argv], cwd=tmp, env=_env(tmp, r),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    for rel in r.readonly:
        (tmp / rel).chmod(0o755)
    after = snapshot(tmp)
    for rel in r.readonly:
        (tmp / rel).chmod(0o555)
    return Result(proc.returncode, proc.stdout, proc.stderr, before, after)


def _skip_reason(r: Row) -> str | None:
    if r.readonly and MODES_IGNORED:
        return "this process writes into read-only folders (root), so a read-only --out cannot be refused"
    return None


@pytest.fixture(scope="module")
def results(request, tmp_path_factory) -> dict[str, Result]:
    """Run the selected rows at once, those importing vLLM first; {row id: result}."""
    wanted = {item.callspec.params["r"].id: item.callspec.params["r"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_row" and hasattr(item, "callspec")}
    todo = sorted((r for r in wanted.values() if not _skip_reason(r)), key=lambda r: -r.cost)
    folders = {r.id: tmp_path_factory.mktemp(r.id, numbered=True) for r in todo}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {r.id: pool.submit(_run, folders[r.id], r) for r in todo}
        return {rid: f.result() for rid, f in futures.items()}


def _param(r: Row):
    marks = [pytest.mark.xfail(reason=r.xfail, strict=True)] if r.xfail else []
    return pytest.param(r, id=r.id, marks=marks)


def test_row_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("r", [_param(r) for r in ROWS])
def test_row(r: Row, results):
    if reason := _skip_reason(r):
        pytest.skip(reason)
    res = results[r.id]
    shown = f"exit {res.code}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-6000:]}"
    assert "Traceback" not in res.stderr, shown
    assert "internal error" not in res.stderr, shown
    assert res.code == r.code, shown
    lines = res.stderr.splitlines()
    if r.err is None:  # a command that works: notes may go to stderr, errors may not
        assert not any("error" in line for line in lines), shown
    else:
        assert len(lines) == 1, shown
        assert lines[0].startswith(("tune-moe: error: ", f"tune-moe {r.argv[0]}: error: ")), shown
        assert r.err in lines[0], shown
    if r.absent is not None:
        assert r.absent not in res.stderr, shown
    if r.out is not None:
        assert r.out in res.stdout, shown
    changed = {k for k in res.before.keys() | res.after.keys() if res.before.get(k) != res.after.get(k)}
    allowed = {k for k in changed  # an allowed path, what is inside it, and the folders made to hold it
               if any(k == p or k.startswith(p + os.sep) or p.startswith(k + os.sep) for p in r.may_write)}
    assert changed == allowed, f"files created, changed or removed: {sorted(changed - allowed)}\n{shown}"


def test_preflight_writes_nothing(results):
    """vLLM's import of the humming kernels makes a lock file under $HUMMING_TMP_DIR: the probe gives it a temp folder."""
    ran = [r for r in ROWS if HUMMING in r.may_write and r.id in results]
    if not ran:
        pytest.skip("no preflight row that reaches vLLM was selected")
    wrote = {r.id: sorted(k for k in results[r.id].after if k.startswith(HUMMING)) for r in ran}
    assert not any(wrote.values()), wrote


def test_run_state_folder_is_git_ignored():
    """A run's state (kernels_configs/vllm-<release>/<device>/.tune-moe/) is never committed with the configs."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    path = "kernels_configs/vllm-0.33/NVIDIA_H200/.tune-moe/results.jsonl"
    proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"git check-ignore says {path} is not ignored ({proc.returncode}: {proc.stderr})"
    manifest = subprocess.run(["git", "check-ignore", "-q", "kernels_configs/vllm-0.33/NVIDIA_H200/.tune-moe-bake.json"],
                              cwd=REPO, capture_output=True)
    assert manifest.returncode == 1  # only the state folder, not files whose names start alike
