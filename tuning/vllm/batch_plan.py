"""The token counts one engine puts through the fused MoE per step, as the serve's vLLM release resolves them.

``batch_plan`` mirrors ``EngineArgs.get_batch_defaults`` (``vllm serve``), the CUDA-graph mode the command
leaves (``-O``, ``--compilation-config`` ``mode`` and ``cudagraph_mode``, ``--enforce-eager``) and
``VllmConfig._set_cudagraph_sizes``:

- vLLM 0.33 captures one list of token counts: 1, 2, 4, every 8 to 256, every 16 to the ceiling (512, 1024 on
  SM100, at most twice the widest decode batch), the prefill chunk if it fits, and the MTP decode sizes.
- vLLM 0.34 starts from that list and then resolves prefill token sizes and decode request sizes apart
  (``_split_cudagraph_capture_sizes``). Without the deprecated size keys, SM100 defaults both wider: a prefill grid
  up to 8192 tokens and decode graphs up to 8192 tokens. FULL_DECODE_ONLY captures no prefill sizes, and one-token
  draft steps of a single-module MTP, EAGLE or draft model add their own request counts.

Where vLLM is importable, ``vllm_probe`` runs vLLM's own functions instead, and CI asserts both agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..errors import UsageError
from .serve_command import ServeCommand, check_bounds

MIXED_MODE = {"NONE": "NONE", "PIECEWISE": "PIECEWISE", "FULL": "FULL", "FULL_DECODE_ONLY": "NONE",
              "FULL_AND_PIECEWISE": "PIECEWISE"}  # CUDAGraphMode.mixed_mode(): what mixed batches capture
LEVEL_MODE = {0: "NONE", 1: "PIECEWISE", 2: "FULL_AND_PIECEWISE", 3: "FULL_AND_PIECEWISE"}  # -O's cudagraph_mode
WITHOUT_PIECEWISE = {"PIECEWISE": "NONE", "FULL_AND_PIECEWISE": "FULL_DECODE_ONLY"}
VLLM_COMPILE = 3  # CompilationMode.VLLM_COMPILE: piecewise graphs need it
DRAFT_STEP_METHODS = ("eagle", "eagle3", "mtp", "draft_model")  # get_draft_decode_cudagraph_request_sizes
WIDE = 8192  # 0.34's SM100 default for prefill and decode graph tokens


@dataclass(frozen=True, kw_only=True)
class BatchPlan:
    """What one engine (one DP rank) captures and schedules, in tokens."""

    max_num_seqs: int
    max_num_batched_tokens: int
    capture_sizes: tuple[int, ...]  # CUDA-graph sizes; steps above the largest run eagerly


def batch_defaults(memory_gb: float, world_size: int) -> tuple[int, int]:
    """EngineArgs.get_batch_defaults for ``vllm serve`` (UsageContext.OPENAI_API_SERVER): (tokens, seqs)."""
    if memory_gb * 1e9 >= 160 * 2**30:
        return 16384, 1024
    if memory_gb * 1e9 >= 70 * 2**30:
        return 8192, 1024
    return 2048 * world_size, 128 * world_size


def graph_mode(cmd: ServeCommand) -> str:
    """The CUDA-graph mode the command leaves: ``cudagraph_mode`` or -O's default, without piecewise graphs where
    the compilation mode is not VLLM_COMPILE (``_normalize_piecewise_cudagraph_mode``), NONE under eager."""
    if cmd.enforce_eager:
        return "NONE"
    c = cmd.compilation
    mode = c.get("cudagraph_mode") or LEVEL_MODE[cmd.optimization_level]
    compiled = c.get("mode", VLLM_COMPILE if cmd.optimization_level > 0 else 0)
    return WITHOUT_PIECEWISE.get(mode, mode) if compiled != VLLM_COMPILE else mode


def batch_plan(cmd: ServeCommand, arch: str, memory_gb: float, release: str, mtp_layers: int = 1) -> BatchPlan:
    """The serve's batch limits and CUDA-graph token sizes under vLLM ``release`` ("0.33" or "0.34");
    ``mtp_layers``: the checkpoint's MTP modules (its ``num_nextn_predict_layers``), which the draft steps use."""
    tokens, seqs = batch_defaults(memory_gb, cmd.tp)
    if cmd.performance_mode == "throughput":
        tokens, seqs = tokens * 2, seqs * 2
    tokens = cmd.max_num_batched_tokens or tokens
    seqs = cmd.max_num_seqs or seqs
    check_bounds(cmd, seqs, tokens)
    mode = graph_mode(cmd)
    sizes: list[int] = []
    if mode != "NONE":
        sizes = _shared_sizes(cmd, arch, seqs, tokens)
        if release != "0.33":
            sizes = _split_sizes(cmd, arch, sizes, seqs=seqs, tokens=tokens, mode=mode, mtp_layers=mtp_layers)
    return BatchPlan(max_num_seqs=seqs, max_num_batched_tokens=tokens, capture_sizes=tuple(sizes))


