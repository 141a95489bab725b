"""The tuning plan: layouts that fit, the shapes vLLM will ask for, and the (shape, M) jobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import fit as fitting
from .gpus import GpuSpec
from .jobs import Job
from .models import ModelGeometry
from .shapes import Layout, MoeShape, Refusal, shape_for
from .vllm_rules import (ACTIVATIONS, DEEPGEMM_MIN_N, KIND, ServeFacts, down_file_name, launch_read_in, launch_rules,
                         layer_runtime, reads_down_file)


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
        refused = _backend_refusal(plan, layout)
        if refused:
            plan.refusals.append(refused)
            continue
        verdict = fitting.fit(model, layout, dtype, gpu)
        plan.fits.append(verdict)
        if verdict.fits or not check_fit:
            plan.shapes.setdefault(shape, []).append(layout)
    if not plan.shapes and not plan.backend_refused:
        plan.alternatives = fitting.alternatives(model, dtype, gpu, num_gpus, vllm_version, moe_backend)
    return plan


def _backend_refusal(plan: Plan, layout: Layout) -> Refusal | None:
    """Under an explicit --moe-backend: a layout vLLM will not start (a layer kind the backend cannot run), or one
    where no MoE layer kind runs vLLM's Triton kernel, so no tuned file is read (vllm_rules.layer_runtime)."""
    if plan.moe_backend == "auto":
        return None
    runs = {act: layer_runtime(plan.serve_facts(layout, plan.moe_backend), act) for act in ACTIVATIONS}
    flag = f"--moe-backend {plan.moe_backend}"
    for act, r in runs.items():
        if r.error:
            return Refusal(layout, f"vLLM will not start with {flag}: {KIND[act]}: {r.error}", of_backend=True)
    e8m0_off = [layer_runtime(plan.serve_facts(layout, plan.moe_backend, {"VLLM_USE_DEEP_GEMM_E8M0": "0"}), act)
                for act in ACTIVATIONS]  # DeepGEMM's Triton fallback reads the file then (the advised TP4/TP8 serve)
    if not any(r.reads_tuned_file for r in [*runs.values(), *e8m0_off]):
        ran = ", ".join(f"{KIND[act]} {r.backend}" for act, r in runs.items())
        return Refusal(layout, f"with {flag} no MoE layer kind runs the Triton kernel ({ran}): no tuned file is "
                               "read, so there is nothing to tune", by_vllm=False, of_backend=True)
    return None


def format_plan(plan: Plan) -> str:
    lines = [f"Plan: {plan.model.name} {plan.dtype} on {plan.num_gpus}x{plan.gpu.key} "
             f"({plan.gpu.device_name}, {plan.gpu.arch}), vLLM {plan.vllm_version} launch rules"
             f"{launch_read_in(plan.vllm_version)}", "", "Layouts:"]
    lines += [f"  {f.why(plan.gpu)}" for f in plan.fits]
    lines += [f"  {r.layout.name}: " + (f"refused by vLLM {plan.vllm_version}: " if r.by_vllm else "not planned: ")
              + r.reason for r in plan.refusals]
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
    if launch_rules(plan.vllm_version).tma_weights and plan.gpu.arch in ("sm90", "sm100") and \
            any(s.block_shape for s in plan.shapes):
        lines += ["", f"Weights: vLLM {plan.vllm_version} reads block-FP8 weights through a TMA descriptor on "
                      f"{plan.gpu.arch} wherever the N and K tiles divide them, and the search times that launch"]
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
