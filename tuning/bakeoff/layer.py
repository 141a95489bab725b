"""The backend bake-off: one MoE layer's whole expert computation per backend, as vLLM 0.33 runs it.

Per layout and M, one routed batch and one set of float weights; per layer kind (SiLU, SwiGLU-step) and
backend, the output is checked against the float reference, and only then timed (``bench.measure``: CUDA
graph, L2 flushed before each sample). A backend that fails to build, launch or pass the check is a result
with its reason, never a crash. vLLM's own CUDA ops run where they loaded and passed their check (``vllm_ops``),
the stand-ins of ``moe_ops.STAND_INS`` elsewhere. Each backend runs on the shape its serve holds: Triton on the refined block
(TP4 [64,64], TP8 [32,32]), DeepGEMM and its hybrid on the padded 128 blocks (TP4 N=384, TP8 N=256).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import configs
from ..bench import measure
from ..configs import FIELDS, TileConfig
from .layer_inputs import FloatWeights, QuantWeights, batch, errors, float_weights, quantised, reference
from ..shapes import DEFAULT_VLLM_VERSION, MoeShape, Refusal, parse_layout, parse_version, shape_for
from ..vllm.rules import ACTIVATIONS, deepgemm_runs, down_file_name, nearest_entry

TOLERANCE = 0.1  # relative error of a whole FP8 layer (both GEMMs, two activation quantisations) against float
BACKENDS = {
    "triton_tuned": "Triton, the committed tuned config (--moe-backend triton; E8M0 on: UE8M0 activation scales)",
    "triton_default": "Triton, vLLM's default config (no tuned file)",
    "deepgemm_e8m0": "DeepGEMM, UE8M0 weight and activation scales (--moe-backend deep_gemm, vLLM's default)",
    "deepgemm_fp32": "DeepGEMM, float32 scales (VLLM_USE_DEEP_GEMM_E8M0=0), at every M",
    "hybrid": "TritonOrDeepGemmExperts with E8M0 off: DeepGEMM (fp32) when M >= 128 and N > 512, else Triton "
              "with the padded shape's tuned file",
    "flashinfer": "FlashInfer-CUTLASS fused MoE (vLLM's default on the SiLU layers with EP)",
}


@dataclass(frozen=True)
class Measured:
    layout: str
    activation: str
    m: int
    backend: str
    shape: str
    us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    standin_us: float | None = None  # time of the torch stand-ins for vLLM's CUDA ops still run, inside ``us``
    rel_error: float | None = None
    calc_diff: float | None = None
    runs: str = ""  # what ran (the hybrid: DeepGEMM or Triton; Triton: the config)
    failure: str | None = None


TIMES = ("us", "p20_us", "p80_us", "standin_us")  # µs: a number above 0, or null where not timed
ERRORS = ("rel_error", "calc_diff")  # a number, or null where the check did not run


def measured_row(row) -> Measured:
    """A row of a --json-out file as the Measured it recorded; ValueError naming the first field that is missing or
    of the wrong type (the layout's name is the caller's to check: it needs the model)."""
    if not isinstance(row, dict):
        raise ValueError(f"is {type(row).__name__}, not an object of {', '.join(Measured.__dataclass_fields__)}")
    fields = Measured.__dataclass_fields__
    extra = next((k for k in row if k not in fields), None)
    if extra is not None:
        raise ValueError(f"has the unknown field {extra!r}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    need = {"layout": (lambda v: isinstance(v, str) and v != "", "a layout name"),
            "activation": (lambda v: v in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}"),
            "m": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
            "backend": (lambda v: isinstance(v, str) and v in BACKENDS, f"one of {', '.join(BACKENDS)}"),
            "shape": (lambda v: isinstance(v, str), "a string")}
    for key, (ok, what) in need.items():
        if key not in row:
            raise ValueError(f"has no {key!r} ({what})")
        if not ok(row[key]):
            raise ValueError(f"{key!r} is {row[key]!r}, not {what}")
    optional = {**{k: (lambda v: v is None or number(v) and 0 < v < float("inf"), "µs > 0 or null") for k in TIMES},
                **{k: (lambda v: v is None or number(v), "a number or null") for k in ERRORS},
                "runs": (lambda v: isinstance(v, str), "a string"),
                "failure": (lambda v: v is None or isinstance(v, str), "a string or null")}
    for key, (ok, what) in optional.items():
        if key in row and not ok(row[key]):
            raise ValueError(f"{key!r} is {row[key]!r}, not {what}")
    return Measured(**row)


@dataclass
class Bench:
    """Everything the GPU run loaded once: vLLM's kernels and CUDA ops, DeepGEMM, FlashInfer (each may be missing)."""

    kernel: object
    helpers: object
    model: object
    folder: Path  # the tuned files
    device_name: str
    flush_bytes: int
    dg: object | None = None
    fi: Callable | None = None
    missing: dict[str, str] = field(default_factory=dict)  # backend -> why it could not run
    budget_ms: float = 50.0
    tolerance: float = TOLERANCE
    seed: int = 0
    capability: int = 90  # the GPU's compute capability (launch.capability)
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    precompile: object | None = None  # compile.Precompiler: Triton configs compiled in parallel processes
    ops: object | None = None  # vllm_ops.VllmOps: vLLM's CUDA ops that loaded and passed their check
    ops_why: str = ""  # why none loaded (ops None)


