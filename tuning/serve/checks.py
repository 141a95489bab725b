"""What validate-serve checks before it starts a server: --serve-args leave alone what the run sets or relies
on, --model is a checkpoint of --dtype, the layout fits in memory, the node has the GPUs, ``tune-moe preflight``
on the exact serve command and environment (what vLLM runs per MoE layer kind, which tuned files it reads), and,
for a reduced one-GPU serve, that it reads the same tuned files as the layout it emulates."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import gpus
from . import preflight as pf
from ..errors import UsageError
from ..fit import alternatives, fit
from ..models import BUILTIN, ModelGeometry, checkpoint, load_model
from .recipe import CHECKPOINTS, ServeSpec
from .reduced import Reduced
from ..vllm.serve_command import options
from ..shapes import Layout, Refusal, parse_version, shape_for
from ..vllm.log import BATCHED, Predicted
from ..vllm.rules import (ACTIVATIONS, ServeFacts, down_file_name, flag_fix, layer_runtime, looks_up_down_file,
                         mirrored)

# vLLM's destinations of the serve options validate-serve sets or relies on, by what sets them
LAYOUT_OPTIONS = ("tensor_parallel_size", "data_parallel_size", "enable_expert_parallel", "pipeline_parallel_size")
RECIPE_OPTIONS = ("reasoning_parser", "tool_call_parser", "enable_auto_tool_choice", "trust_remote_code")
MTP_OPTIONS = ("hf_overrides", "speculative_config", "spec_method", "spec_model", "spec_tokens")
REACH_OPTIONS = ("host", "uds")  # the health check and the benchmark reach the server on 127.0.0.1:--port
DROP = "drop it from --serve-args"
# values of those options that change nothing the run relies on: an address 127.0.0.1 reaches, bf16 activations
HARMLESS = {"host": ("0.0.0.0", "127.0.0.1", "localhost", "::"), "dtype": ("auto", "bfloat16")}


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
    model, dtype = checkpoint(cmd.model, cmd.quantization, cmd.hf_overrides)
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


def check_serve_args(words: list[str], args: argparse.Namespace, layout: Layout, release: str) -> dict[str, str]:
    """Refuse (one line) in --serve-args an option vLLM ``release``'s serve parser does not have (by the flag table
    written from it, which ``tune-moe preflight`` reads too), a word that is no option, or an option validate-serve
    sets or relies on: vLLM takes the last of two, so the serve would not be the one checked. Returns each option
    given, as vLLM's destination -> the option as written."""
    try:
        positional, values, names = options(words, release)
    except UsageError as exc:
        raise UsageError(f"--serve-args: {str(exc).removeprefix('preflight: ')}") from None
    if positional:
        raise UsageError(f"--serve-args: {positional[0]!r} is no option (vLLM would take it for a second model); "
                         "pass options only (the model is --model's)")
    decided = _decided(args, layout, values)
    for dest, name in names.items():
        if dest in decided and values.get(dest) not in HARMLESS.get(dest, ()):
            raise UsageError(f"--serve-args sets {name}, which {decided[dest]}")
    return names


def _decided(args: argparse.Namespace, layout: Layout, values: dict) -> dict[str, str]:
    """The serve options validate-serve sets or relies on: vLLM's destination -> what decides it; the fix."""
    reach = "validate-serve decides (its health check and benchmark reach the server on 127.0.0.1:--port)"
    out = {dest: f"--layout {layout.name} decides; {_layout_fix(args, layout, values)}" for dest in LAYOUT_OPTIONS}
    out |= {dest: f"validate-serve sets (the recipe's flags); {DROP}" for dest in RECIPE_OPTIONS}
    out |= {dest: f"{reach}; {DROP}" for dest in REACH_OPTIONS}
    out |= {
        "model": f"--reduced decides (it serves the folder it writes); {DROP}" if args.reduced else
        f"--model decides; use --model {values.get('model')}",
        "port": f"--port decides; use --port {values.get('port')}",
        "moe_backend": f"--moe-backend decides; use --moe-backend {values.get('moe_backend')}",
        "quantization": f"--dtype {args.dtype} decides (the checkpoint's own weights: bf16, or block FP8); {DROP}",
        "dtype": f"validate-serve's --dtype {args.dtype} decides (bf16 activations, either checkpoint); {DROP}",
    }
    if args.reduced:
        out |= {"hf_overrides": f"--reduced sets (the reduced model's layers and experts); {DROP}",
                "load_format": f"--reduced sets (dummy weights); {DROP}"}
    if args.mtp:
        out |= {dest: "--mtp sets (the recipe's MTP flags); drop it from --serve-args, or drop --mtp"
                for dest in MTP_OPTIONS}
    if not args.no_bench:
        out |= {"jit_monitor_verbose": f"validate-serve sets (each pass counts the compiles vLLM logs); {DROP}",
                "served_model_name": f"--model decides (the benchmark asks for the model by it); {DROP}"}
    if args.measure_moe_share:
        out["profiler_config"] = f"--measure-moe-share sets (the profiled pass's trace folder); {DROP}"
    return out


