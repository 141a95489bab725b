"""What validate-serve checks before it starts a server: the layout fits in memory, ``tune-moe preflight`` on
the exact serve command and environment (what vLLM runs per MoE layer kind, which tuned files it reads), and,
for a reduced one-GPU serve, that it reads the same tuned files as the layout it emulates."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import gpus
from . import preflight as pf
from .errors import UsageError
from .fit import alternatives, fit
from .models import BUILTIN, ModelGeometry, load_model
from .recipe import CHECKPOINTS, ServeSpec
from .reduced import Reduced
from .shapes import Refusal, parse_version, shape_for
from .vllm_log import BATCHED, Predicted
from .vllm_rules import ACTIVATIONS, MIRRORED, ServeFacts, down_file_name, layer_runtime, looks_up_down_file

@dataclass(frozen=True)
class Preflight:
    """``tune-moe preflight``'s answer for the exact serve command and environment."""

    report: dict  # preflight.check's
    node: pf.Node
    stand_in: str | None = None  # the checkpoint whose geometry was read for a model without a local config.json

    @property
    def layers(self) -> list[pf.Layer]:
        return self.report["layers"]

    @property
    def files(self) -> list[str]:
        """The tuned files the serve reads as tuned: vLLM must log exactly these."""
        return list(dict.fromkeys(layer.file for layer in self.layers if layer.file))

    def predicted(self) -> list[Predicted]:
        down = {layer.activation: down_file_name(layer.file) for layer in self.layers if layer.file
                and looks_up_down_file(layer.runtime, vllm_version=self.node.vllm_version, dtype=self.report["dtype"])}
        return [Predicted(pf.KIND[layer.activation], layer.runtime.backend, layer.file, down.get(layer.activation))
                for layer in self.layers]

    def as_dict(self) -> dict:
        r = self.report
        layers = [{"kind": pf.KIND[layer.activation], "activation": layer.activation, **asdict(layer.runtime),
                   "reads_tuned_file": layer.runtime.reads_tuned_file, "file": layer.file,
                   "found": str(layer.found) if layer.found else None, "drift": layer.drift} for layer in self.layers]
        return {"answered_by": r["answered_by"], "model": r["command"].model, "stand_in": self.stand_in,
                "dtype": r["dtype"], "plan": asdict(r["plan"]), "tokens": r["tokens"], "layers": layers,
                "problems": r["problems"], "notes": r["notes"], "advice": r.get("advice"), "fix": r["fix"],
                "text": self.report_text()}

    def report_text(self) -> str:
        """Preflight's per-layer-kind table, as ``tune-moe preflight`` prints it."""
        return pf.render(self.report, self.node)


def kind_phrase(layer: pf.Layer) -> str:
    """One layer kind in a few words: its backend and what it reads."""
    r, kind = layer.runtime, pf.KIND[layer.activation]
    if r.error:
        return f"{kind}: vLLM will not start ({r.error})"
    if layer.file:
        how = "runs DeepGEMM's Triton fallback with" if r.backend == "DEEPGEMM" else "reads"
        return f"{kind}: {r.backend}, {how} the tuned file {layer.file}"
    if r.backend == BATCHED:
        return (f"{kind}: {r.backend}, looks the tuned file up but runs the batched kernel (M = tokens per "
                "expert), so the tuned configs do not run as tuned")
    why = " (E8M0 is on: DeepGEMM at every M)" if r.backend == "DEEPGEMM" else ""
    return f"{kind}: {r.backend}, reads no Triton tuned file{why}"


def triton_alternative(pre: Preflight) -> str | None:
    """What ``--moe-backend triton`` would change, by the serve's vLLM release's rules (the mirror), when it runs
    every kind on TritonExperts."""
    cmd = pre.report["command"]
    if cmd.moe_backend == "triton":
        return None
    model, dtype = pf.checkpoint(cmd.model, cmd.quantization, cmd.hf_overrides)
    facts = ServeFacts(arch=pre.node.gpu.arch, dtype=dtype, tp=cmd.tp, dp=cmd.dp, ep=cmd.ep, moe_backend="triton",
                       env=tuple(sorted((k, v) for k, v in pre.node.env.items() if k.startswith("VLLM_"))),
                       num_experts=model.num_experts, intermediate=model.moe_intermediate_size,
                       hidden=model.hidden_size, top_k=model.top_k, vllm=pre.node.vllm_version)
    if all(layer_runtime(facts, act).reads_tuned_file for act in ACTIVATIONS):
        advice = pre.report.get("advice")
        series = ".".join(map(str, parse_version(pre.node.vllm_version)))
        return (f"with --moe-backend triton vLLM {series} runs every MoE layer kind on TRITON, which "
                "reads the tuned file"
                + (f" ({advice})" if advice else ""))
    return None


def kind_notes(pre: Preflight) -> list[str]:
    """Per layer kind, when some kind will not run the tuned configs; and the backend advice for the layout."""
    advice = [pre.report["advice"]] if pre.report.get("advice") else []
    if all(layer.file for layer in pre.layers):
        return advice
    text = "; ".join(kind_phrase(layer) for layer in pre.layers)
    if any(layer.file for layer in pre.layers):
        return [f"{text}: the tuned configs serve only the layer kinds that read them", *advice]
    alt = triton_alternative(pre)
    return [f"{text}: no MoE layer kind runs the tuned Triton kernel, so the check will fail" + (f"; {alt}" if alt else "")]


