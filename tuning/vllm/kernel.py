"""Where the fused-MoE kernel comes from: the installed vLLM, or a vLLM source given by path.

``--vllm-src`` takes a ``fused_moe.py``, a vLLM wheel, or a vLLM source tree (read and checked by
``vllm_source``). Only its ``@triton.jit`` functions and ``get_default_config`` (with vLLM's platform
helpers replaced by CUDA answers) are loaded; the rest of vLLM is never imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Callable

from ..errors import UsageError
from ..files import atomic_write_text
from ..shapes import DEFAULT_VLLM_VERSION, parse_version
from .source import (FUSED_MOE, SourceKernel, check_params, first_line, kept_defs, read_signature, read_source,
                          release_of, sha256_text, source_version)

CACHE_DIR = Path(os.environ.get("TUNE_MOE_CACHE", Path.home() / ".cache" / "tune-moe"))


def installed_vllm_version() -> str | None:
    """The installed vLLM's version, read from its metadata without importing it."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def target_release(vllm_version: str | None, vllm_src: str | None) -> str:
    """The vLLM a run is for: --vllm-version, else what --vllm-src tells of itself, else the installed vLLM, else
    the default release. Nothing is loaded (a bad --vllm-src is refused when it is)."""
    return (vllm_version or (source_version(Path(vllm_src)) if vllm_src else None) or installed_vllm_version()
            or DEFAULT_VLLM_VERSION)


def installed_fused_moe() -> Path | None:
    """The installed vLLM's fused_moe.py, found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / FUSED_MOE.removeprefix("vllm/")
    return path if path.exists() else None


@dataclass(frozen=True)
class KernelSource:
    """A picklable description of where to load the kernel from (sent to every worker)."""

    path: str | None = None  # None: the installed vLLM
    vllm_version: str | None = None  # overrides what the source says

    def load(self) -> "Kernel":
        return load_installed(self.vllm_version) if self.path is None else load_from_path(Path(self.path), self.vllm_version)

    def read(self) -> SourceKernel:
        """The checks ``load`` makes that need no torch, Triton or vLLM import: the release, the hash and the
        launcher's parameters, read from the source text. What ``load`` alone can refuse (a source whose code
        fails when run) is refused by the worker that loads it."""
        if self.path is not None:
            return read_signature(Path(self.path), self.vllm_version)
        path, installed = installed_fused_moe(), installed_vllm_version()
        if path is None or installed is None:
            raise UsageError(f"vLLM is not importable here (no installed {FUSED_MOE}); install it "
                             "(install/install-vllm.sh) or pass --vllm-src with a vLLM fused_moe.py or wheel")
        check_installed_version(installed, self.vllm_version)
        return read_signature(path, self.vllm_version or installed)


@dataclass
class Kernel:
    fn: Any  # the @triton.jit fused_moe_kernel
    default_config: Callable[..., dict]  # vLLM's get_default_config(M, E, N, K, topk, dtype, block_shape)
    vllm_version: str
    origin: str  # human-readable: where it came from
    source_sha256: str  # of vLLM's fused_moe.py text: the same file gives the same hash, installed or not
    align_op: Callable | None = None  # vLLM's moe_align_block_size, when vLLM is importable

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(self.fn.arg_names)

    @property
    def describe(self) -> str:
        return f"vLLM {self.vllm_version} fused_moe_kernel ({self.origin})"


@contextlib.contextmanager
def quiet_imports():
    """Importing vLLM logs deprecations, a missing ``vllm._C`` and a missing CUDA runtime through torch's
    and vLLM's loggers on stderr; none of it is tune-moe's to report. Errors still show. torch is imported
    first: its import sets its loggers' levels."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    loggers = [logging.getLogger(name) for name in ("torch", "vllm")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            if lg.level == logging.ERROR:  # a level the import itself configured is left as it is
                lg.setLevel(level)


def check_installed_version(installed: str, wanted: str | None) -> None:
    if wanted and parse_version(wanted) != parse_version(installed):
        raise UsageError(f"the installed vLLM is {installed}, not {wanted}; pass --vllm-src with vLLM "
                         f"{wanted}'s fused_moe.py or wheel to tune its kernel")