def _shared_sizes(cmd: ServeCommand, arch: str, seqs: int, tokens: int) -> list[int]:
    """0.33's ``_set_cudagraph_sizes`` (0.34's first step): one list of token counts."""
    default_max = 1024 if arch == "sm100" else 512
    query = 1 + cmd.num_speculative_tokens
    biggest, decode = cmd.compilation.get("max_cudagraph_capture_size"), []
    if biggest is None:
        biggest = min(seqs * query * 2, default_max)
        if query > 1:
            counts = _request_counts(min(seqs, default_max))
            decode = sorted({n * query for n in counts if n * query <= biggest})
        elif seqs <= biggest:
            decode = [seqs]
    biggest = min(tokens, biggest)
    given = cmd.compilation.get("cudagraph_capture_sizes")
    if biggest < 1 or given == []:  # _set_cudagraph_sizes asserts both with CUDA graphs on
        raise UsageError("preflight: --compilation-config " + (
            f"max_cudagraph_capture_size {biggest}" if biggest < 1 else "cudagraph_capture_sizes []") +
            ": vLLM captures CUDA graphs of at least 1 token and asserts so as it starts; give 1 or more, or "
            "--enforce-eager for no graphs")
    if given is not None:
        kept = sorted(s for s in set(given) if s <= tokens)
        if cmd.compilation.get("max_cudagraph_capture_size") not in (None, max(kept, default=0)):
            raise UsageError(f"preflight: --compilation-config max_cudagraph_capture_size "
                             f"{cmd.compilation['max_cudagraph_capture_size']} is not the largest of "
                             f"cudagraph_capture_sizes ({max(kept, default=0)}), which vLLM refuses; drop one of them")
        return kept
    sizes = list(range(1, min(biggest, 32) + 1)) if cmd.performance_mode == "interactivity" else \
        [s for s in (1, 2, 4) if s <= biggest]
    if biggest >= 8:
        sizes += list(range(8, min(biggest + 1, 256), 8))
    if biggest >= 256:
        sizes += list(range(256, biggest + 1, 16))
    if tokens <= biggest and tokens not in sizes:
        sizes.append(tokens)
    return sorted(set(sizes + [s for s in decode if s <= tokens]))


def _request_counts(reqs: int) -> list[int]:
    return sorted({n for n in (1, 2, 4) if n <= reqs} | set(range(8, min(reqs + 1, 256), 8))
                  | set(range(256, reqs + 1, 16)) | {reqs})


def _split_sizes(cmd: ServeCommand, arch: str, shared: list[int], *, seqs: int, tokens: int, mode: str,
                 mtp_layers: int) -> list[int]:
    """0.34's ``_split_cudagraph_capture_sizes``: every graph's token count, prefill and decode resolved apart."""
    c = cmd.compilation
    legacy = c.get("cudagraph_capture_sizes") is not None or c.get("max_cudagraph_capture_size") is not None
    split = any(c.get(k) is not None for k in ("prefill_cudagraph_capture_token_sizes",
                                               "max_prefill_cudagraph_capture_tokens",
                                               "decode_cudagraph_capture_request_sizes",
                                               "max_decode_cudagraph_capture_requests"))
    wide = not legacy and arch == "sm100"
    query = 1 + cmd.num_speculative_tokens
    prefill = _prefill_sizes(cmd, tokens, shared, wide)
    decode = _decode_requests(cmd, seqs, shared, wide, query)
    decode_tokens = c.get("max_decode_cudagraph_capture_tokens") or (WIDE if wide else None)
    budget = min(tokens, decode_tokens or tokens)
    graphs = {n * q for n, q in decode_shapes(decode, {query: seqs}, budget)}
    graphs |= {n for n, _ in decode_shapes(_draft_requests(cmd, seqs, decode, mtp_layers), {1: seqs}, budget)}
    if cmd.adaptive_verification:
        limit = min(max(decode, default=0) * query, tokens, decode_tokens or max(decode, default=0) * query)
        graphs |= set(varlen_decode_grid(limit, cmd.performance_mode == "interactivity"))
    every = graphs | set(prefill)
    if legacy and split:
        if shared not in (sorted(every), sorted(graphs)):
            raise UsageError("preflight: vLLM 0.34 refuses the deprecated cudagraph_capture_sizes and "
                             "max_cudagraph_capture_size beside the prefill and decode CUDA graph capture sizes; "
                             "set only the latter")
        return shared
    if (split or not legacy) and MIXED_MODE[mode] == "NONE":
        return sorted(graphs)  # FULL_DECODE_ONLY captures no prefill graph
    return sorted(every)


