"""GPU catalogue (data), vLLM's device-name rule, and what this node has.

Rates are dense datasheet numbers; H200 bandwidth measured by a device-to-device
copy is ~4.3 TB/s of the 4.8 in the table.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class GpuSpec:
    key: str  # what --gpu takes
    torch_name: str  # torch.cuda.get_device_name()
    capability: tuple[int, int]
    sms: int
    smem_per_block: int  # bytes of shared memory one thread block may use (opt-in)
    hbm_gb: float
    bandwidth_tbs: float
    bf16_tflops: float
    fp8_tflops: float
    l2_mb: int

    @property
    def arch(self) -> str:
        return f"sm{self.capability[0]}{self.capability[1]}"

    @property
    def device_name(self) -> str:
        """The ``device_name=`` vLLM puts in config file names for this GPU."""
        return vllm_device_name(self.torch_name)

    def peak_tflops(self, dtype: str) -> float:
        return self.fp8_tflops if dtype == "fp8" else self.bf16_tflops


CATALOGUE: dict[str, GpuSpec] = {
    g.key.lower(): g
    for g in (
        GpuSpec("H200", "NVIDIA H200", (9, 0), 132, 232448, 141, 4.8, 989, 1979, 60),
        GpuSpec("H20", "NVIDIA H20", (9, 0), 78, 232448, 96, 4.0, 148, 296, 60),
        GpuSpec("H20-3e", "NVIDIA H20-3e", (9, 0), 78, 232448, 141, 4.8, 148, 296, 60),
        GpuSpec("B200", "NVIDIA B200", (10, 0), 148, 232448, 180, 8.0, 2250, 4500, 126),
    )
}


def vllm_device_name(torch_name: str) -> str:
    """vLLM's rule: whitespace and '/' runs become '_'; every H200-family name is NVIDIA_H200."""
    name = re.sub(r"[\s/]+", "_", torch_name)
    return "NVIDIA_H200" if "H200" in name.split("_") else name


def get_gpu(key: str) -> GpuSpec:
    spec = CATALOGUE.get(key.lower())
    if spec is None:
        known = ", ".join(g.key for g in CATALOGUE.values())
        raise UsageError(f"--gpu {key}: unknown GPU; use one of {known}")
    return spec


def spec_for_name(torch_name: str) -> GpuSpec | None:
    """The catalogue entry a detected device name belongs to (by vLLM device name)."""
    dev = vllm_device_name(torch_name)
    return next((g for g in CATALOGUE.values() if g.device_name == dev), None)


@dataclass(frozen=True)
class DetectedGpu:
    index: int
    name: str
    memory_mib: int
    driver: str


def detect_gpus() -> list[DetectedGpu]:
    """GPUs on this node, from nvidia-smi; empty when there is no NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = "index,name,memory.total,driver_version"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            mem = int(parts[2]) if parts[2].isdigit() else 0
            gpus.append(DetectedGpu(int(parts[0]), parts[1], mem, parts[3]))
    return gpus


def visible(found: list[DetectedGpu], cuda_visible: str | None) -> list[DetectedGpu]:
    """The GPUs of ``found`` a process may use under CUDA_VISIBLE_DEVICES (``cuda_visible``; all when unset): by
    index, or, for UUID or MIG entries, as many as it lists (nvidia-smi's query here has no UUIDs). Ray hands out
    these, and refuses to start with more GPUs than it lists."""
    if cuda_visible is None or not found:
        return found
    entries = [e.strip() for e in cuda_visible.split(",") if e.strip()]
    if all(e.isascii() and e.isdigit() for e in entries):
        by_index = {g.index: g for g in found}
        usable = [by_index[int(e)] for e in entries if int(e) in by_index]
    else:
        usable = found[:len(entries)]
    if not usable:
        raise UsageError(f"CUDA_VISIBLE_DEVICES={cuda_visible!r} hides every GPU of this node ({describe(found)}); "
                         "unset it, or list the GPUs to use (e.g. CUDA_VISIBLE_DEVICES=0,1)")
    return usable


def describe(found: list[DetectedGpu]) -> str:
    if not found:
        return "no NVIDIA GPU"
    names = sorted({g.name for g in found})
    return " + ".join(f"{sum(g.name == n for g in found)}x {n}" for n in names)


def check_node(gpu: GpuSpec, found: list[DetectedGpu], *, instead: str = "add --dry-run to print the plan only",
               done: str = "") -> None:
    """Refuse to run for ``gpu`` on a node whose GPUs are none or something else; ``instead``: what the command
    offers without a GPU, ``done``: what the line says of the run (validate-serve: "nothing was started; ")."""
    if not found:
        raise UsageError(no_gpu_line(gpu.key, instead, done))
    wrong = sorted({g.name for g in found if vllm_device_name(g.name) != gpu.device_name})
    if wrong:
        raise UsageError(
            f"--gpu {gpu.key}: this node has {describe(found)}, not {gpu.torch_name}; {done}"
            f"pass the --gpu that matches the node, or {instead}"
        )


def no_gpu_line(key: str | None, instead: str, done: str = "") -> str:
    """The one line for a node where nvidia-smi is missing, fails or finds no GPU (with --gpu ``key`` or without)."""
    given = f"--gpu {key}: " if key else ""
    return f"{given}this node has no NVIDIA GPU (nvidia-smi found none); {done}run on a GPU node, or {instead}"
