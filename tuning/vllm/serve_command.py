"""A ``vllm serve`` command as the serve's vLLM release reads it: the fields that decide the MoE's work.

``parse`` turns the words of a serve command into a ``ServeCommand``: the model, the parallel layout,
``--moe-backend``, speculative decoding, ``--hf-overrides``, and what sets the batch sizes and CUDA graphs
(``--max-num-seqs``, ``--max-num-batched-tokens``, ``--enforce-eager``, ``-O``, ``--performance-mode`` and the
``--compilation-config`` keys ``batch_plan`` reads). Words are first rewritten as vLLM's
``FlexibleArgumentParser`` does (``--max_num_seqs``, ``-O3``, dotted keys such as ``-cc.cudagraph_mode=NONE``
folded into one JSON value); every flag is then checked against that release's serve parser
(``data/vllm_serve_flags.json``, written from vLLM 0.33's and 0.34's parsers and compared with them in CI), and an
unknown one is refused in one line. Where vLLM is importable, ``vllm_probe`` asks vLLM's own parser instead, and CI
asserts both agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import UsageError
from ..shapes import parse_version
from .rules import normalize_moe_backend

FLAGS_FILE = Path(__file__).parents[1] / "data" / "vllm_serve_flags.json"
MEMORY_GB = {"sm90": {"H200": 141, "H20": 96, "H20-3e": 141}, "sm100": {"B200": 180}}
GRAPH_MODES = ("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")  # CUDAGraphMode
COMPILE_MODES = ("NONE", "STOCK_TORCH_COMPILE", "DYNAMO_TRACE_ONCE", "VLLM_COMPILE")  # CompilationMode, 0-3
GRAPH_KEYS = {  # the --compilation-config keys that set the CUDA graphs: key -> the first release that has it
    "cudagraph_capture_sizes": "0.33", "max_cudagraph_capture_size": "0.33", "cudagraph_mode": "0.33",
    "mode": "0.33", "prefill_cudagraph_capture_token_sizes": "0.34", "max_prefill_cudagraph_capture_tokens": "0.34",
    "decode_cudagraph_capture_request_sizes": "0.34", "max_decode_cudagraph_capture_requests": "0.34",
    "max_decode_cudagraph_capture_tokens": "0.34"}
MTP_METHODS = ("mtp", "step3p5_mtp")  # SpeculativeConfig names every MTP model type "mtp"
HUMAN_INT = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT])")
WHOLE = re.compile(r"\s*[+-]?[0-9]+\s*")
# The least value vLLM's configs take for the sizes a serve resolves (pydantic Field bounds: ParallelConfig and
# SchedulerConfig ge=1, SpeculativeConfig gt=0); vLLM stops at start-up on a smaller one. CI reads vLLM's fields.
BOUNDS = {"tensor_parallel_size": ("ParallelConfig", 1), "data_parallel_size": ("ParallelConfig", 1),
          "max_num_seqs": ("SchedulerConfig", 1), "max_num_batched_tokens": ("SchedulerConfig", 1),
          "num_speculative_tokens": ("SpeculativeConfig", 1)}
BOUND_FLAGS = {"num_speculative_tokens": "--speculative-config num_speculative_tokens"}


def out_of_bounds(key: str, value) -> str:
    """The one line for a ``BOUNDS`` size vLLM's config refuses (the mirror's and the probe's alike)."""
    cls, least = BOUNDS[key]
    flag = BOUND_FLAGS.get(key, "--" + key.replace("_", "-"))
    return (f"preflight: {flag} {value!r}: vLLM's {cls} takes a whole number of at least {least}, so the serve would "
            f"not start; pass {least} or more")