def load_installed(version: str | None = None) -> Kernel:
    try:
        with quiet_imports():
            from vllm.model_executor.layers.fused_moe import fused_moe as fm
            from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size
            import vllm
    except ImportError as exc:
        raise UsageError(f"vLLM is not importable here ({exc}); install it (install/install-vllm.sh) "
                         "or pass --vllm-src with a vLLM fused_moe.py or wheel") from None
    path = Path(inspect.getfile(fm))
    check_installed_version(vllm.__version__, version)
    if not hasattr(fm.fused_moe_kernel, "arg_names"):
        # No usable GPU driver: vLLM swapped Triton for its placeholder, so its fused_moe_kernel is a plain
        # function. The same source file, loaded on its own, gets the real Triton (its interpreter here).
        return load_from_path(path, version or vllm.__version__)
    kernel = Kernel(fm.fused_moe_kernel, fm.get_default_config, version or vllm.__version__,
                    f"installed, {path}", sha256_text(path.read_text()), moe_align_block_size)
    check_signature(kernel)
    return kernel


def load_from_path(path: Path, version: str | None = None) -> Kernel:
    source, origin, found_version = read_source(path)
    version = release_of(source, version or found_version, path)
    module, discard = _import_kernels(source, version, path)
    try:
        kernel = Kernel(module.fused_moe_kernel, module.get_default_config, version, origin, sha256_text(source))
        check_signature(kernel)
    except UsageError:
        discard()  # a refused source leaves nothing in the cache
        raise
    return kernel


def _import_kernels(source: str, version: str, path: Path) -> tuple[ModuleType, Callable[[], None]]:
    """Write vLLM's jit functions and default-config helpers to a module file and import it; the module, and a
    function that forgets it and removes what this call wrote to the cache (for a source refused later).

    The source is checked first (Python, with a ``@triton.jit`` ``fused_moe_kernel`` and ``get_default_config``),
    so a file that is not vLLM's fused_moe.py leaves nothing in the cache; one whose kernels fail to load is
    removed again."""
    chunks = ["\n".join(source.splitlines()[first_line(node) - 1:node.end_lineno])
              for node in kept_defs(source, path)]
    return import_text(_PRELUDE + "\n\n\n".join(chunks) + "\n", "tune_moe_vllm_kernels", path)


def import_text(text: str, prefix: str, path) -> tuple[ModuleType, Callable[[], None]]:
    """Import ``text`` as a module file in the cache, named by its hash; the module, and a function that forgets it
    and removes what this call wrote (the cache is left as it was). A module whose code fails at import is bad
    input from ``--vllm-src path``: one line."""
    name = f"{prefix}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    if name in sys.modules:
        return sys.modules[name], lambda: None
    file = CACHE_DIR / f"{name}.py"
    compiled = Path(importlib.util.cache_from_source(str(file)))
    made = [d for d in (compiled.parent, CACHE_DIR, *CACHE_DIR.parents) if not d.exists()]  # deepest first
    wrote = [p for p in (file, compiled) if not p.exists()]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    if not file.exists():
        atomic_write_text(file, text)

    def discard() -> None:
        sys.modules.pop(name, None)
        for p in wrote:
            p.unlink(missing_ok=True)
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: another process may have put files there meanwhile

    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the source's own code fails at import: bad input, not a bug here
        discard()
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise UsageError(f"--vllm-src {path}: its kernels do not load ({type(exc).__name__}: {detail}); "
                         "pass vLLM's fused_moe.py, wheel or tree") from None
    return module, discard


# Stand-ins for the vLLM helpers get_default_config touches, answering as CUDA does.
_PRELUDE = '''"""vLLM fused-MoE kernels, loaded on their own by tune-moe."""
from typing import Any
import torch
import triton
import triton.language as tl
from tuning.vllm.kernel import platform_shim as current_platform, envs_shim as envs, next_power_of_2


'''

envs_shim = SimpleNamespace(VLLM_BATCH_INVARIANT=False)


def next_power_of_2(n: int) -> int:
    return 1 if n < 1 else 1 << (n - 1).bit_length()


class _CudaPlatform:
    def is_rocm(self) -> bool:
        return False

    def is_cuda(self) -> bool:
        return True

    def is_device_capability(self, cap: int) -> bool:
        import torch

        return torch.cuda.is_available() and torch.cuda.get_device_capability() == divmod(cap, 10)


platform_shim = _CudaPlatform()


# --- the launcher's contract with the kernel --------------------------------------------

def check_signature(kernel: Kernel) -> None:
    check_params(kernel.params, _params_with_defaults(kernel.fn), f"vLLM {kernel.vllm_version} ({kernel.origin})")


def _params_with_defaults(fn) -> set[str]:
    sig = inspect.signature(fn.fn)
    return {n for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


