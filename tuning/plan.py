"""The tuning plan: layouts that fit, the shapes vLLM will ask for, and the (shape, M) jobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import fit as fitting
from .gpus import GpuSpec
from .jobs import Job
from .models import ModelGeometry
from .shapes import Layout, MoeShape, Refusal, shape_for
from .vllm.rules import (ACTIVATIONS, DEEPGEMM_MIN_N, KIND, LayerRuntime, ServeFacts, down_file_name, launch_read_in,
                         launch_rules, layer_runtime, mirrored, reads_down_file)


@dataclass
class Plan:
    gpu: GpuSpec
    dtype: str
    model: ModelGeometry
    vllm_version: str
    num_gpus: int
    batch_sizes: tuple[int, ...]
    moe_backend: str = "auto"  # the --moe-backend the serve will pass (it decides FP8 TP shapes and the serve line)
    fits: list[fitting.Fit] = field(default_factory=list)
    shapes: dict[MoeShape, list[Layout]] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    alternatives: list[str] = field(default_factory=list)

    @property
    def jobs(self) -> list[Job]:
        """Every (shape, M) of the plan; ``schedule`` decides the order workers take them in."""
        return [Job(s, m) for s in self.shapes for m in self.batch_sizes]

    @property
    def backend_refused(self) -> bool:
        """No shape, because under the serve's --moe-backend no layout reads a tuned file."""
        return not self.shapes and bool(self.refusals) and all(r.of_backend for r in self.refusals)

    def file_name(self, shape: MoeShape) -> str:
        return shape.file_name(self.gpu.device_name)

    def serve_facts(self, lay: Layout, moe_backend: str, env: dict[str, str] | None = None) -> ServeFacts:
        """What decides each MoE layer kind's backend in a serve of this plan's model on ``lay``."""
        m = self.model
        return ServeFacts(arch=self.gpu.arch, dtype=self.dtype, tp=lay.tp, dp=lay.dp, ep=lay.ep,
                          moe_backend=moe_backend, env=tuple(sorted((env or {}).items())), num_experts=m.num_experts,
                          intermediate=m.moe_intermediate_size, hidden=m.hidden_size, top_k=m.top_k,
                          vllm=self.vllm_version)


def make_plan(model: ModelGeometry, gpu: GpuSpec, dtype: str, layouts: list[Layout], num_gpus: int,
              batch_sizes: tuple[int, ...], *, vllm_version: str, moe_backend: str = "auto",
              check_fit: bool = True) -> Plan:
    plan = Plan(gpu, dtype, model, vllm_version, num_gpus, tuple(sorted(set(batch_sizes))), moe_backend)
    for layout in layouts:
        shape = shape_for(model, layout, dtype, vllm_version, moe_backend)
        if isinstance(shape, Refusal):
            plan.refusals.append(shape)
            continue
        verdict = fitting.fit(model, layout, dtype, gpu)
        if not verdict.fits and check_fit:
            plan.fits.append(verdict)
            continue
        refused = _backend_refusal(plan, layout)
        if refused:
            plan.refusals.append(refused)
            continue
        plan.fits.append(verdict)
        plan.shapes.setdefault(shape, []).append(layout)
    if not plan.shapes and not plan.backend_refused:
        plan.alternatives = fitting.alternatives(model, dtype, gpu, num_gpus, vllm_version, moe_backend)
    return plan


def _backend_refusal(plan: Plan, layout: Layout) -> Refusal | None:
    """A layout vLLM will not start under an explicit --moe-backend (a layer kind the backend cannot run), or one
    no serve reads a tuned file in (``_reading_serves``: no MoE layer kind runs vLLM's Triton kernel)."""
    if plan.moe_backend == "auto" and not mirrored(plan.vllm_version):
        return None  # a release whose per-kind choice the mirror does not hold: every layout stays planned
    serves = _reading_serves(plan, layout)
    flag = f"--moe-backend {plan.moe_backend}"
    runs = serves[0].runs
    errors = [f"{KIND[act]}: {r.error}" for act, r in runs.items() if r.error]
    if errors and plan.moe_backend != "auto":
        return Refusal(layout, f"vLLM will not start with {flag}: {errors[0]}", of_backend=True)
    if errors or any(s.kinds for s in serves):
        return None
    ran = ", ".join(f"{KIND[act]} {r.backend}" for act, r in runs.items())
    if plan.moe_backend == "auto":
        return Refusal(layout, f"with {flag} vLLM {plan.vllm_version} runs {ran} on {plan.gpu.key}, and no MoE layer "
                               "kind runs the Triton kernel: no tuned file is read (--moe-backend triton plans the "
                               "layout for a serve that passes it)", by_vllm=False, of_backend=True)
    return Refusal(layout, f"with {flag} no MoE layer kind runs the Triton kernel ({ran}): no tuned file is "
                           "read, so there is nothing to tune", by_vllm=False, of_backend=True)


