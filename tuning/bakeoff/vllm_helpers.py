"""vLLM's Triton helper kernels (0.33's, and 0.34's sorted SiLU-quant kernel where the source has it), loaded from
vLLM's own source files without importing vLLM.

The bake-off re-creates each expert path of vLLM 0.33 on a machine where vLLM cannot be imported
(it pins torch 2.14). The helper kernels those paths launch are ``@triton.jit`` functions in vLLM's
source: they are read from the file, only the named jit functions are kept, and they are imported as a
module of their own (as ``kernel`` does for ``fused_moe_kernel``). vLLM's code is never copied into this
repository; the host code that launches them (``moe_ops``) mirrors vLLM's launchers line by line.

The source is a vLLM source tree (a folder holding ``vllm/``), a vLLM wheel, or the installed vLLM.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import UsageError
from ..vllm.kernel import import_text
from ..vllm.source import first_line, is_triton_jit, version_near

FUSED_MOE_DIR = "vllm/model_executor/layers/fused_moe"
# vLLM source file -> the @triton.jit functions taken from it (in an order that defines callees first).
HELPERS = {
    f"{FUSED_MOE_DIR}/deep_gemm_utils.py": (
        "apply_expert_map", "_fwd_kernel_ep_scatter_1", "_fwd_kernel_ep_scatter_2", "_fwd_kernel_ep_gather"),
    f"{FUSED_MOE_DIR}/utils.py": ("_count_expert_num_tokens",),
    "vllm/model_executor/layers/quantization/utils/fp8_utils.py": (
        "_per_token_group_quant_fp8", "_per_token_group_quant_fp8_colmajor",
        "_silu_mul_per_token_group_quant_fp8_colmajor"),
    "vllm/model_executor/layers/activation.py": ("_swiglustep_and_mul_kernel",),
}
# From vLLM 0.34, taken where the source has them: the sorted-activation path of a `_down.json` file.
LATER = {f"{FUSED_MOE_DIR}/experts/triton_moe.py": ("_silu_mul_quant_sorted_kernel",)}
FILES = (f"{FUSED_MOE_DIR}/fused_moe.py", *HELPERS, *LATER, "vllm/_version.py")  # what a stash of the source holds
_PRELUDE = '"""vLLM 0.33 helper kernels, loaded on their own by tune-moe."""\nimport triton\nimport triton.language as tl\n\n\n'


@dataclass(frozen=True)
class VllmSource:
    """Where vLLM's files are read from: a tree root, a wheel, or None for the installed vLLM."""

    path: str | None = None

    def read(self, rel: str) -> str:
        if self.path is None:
            return _installed(rel).read_text()
        root = Path(self.path)
        if root.suffix == ".whl":
            try:
                with zipfile.ZipFile(root) as whl:
                    return whl.read(rel).decode()
            except (OSError, KeyError, zipfile.BadZipFile) as exc:
                raise UsageError(f"--vllm-src {root}: no {rel} in this wheel ({type(exc).__name__})") from None
        file = root / rel
        if not file.is_file():
            raise UsageError(f"--vllm-src {root}: no {rel} there; pass a folder holding vllm/ "
                             "(benchmarks/gpu_stage.sh pack-sources makes one) or a vLLM wheel")
        return file.read_text()

    @property
    def fused_moe(self) -> str | None:
        """The fused_moe.py the kernel loader takes (``kernel.KernelSource``), None for the installed one."""
        if self.path is None:
            return None
        return self.path if self.path.endswith(".whl") else str(Path(self.path) / FILES[0])

    def version(self) -> str | None:
        if self.path is None:
            from ..vllm.kernel import installed_vllm_version

            return installed_vllm_version()
        if self.path.endswith(".whl"):
            return Path(self.path).name.split("-")[1]
        return version_near(Path(self.path) / FILES[0])


def _installed(rel: str) -> Path:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("vLLM is not importable here; pass --vllm-src with a folder holding vllm/ or a vLLM wheel")
    return Path(spec.submodule_search_locations[0]).parent / rel


def jit_functions(source: str, names: tuple[str, ...], origin: str) -> list[str]:
    """The text of each named top-level ``@triton.jit`` function of ``source``, decorators included."""
    found = {node.name: "\n".join(source.splitlines()[first_line(node) - 1:node.end_lineno])
             for node in ast.parse(source).body
             if isinstance(node, ast.FunctionDef) and node.name in names and is_triton_jit(node)}
    missing = [n for n in names if n not in found]
    if missing:
        raise UsageError(f"{origin}: lacks the @triton.jit function(s) {', '.join(missing)}; "
                         "this is not vLLM 0.33's source")
    return [found[n] for n in names]


def load_helpers(src: VllmSource) -> ModuleType:
    """One module holding every helper kernel of ``HELPERS``, written to the cache and imported."""
    chunks = []
    for rel, names in HELPERS.items():
        chunks += jit_functions(src.read(rel), names, f"{src.path or 'installed vLLM'}: {rel}")
    for rel, names in LATER.items():
        try:
            chunks += jit_functions(src.read(rel), names, rel)
        except UsageError:  # an earlier release, or a stash without the file
            pass
    text = _PRELUDE + "\n\n\n".join(chunks) + "\n"
    module, _ = import_text(text, "tune_moe_vllm_helpers", src.path or "(installed vLLM)")
    module.SOURCE_SHA256 = hashlib.sha256(text.encode()).hexdigest()
    return module
