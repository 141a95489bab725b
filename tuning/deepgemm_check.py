"""``tune-moe check-deepgemm``: is DeepGEMM usable on this GPU, correct at
Step-3.5-Flash's MoE shapes, and how fast.

Checks, in order: the environment (compute capability, nvcc, cuobjdump, a
writable JIT cache), which DeepGEMM is imported and from where, then three
FP8 GEMMs against a float reference of the unquantized inputs: dense
``fp8_gemm_nt``, grouped ``m_grouped_fp8_gemm_nt_contiguous`` and
``m_grouped_fp8_gemm_nt_masked`` at the w13 (N=2560, K=4096) and w2 (N=4096,
K=1280) shapes of one EP rank (72 experts, ~128 rows each).

The pure parts (calc_diff, the quantizers, version rules, environment checks
given their inputs, report assembly) need no GPU; only ``_gemm_checks`` does.
Exit status: 0 when every check passed, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UsageError
from .gpus import spec_for_name

try:
    import torch
except ImportError:  # reported as a failed check by run()
    torch = None

PASS_DIFF = 1e-3  # DeepGEMM's own bar for FP8 against a float reference
FP8_MAX = 448.0  # largest float8_e4m3fn
QUANT_BLOCK = 128  # 1x128 activation groups, 128x128 weight blocks

# Oldest nvcc DeepGEMM accepts per GPU major; DeepGEMM >= 2.8 (its deep_jit
# runtime, bundled by vLLM 0.33 as 2.8.1) refuses anything below 12.9 on every GPU.
ARCH_NVCC_MIN = {9: (12, 3), 10: (12, 9)}
DEEP_JIT_SINCE = (2, 8)
DEEP_JIT_NVCC_MIN = (12, 9)


@dataclass(frozen=True)
class GemmCase:
    name: str
    kind: str  # dense | contiguous | masked
    n: int
    k: int


# Step-3.5-Flash MoE: w13 is [2*1280, 4096], w2 is [4096, 1280]
GEMM_CASES = (
    GemmCase("gemm.dense", "dense", 2560, 4096),
    GemmCase("gemm.contiguous.w13", "contiguous", 2560, 4096),
    GemmCase("gemm.contiguous.w2", "contiguous", 4096, 1280),
    GemmCase("gemm.masked.w13", "masked", 2560, 4096),
    GemmCase("gemm.masked.w2", "masked", 4096, 1280),
)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # pass | fail | skip
    value: Any = None  # JSON-serialisable
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "pass"


def verdict(name: str, ok: bool, value: Any = None, detail: str = "") -> Check:
    return Check(name, "pass" if ok else "fail", value, detail)


# ---------------------------------------------------------------- versions

def parse_version(text: str | None) -> tuple[int, ...]:
    """Leading numeric release of a version string: '2.1.1.post3+abc' -> (2, 1, 1)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text or "")
    return tuple(int(p) for p in match.group(1).split(".")) if match else ()


def parse_nvcc_release(text: str) -> tuple[int, int] | None:
    """'Cuda compilation tools, release 12.9, V12.9.86' -> (12, 9)."""
    match = re.search(r"release (\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def required_nvcc(capability: tuple[int, int] | None, dg_version: tuple[int, ...]) -> tuple[tuple[int, int], str]:
    """The oldest nvcc that works for this GPU and DeepGEMM, and why."""
    major = capability[0] if capability else 9
    need, why = ARCH_NVCC_MIN.get(major, (12, 9)), f"sm{major}0"
    if dg_version >= DEEP_JIT_SINCE and DEEP_JIT_NVCC_MIN > need:
        need, why = DEEP_JIT_NVCC_MIN, f"DeepGEMM {'.'.join(map(str, dg_version))}"
    return need, why


def version_from_init(text: str) -> str:
    match = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.MULTILINE)
    return match.group(1) if match else ""


# ------------------------------------------------------------ environment

def check_capability(capability: tuple[int, int] | None, device: str) -> Check:
    if capability is None:
        return verdict("gpu.capability", False, None, device or "no CUDA device visible to torch")
    cc = f"{capability[0]}.{capability[1]}"
    ok = capability == (9, 0) or capability[0] == 10
    detail = f"{device}" if ok else f"{device} is sm{cc}; DeepGEMM needs compute capability 9.0 or 10.x"
    return verdict("gpu.capability", ok, cc, detail)