@dataclass(frozen=True)
class Serve:
    """A serve of a layout: what it adds to the plan's --moe-backend, what each MoE layer kind then runs, and the
    kinds whose fused MoE reads the layout's tuned file."""
    flags: str  # "" for the plan's --moe-backend alone, e.g. "VLLM_USE_DEEP_GEMM_E8M0=0" or "--moe-backend triton"
    runs: dict[str, LayerRuntime]
    kinds: tuple[str, ...]
    why: str = ""  # how this serve comes to read the file, for the plan's note


def _reading_serves(plan: Plan, layout: Layout) -> list[Serve]:
    """The serves of ``layout`` that may read its tuned file, the plan's --moe-backend alone first; then with
    DeepGEMM's E8M0 off, when its Triton fallback reads the file (the advised TP4/TP8 serve on an H200; under auto
    only on sm90: DeepGEMM on sm100 takes UE8M0 scales only); under auto, the serve the backend advice measured
    for this GPU and layout (``backend_advice``)."""
    shape = shape_for(plan.model, layout, plan.dtype, plan.vllm_version, plan.moe_backend)
    configs = [("", plan.moe_backend, {}, "")]
    if plan.moe_backend != "auto" or plan.gpu.arch == "sm90":
        configs.append(("VLLM_USE_DEEP_GEMM_E8M0=0", plan.moe_backend, {"VLLM_USE_DEEP_GEMM_E8M0": "0"},
                        "through DeepGEMM's Triton fallback"))
    advice = _advice(plan, layout) if plan.moe_backend == "auto" else None
    if advice:
        configs.append((advice.flags(), advice.moe_backend, advice.env, f"the backend advice for {layout.name}"))
    serves = []
    for flags, backend, env, why in configs:
        runs = {act: layer_runtime(plan.serve_facts(layout, backend, env), act) for act in ACTIVATIONS}
        # a backend that pads the FP8 shard the plan's refines (the advised deep_gemm) reads another shape's file
        same = backend == plan.moe_backend or shape_for(plan.model, layout, plan.dtype, plan.vllm_version,
                                                        backend) == shape
        kinds = tuple(act for act, r in runs.items() if r.reads_tuned_file) if same else ()
        serves.append(Serve(flags, runs, kinds, why))
    return serves


def _advice(plan: Plan, layout: Layout):
    """The backend advice measured for this GPU and layout under the plan's release, where it names a --moe-backend
    (``backend_advice``); else None."""
    from .vllm.backend_advice import Advice, advice_for

    advice = advice_for(plan.gpu.key, layout, plan.dtype, plan.vllm_version)
    return advice if isinstance(advice, Advice) and advice.measured and advice.moe_backend != "auto" else None


def _kinds(acts) -> str:
    return "both MoE layer kinds" if len(acts) == len(ACTIVATIONS) else " and ".join(KIND[a] for a in acts)


def read_note(plan: Plan, layouts: list[Layout]) -> str | None:
    """Under --moe-backend auto, where a default serve of the shape's layouts does not read its file on every MoE
    layer kind: which kinds do, and which other serves read it. None where the default serve reads it on every
    kind (or the mirror does not hold the release's choice)."""
    if plan.moe_backend != "auto" or not mirrored(plan.vllm_version):
        return None
    per = {lay: _reading_serves(plan, lay) for lay in layouts}
    short = {lay: serves for lay, serves in per.items() if len(serves[0].kinds) < len(ACTIVATIONS)}
    if not short:
        return None
    auto = next(iter(short.values()))[0]
    ran = ", ".join(f"{KIND[act]}: {r.backend}" for act, r in auto.runs.items() if act not in auto.kinds)
    where = ", ".join(lay.name for lay in short)
    reads = f"only the {_kinds(auto.kinds)} read it" if auto.kinds else "no MoE layer reads it"
    others = list(dict.fromkeys(f"{s.flags} ({_kinds(s.kinds)}, {s.why})" for serves in short.values()
                                for s in serves[1:] if set(s.kinds) - set(serves[0].kinds)))
    return (f"with --moe-backend auto {reads} on {where} ({ran})"
            + (f"; read with {'; or '.join(others)}" if others else ""))


def advised_elsewhere(plan: Plan) -> list[str]:
    """Under --moe-backend auto: the planned layouts whose measured backend advice serves them with a backend that
    reads another shape's file (the padded FP8 TP4/TP8 shard under deep_gemm on an H200), with the tune that adds it."""
    if plan.moe_backend != "auto" or not mirrored(plan.vllm_version):
        return []
    out = []
    for shape, layouts in plan.shapes.items():
        for lay in layouts:
            advice = _advice(plan, lay)
            if advice is None:
                continue
            other = shape_for(plan.model, lay, plan.dtype, plan.vllm_version, advice.moe_backend)
            runs = [layer_runtime(plan.serve_facts(lay, advice.moe_backend, advice.env), act) for act in ACTIVATIONS]
            if isinstance(other, MoeShape) and other != shape and any(r.reads_tuned_file for r in runs):
                out.append(f"{lay.name}: the backend advice serves it with {advice.flags()}, which reads "
                           f"{plan.file_name(other)}; tune-moe --gpu {plan.gpu.key} --dtype {plan.dtype} --layouts "
                           f"{lay.name} --moe-backend {advice.moe_backend} --vllm-version {plan.vllm_version} tunes it")
    return out