def _layout_fix(args: argparse.Namespace, layout: Layout, values: dict) -> str:
    """The --layout that the parallel options of --serve-args ask for, where validate-serve has one."""
    if args.reduced:
        return f"{DROP} (--reduced serves the layout's per-GPU shape on one GPU)"
    try:
        pp = int(values.get("pipeline_parallel_size", 1))
        wanted = Layout(tp=int(values.get("tensor_parallel_size", layout.tp)),
                        dp=int(values.get("data_parallel_size", layout.dp)),
                        ep=bool(values.get("enable_expert_parallel", layout.ep)))
    except ValueError:
        return DROP
    if pp != 1:
        return f"{DROP} (validate-serve's layouts have no pipeline parallelism)"
    if wanted == layout or min(wanted.tp, wanted.dp) < 1 or (wanted.ep and wanted.gpus == 1):
        return DROP
    return f"use --layout {wanted.name}"


def check_checkpoint(model: str, dtype: str) -> None:
    """Refuse (one line) a --model of the other dtype: a built-in name or a local folder (a Hugging Face id
    tune-moe does not know is read as the dtype's checkpoint, ``geometry_name``)."""
    if geometry_name(model, dtype) != model:
        return
    _, found = checkpoint(model, None)
    if found != dtype:
        raise UsageError(f"--dtype {dtype}: --model {model} is a checkpoint of {found} weights; pass --dtype {found}")


PRINT_ONLY = "add --print-command to print the commands only"  # what validate-serve offers without a GPU
STARTED = "nothing was started; "


def no_gpu(key: str | None) -> UsageError:
    """A serve on a node where nvidia-smi is missing, fails or finds no GPU (with --gpu ``key`` or without)."""
    instead = PRINT_ONLY if key else "add --print-command --gpu GPU to print the commands only"
    return UsageError(gpus.no_gpu_line(key, instead, STARTED))


def check_gpus(gpu: gpus.GpuSpec, layout: Layout, env: Mapping[str, str]) -> None:
    """Refuse (one line) to start the serve on a node without the GPUs it needs: none or others than --gpu
    (``gpus.check_node``), or fewer than the layout's among those CUDA_VISIBLE_DEVICES of the serve's environment
    leaves."""
    found = gpus.detect_gpus()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    usable = gpus.visible(found, visible) if found else found
    gpus.check_node(gpu, usable, instead=PRINT_ONLY, done=STARTED)
    if len(usable) < layout.gpus:
        seen = gpus.describe(found) + (f", {len(usable)} of them in CUDA_VISIBLE_DEVICES={visible}"
                                       if len(usable) < len(found) else "")
        raise UsageError(f"{layout.name} needs {layout.gpus} GPUs and this node has {seen}; nothing was started; "
                         f"run on a node with {layout.gpus}, or add --reduced to serve {layout.name}'s per-GPU "
                         "shape on one GPU")


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
    if not mirrored(version):
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
            fix = flag_fix(r.error, dict(env)) or "change --moe-backend or the layout"
            raise UsageError(f"{pf.KIND[act]}: vLLM {version} will not start this serve ({r.error}); {fix}")
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