def default_tile(kernel, shape: MoeShape, m: int) -> TileConfig:
    """vLLM's get_default_config for this M (try_get_optimal_moe_config without a file)."""
    cfg = kernel.default_config(m, shape.num_experts, shape.n, shape.k, shape.top_k, shape.vllm_dtype,
                                list(shape.block_shape))
    return TileConfig(**{f: int(cfg.get(f, 4 if f == "num_warps" else 3)) for f in FIELDS})


def tuned_tile(folder: Path, shape: MoeShape, device_name: str, m: int) -> TileConfig | None:
    path = folder / shape.file_name(device_name)
    if not path.exists():
        return None
    table = configs.read_config_file(path)
    return nearest_entry(table, m)


def tuned_down(folder: Path, shape: MoeShape, device_name: str, m: int) -> dict | None:
    """The entry nearest to M of the `_down.json` beside the shape's tuned file, which vLLM 0.34 reads for block-FP8
    [128,128] (``vllm_rules.sorted_down_runs`` decides whether it runs); None where there is no such file."""
    path = folder / down_file_name(shape.file_name(device_name))
    return down_entry(path, m) if path.exists() else None


def down_entry(path: Path, m: int) -> dict | None:
    """A `_down.json` file's entry nearest to M, as experts/triton_moe.py picks it (vLLM 0.34)."""
    table = {int(k): v for k, v in json.loads(Path(path).read_text()).items() if k.isascii() and k.isdigit()}
    return nearest_entry(table, m) if table else None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


def evaluate(ctx: Bench, base: Measured, build: Callable, ref: torch.Tensor) -> Measured:
    """Build the path, check it against the reference, then time it; any failure becomes the result."""
    from dataclasses import replace

    try:
        path = build()
        rel, diff = errors(path.run(), ref)
        if not rel <= ctx.tolerance:
            return replace(base, rel_error=rel, calc_diff=diff, failure=f"numerics: relative error {rel:.3f} > "
                                                                         f"{ctx.tolerance}")
        t = measure(path.run, budget_ms=ctx.budget_ms, flush_l2_bytes=ctx.flush_bytes)
        standin = getattr(path, "stand_in_ops", None)
        s = measure(standin, budget_ms=ctx.budget_ms / 4, flush_l2_bytes=ctx.flush_bytes).median_us if standin else None
        return replace(base, us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us, standin_us=s, rel_error=rel,
                       calc_diff=diff)
    except Exception as exc:  # compile, resources, launch, a missing API: a result
        return replace(base, failure=one_line(exc))
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class LayoutSetup:
    name: str
    layout: object
    triton: MoeShape  # what --moe-backend triton (and auto) runs
    deepgemm: MoeShape  # what --moe-backend deep_gemm runs (128 blocks, maybe padded)
    weights: FloatWeights
    q_triton: QuantWeights
    q_dg: dict[bool, QuantWeights | str]  # E8M0 on/off -> DeepGEMM's weights, or why there are none
    q_fi: QuantWeights | None


def setup(ctx: Bench, name: str) -> LayoutSetup:
    from .path_deepgemm import deepgemm_weights
    from .path_flashinfer import flashinfer_weights

    layout = parse_layout(name)
    tri, dgs = (shape_for(ctx.model, layout, "fp8", moe_backend=b) for b in ("triton", "deep_gemm"))
    for s in (tri, dgs):
        if isinstance(s, Refusal):
            raise ValueError(f"layout {name}: {s.reason}")
    w = float_weights(tri, ctx.seed, ctx.device, ctx.dtype)
    q_tri, q_dg128 = quantised(w, tri.block_shape), quantised(w, (128, 128), n=dgs.n)
    q_dg: dict[bool, QuantWeights | str] = {}
    for e8m0 in (True, False):
        try:
            q_dg[e8m0] = deepgemm_weights(ctx.dg, q_dg128, e8m0) if ctx.dg else ctx.missing["deepgemm"]
        except Exception as exc:
            q_dg[e8m0] = one_line(exc)
    q_fi = flashinfer_weights(q_tri) if layout.ep and ctx.fi and tri.block_shape == (128, 128) else None
    return LayoutSetup(name, layout, tri, dgs, w, q_tri, q_dg, q_fi)


def run_layout(ctx: Bench, name: str, ms: list[int], *, kinds: tuple[str, ...] = ACTIVATIONS, say=print,
               into: list | None = None) -> list[Measured]:
    """Every backend per M and layer kind; rows are appended to ``into`` as they are measured (an interrupted
    run keeps them)."""
    ls = setup(ctx, name)
    if ctx.precompile:
        _precompile(ctx, ls, ms)
    rows: list[Measured] = [] if into is None else into
    for m in ms:
        b = batch(ls.triton, m, ls.layout.dp, ctx.seed, ctx.device, ctx.dtype)
        for act in kinds:
            ref = reference(ls.weights, b, act)
            got = [evaluate(ctx, base, build, ref) if build else base for base, build in _plans(ctx, ls, b, act)]
            hybrid = _hybrid(ctx, ls, b, act, got, ref)
            rows += [*got, hybrid]
            say(_line(m, act, [*got, hybrid]))
        del b
    return rows


