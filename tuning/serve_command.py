"""A ``vllm serve`` command as vLLM 0.33 reads it, and the batch sizes its fused MoE will see.

``parse`` turns the words of a serve command into a ``ServeCommand``: the model, the parallel layout,
``--moe-backend``, MTP, ``--hf-overrides``, and what sets the batch sizes (``--max-num-seqs``, ``--max-num-batched-tokens``,
``--enforce-eager``, ``--compilation-config``'s capture sizes, ``--performance-mode``). Every flag is
checked against vLLM 0.33's serve parser (``data/vllm_serve_flags.json``, written from that parser and
compared with it in CI); an unknown one is refused in one line. ``batch_plan`` mirrors
``EngineArgs.get_batch_defaults`` and ``VllmConfig._set_cudagraph_sizes``. Where vLLM is importable,
``vllm_probe`` asks vLLM's own parser and functions instead, and CI asserts both agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import UsageError
from .vllm_rules import normalize_moe_backend

FLAGS_FILE = Path(__file__).parent / "data" / "vllm_serve_flags.json"
MEMORY_GB = {"sm90": {"H200": 141, "H20": 96, "H20-3e": 141}, "sm100": {"B200": 180}}


@lru_cache(maxsize=1)
def serve_flags() -> dict[str, list]:
    """vLLM 0.33's ``vllm serve`` options: option -> [destination, takes a value, value stored without one]."""
    return json.loads(FLAGS_FILE.read_text())["flags"]


@dataclass(frozen=True, kw_only=True)
class ServeCommand:
    model: str
    tp: int = 1
    dp: int = 1
    ep: bool = False
    moe_backend: str = "auto"
    quantization: str | None = None
    num_speculative_tokens: int = 0
    max_num_seqs: int | None = None  # None: vLLM's default for the GPU
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    capture_sizes: tuple[int, ...] | None = None  # --compilation-config cudagraph_capture_sizes
    max_capture_size: int | None = None  # --compilation-config max_cudagraph_capture_size
    performance_mode: str = "balanced"
    hf_overrides: dict = field(default_factory=dict)  # --hf-overrides: config.json keys vLLM replaces at load
    argv: tuple[str, ...] = field(default=(), compare=False)


def _words(argv: list[str]) -> list[str]:
    """The serve command's words after ``vllm serve`` (also accepts them without it)."""
    words = list(argv)
    if words[:2] == ["vllm", "serve"] or (len(words) > 1 and words[0].endswith("/vllm") and words[1] == "serve"):
        words = words[2:]
    elif words[:1] == ["serve"]:
        words = words[1:]
    if not words:
        raise UsageError("preflight: no serve command after '--'; pass e.g. -- vllm serve MODEL --tensor-parallel-size 4")
    return words


