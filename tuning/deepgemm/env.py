"""Where DeepGEMM would run: the checks of the environment, and which DeepGEMM is imported.

A check is a frozen ``Check`` (pass, fail or skip, a JSON value and a one-line detail).
The environment checks are compute capability 9.0 or 10.x, an nvcc new enough for the
GPU and for the DeepGEMM release (``required_nvcc``), ``cuobjdump`` on PATH and a
writable JIT cache folder; each takes its inputs as arguments, so none needs a GPU.
``locate_deep_gemm`` finds the DeepGEMM vLLM would import (a ``--deep-gemm-path``
folder, else an installed ``deep_gemm``, else vLLM's bundled copy) without importing
it, and ``import_deep_gemm`` imports it, a failure being a failed check.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError

# Oldest nvcc DeepGEMM accepts per GPU major; DeepGEMM >= 2.8 (its deep_jit
# runtime, bundled by vLLM 0.33 as 2.8.1) refuses anything below 12.9 on every GPU.
ARCH_NVCC_MIN = {9: (12, 3), 10: (12, 9)}
DEEP_JIT_SINCE = (2, 8)
DEEP_JIT_NVCC_MIN = (12, 9)


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


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


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


def environment_checks(env: dict[str, str], capability: tuple[int, int] | None, device: str,
                       dg_version: tuple[int, ...]) -> tuple[list[Check], str]:
    """The four environment checks, in order, and the JIT cache folder they checked."""
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
        return None, verdict("deep_gemm.import", False, source.module, f"{source.directory}: {one_line(exc)}")
    version = getattr(module, "__version__", source.version)
    detail = f"{version} from {source.directory} ({source.how}) in {time.perf_counter() - start:.2f} s"
    return module, verdict("deep_gemm.import", True, source.module, detail)
