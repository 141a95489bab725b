"""What validate-serve's runs say about the tuned configs' gain: the A/B of pairs of measured passes (``ab``'s
statistics over them, and which servers ran them) and the gain the tuned files predict for the serve
(``moe_share``), and for the layout a reduced serve emulates."""

from __future__ import annotations

from . import ab
from . import preflight as pf
from .model_folder import published_config
from ..models import load_model
from .moe_share import Prediction, Share, estimate, predict
from .args import RESIDENT_MEMORY, Setup
from .checks import Preflight, geometry_name
from .report import METRICS


def ab_summary(setup: Setup, runs: list[dict]) -> dict:
    """The pairs' measured passes (report.json's runs), per metric: spreads, the ratio's interval, the verdict."""
    w = setup.workload
    pairs: dict[int, dict] = {}
    for r in runs:
        if r["pair"] is not None:
            pairs.setdefault(r["pair"], {})[r["arm"]] = r["metrics"]
    metrics = [ab.Metric(w.primary, METRICS[w.primary], True),
               ab.Metric("median_ttft_ms", METRICS["median_ttft_ms"], False),
               ab.Metric("median_tpot_ms", METRICS["median_tpot_ms"], False)]
    summary = ab.summarize([(p["default"], p["tuned"]) for _, p in sorted(pairs.items())], metrics)
    order = [f"{p}: {' then '.join(pairs[p])}" for p in sorted(pairs)]
    head = summary["verdicts"].get(w.primary, {"text": f"no {METRICS[w.primary]} in every run", "outcome": "none"})
    servers = {"mode": setup.ab_servers, "ports": {arm: setup.arm_spec(arm).port for arm in ("default", "tuned")},
               "gpu_memory_utilization": RESIDENT_MEMORY if setup.resident else None}
    return {"pairs": len(pairs), "order": order, "workload": w.name, "primary": w.primary, "servers": servers, **summary,
            "per_pair": {str(p): v for p, v in sorted(pairs.items())}, "verdict": head["text"],
            "outcome": head["outcome"], "method": summary["ratios"].get(w.primary, {}).get("method")}


def predictions(setup: Setup, pre: Preflight, measured: Share | None) -> dict:
    """The gain the tuned files predict for this serve, and (reduced) for the layout it emulates at the same
    concurrency (an expert-parallel rank gets every DP rank's tokens, so M stays the concurrency)."""
    files = [layer.found for layer in pre.layers if layer.found]
    chunk = pre.report["plan"].max_num_batched_tokens
    w, gpu, dtype = setup.workload, setup.gpu, setup.spec.dtype
    m, phrase = w.tokens_per_step(chunk), w.m_phrase(chunk)
    if not files:
        return {"served": None, "full": None, "m": m, "m_phrase": phrase,
                "why": "the tuned folder holds no file this serve reads"}
    rows = w.max_concurrency if w.phase != "prefill" else max(1, m // w.input_len)
    layer, cmd = next(layer for layer in pre.layers if layer.found), pre.report["command"]
    shape = pf.layer_shape(load_model(geometry_name(setup.spec.model, dtype), cmd.hf_overrides), cmd, layer.runtime,
                           dtype)
    cfg = setup.reduced.effective_config() if setup.reduced else published_config(dtype)
    served = predict(files[0], m, measured or estimate(cfg, shape, gpu, m=m, logit_rows=rows, tp=setup.spec.layout.tp))
    full = None
    if setup.reduced:
        share = estimate(published_config(dtype), setup.reduced.shape, gpu, m=m, logit_rows=rows, tp=setup.layout.tp)
        full = predict(files[0], m, share)
    return {"served": _as(served), "full": _as(full), "m": m, "m_phrase": phrase, "why": None if served else
            f"{files[0].name} has no tune-moe provenance (no per-batch speedup to predict from)"}


def in_serving(profiles: dict, ab_summary_: dict | None, phase: str, m: int) -> dict | None:
    """The fused MoE's time per step on the profiled default and tuned servers (a resident A/B's), so the
    kernel speedup the serve itself ran, and the gain that saving makes against the default arm's step time in
    the measured passes: its median TPOT (decode, mixed), or the M tokens of a prefill step at its median total
    tok/s (prefill). The profiled steps' own span is not used: the profiler slows it."""
    d, t = (profiles.get(arm) or {} for arm in ("default", "tuned"))
    if not (d.get("moe_us") and t.get("moe_us")):
        return None
    saved = d["moe_us"] - t["moe_us"]
    out = {"default_moe_us": d["moe_us"], "tuned_moe_us": t["moe_us"], "kernel_speedup": d["moe_us"] / t["moe_us"],
           "saved_us": saved, "steps": min(d["steps"], t["steps"]), "step_ms": None, "step_from": None, "gain": None}
    arm = (ab_summary_ or {}).get("arms", {}).get("default", {})
    if phase == "prefill":
        tps = (arm.get("total_token_throughput") or {}).get("median")
        step, source = (m * 1e3 / tps, f"{m} tokens at their median total tok/s") if tps else (None, None)
    else:
        step, source = (arm.get("median_tpot_ms") or {}).get("median"), "their median TPOT"
    if step:
        out.update(step_ms=step, step_from=source, gain=step * 1e3 / (step * 1e3 - saved))
    return out


def _as(p: Prediction | None) -> dict | None:
    return p.as_dict() if p else None