def _precompile(ctx: Bench, ls: LayoutSetup, ms: list[int]) -> None:
    """Every Triton config the layout will launch, compiled into Triton's cache in parallel before the GPU times."""
    jobs = []
    for m in ms:
        tri = {default_tile(ctx.kernel, ls.triton, m), tuned_tile(ctx.folder, ls.triton, ctx.device_name, m)}
        jobs += [(ls.triton, m, c) for c in tri if c]
        if not deepgemm_runs(m, ls.deepgemm.n, ls.deepgemm.k, e8m0=False):
            jobs.append((ls.deepgemm, m, tuned_tile(ctx.folder, ls.deepgemm, ctx.device_name, m)
                         or default_tile(ctx.kernel, ls.deepgemm, m)))
    ctx.precompile.all(jobs)


def _plans(ctx: Bench, ls: LayoutSetup, b, act: str):
    """(row, builder) per backend; builder None when the row already says why it cannot run."""
    from .path_deepgemm import DeepGemmPath
    from .path_flashinfer import FlashInferPath
    from .path_triton import TritonPath

    m = b.m
    tuned = tuned_tile(ctx.folder, ls.triton, ctx.device_name, m)
    default = default_tile(ctx.kernel, ls.triton, m)

    def row(backend: str, shape: MoeShape, **kw) -> Measured:
        return Measured(ls.name, act, m, backend, shape.label, **kw)

    def triton(config: TileConfig, down: dict | None = None):
        return lambda: TritonPath(ctx.kernel, ctx.helpers, ls.triton, ls.q_triton, b, config=config, activation=act,
                                  e8m0=True, capability=ctx.capability, ops=ctx.ops, down=down)
    reads_down = parse_version(ctx.kernel.vllm_version or DEFAULT_VLLM_VERSION) >= (0, 34)
    down = tuned_down(ctx.folder, ls.triton, ctx.device_name, m) if reads_down else None
    yield (row("triton_tuned", ls.triton, runs=(tuned or default).short), triton(tuned, down)) if tuned else \
        (row("triton_tuned", ls.triton, failure=f"no tuned file {ls.triton.file_name(ctx.device_name)}"), None)
    yield row("triton_default", ls.triton, runs=default.short), triton(default)
    for e8m0, backend in ((True, "deepgemm_e8m0"), (False, "deepgemm_fp32")):
        w = ls.q_dg[e8m0]
        if isinstance(w, str):
            yield row(backend, ls.deepgemm, failure=w), None
        else:
            yield row(backend, ls.deepgemm, runs="DeepGEMM"), (
                lambda w=w, e8m0=e8m0: DeepGemmPath(ctx.dg, ctx.helpers, ls.deepgemm, w, b, activation=act, e8m0=e8m0,
                                                    ops=ctx.ops))
    if act == "silu" and ls.layout.ep:
        if ls.q_fi is None:
            yield row("flashinfer", ls.triton, failure=ctx.missing.get("flashinfer", "FlashInfer not loaded")), None
        else:
            yield row("flashinfer", ls.triton, runs="FlashInfer-CUTLASS"), (
                lambda: FlashInferPath(ctx.fi, ls.triton, ls.q_fi, b, ls.layout))


def _hybrid(ctx: Bench, ls: LayoutSetup, b, act: str, got: list[Measured], ref) -> Measured:
    """TritonOrDeepGemmExperts._select_experts_impl (experts/triton_deep_gemm_moe.py:77) with E8M0 off:
    _valid_deep_gemm (experts/deep_gemm_moe.py:73): M >= 128, N and K multiples of 128, N > 512."""
    from dataclasses import replace

    from .path_triton import TritonPath

    s, m = ls.deepgemm, b.m
    if deepgemm_runs(m, s.n, s.k, e8m0=False):
        fp32 = next(r for r in got if r.backend == "deepgemm_fp32")
        return replace(fp32, backend="hybrid", runs="DeepGEMM (fp32 scales)")
    w = ls.q_dg[False]
    config = tuned_tile(ctx.folder, s, ctx.device_name, m) or default_tile(ctx.kernel, s, m)
    base = Measured(ls.name, act, m, "hybrid", s.label, runs=f"Triton {config.short}")
    if isinstance(w, str):  # the fallback reads DeepGEMM's weights: without DeepGEMM there are none
        return replace(base, failure=w)
    return evaluate(ctx, base, lambda: TritonPath(ctx.kernel, ctx.helpers, s, w, b, config=config, activation=act,
                                                  e8m0=False, capability=ctx.capability, ops=ctx.ops), ref)


def _line(m: int, act: str, rows: list[Measured]) -> str:
    cells = "  ".join(f"{r.backend}={r.us:.1f}" if r.us is not None else f"{r.backend}=--" for r in rows)
    return f"  M={m:<5} {act:<10} {cells}"
