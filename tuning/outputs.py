"""Turn finished jobs into vLLM's files, their provenance sidecars, and the end-of-run summary."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from . import configs
from .jobs import JobResult, Settings
from .plan import Plan
from .serve import RECIPE_FLAGS
from .shapes import Layout, MoeShape



def write_shape(out: Path, plan: Plan, shape: MoeShape, results: dict[int, JobResult], settings: Settings,
                info: dict, started: str) -> Path:
    """Write (merge into) the vLLM JSON for ``shape`` and its sidecar; return the JSON path."""
    path = Path(out) / plan.file_name(shape)
    old = configs.check_writable(path, overwrite=True)
    old_prov = configs.read_provenance(path) or {}
    merged = configs.merge(old, {m: r.tuned for m, r in results.items()})
    rows = {**old_prov.get("results", {}), **{str(m): _row(r) for m, r in sorted(results.items())}}
    configs.write_config_file(path, merged, info.get("triton", "unknown"))
    configs.write_provenance(path, {
        "tool_version": _tool_version(),
        "file": path.name,
        "shape": {"num_experts": shape.num_experts, "global_experts": shape.global_experts, "n": shape.n,
                  "k": shape.k, "top_k": shape.top_k, "dtype": shape.dtype,
                  "block_shape": list(shape.block_shape) if shape.block_shape else None},
        "layouts": [lay.name for lay in plan.shapes.get(shape, [])],
        "gpu": {"key": plan.gpu.key, "name": info.get("name"), "device_name": plan.gpu.device_name,
                "driver": info.get("driver"), "count": info.get("count", 1)},
        "software": {k: info.get(k) for k in ("cuda", "torch", "triton", "vllm", "kernel", "python")},
        "search": {"strategy": settings.strategy, "routing": settings.routing, "seed": settings.seed,
                   "scope": settings.scope},
        "started": started, "finished": now(),
        "tuning_seconds": round(sum(r.seconds for r in results.values()), 1),
        "results": dict(sorted(rows.items(), key=lambda kv: int(kv[0]))),
    })
    return path


def _row(r: JobResult) -> dict:
    return {"default": r.default.to_dict(), "default_us": round(r.default_us, 2), "tuned": r.tuned.to_dict(),
            "tuned_us": round(r.tuned_us, 2), "tuned_p20_us": round(r.tuned_p20_us, 2),
            "tuned_p80_us": round(r.tuned_p80_us, 2), "speedup": round(r.speedup, 4),
            "roofline_us": round(r.roofline_us, 2), "bound": r.bound,
            "default_pct_roofline": round(100 * r.roofline_us / r.default_us, 1),
            "tuned_pct_roofline": round(100 * r.roofline_us / r.tuned_us, 1),
            "evaluated": r.evaluated, "failed": r.failed}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tool_version() -> str:
    from . import __version__

    return __version__


def summary(plan: Plan, results: dict[tuple[str, int], JobResult]) -> str:
    lines = [f"{'shape':<34} {'M':>5} {'default us':>11} {'tuned us':>9} {'speedup':>8} {'% roofline':>11}  tuned config"]
    for shape in plan.shapes:
        file = plan.file_name(shape)
        rows = sorted((r for (f, _), r in results.items() if f == file), key=lambda r: r.m)
        for r in rows:
            pct = f"{100 * r.roofline_us / r.default_us:.0f}->{100 * r.roofline_us / r.tuned_us:.0f}"
            lines.append(f"{shape.label:<34} {r.m:>5} {r.default_us:>11.1f} {r.tuned_us:>9.1f} {r.speedup:>7.3f}x "
                         f"{pct:>11}  {r.tuned.short}")
        if rows:
            geo = math.exp(sum(math.log(r.speedup) for r in rows) / len(rows))
            worst = min(rows, key=lambda r: r.speedup)
            lines.append(f"{shape.label:<34} geomean {geo:.3f}x, worst {worst.speedup:.3f}x at M={worst.m}")
    return "\n".join(lines)


def serve_lines(plan: Plan, out: Path) -> list[str]:
    """The exact serve command for each recipe layout the plan tuned for."""
    model = plan.model.name
    lines = []
    for shape, layouts in plan.shapes.items():
        for lay in layouts:
            if lay in (Layout(tp=4), Layout(dp=4, ep=True)):
                # vLLM 0.33 on Hopper runs block FP8 + EP on FlashInfer-CUTLASS unless told to use Triton.
                backend = ["--moe-backend", "triton"] if shape.dtype == "fp8" and lay.ep else []
                flags = " ".join(lay.vllm_flags() + backend)
                lines.append(f"VLLM_TUNED_CONFIG_FOLDER={Path(out).resolve()} vllm serve {model} {flags} {' '.join(RECIPE_FLAGS)}")
    return lines
