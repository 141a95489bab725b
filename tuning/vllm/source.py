"""A vLLM fused_moe.py as text: where it is read from, which release it is, and whether the launcher can fill
its kernel's parameters. Torch-free: ``--dry-run`` checks a ``--vllm-src`` here, and ``kernel`` loads what
passes.

``--vllm-src`` takes a ``fused_moe.py``, a vLLM wheel, or a vLLM source tree. The release is the one given,
else the one the source tells (a wheel's name, the tree's ``_version.py``, a known release's sha256); a known
release's file given as another release's is refused.
"""

from __future__ import annotations

import ast
import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..shapes import parse_version

FUSED_MOE = "vllm/model_executor/layers/fused_moe/fused_moe.py"
# sha256 of FUSED_MOE in each release's manylinux x86_64 wheel: a file tells its own release, and one passed
# as another release's is refused.
KNOWN_SOURCES = {
    "a8015d90908883d3dc459e7a508d2de56bfbdff678c5f36e23d0410ef5a04683": "0.26.0",
    "f37773a8ca2c93171cbf6e2dc6a08855d8e57db7e4aa8d8fcfc78057c26a0010": "0.33.0",
    "31b3d0b8eec45f1efc6555dfde354279187aefd45afbd509853a85f3ae2a5c8c": "0.34.0",
}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def release_of(source: str, version: str | None, path: Path) -> str:
    """The vLLM version a source is taken as: the one given (or found beside it), else the release whose file it
    is; a known release's file given as another release's is refused."""
    known = KNOWN_SOURCES.get(sha256_text(source))
    if version is None and known is None:
        raise UsageError(f"--vllm-src {path}: cannot tell its vLLM version; add --vllm-version")
    if known and version and parse_version(known) != parse_version(version):
        raise UsageError(f"--vllm-src {path} is vLLM {known}'s fused_moe.py (by its sha256), not vLLM {version}'s; "
                         f"pass vLLM {version}'s file or wheel, or --vllm-version {known}")
    return version or known


def read_source(path: Path) -> tuple[str, str, str | None]:
    """(text, where it was read, the version found with it or None) of a fused_moe.py, wheel or tree."""
    if path.suffix == ".whl":
        m = re.match(r"vllm-([0-9][^-]*)-", path.name)
        try:
            with zipfile.ZipFile(path) as whl:
                return whl.read(FUSED_MOE).decode(), f"wheel {path}", m.group(1) if m else None
        except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise UsageError(f"--vllm-src {path}: not a vLLM wheel with {FUSED_MOE} ({exc})") from None
    if path.is_dir():
        path = path / FUSED_MOE if (path / FUSED_MOE).exists() else path / "fused_moe.py"
    if not path.is_file():
        raise UsageError(f"--vllm-src {path}: no such file; pass vLLM's fused_moe.py, a vLLM wheel or a source tree")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--vllm-src {path}: not a readable Python source ({type(exc).__name__}); "
                         "pass vLLM's fused_moe.py, a vLLM wheel or a source tree") from None
    return text, f"source {path}", version_near(path)


def version_near(path: Path) -> str | None:
    """The version of the vLLM tree or installed package a fused_moe.py sits in."""
    for parent in path.resolve().parents:
        for candidate in (parent / "_version.py", parent / "version.py"):
            if parent.name == "vllm" and candidate.exists():
                m = re.search(r"""(?:__version__|version)\s*(?::\s*str)?\s*=\s*['"]([0-9][^'"]*)['"]""",
                              candidate.read_text())
                if m:
                    return m.group(1)
    return None


KEEP = {"get_default_config", "should_moe_wna16_use_cuda"}  # the non-jit functions the loader takes too