def find_cuda_home(env: dict[str, str], which_nvcc: str | None) -> str:
    """DeepGEMM's search order: CUDA_HOME, CUDA_PATH, the nvcc on PATH, /usr/local/cuda."""
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(key):
            return env[key]
    if which_nvcc:
        return str(Path(which_nvcc).resolve().parent.parent)
    return "/usr/local/cuda"


def find_nvcc(env: dict[str, str], cuda_home: str) -> str:
    return env.get("DG_JIT_NVCC_COMPILER") or str(Path(cuda_home) / "bin" / "nvcc")


def check_nvcc(path: str, version_text: str | None, capability: tuple[int, int] | None,
               dg_version: tuple[int, ...]) -> Check:
    need, why = required_nvcc(capability, dg_version)
    need_s = f"{need[0]}.{need[1]}"
    if version_text is None:
        return verdict("nvcc.version", False, None,
                       f"{path} not found or not runnable; install CUDA toolkit >= {need_s} and set CUDA_HOME")
    have = parse_nvcc_release(version_text)
    if have is None:
        return verdict("nvcc.version", False, None, f"cannot read a release from '{path} --version'")
    ok = have >= need
    detail = f"{path} (needs >= {need_s} for {why})"
    if not ok:
        detail += f"; install CUDA toolkit >= {need_s} and point CUDA_HOME at it"
    return verdict("nvcc.version", ok, f"{have[0]}.{have[1]}", detail)


def check_cuobjdump(on_path: str | None, cuda_home: str) -> Check:
    if on_path:
        return verdict("cuobjdump", True, on_path)
    beside = Path(cuda_home) / "bin" / "cuobjdump"
    fix = f"add {beside.parent} to PATH" if beside.exists() else "install the CUDA toolkit's cuobjdump"
    return verdict("cuobjdump", False, None, f"cuobjdump is not on PATH; {fix}")


def default_jit_cache_dir(home: str, dg_version: tuple[int, ...]) -> str:
    """Where DeepGEMM caches kernels without DG_JIT_CACHE_DIR (2.8.1 was seen writing ~/.dj/cache)."""
    return str(Path(home) / (".dj" if dg_version >= DEEP_JIT_SINCE else ".deep_gemm"))


def jit_cache_dir(env: dict[str, str], dg_version: tuple[int, ...]) -> tuple[str, str]:
    if env.get("DG_JIT_CACHE_DIR"):
        return env["DG_JIT_CACHE_DIR"], "DG_JIT_CACHE_DIR"
    return default_jit_cache_dir(env.get("HOME") or str(Path.home()), dg_version), "DeepGEMM default"


