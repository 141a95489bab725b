"""vLLM 0.33's own CUDA ops for the bake-off, loaded from its compiled libraries without importing vLLM.

vLLM 0.33 builds its CUDA ops on torch's stable ABI: ``vllm/_C_stable_libtorch.abi3.so`` registers
``torch.ops._C.*`` and ``vllm/_moe_C_stable_libtorch.abi3.so`` registers ``torch.ops._moe_C.*``
(vllm/platforms/cuda.py:240-248 imports both). ``torch.ops.load_library`` registers them under the torch
of a machine where vLLM itself is not installed. The folder is ``--vllm-ops DIR`` (benchmarks/gpu_stage.sh
pack-ops and setup-ops make one), else the installed vLLM package's folder.

``VllmOps`` calls each op exactly as vLLM 0.33's Python wrapper does: the same buffers, dtypes and
arguments (each method names the wrapper, file:line). Only ops whose registered schema is 0.33's are taken,
and ``ops_gate.gate`` runs each once against its stand-in before the bake-off uses it; an op refused at
any step is not used, and ``refused`` keeps why (the stand-in of ``moe_ops.STAND_INS`` runs instead).

torch is imported only when the libraries are loaded, so ``check_folder`` is cheap.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UsageError

# library -> (torch.ops namespace, the ops of it the expert paths call)
LIBRARIES = {
    "_C_stable_libtorch.abi3.so": ("_C", ("per_token_group_fp8_quant", "silu_and_mul", "silu_and_mul_per_block_quant")),
    "_moe_C_stable_libtorch.abi3.so": ("_moe_C", ("moe_align_block_size", "moe_sum")),
}
# The schemas vLLM 0.33's libraries register (read from the two .so files); an op registered otherwise is refused.
SCHEMAS = {
    "per_token_group_fp8_quant": "per_token_group_fp8_quant(Tensor input, Tensor! output_q, Tensor! output_s, "
                                 "int group_size, float eps, float fp8_min, float fp8_max, bool scale_ue8m0, "
                                 "bool dummy_is_scale_transposed, bool dummy_is_tma_aligned) -> ()",
    "silu_and_mul": "silu_and_mul(Tensor! result, Tensor input) -> ()",
    "silu_and_mul_per_block_quant": "silu_and_mul_per_block_quant(Tensor! out, Tensor input, Tensor! scales, "
                                    "int group_size, Tensor? scale_ub=None, bool is_scale_transposed=False) -> ()",
    "moe_align_block_size": "moe_align_block_size(Tensor topk_ids, int num_experts, int block_size, "
                            "Tensor! sorted_token_ids, Tensor! experts_ids, Tensor! num_tokens_post_pad, "
                            "Tensor? maybe_expert_map, Tensor(a!)? scatter_idx=None) -> ()",
    "moe_sum": "moe_sum(Tensor input, Tensor! output, Tensor? topk_ids=None, Tensor? expert_map=None) -> ()",
}
MAKE = "benchmarks/gpu_stage.sh pack-ops, then setup-ops, makes one (/tmp/vllm-ops)"


@dataclass
class VllmOps:
    """The loaded ops (``raw``: name -> the torch.ops callable) and, per op not used, why."""

    folder: str
    raw: dict[str, Callable]
    refused: dict[str, str] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.raw

    def refuse(self, name: str, why: str) -> None:
        self.raw.pop(name, None)
        self.refused[name] = why

    def per_token_group_fp8_quant(self, x, x_q, x_s, *, group_size: int, eps: float, fp8_min: float, fp8_max: float,
                                  use_ue8m0: bool, column_major_scales: bool, tma_aligned_scales: bool) -> None:
        """fp8_utils.py:708-719 (per_token_group_quant_fp8 on CUDA with a contiguous ``x``; the caller allocates
        ``x_q`` and ``x_s`` as lines 676-701 do)."""
        self.raw["per_token_group_fp8_quant"](x, x_q, x_s, group_size, eps, fp8_min, fp8_max, use_ue8m0,
                                              column_major_scales, tma_aligned_scales)

    def silu_and_mul(self, out, x) -> None:
        """fused_moe/activation.py:356 (apply_moe_activation, SiLU without a clamp limit)."""
        self.raw["silu_and_mul"](out, x)

    def silu_and_mul_per_block_quant(self, x, group_size: int, quant_dtype, scale_ub=None,
                                     is_scale_transposed: bool = False):
        """_custom_ops.py:515-561, as experts/triton_moe.py:533 calls it (group_size 128, fp8): the output and
        the scales are allocated per call, (T, N/2) and (T, N/2/group) row-major."""
        import torch

        tokens, hidden = x.shape[0], x.shape[-1] // 2
        out = torch.empty((tokens, hidden), device=x.device, dtype=quant_dtype)
        groups = hidden // group_size
        if is_scale_transposed:
            scales = torch.empty((groups, tokens), device=x.device, dtype=torch.float32).t()
        else:
            scales = torch.empty((tokens, groups), device=x.device, dtype=torch.float32)
        self.raw["silu_and_mul_per_block_quant"](out, x, scales, group_size, scale_ub, is_scale_transposed)
        return out, scales

    def moe_align_block_size(self, topk_ids, block_size: int, num_experts: int, expert_map=None,
                             ignore_invalid_experts: bool = False):
        """fused_moe/moe_align_block_size.py:55-169 (pad_sorted_ids False, no scatter_idx) -> _custom_ops.py:2222:
        (sorted_token_ids, expert_ids, num_tokens_post_padded)."""
        import torch

        numel, device = topk_ids.numel(), topk_ids.device
        max_padded = numel + num_experts * (block_size - 1)  # line 137
        if numel < num_experts:  # lines 140-143
            max_padded = min(numel * block_size, max_padded)
        sorted_ids = torch.empty((max_padded,), dtype=torch.int32, device=device)
        expert_ids = torch.empty((-(-max_padded // block_size),), dtype=torch.int32, device=device)
        num_tokens_post_pad = torch.empty((1), dtype=torch.int32, device=device)
        self.raw["moe_align_block_size"](topk_ids, num_experts, block_size, sorted_ids, expert_ids,
                                         num_tokens_post_pad, expert_map if ignore_invalid_experts else None, None)
        if expert_map is not None and not ignore_invalid_experts:  # line 164
            expert_ids = expert_map[expert_ids]
        return sorted_ids, expert_ids, num_tokens_post_pad

    def moe_sum(self, x, out, topk_ids=None, expert_map=None) -> None:
        """_custom_ops.py:2190-2196, as experts/triton_moe.py:641-653 calls it (topk_ids and the expert map only
        with an expert map: the slots of other ranks' experts are skipped)."""
        self.raw["moe_sum"](x, out, topk_ids, expert_map)


def has(ops: VllmOps | None, name: str) -> bool:
    """Whether vLLM's op ``name`` is loaded and passed its check."""
    return ops is not None and ops.has(name)


def check_folder(path: str) -> None:
    """``--vllm-ops DIR``: a folder holding both libraries, or one line naming what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"--vllm-ops {path}: no such folder; give the folder holding vLLM 0.33's "
                         f"{' and '.join(LIBRARIES)} ({MAKE})")
    missing = [lib for lib in LIBRARIES if not (root / lib).is_file()]
    if missing:
        raise UsageError(f"--vllm-ops {path}: no {' or '.join(missing)} there; give the folder holding vLLM 0.33's "
                         f"compiled ops ({MAKE})")


def installed_folder() -> Path | None:
    """The installed vllm package's folder, found without importing vLLM."""
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def load(folder: str | None, *, helpers, experts: int, top_k: int,
         device: str = "cuda") -> tuple[VllmOps | None, str]:
    """vLLM's ops from ``folder`` (else the installed vLLM's), each checked against its stand-in; or None and
    one line saying why none loaded. ``experts`` and ``top_k`` (the model's global experts and top-k) and
    ``helpers`` (vLLM's Triton kernels, for the quantisation stand-in) shape the check."""
    root = Path(folder) if folder else installed_folder()
    if root is None:
        return None, f"vLLM is not installed here and --vllm-ops was not given ({MAKE})"
    raw: dict[str, Callable] = {}
    refused: dict[str, str] = {}
    failures: dict[str, str] = {}
    for lib, (namespace, names) in LIBRARIES.items():
        why = _load_library(root / lib)
        if why:
            failures[lib] = why
            refused.update({n: f"{lib} did not load ({why})" for n in names})
            continue
        for name in names:
            op, why = _registered(namespace, name)
            if op is None:
                refused[name] = why
            else:
                raw[name] = op
    if not raw:
        if len(set(failures.values())) == 1 and len(failures) == len(LIBRARIES):  # the same cause for both
            detail = f"both libraries: {next(iter(failures.values()))}"
        else:
            detail = "; ".join(f"{k}: {w}" for k, w in (failures or refused).items())
        return None, _clip(f"vLLM's CUDA ops did not load from {root} ({detail})")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return None, f"vLLM's CUDA ops loaded from {root}, but torch sees no GPU to run them on"
    from .ops_gate import gate

    ops = VllmOps(str(root), raw, refused)
    gate(ops, helpers, device=device, experts=experts, top_k=top_k)
    return ops, ""


def status(ops: VllmOps | None, why: str) -> dict[str, str | None]:
    """Per op the expert paths call: None where vLLM's op runs, else why its stand-in runs."""
    from .moe_ops import STAND_INS

    return {name: None if has(ops, name) else (ops.refused.get(name, "not loaded") if ops else why)
            for name in STAND_INS}


def record(ops: VllmOps | None, why: str) -> dict:
    """What the provenance keeps: the folder, vLLM's ops that ran, and why each other op was a stand-in."""
    table = status(ops, why)
    return {"folder": ops.folder if ops else None, "vllm": [n for n, w in table.items() if w is None],
            "stand_ins": {n: w for n, w in table.items() if w is not None}}


def _load_library(path: Path) -> str | None:
    """None when torch registered the library's ops, else the loader's one-line reason."""
    import torch

    if not path.is_file():
        return f"no {path.name} in {path.parent}"
    try:
        torch.ops.load_library(str(path))
    except Exception as exc:  # dlopen's own message: a missing libcuda, an undefined symbol, a foreign file
        cause = exc.__cause__ or exc
        text = str(cause).strip().replace(f"{path}: ", "")  # dlopen names the file; the caller names the library
        return _clip(f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}")
    return None


def _registered(namespace: str, name: str) -> tuple[Callable | None, str]:
    """The op torch registered, if its schema is vLLM 0.33's; else None and why."""
    import torch

    try:
        op = getattr(getattr(torch.ops, namespace), name)
        schema = op.default._schema
    except (AttributeError, RuntimeError) as exc:
        return None, _clip(f"torch.ops.{namespace}.{name} is not registered ({type(exc).__name__})")
    if signature(schema) != signature(torch._C.parse_schema(SCHEMAS[name])):
        return None, _clip(f"torch.ops.{namespace}.{name} is registered as {schema}, not as vLLM 0.33's "
                           f"{SCHEMAS[name]}")
    return op, ""


def signature(schema) -> list[tuple[str, str]]:
    """An op schema's arguments (name, type): what the positional calls above rely on."""
    return [(a.name, str(a.type)) for a in schema.arguments]


def _clip(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