def _options(words: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    """Positional words and options by vLLM's destination name; flags vLLM 0.33 does not have are refused."""
    flags, positional, values, i = serve_flags(), [], {}, 0
    while i < len(words):
        word = words[i]
        if not word.startswith("-") or word == "-":
            positional.append(word)
            i += 1
            continue
        name, has_inline, inline = word.partition("=")
        if name.startswith("--"):  # vLLM's parser takes --max_num_seqs for --max-num-seqs
            name = "--" + name[2:].replace("_", "-")
        if name not in flags:
            raise UsageError(f"preflight: {name} is not a vLLM 0.33 'vllm serve' option; check the spelling "
                             "(vllm serve --help lists them)")
        dest, takes_value, stored = flags[name]
        if takes_value and not has_inline:
            if i + 1 >= len(words):
                raise UsageError(f"preflight: {name} needs a value")
            inline, i = words[i + 1], i + 1
        values[dest] = inline if takes_value else stored
        i += 1
    return positional, values


def _json(values: dict, name: str) -> dict:
    text = values.get(name)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(f"preflight: --{name.replace('_', '-')} {text!r} is not JSON; quote it as one word") from None
    if not isinstance(data, dict):
        raise UsageError(f"preflight: --{name.replace('_', '-')} must be a JSON object")
    return data


def _int(values: dict, name: str, default: int | None) -> int | None:
    if name not in values:
        return default
    try:
        return int(values[name])
    except ValueError:
        raise UsageError(f"preflight: --{name.replace('_', '-')} {values[name]!r} is not a whole number") from None


def parse(argv: list[str]) -> ServeCommand:
    """The serve command as vLLM 0.33's parser reads it (the fields that decide the MoE's work)."""
    positional, values = _options(_words(argv))
    model = values.get("model") or (positional[0] if positional else None)
    if not model or len(positional) > 1:
        raise UsageError("preflight: the serve command names no model (or more than one); "
                         "write vllm serve MODEL [options]")
    compilation = _json(values, "compilation_config")
    sizes = compilation.get("cudagraph_capture_sizes")
    return ServeCommand(
        model=str(model), tp=_int(values, "tensor_parallel_size", 1), dp=_int(values, "data_parallel_size", 1),
        ep=bool(values.get("enable_expert_parallel", False)),
        moe_backend=normalize_moe_backend(str(values.get("moe_backend", "auto"))),
        quantization=values.get("quantization"),
        num_speculative_tokens=int(_json(values, "speculative_config").get("num_speculative_tokens", 0) or 0),
        max_num_seqs=_int(values, "max_num_seqs", None),
        max_num_batched_tokens=_int(values, "max_num_batched_tokens", None),
        enforce_eager=bool(values.get("enforce_eager", False)),
        capture_sizes=tuple(int(s) for s in sizes) if sizes is not None else None,
        max_capture_size=compilation.get("max_cudagraph_capture_size"),
        performance_mode=str(values.get("performance_mode", "balanced")),
        hf_overrides=_json(values, "hf_overrides"), argv=tuple(argv))


# ---- batch sizes ---------------------------------------------------------------------------------

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


def batch_plan(cmd: ServeCommand, arch: str, memory_gb: float) -> BatchPlan:
    """VllmConfig._set_cudagraph_sizes for a serve without dynamic speculative decoding."""
    tokens, seqs = batch_defaults(memory_gb, cmd.tp)
    if cmd.performance_mode == "throughput":
        tokens, seqs = tokens * 2, seqs * 2
    tokens = cmd.max_num_batched_tokens or tokens
    seqs = cmd.max_num_seqs or seqs
    if cmd.enforce_eager:
        return BatchPlan(max_num_seqs=seqs, max_num_batched_tokens=tokens, capture_sizes=())
    return BatchPlan(max_num_seqs=seqs, max_num_batched_tokens=tokens,
                     capture_sizes=tuple(_capture_sizes(cmd, arch, seqs, tokens)))


def _capture_sizes(cmd: ServeCommand, arch: str, seqs: int, tokens: int) -> list[int]:
    default_max = 1024 if arch == "sm100" else 512
    query = 1 + cmd.num_speculative_tokens
    biggest, decode = cmd.max_capture_size, []
    if biggest is None:
        biggest = min(seqs * query * 2, default_max)
        if query > 1:
            reqs = min(seqs, default_max)
            counts = sorted({n for n in (1, 2, 4) if n <= reqs} | set(range(8, min(reqs + 1, 256), 8))
                            | set(range(256, reqs + 1, 16)) | {reqs})
            decode = sorted({n * query for n in counts if n * query <= biggest})
        elif seqs <= biggest:
            decode = [seqs]
    biggest = min(tokens, biggest)
    if cmd.capture_sizes is not None:
        return sorted(s for s in set(cmd.capture_sizes) if s <= tokens)
    sizes = list(range(1, min(biggest, 32) + 1)) if cmd.performance_mode == "interactivity" else \
        [s for s in (1, 2, 4) if s <= biggest]
    if biggest >= 8:
        sizes += list(range(8, min(biggest + 1, 256), 8))
    if biggest >= 256:
        sizes += list(range(256, biggest + 1, 16))
    if tokens <= biggest and tokens not in sizes:
        sizes.append(tokens)
    return sorted(set(sizes + [s for s in decode if s <= tokens]))