def check_cache_dir(path: str, source: str) -> Check:
    """The folder exists (or can be made) and takes a file."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".tune-moe-probe-"):
            pass
    except OSError as exc:
        return verdict("jit_cache.writable", False, path,
                       f"{source} {path} is not writable ({exc.strerror}); set DG_JIT_CACHE_DIR to a writable folder")
    return verdict("jit_cache.writable", True, path, source)


def count_cached_kernels(path: str) -> int:
    root = Path(path)
    return sum(1 for _ in root.rglob("kernel.cubin")) if root.is_dir() else 0


def _nvcc_version_text(path: str) -> str | None:
    try:
        return subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------- which DeepGEMM

@dataclass(frozen=True)
class DeepGemmSource:
    module: str  # the name to import
    directory: str  # the package folder
    how: str  # --deep-gemm-path | installed | vllm bundled
    version: str  # __version__ read from __init__.py, "" if none


def _source_from_spec(module: str, spec: Any, how: str) -> DeepGemmSource | None:
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    text = Path(spec.origin).read_text(encoding="utf-8", errors="replace")
    return DeepGemmSource(module, str(Path(spec.origin).parent), how, version_from_init(text))


def _bundled_in_vllm(find_spec: Callable) -> DeepGemmSource | None:
    """vllm/third_party/deep_gemm, found without importing vLLM."""
    try:
        vllm = find_spec("vllm")
    except (ImportError, ValueError):
        return None
    for root in (vllm.submodule_search_locations or []) if vllm else []:
        init = Path(root) / "third_party" / "deep_gemm" / "__init__.py"
        if init.is_file():
            version = version_from_init(init.read_text(encoding="utf-8", errors="replace"))
            return DeepGemmSource("vllm.third_party.deep_gemm", str(init.parent), "vllm bundled", version)
    return None


def locate_deep_gemm(extra_path: str | None, find_spec: Callable = importlib.util.find_spec) -> DeepGemmSource | None:
    """The DeepGEMM vLLM would import: an installed deep_gemm first, else vLLM's bundled copy.

    ``extra_path`` (a folder holding ``deep_gemm/``) goes first on sys.path and must win.
    """
    if extra_path:
        folder = Path(extra_path).resolve()
        if not (folder / "deep_gemm" / "__init__.py").is_file():
            raise UsageError(f"--deep-gemm-path {extra_path}: no deep_gemm/__init__.py in it; "
                             "pass the folder that contains deep_gemm/ (e.g. a copy of vllm/third_party)")
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        source = _source_from_spec("deep_gemm", find_spec("deep_gemm"), "--deep-gemm-path")
        if source is None or Path(source.directory).parent != folder:
            where = source.directory if source else "nowhere"
            raise UsageError(f"--deep-gemm-path {extra_path}: deep_gemm resolves to {where}; "
                             "run in a fresh interpreter so the folder comes first")
        return source
    installed = _source_from_spec("deep_gemm", find_spec("deep_gemm"), "installed")
    return installed or _bundled_in_vllm(find_spec)


def import_deep_gemm(source: DeepGemmSource | None) -> tuple[Any, Check]:
    if source is None:
        return None, verdict("deep_gemm.import", False, None,
                             "no deep_gemm package and no vLLM with a bundled copy; install vLLM >= 0.20, "
                             "run install/install-deepgemm.sh, or pass --deep-gemm-path")
    start = time.perf_counter()
    try:
        module = importlib.import_module(source.module)
    except Exception as exc:  # any failure to load is the finding
        return None, verdict("deep_gemm.import", False, source.module, f"{source.directory}: {_one_line(exc)}")
    version = getattr(module, "__version__", source.version)
    detail = f"{version} from {source.directory} ({source.how}) in {time.perf_counter() - start:.2f} s"
    return module, verdict("deep_gemm.import", True, source.module, detail)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# -------------------------------------------------------- numerics (torch)

def calc_diff(x: "torch.Tensor", y: "torch.Tensor") -> float:
    """DeepGEMM's metric: 1 - 2*sum(x*y) / sum(x*x + y*y); 0 for identical tensors."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if float(denominator) == 0.0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def ceil_to_ue8m0(x: "torch.Tensor") -> "torch.Tensor":
    """Round each positive scale up to a power of two (UE8M0), as sm100 requires."""
    bits = x.abs().float().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) + (bits & 0x7FFFFF).bool().int()
    return (exponent.clamp(1, 254) << 23).view(torch.float32)