def kept_defs(source: str, path: Path) -> list[ast.FunctionDef]:
    """The source's top-level ``@triton.jit`` functions and default-config helpers; refused in one line unless it
    is Python with a ``@triton.jit`` ``fused_moe_kernel`` and ``get_default_config``."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:
        why = exc.msg if isinstance(exc, SyntaxError) else exc
        raise UsageError(f"--vllm-src {path}: not Python source ({type(exc).__name__}: {why}); "
                         "pass vLLM's fused_moe.py, a vLLM wheel or a source tree") from None
    kept = [node for node in tree.body
            if isinstance(node, ast.FunctionDef) and (node.name in KEEP or is_triton_jit(node))]
    found = {node.name if node.name in KEEP else f"jit:{node.name}" for node in kept}
    lacking = [what for what, key in (("a @triton.jit fused_moe_kernel", "jit:fused_moe_kernel"),
                                      ("get_default_config", "get_default_config")) if key not in found]
    if lacking:
        raise UsageError(f"--vllm-src {path}: lacks {' and '.join(lacking)}; "
                         "pass vLLM's fused_moe.py, wheel or tree")
    return kept


def first_line(node: ast.FunctionDef) -> int:
    return node.decorator_list[0].lineno if node.decorator_list else node.lineno


def is_triton_jit(node: ast.FunctionDef) -> bool:
    return any(ast.unparse(d).split("(")[0] in ("triton.jit", "jit") for d in node.decorator_list)


# --- the launcher's contract with the kernel --------------------------------------------

# Parameters the launcher knows how to fill (every vLLM version's names).
KNOWN_PARAMS = frozenset("""
a_ptr b_ptr c_ptr b_bias_ptr a_scale_ptr b_scale_ptr topk_weights_ptr sorted_token_ids_ptr expert_ids_ptr
num_tokens_post_padded_ptr N K EM num_valid_tokens stride_am stride_ak stride_be stride_bk stride_bn stride_cm
stride_cn stride_asm stride_ask stride_bse stride_bsk stride_bsn stride_bbe stride_bbn group_n group_k
naive_block_assignment BLOCK_SIZE_M BLOCK_SIZE_N BLOCK_SIZE_K GROUP_SIZE_M SPLIT_K MUL_ROUTED_WEIGHT top_k
compute_type use_fp8_w8a8 use_int8_w8a8 use_int8_w8a16 per_channel_quant HAS_BIAS SWAP_AB USE_TD even_Ks
filter_expert b_desc a_desc USE_TMA_B USE_TMA_A C_IS_SORTED
""".split())
REQUIRED_PARAMS = frozenset("""
a_ptr b_ptr c_ptr a_scale_ptr b_scale_ptr topk_weights_ptr sorted_token_ids_ptr expert_ids_ptr
num_tokens_post_padded_ptr N K EM num_valid_tokens BLOCK_SIZE_M BLOCK_SIZE_N BLOCK_SIZE_K GROUP_SIZE_M
MUL_ROUTED_WEIGHT top_k compute_type use_fp8_w8a8
""".split())


def check_params(params: tuple[str, ...], defaults: set[str], what: str) -> None:
    """Refuse, in one line naming every difference, a kernel whose parameters the launcher cannot fill: one it
    does not know (and that has no default), or one it needs and the kernel lacks. Launcher values the kernel has
    no parameter for are simply not passed (0.26 has no USE_TD)."""
    unknown = sorted(set(params) - KNOWN_PARAMS - defaults)
    missing = sorted(REQUIRED_PARAMS - set(params))
    if unknown or missing:
        detail = (f"unknown parameters {', '.join(unknown)}" if unknown else "") + \
                 ("; " if unknown and missing else "") + \
                 (f"missing parameters {', '.join(missing)}" if missing else "")
        raise UsageError(f"fused_moe_kernel of {what} has a signature this launcher does not know ({detail}); "
                         "use a supported vLLM (0.26, 0.33 or 0.34) or update tuning/launch.py")


@dataclass(frozen=True)
class SourceKernel:
    """fused_moe_kernel as a vLLM source declares it, read without torch or Triton (for ``--dry-run``, and for the
    sweep's driver, which never imports torch: its workers load the kernel)."""

    vllm_version: str
    origin: str
    source_sha256: str
    params: tuple[str, ...]

    @property
    def not_passed(self) -> list[str]:
        """Launcher values this kernel has no parameter for (not passed to it)."""
        return sorted(KNOWN_PARAMS - set(self.params))

    def describe(self) -> str:
        absent = f"; not in it, so not passed: {', '.join(self.not_passed)}" if self.not_passed else ""
        return (f"vLLM {self.vllm_version} fused_moe_kernel ({self.origin}, sha256 {self.source_sha256[:12]}): "
                f"{len(self.params)} parameters, each one the launcher fills{absent}")


def source_version(path: Path) -> str | None:
    """The vLLM version a --vllm-src tells of itself (a wheel's name, the tree it sits in, a known release's
    sha256), or None: for the plan's default version; the source is checked when it is loaded."""
    try:
        source, _, found = read_source(path)
    except UsageError:
        return None
    return found or KNOWN_SOURCES.get(sha256_text(source))


def read_signature(path: Path, version: str | None = None) -> SourceKernel:
    """The parameter check of ``load_from_path`` on the source text alone: no torch, Triton or vLLM imported."""
    source, origin, found_version = read_source(path)
    version = release_of(source, version or found_version, path)
    node = next(n for n in kept_defs(source, path) if n.name == "fused_moe_kernel" and is_triton_jit(n))
    args = node.args.posonlyargs + node.args.args
    params = tuple(a.arg for a in args)
    defaults = {a.arg for a in args[len(args) - len(node.args.defaults):]} if node.args.defaults else set()
    check_params(params, defaults, f"vLLM {version} ({origin})")
    return SourceKernel(version, origin, sha256_text(source), params)