def _prefill_sizes(cmd: ServeCommand, tokens: int, shared: list[int], wide: bool) -> list[int]:
    kept, cap = _explicit(cmd, "prefill_cudagraph_capture_token_sizes", "max_prefill_cudagraph_capture_tokens", tokens)
    if kept is not None:
        return kept
    if cap is not None or wide:
        return prefill_grid(min(WIDE if cap is None else cap, tokens), cmd.performance_mode == "interactivity")
    return list(shared)


def _decode_requests(cmd: ServeCommand, seqs: int, shared: list[int], wide: bool, query: int) -> list[int]:
    kept, cap = _explicit(cmd, "decode_cudagraph_capture_request_sizes", "max_decode_cudagraph_capture_requests", seqs)
    if kept is not None:
        return kept
    if cap is not None or wide:
        return decode_grid(seqs if cap is None else min(cap, seqs))
    top = max(shared, default=0)  # the shared sizes' recorded max
    return sorted({min(-(-s // query), seqs) for s in shared if -(-s // query) * query <= top})


def _explicit(cmd: ServeCommand, name: str, cap_name: str, limit: int) -> tuple[list[int] | None, int | None]:
    """The sizes ``name`` gives, within [1, ``limit``] (None if not given), and the cap ``cap_name`` sets."""
    sizes, cap = cmd.compilation.get(name), cmd.compilation.get(cap_name)
    if sizes is None:
        return None, cap
    kept = sorted({s for s in sizes if 1 <= s <= limit})
    if cap is not None and kept and kept[-1] > cap:
        raise UsageError(f"preflight: --compilation-config {name} holds {kept[-1]}, above {cap_name}={cap}; "
                         f"raise {cap_name} or drop the larger sizes")
    return kept, cap


def _draft_requests(cmd: ServeCommand, seqs: int, decode: list[int], mtp_layers: int) -> list[int]:
    """``get_draft_decode_cudagraph_request_sizes``: the one-token draft steps after the first, whose graphs a
    multi-module MTP (as many modules as draft tokens, two or more) does not take."""
    k = cmd.num_speculative_tokens
    multi_module = cmd.speculative_method == "mtp" and min(mtp_layers, k) > 1
    if not decode or k < 2 or cmd.speculative_method not in DRAFT_STEP_METHODS or multi_module:
        return []
    return decode_grid(seqs)


def decode_shapes(sizes: list[int], query_lens: dict[int, int], max_tokens: int) -> list[tuple[int, int]]:
    """``decode_cudagraph_capture_shapes``: (requests, query length) of each uniform decode graph; a batch pads to
    the smallest graph that holds it, so the first size above a limit is captured at the limit."""
    sizes, shapes = sorted(set(sizes)), set()
    for q, max_reqs in query_lens.items():
        limit = min(max_reqs, max_tokens // q)
        reachable = [s for s in sizes if s < limit] + [s for s in sizes if s >= limit][:1]
        shapes.update((min(n, limit), q) for n in reachable if limit >= 1)
    return sorted(shapes, key=lambda shape: (shape[1], shape[0]))


def _walk_grid(limit: int, step: Callable[[int], float]) -> list[int]:
    """1, ..., ``limit``: each size the next multiple of the largest power of two not above ``step(size)``."""
    grid, size = [], 1
    while size < limit:
        grid.append(size)
        stride = 1 << max(0, math.floor(math.log2(max(1.0, step(size)))))
        size = (size // stride + 1) * stride
    return [*grid, limit] if limit else []


def prefill_grid(max_tokens: int, dense_head: bool = False) -> list[int]:
    """``prefill_cudagraph_capture_grid``: 1, 2, 4, every 8 to 64, four sizes a doubling to 1024, then every 256
    (every 512 once 7% of the size passes 512); every count to 32 with ``dense_head``."""
    grid = _walk_grid(max_tokens, lambda t: min(t, max(8, t / 4), 0.07 * max(t, 4096)))
    return sorted({*grid, *(t for t in range(1, 33) if t < max_tokens)}) if dense_head else grid


def decode_grid(max_requests: int) -> list[int]:
    """``decode_cudagraph_capture_grid``: every count to 6, then steps of the largest power of two not above
    0.65 * n^(2/3)."""
    return _walk_grid(max_requests, lambda n: 0.65 * n ** (2 / 3))


def varlen_decode_grid(max_tokens: int, dense_head: bool = False) -> list[int]:
    """``varlen_decode_cudagraph_capture_grid`` (adaptive verification): 1, 2, 4, four sizes a doubling from 8 to
    1024, every 128 to 4096, every 256 beyond."""
    grid, low = set(range(1, 33)) if dense_head else {1, 2, 4}, 8
    grid.add(low)
    while low < 1024:
        grid.update(range(low + low // 4, 2 * low + 1, low // 4))
        low *= 2
    grid.update(range(1024, 4096, 128), range(4096, max_tokens, 256))
    return sorted({s for s in grid if s < max_tokens} | {max_tokens}) if max_tokens else []