def per_token_cast_to_fp8(x: "torch.Tensor", use_ue8m0: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    """[m, k] -> fp8 [m, k] and fp32 scales [m, k/128] (one per 1x128 group)."""
    m, k = x.shape
    _require_multiple("k", k)
    groups = x.view(m, k // QUANT_BLOCK, QUANT_BLOCK).float()
    scale = groups.abs().amax(dim=2).clamp(min=1e-4) / FP8_MAX
    scale = ceil_to_ue8m0(scale) if use_ue8m0 else scale
    return (groups / scale.unsqueeze(2)).to(torch.float8_e4m3fn).view(m, k), scale


def per_block_cast_to_fp8(x: "torch.Tensor", use_ue8m0: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    """[n, k] -> fp8 [n, k] and fp32 scales [n/128, k/128] (one per 128x128 block)."""
    n, k = x.shape
    _require_multiple("n", n)
    _require_multiple("k", k)
    blocks = x.view(n // QUANT_BLOCK, QUANT_BLOCK, k // QUANT_BLOCK, QUANT_BLOCK).float()
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4) / FP8_MAX
    scale = ceil_to_ue8m0(scale) if use_ue8m0 else scale
    fp8 = (blocks / scale).to(torch.float8_e4m3fn).view(n, k)
    return fp8, scale.view(n // QUANT_BLOCK, k // QUANT_BLOCK)


def _require_multiple(name: str, value: int) -> None:
    if value % QUANT_BLOCK:
        raise ValueError(f"{name}={value} is not a multiple of {QUANT_BLOCK}")


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def expert_rows(num_experts: int, mean_rows: int, seed: int) -> list[int]:
    """Rows per expert, uniform in [0.7, 1.3] x mean (DeepGEMM's own test spread), at least 1."""
    rng = random.Random(seed)
    return [max(1, int(mean_rows * rng.uniform(0.7, 1.3))) for _ in range(num_experts)]


def contiguous_layout(rows: list[int], alignment: int) -> list[int]:
    """m_indices: expert id for each real row, -1 for the padding that aligns each expert."""
    layout: list[int] = []
    for expert, count in enumerate(rows):
        layout += [expert] * count + [-1] * (align_up(count, alignment) - count)
    return layout


def use_ue8m0(capability: tuple[int, int]) -> bool:
    """sm100 kernels take power-of-two (UE8M0) scale factors; sm90 takes fp32."""
    return capability[0] == 10


# ------------------------------------------------------------- GEMMs (GPU)

@dataclass(frozen=True)
class Prepared:
    call: Callable[[], Any]  # one launch
    result: Callable[[], tuple[Any, Any]]  # (output, float reference) over the valid rows
    m: int  # rows that carry data
    groups: int
    flops: int


def _bf16(*shape: int) -> "torch.Tensor":
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def _grouped_weights(g: int, n: int, k: int, ue8m0: bool) -> tuple["torch.Tensor", tuple]:
    b = _bf16(g, n, k)
    fp8, scale = per_block_cast_to_fp8(b.view(g * n, k), ue8m0)
    return b, (fp8.view(g, n, k), scale.view(g, n // QUANT_BLOCK, k // QUANT_BLOCK))


def _prepare_dense(dg: Any, case: GemmCase, m: int, rows: list[int], ue8m0: bool) -> Prepared:
    a, b = _bf16(m, case.k), _bf16(case.n, case.k)
    d = torch.empty(m, case.n, device="cuda", dtype=torch.bfloat16)
    ref = a.float() @ b.float().t()
    a8, b8 = per_token_cast_to_fp8(a, ue8m0), per_block_cast_to_fp8(b, ue8m0)
    return Prepared(lambda: dg.fp8_gemm_nt(a8, b8, d, disable_ue8m0_cast=not ue8m0),
                    lambda: (d, ref), m, 1, 2 * m * case.n * case.k)


def _prepare_contiguous(dg: Any, case: GemmCase, m: int, rows: list[int], ue8m0: bool) -> Prepared:
    alignment = int(dg.get_mk_alignment_for_contiguous_layout())
    m_indices = torch.tensor(contiguous_layout(rows, alignment), device="cuda", dtype=torch.int32)
    valid = m_indices >= 0
    a = _bf16(m_indices.numel(), case.k) * valid.unsqueeze(1)  # padding rows are zero
    b, b8 = _grouped_weights(len(rows), case.n, case.k, ue8m0)
    d = torch.empty(m_indices.numel(), case.n, device="cuda", dtype=torch.bfloat16)
    ref = torch.zeros(m_indices.numel(), case.n, device="cuda", dtype=torch.float32)
    start = 0
    for expert, count in enumerate(rows):  # [rows_e, k] @ [k, n] per expert
        ref[start:start + count] = a[start:start + count].float() @ b[expert].float().t()
        start += align_up(count, alignment)
    a8 = per_token_cast_to_fp8(a, ue8m0)
    return Prepared(lambda: dg.m_grouped_fp8_gemm_nt_contiguous(a8, b8, d, m_indices, disable_ue8m0_cast=not ue8m0),
                    lambda: (d[valid], ref[valid]), sum(rows), len(rows), 2 * sum(rows) * case.n * case.k)


def _prepare_masked(dg: Any, case: GemmCase, m: int, rows: list[int], ue8m0: bool) -> Prepared:
    g, max_m = len(rows), align_up(max(rows), QUANT_BLOCK)
    a = _bf16(g, max_m, case.k)
    b, b8 = _grouped_weights(g, case.n, case.k, ue8m0)
    d = torch.empty(g, max_m, case.n, device="cuda", dtype=torch.bfloat16)
    ref = torch.einsum("gmk,gnk->gmn", a.float(), b.float())
    masked_m = torch.tensor(rows, device="cuda", dtype=torch.int32)
    valid = torch.arange(max_m, device="cuda").unsqueeze(0) < masked_m.unsqueeze(1)
    fp8, scale = per_token_cast_to_fp8(a.view(g * max_m, case.k), ue8m0)
    a8 = (fp8.view(g, max_m, case.k), scale.view(g, max_m, case.k // QUANT_BLOCK))
    expected_m = round(sum(rows) / g)
    return Prepared(lambda: dg.m_grouped_fp8_gemm_nt_masked(a8, b8, d, masked_m, expected_m, disable_ue8m0_cast=not ue8m0),
                    lambda: (d[valid], ref[valid]), sum(rows), g, 2 * sum(rows) * case.n * case.k)


PREPARE = {"dense": _prepare_dense, "contiguous": _prepare_contiguous, "masked": _prepare_masked}


def _wall(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def time_launches(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of one launch, L2 flushed before each (CUDA events)."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def measure(case: GemmCase, prepared: Prepared, peak_tflops: float | None, reps: int) -> Check:
    first_s = _wall(prepared.call)  # JIT compile, or a load from the disk cache
    cached_s = _wall(prepared.call)
    diff = calc_diff(*prepared.result())
    seconds = time_launches(prepared.call, reps)
    tflops = prepared.flops / seconds / 1e12
    n, k = case.n, case.k
    value = {
        "m": prepared.m, "n": n, "k": k, "groups": prepared.groups, "calc_diff": diff,
        "time_us": seconds * 1e6, "tflops": tflops, "peak_tflops": peak_tflops,
        "pct_of_peak": 100 * tflops / peak_tflops if peak_tflops else None,
        "first_call_s": first_s, "cached_call_s": cached_s,
    }
    ok = diff < PASS_DIFF  # NaN fails too
    return verdict(case.name, ok, value, "" if ok else f"calc_diff {diff:.2e} is not below {PASS_DIFF:g}")


def _gemm_checks(dg: Any, capability: tuple[int, int], peak: float | None, args: argparse.Namespace) -> list[Check]:
    ue8m0 = use_ue8m0(capability)
    rows = expert_rows(args.experts, args.rows_per_expert, args.seed)
    checks = []
    for case in GEMM_CASES:
        torch.manual_seed(args.seed)
        try:
            prepared = PREPARE[case.kind](dg, case, args.dense_m, rows, ue8m0)
            checks.append(measure(case, prepared, peak, args.reps))
        except Exception as exc:  # a kernel that fails to build or launch is a result
            checks.append(verdict(case.name, False, None, _one_line(exc)))
        finally:
            prepared = None
            torch.cuda.empty_cache()
    return checks


# ------------------------------------------------------------------ report

def assemble_report(checks: list[Check], context: dict[str, Any]) -> dict[str, Any]:
    """Every check with its value; ok only when there is at least one check and all passed."""
    failed = [c.name for c in checks if not c.ok]
    return {
        "tool": "tune-moe check-deepgemm",
        "ok": bool(checks) and not failed,
        "failed": failed,
        **context,
        "checks": [asdict(c) for c in checks],
    }


def format_check(check: dict[str, Any]) -> str:
    value = check["value"]
    if isinstance(value, dict) and "calc_diff" in value:
        pct = f"{value['pct_of_peak']:3.0f}% of {value['peak_tflops']:.0f}" if value["pct_of_peak"] else "peak n/a"
        shape = f"m={value['m']} n={value['n']} k={value['k']}" + (
            f" x{value['groups']}" if value["groups"] > 1 else "")
        text = (f"{shape:<26} diff {value['calc_diff']:.1e} {value['time_us']:8.1f} us "
                f"{value['tflops']:6.0f} TFLOP/s ({pct}) first {value['first_call_s']:.2f} s, "
                f"cached {value['cached_call_s'] * 1e3:.2f} ms")
        text += f"  {check['detail']}" if check["detail"] else ""
    else:
        text = " ".join(str(p) for p in (value, check["detail"]) if p not in (None, ""))
    return f"{check['status'].upper():<4} {check['name']:<20} {text}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [format_check(c) for c in report["checks"]]
    verdict_line = "DeepGEMM check passed" if report["ok"] else f"DeepGEMM check FAILED: {', '.join(report['failed'])}"
    return lines + [verdict_line]


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, target)


# --------------------------------------------------------------------- CLI

def _probe_gpu() -> tuple[tuple[int, int] | None, str]:
    if torch is None:
        return None, "torch is not importable; install torch with CUDA"
    if not torch.cuda.is_available():
        return None, "no CUDA device visible to torch"
    return tuple(torch.cuda.get_device_capability()), torch.cuda.get_device_name()


def _environment_checks(env: dict[str, str], capability: tuple[int, int] | None, device: str,
                        dg_version: tuple[int, ...]) -> tuple[list[Check], str]:
    cuda_home = find_cuda_home(env, shutil.which("nvcc"))
    nvcc = find_nvcc(env, cuda_home)
    cache, cache_source = jit_cache_dir(env, dg_version)
    checks = [
        check_capability(capability, device),
        check_nvcc(nvcc, _nvcc_version_text(nvcc), capability, dg_version),
        check_cuobjdump(shutil.which("cuobjdump"), cuda_home),
        check_cache_dir(cache, cache_source),
    ]
    return checks, cache


def _context(source: DeepGemmSource | None, capability: tuple[int, int] | None, device: str,
             args: argparse.Namespace) -> dict[str, Any]:
    return {
        "gpu": {"name": device, "capability": list(capability) if capability else None,
                "scale_format": ("ue8m0" if use_ue8m0(capability) else "fp32") if capability else None},
        "deep_gemm": asdict(source) if source else None,
        "versions": {"python": sys.version.split()[0], "torch": getattr(torch, "__version__", None),
                     "torch_cuda": getattr(getattr(torch, "version", None), "cuda", None)},
        "inputs": {"experts": args.experts, "rows_per_expert": args.rows_per_expert,
                   "dense_m": args.dense_m, "reps": args.reps, "seed": args.seed, "pass_diff": PASS_DIFF},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deep-gemm-path", metavar="DIR",
                        help="put DIR (the folder holding deep_gemm/, e.g. a copy of vllm/third_party) first on sys.path")
    parser.add_argument("--json-out", metavar="FILE", help="write the full report (every check and value) as JSON")
    parser.add_argument("--jit-cache-dir", metavar="DIR", help="set DG_JIT_CACHE_DIR for this run")
    parser.add_argument("--experts", type=int, default=72, help="experts per GPU for the grouped GEMMs (default 72: EP4)")
    parser.add_argument("--rows-per-expert", type=int, default=128, help="mean rows (tokens) per expert (default 128)")
    parser.add_argument("--dense-m", type=int, default=4096, help="M of the dense GEMM (default 4096)")
    parser.add_argument("--reps", type=int, default=20, help="timed launches per GEMM; the median is reported")
    parser.add_argument("--seed", type=int, default=0)


def _validate(args: argparse.Namespace) -> None:
    for flag, value, top in (("--experts", args.experts, 288), ("--rows-per-expert", args.rows_per_expert, 65536),
                             ("--dense-m", args.dense_m, 65536), ("--reps", args.reps, 10000)):
        if not 1 <= value <= top:
            raise UsageError(f"{flag} {value}: out of range; use 1..{top}")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    if args.jit_cache_dir:
        os.environ["DG_JIT_CACHE_DIR"] = str(Path(args.jit_cache_dir).resolve())
    source = locate_deep_gemm(args.deep_gemm_path)
    capability, device = _probe_gpu()
    dg_version = parse_version(source.version if source else "")
    checks, cache = _environment_checks(dict(os.environ), capability, device, dg_version)
    cached_before = count_cached_kernels(cache)
    module, import_check = import_deep_gemm(source)
    checks.append(import_check)
    gpu_ok = next(c.ok for c in checks if c.name == "gpu.capability")
    if module is not None and gpu_ok:
        spec = spec_for_name(device)
        checks += _gemm_checks(module, capability, spec.fp8_tflops if spec else None, args)
    else:
        why = "needs a supported GPU and an importable DeepGEMM"
        checks += [Check(case.name, "skip", None, why) for case in GEMM_CASES]
    context = _context(source, capability, device, args)
    context["jit_cache"] = {"dir": cache, "kernels_before": cached_before, "kernels_after": count_cached_kernels(cache)}
    report = assemble_report(checks, context)
    print("\n".join(summary_lines(report)))
    if args.json_out:
        write_json_atomic(args.json_out, report)
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tuning.deepgemm_check",
                                     description="verify DeepGEMM on this GPU: environment, correctness, speed")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except UsageError as exc:
        sys.stderr.write(f"tune-moe: error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