def format_plan(plan: Plan) -> str:
    lines = [f"Plan: {plan.model.name} {plan.dtype} on {plan.num_gpus}x{plan.gpu.key} "
             f"({plan.gpu.device_name}, {plan.gpu.arch}), vLLM {plan.vllm_version} launch rules"
             f"{launch_read_in(plan.vllm_version)}", "", "Layouts:"]
    lines += [f"  {f.why(plan.gpu)}" for f in plan.fits]
    said: dict[str, list[str]] = {}  # one line per reason: a backend's refusal is often every layout's
    for r in plan.refusals:
        said.setdefault((f"refused by vLLM {plan.vllm_version}: " if r.by_vllm else "not planned: ") + r.reason,
                        []).append(r.layout.name)
    lines += [f"  {', '.join(names)}: {reason}" for reason, names in said.items()]
    if plan.backend_refused:
        return "\n".join(lines + ["", f"No layout reads a Triton tuned file with --moe-backend {plan.moe_backend}."])
    if not plan.shapes:
        lines += ["", f"No layout fits {plan.model.name} {plan.dtype} on {plan.num_gpus}x{plan.gpu.key}."]
        lines += [f"  would fit: {alt}" for alt in plan.alternatives] or ["  nothing in the catalogue would"]
        return "\n".join(lines)
    lines += ["", f"Shapes ({len(plan.shapes)}), each a file vLLM loads:"]
    for shape, layouts in plan.shapes.items():
        ep = f", routed over {shape.global_experts} global experts" if shape.expert_parallel else ""
        if shape.expert_parallel and not launch_rules(plan.vllm_version).drop_remote_slots:
            ep += f" (vLLM {plan.vllm_version} aligns the remote experts' slots too; their blocks write zeros)"
        block = plan.model.weight_block_size
        if shape.block_shape and block and tuple(shape.block_shape) != tuple(block):
            ep += (f"; vLLM {plan.vllm_version} refines the checkpoint's {list(block)} block for this shard "
                   "(--moe-backend deep_gemm pads the shard instead)")
        elif layouts and not shape.expert_parallel and shape.n * layouts[0].gpus != plan.model.moe_intermediate_size:
            ep += f"; vLLM pads the {plan.model.moe_intermediate_size // layouts[0].gpus}-wide shard to whole FP8 blocks"
            if plan.moe_backend == "deep_gemm" and shape.n < DEEPGEMM_MIN_N:  # TritonOrDeepGemmExperts: DeepGEMM
                # at every M unless E8M0 is off
                ep += (" (with deep_gemm, vLLM runs DeepGEMM at every M, E8M0 being on by default; Triton runs this "
                       "file only with VLLM_USE_DEEP_GEMM_E8M0=0)")
        lines.append(f"  {plan.file_name(shape)}")
        lines.append(f"      {shape.label}, K={shape.k}, top-{shape.top_k}{ep}; layouts {', '.join(l.name for l in layouts)}")
        note = read_note(plan, layouts)
        if note:
            lines.append(f"      {note}")
    if launch_rules(plan.vllm_version).tma_weights and plan.gpu.arch in ("sm90", "sm100") and \
            any(s.block_shape for s in plan.shapes):
        lines += ["", f"Weights: vLLM {plan.vllm_version} reads block-FP8 weights through a TMA descriptor on "
                      f"{plan.gpu.arch} wherever the N and K tiles divide them, and the search times that launch"]
    advised = advised_elsewhere(plan)
    if advised:
        lines += ["", "Advised serves that read a file this plan does not tune:"] + [f"  {a}" for a in advised]
    downs = down_files(plan)
    if downs:
        lines += ["", f"Down files: vLLM {plan.vllm_version} also reads {', '.join(downs)} for the SiLU layers (an "
                      "optional sorted-activation path of the down projection); tune-moe writes none: on the H200 that "
                      "path measured 0.94-0.98x of the plain one for E=288 N=640 (benchmarks/README §2z)"]
    lines += ["", "Batch sizes (M): " + " ".join(map(str, plan.batch_sizes)),
              f"Jobs: {len(plan.shapes)} shapes x {len(plan.batch_sizes)} batch sizes = {len(plan.jobs)} (shape, M) jobs"]
    return "\n".join(lines)


def down_files(plan: Plan) -> list[str]:
    """The `_down.json` files vLLM 0.34 reads beside the plan's files (``vllm_rules.reads_down_file``), each with the
    layout whose SiLU layers read it."""
    out = []
    for shape, layouts in plan.shapes.items():
        for lay in layouts:
            r = layer_runtime(plan.serve_facts(lay, plan.moe_backend), "silu")
            if (r.n, tuple(r.block or ())) == (shape.n, tuple(shape.block_shape or ())) and reads_down_file(
                    r, "silu", vllm_version=plan.vllm_version, arch=plan.gpu.arch, expert_parallel=lay.ep,
                    dtype=plan.dtype):
                out.append(f"{down_file_name(plan.file_name(shape))} ({lay.name})")
    return out