def geometry_name(model: str, dtype: str) -> str:
    """What to read the MoE geometry from: the model's own config.json when it is local, else the dtype's
    checkpoint (a Hugging Face id of another name is served as given, its geometry taken as Step-3.5-Flash's)."""
    return model if model in BUILTIN or (Path(model) / "config.json").is_file() else CHECKPOINTS[dtype]


def run_preflight(spec: ServeSpec, gpu: gpus.GpuSpec, version: str, geometry: Path | None = None) -> Preflight:
    """Preflight on ``spec``'s command with the serve's environment; refuses (one line) a serve vLLM will not start.
    ``geometry``: the config.json to read the MoE geometry from (a reduced serve's, with its overrides applied)."""
    argv, name = spec.argv(), str(geometry) if geometry else geometry_name(spec.model, spec.dtype)
    argv[2] = name
    node = pf.Node(gpu=gpu, env=spec.environ(dict(os.environ)), config_dir=spec.tuned_folder, vllm_version=version)
    report = pf.check(argv, node)
    if report["dtype"] != spec.dtype:
        raise UsageError(f"--dtype {spec.dtype}: {spec.model} is a {report['dtype']} checkpoint; "
                         f"pass --dtype {report['dtype']}")
    broken = [layer for layer in report["layers"] if layer.runtime.error]
    if broken:
        why = "; ".join(f"{pf.KIND[layer.activation]}: {layer.runtime.error}" for layer in broken)
        raise UsageError(f"preflight: vLLM will not start this serve ({why}); nothing was started; change "
                         "--moe-backend or the layout (tune-moe preflight shows what each MoE layer kind runs)")
    return Preflight(report, node, name if name != spec.model and not geometry else None)


def check_fit(spec: ServeSpec, gpu: gpus.GpuSpec, reduced: Reduced | None = None) -> None:
    """Refuse (one line) a layout whose weights leave too little memory on each GPU."""
    if reduced:
        verdict = fit(reduced.geometry(), spec.layout, spec.dtype, gpu)
        if not verdict.fits:
            raise UsageError(f"--reduced {reduced.layout.name}: {reduced.layers} layers do not fit on one {gpu.key} "
                             f"({verdict.why(gpu)}); nothing was started; pass fewer --reduced-layers")
        return
    model = load_model(geometry_name(spec.model, spec.dtype))
    verdict = fit(model, spec.layout, spec.dtype, gpu)
    if not verdict.fits:
        others = alternatives(model, spec.dtype, gpu, spec.layout.gpus)
        raise UsageError(f"layout {spec.layout.name} does not fit in memory: {verdict.why(gpu)}; nothing was started"
                         + (f"; try {' or '.join(others)}" if others else ""))


def expected_files(spec: ServeSpec, gpu: gpus.GpuSpec, version: str, model: ModelGeometry) -> list[str]:
    """The tuned files the serve's MoE layer kinds read (--print-command, which starts nothing): the mirror's
    rules for the releases it mirrors, 0.33 and 0.34 (a run asks preflight, which asks vLLM itself); other
    versions by the plan's shape rule."""
    layout = spec.layout
    shape = shape_for(model, layout, spec.dtype, version, spec.moe_backend)
    if isinstance(shape, Refusal):
        raise UsageError(f"layout {layout.name}: {shape.reason}")
    if parse_version(version) not in {parse_version(v) for v in MIRRORED}:
        return [shape.file_name(gpu.device_name)]
    env = tuple(sorted((k, v) for k, v in spec.environ(dict(os.environ)).items() if k.startswith("VLLM_")))
    facts = ServeFacts(arch=gpu.arch, dtype=spec.dtype, tp=layout.tp, dp=layout.dp, ep=layout.ep,
                       moe_backend=spec.moe_backend, env=env, num_experts=model.num_experts,
                       intermediate=model.moe_intermediate_size, hidden=model.hidden_size, top_k=model.top_k,
                       vllm=version)
    names = []
    for act in ACTIVATIONS:
        r = layer_runtime(facts, act)
        if r.error:
            raise UsageError(f"{pf.KIND[act]}: vLLM {version} will not start this serve ({r.error}); change "
                             "--moe-backend or the layout")
        if r.reads_tuned_file:
            names.append(pf.layer_shape(model, layout, r, spec.dtype).file_name(gpu.device_name))
    return list(dict.fromkeys(names))


def check_emulation(served: list[str], emulated: list[str], reduced: Reduced, moe_backend: str) -> None:
    """A reduced serve must read exactly the tuned files the layout it emulates reads; else it would prove
    nothing about that layout (one line, nothing started)."""
    if served == emulated:
        return
    layout = reduced.layout.name
    if not emulated:
        fix = (f"{layout} reads no Triton tuned file with --moe-backend {moe_backend} (tune-moe preflight shows what "
               "each layer kind runs); emulate a Triton serve of it with --moe-backend triton")
    else:
        fix = "pass the --moe-backend the layout is served with (tune-moe preflight shows what each layer kind runs)"
    raise UsageError(f"--reduced: the one-GPU serve reads {_names(served)} but {layout} reads {_names(emulated)}; "
                     f"nothing was started; {fix}")


def _names(files: list[str]) -> str:
    return ", ".join(files) if files else "no Triton tuned file"