def check_bounds(cmd: "ServeCommand", max_num_seqs: int, max_num_batched_tokens: int) -> None:
    """Refuse a serve whose parallel sizes or resolved batch limits vLLM's configs refuse (``BOUNDS``)."""
    for key, value in (("tensor_parallel_size", cmd.tp), ("data_parallel_size", cmd.dp),
                       ("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
        if value < BOUNDS[key][1]:
            raise UsageError(out_of_bounds(key, value))


def serve_release(vllm_version: str) -> str:
    """The mirrored release whose parser and CUDA-graph rules a serve on ``vllm_version`` follows."""
    return "0.34" if parse_version(vllm_version) >= (0, 34) else "0.33"


@lru_cache(maxsize=None)
def serve_flags(release: str = "0.33") -> dict[str, list]:
    """vLLM's ``vllm serve`` options in ``release``: option -> [destination, takes a value, value stored without one]."""
    return json.loads(FLAGS_FILE.read_text())["releases"][release]


@dataclass(frozen=True, kw_only=True)
class ServeCommand:
    model: str
    tp: int = 1
    dp: int = 1
    ep: bool = False
    moe_backend: str = "auto"
    quantization: str | None = None
    num_speculative_tokens: int = 0
    speculative_method: str | None = None  # "mtp" for every MTP model type, as SpeculativeConfig names it
    adaptive_verification: bool = False  # --speculative-config enable_adaptive_verification (0.34)
    max_num_seqs: int | None = None  # None: vLLM's default for the GPU
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    optimization_level: int = 2  # -O
    compilation: dict = field(default_factory=dict)  # the GRAPH_KEYS of --compilation-config it sets
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


def human_int(text: str) -> int:
    """vLLM's ``human_readable_int``: 16384, 16k (x1000) or 16K (x1024)."""
    if m := HUMAN_INT.fullmatch(text.strip()):
        number, suffix = m.groups()
        scale = 1000 ** ("kmgt".index(suffix) + 1) if suffix.islower() else 1024 ** ("KMGT".index(suffix) + 1)
        return int(float(number) * scale)
    return int(text)


def _rewrite(words: list[str]) -> list[str]:
    """``FlexibleArgumentParser.parse_args``'s rewriting: dashes for underscores in a long option's name (up to
    its first dot), ``-O3`` as ``--optimization-level 3``, and dotted keys (``-cc.mode=none``,
    ``--speculative-config.num_speculative_tokens 3``, ``KEY+ a,b`` for a list) merged into one JSON value per
    option, appended last (so it replaces a JSON value given whole)."""
    out, dotted, i = [], {}, 0
    while i < len(words):
        word = words[i]
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            head, dot, rest = name[2:].partition(".")
            word = "--" + head.replace("_", "-") + dot + rest + eq + value
        elif word.startswith("-O") and word != "-O":
            out += ["--optimization-level", word[3:] if word[2:3] == "=" else word[2:]]
            i += 1
            continue
        elif word == "-O" and i + 1 < len(words) and words[i + 1] in {"0", "1", "2", "3"}:
            word = "--optimization-level"
        key = word.split("=", 1)[0]
        if word.startswith("-") and "." in key:
            if "=" in word:
                value = word.split("=", 1)[1]
            elif i + 1 < len(words):
                value, i = words[i + 1], i + 1
            else:
                raise UsageError(f"preflight: {key} needs a value")
            _merge_dotted(dotted, key, value)
        else:
            out.append(word)
        i += 1
    for option, value in dotted.items():
        out += [option, json.dumps(value)]
    return out


def _merge_dotted(dotted: dict, key: str, text: str) -> None:
    if key.endswith("+"):
        key, value = key[:-1], text.split(",")
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = human_int(text)
            except ValueError:
                value = text
    option, *path = key.split(".")
    node = dotted.setdefault(option, {})
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(value, list) and isinstance(node.get(last), list):
        node[last] += value
    else:
        node[last] = value


def options(words: list[str], release: str = "0.33") -> tuple[list[str], dict, dict]:
    """Serve arguments (no ``vllm serve MODEL`` needed) as ``parse`` reads them: the positional words, the options
    by vLLM's destination name, and each destination's option as written (``-tp``, ``--port``); a flag the
    release does not have is refused."""
    return _options(_rewrite(list(words)), release)


def _options(words: list[str], release: str) -> tuple[list[str], dict, dict]:
    """Positional words, options by vLLM's destination name (a list for an option of several values), and the
    option each destination was last given as; flags the release does not have are refused."""
    flags, positional, values, names, i = serve_flags(release), [], {}, {}, 0
    while i < len(words):
        word = words[i]
        if not word.startswith("-") or word == "-":
            positional.append(word)
            i += 1
            continue
        name, has_inline, inline = word.partition("=")
        if name not in flags:
            raise UsageError(f"preflight: {name} is not a vLLM {release} 'vllm serve' option; check the spelling "
                             "(vllm serve --help lists them)")
        dest, nargs, stored = flags[name]
        i, values[dest] = _value(words, i + 1, name, nargs, inline if has_inline else None, stored)
        names[dest] = name
    return positional, values, names


def _value(words: list[str], i: int, name: str, nargs, inline: str | None, stored):
    """The value of option ``name`` whose next word is ``words[i]``, as argparse takes ``nargs`` of them; and the
    index of the word after it."""
    if inline is not None:
        return i, [inline] if nargs == "+" else inline
    if nargs == 0:
        return i, stored
    if nargs == 1:
        if i >= len(words):
            raise UsageError(f"preflight: {name} needs a value")
        return i + 1, words[i]
    taken = []
    while i + len(taken) < len(words) and not words[i + len(taken)].startswith("-") and (nargs == "+" or not taken):
        taken.append(words[i + len(taken)])
    if nargs == "+" and not taken:
        raise UsageError(f"preflight: {name} needs a value")
    return i + len(taken), taken if nargs == "+" else (taken[0] if taken else stored)


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


def _int(values: dict, name: str, default: int | None, read=int) -> int | None:
    if name not in values:
        return default
    try:
        return read(values[name])
    except ValueError:
        raise UsageError(f"preflight: --{name.replace('_', '-')} {values[name]!r} is not a whole number") from None


def parse(argv: list[str], release: str = "0.33") -> ServeCommand:
    """The serve command as vLLM ``release``'s parser reads it (the fields that decide the MoE's work)."""
    positional, values, _ = _options(_rewrite(_words(argv)), release)
    model = values.get("model") or (positional[0] if positional else None)
    if not model or len(positional) > 1:
        raise UsageError("preflight: the serve command names no model (or more than one); "
                         "write vllm serve MODEL [options]")
    spec = _merged(_json(values, "speculative_config"), values, "--speculative-config",
                   (("spec_method", "method", str), ("spec_model", "model", str), ("spec_tokens", "num_speculative_tokens", int)))
    spec = {k.replace("-", "_"): v for k, v in spec.items()}
    if spec.get("num_speculative_tokens_per_batch_size") is not None:
        raise UsageError("preflight: dynamic speculative decoding (num_speculative_tokens_per_batch_size) is not "
                         "modelled; check the serve without it, with its widest num_speculative_tokens")
    tokens = spec.get("num_speculative_tokens")
    count = 0 if tokens is None else _whole(tokens)
    if tokens is not None and (count is None or count < BOUNDS["num_speculative_tokens"][1]):
        raise UsageError(out_of_bounds("num_speculative_tokens", tokens))
    method = spec.get("method")
    if spec and method is None and spec.get("model") in (None, "ngram", "[ngram]"):
        method = "ngram" if spec.get("model") else "draft_model"  # SpeculativeConfig.__post_init__
    level = values.get("optimization_level", "2")
    if str(level) not in {"0", "1", "2", "3"}:
        raise UsageError(f"preflight: -O {level!r} is not an optimization level; use 0, 1, 2 or 3")
    return ServeCommand(
        model=str(model), tp=_int(values, "tensor_parallel_size", 1), dp=_int(values, "data_parallel_size", 1),
        ep=bool(values.get("enable_expert_parallel", False)),
        moe_backend=normalize_moe_backend(str(values.get("moe_backend", "auto"))),
        quantization=values.get("quantization"),
        num_speculative_tokens=count,
        speculative_method="mtp" if method in MTP_METHODS else method,
        adaptive_verification=release != "0.33" and bool(spec.get("enable_adaptive_verification", False)),
        max_num_seqs=_int(values, "max_num_seqs", None),
        max_num_batched_tokens=_int(values, "max_num_batched_tokens", None, human_int),
        enforce_eager=bool(values.get("enforce_eager", False)), optimization_level=int(level),
        compilation=_compilation(_merged(_json(values, "compilation_config"), values, "--compilation-config",
                                         (("cudagraph_capture_sizes", "cudagraph_capture_sizes", int),
                                          ("max_cudagraph_capture_size", "max_cudagraph_capture_size", int))),
                                 release),
        performance_mode=str(values.get("performance_mode", "balanced")),
        hf_overrides=_json(values, "hf_overrides"), argv=tuple(argv))


def _merged(config: dict, values: dict, where: str, flags: tuple) -> dict:
    """``config`` with the values of vLLM's shorthand flags (``--spec-tokens 3``, ``--max-cudagraph-capture-size
    64``), which EngineArgs refuses beside the same key in the JSON."""
    config = dict(config)
    for dest, key, kind in flags:
        if dest not in values:
            continue
        flag = "--" + dest.replace("_", "-")
        if key in config:
            raise UsageError(f"preflight: {flag} and {where}'s {key} are mutually exclusive (vLLM refuses both); "
                             "keep one")
        value = values[dest]
        try:
            config[key] = [kind(v) for v in value] if isinstance(value, list) else kind(value)
        except ValueError:
            raise UsageError(f"preflight: {flag} {value!r} is not a whole number") from None
    return config


def _compilation(given: dict, release: str) -> dict:
    """The CUDA-graph keys of --compilation-config, each checked as vLLM's CompilationConfig checks it."""
    out = {}
    for key, value in given.items():
        since = GRAPH_KEYS.get(key)
        if since is None or value is None:
            continue
        if parse_version(since) > parse_version(release):
            raise UsageError(f"preflight: --compilation-config {key} is a vLLM {since} key, which vLLM {release} "
                             "refuses; use cudagraph_capture_sizes or max_cudagraph_capture_size")
        out[key] = _graph_value(key, value)
    return out


def _graph_value(key: str, value):
    names = GRAPH_MODES if key == "cudagraph_mode" else COMPILE_MODES if key == "mode" else None
    if names is not None:
        if isinstance(value, str) and value.upper() in names:
            return value.upper() if key == "cudagraph_mode" else names.index(value.upper())
        if key == "mode" and isinstance(value, int) and 0 <= value < len(names):
            return value
        raise UsageError(f"preflight: --compilation-config {key} {value!r} is not one of {', '.join(names)}")
    if key.endswith("sizes"):
        if not isinstance(value, list) or not all(_whole(v) is not None for v in value):
            raise UsageError(f"preflight: --compilation-config {key} must be a list of whole numbers")
        if problem := sizes_below_one(key, [_whole(v) for v in value]):
            raise UsageError(problem)
        return [_whole(v) for v in value]
    if _whole(value) is None or _whole(value) < 0:
        raise UsageError(f"preflight: --compilation-config {key} must be a whole number, not {value!r}")
    return _whole(value)


def sizes_below_one(key: str, sizes: list[int]) -> str | None:
    """The one line for a --compilation-config list of CUDA-graph sizes that holds sizes below 1, or None."""
    below = [size for size in sizes if size < 1]
    return (f"preflight: --compilation-config {key} holds {', '.join(map(str, below))}: a CUDA graph is captured "
            "for 1 token or request or more; drop them") if below else None


def _whole(value) -> int | None:
    """An int as pydantic's lax mode takes one (7, 7.0, or "7" from a dotted ``KEY+`` list); else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(value) if isinstance(value, str) and WHOLE.fullmatch(value) else None
