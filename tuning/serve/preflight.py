"""``tune-moe preflight -- vllm serve ...``: what a serve will run, per MoE layer kind, before it starts.

For the serve command (and the ``VLLM_*`` variables of this shell or written before it) it says, for
the SiLU and the clamped-SwiGLU layers of Step-3.5-Flash: the backend the serve's vLLM runs; whether that reads
a Triton tuned file, which one, and whether it is found (``VLLM_TUNED_CONFIG_FOLDER`` first, then the
config folder); the batch sizes the server pushes through the fused MoE (CUDA-graph sizes, the prefill
chunk, times the DP ranks under expert parallelism) and the tuned key vLLM picks for each; and drift
between a file's provenance and this node (GPU, the Triton the target vLLM runs, vLLM, the kernel).
Exit 0 when everything the serve will use is tuned and current; otherwise 1, with the ``tune-moe``
command (for the serve's release) that fills the gap where a tune does. Needs no GPU. vLLM's own parser and
selection code answer where vLLM is importable and is the serve's release (``vllm_probe``); elsewhere the mirrors
in ``serve_command``, ``batch_plan`` and ``vllm_rules`` do, for the release the serve runs (0.33's or 0.34's rules).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..vllm import backend_advice
from .. import gpus, provenance
from ..vllm.batch_plan import BatchPlan, batch_plan
from ..configs import CONFIGS_ROOT, TUNED_VAR, default_folder, read_config_file
from ..errors import UsageError
from ..files import atomic_write_json, output_file
from ..fit import alternatives, fit
from ..vllm.kernel import installed_fused_moe, installed_vllm_version
from ..models import ModelGeometry, checkpoint, mtp_layers
from ..vllm.serve_command import MEMORY_GB, ServeCommand, parse, serve_release
from ..shapes import BATCH_SIZES, DEFAULT_VLLM_VERSION, Layout, MoeShape, parse_version
from ..vllm.triton_pins import mismatch, target_triton
from ..vllm.rules import (ACTIVATIONS, KIND, MIRRORED, LayerRuntime, ServeFacts, kernel_launch_changes, launch_changes,
                         layer_runtime, down_file_name, mirrored, nearest_key, reads_down_file, flag_fix,
                         unblocked_fix, unreadable_flags)

ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
MIRROR = "tune-moe's mirror of vLLM {release}'s rules (its parser, batch sizes and backend per layer)"
FAR = 2.0  # a batch size this many times beyond the nearest tuned key is reported as untuned
RESHAPING = {"moe_num_experts", "moe_intermediate_size", "moe_top_k", "hidden_size"}  # --hf-overrides keys


@dataclass(frozen=True, kw_only=True)
class Node:
    """Where the serve will run and what it reads."""

    gpu: gpus.GpuSpec
    env: dict[str, str]
    config_dir: Path
    vllm_version: str
    config_dir_given: bool = False  # --config-dir: the folder the serve is meant to read


@dataclass(kw_only=True)
class Layer:
    activation: str
    runtime: LayerRuntime
    file: str | None = None  # the tuned file it reads, when it reads one
    found: Path | None = None
    keys: tuple[int, ...] = ()
    drift: list[str] = field(default_factory=list)
    down_file: str | None = None  # the `_down.json` beside ``file`` that vLLM 0.34 also reads (``reads_down_file``)
    down_found: Path | None = None


def split_command(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """``VAR=value ... vllm serve ...``: the leading assignments, and the command."""
    env, i = {}, 0
    while i < len(words) and (m := ASSIGN.match(words[i])):
        env[m.group(1)] = m.group(2)
        i += 1
    return env, words[i:]


def _understand(argv: list[str], arch: str, memory_gb: float, env: dict[str, str], vllm_version: str):
    """The serve command, its batch plan, the checkpoint and vLLM's backend per activation: from one vLLM
    subprocess where the installed vLLM is the release the serve runs, else from the mirrors."""
    installed = installed_vllm_version()
    why = " (vLLM is not importable here)" if installed is None else \
        f" (the installed vLLM is {installed}, the serve runs {vllm_version})"
    if installed is not None and parse_version(installed) == parse_version(vllm_version):
        try:
            from ..vllm.probe import preflight

            answer = preflight(list(_after_serve(argv)), arch, memory_gb, env)
        except RuntimeError as exc:
            answer, why = None, f" (vLLM could not be asked: {exc})"  # a vLLM whose internals moved
        if answer is not None:
            if "error" in answer:
                raise UsageError(answer["error"] if answer["error"].startswith("preflight:") else
                                 f"preflight: vLLM refuses the serve command: {answer['error']}")
            c, p = answer["command"], answer["plan"]
            layers = {act: LayerRuntime(**{**d, "block": d["block"] and tuple(d["block"])})
                      for act, d in zip(ACTIVATIONS, answer["layers"])}
            plan = BatchPlan(max_num_seqs=p["max_num_seqs"], max_num_batched_tokens=p["max_num_batched_tokens"],
                             capture_sizes=tuple(p["capture_sizes"]))
            model, _ = checkpoint(c["model"], c["quantization"], c["hf_overrides"])
            return ServeCommand(**c, argv=tuple(argv)), plan, model, answer["dtype"], layers, "vLLM's own code"
    release = serve_release(vllm_version)
    cmd = parse(argv, release)
    model, dtype = checkpoint(cmd.model, cmd.quantization, cmd.hf_overrides)
    facts = ServeFacts(arch=arch, dtype=dtype, tp=cmd.tp, dp=cmd.dp, ep=cmd.ep, moe_backend=cmd.moe_backend,
                       env=tuple(sorted(env.items())), num_experts=model.num_experts,
                       intermediate=model.moe_intermediate_size, hidden=model.hidden_size, top_k=model.top_k,
                       vllm=vllm_version)
    plan = batch_plan(cmd, arch, memory_gb, release, mtp_layers(cmd.model))
    layers = {act: layer_runtime(facts, act) for act in ACTIVATIONS}
    if parse_version(vllm_version) < parse_version(MIRRORED[0]):
        why += f"; of vLLM {vllm_version}'s own rules only its FP8 shard rule is mirrored"
    elif not mirrored(vllm_version):
        why += f"; vLLM {vllm_version}'s own rules are not mirrored ({release}'s stand in)"
    return cmd, plan, model, dtype, layers, MIRROR.format(release=release) + why


def _after_serve(argv: list[str]) -> list[str]:
    if argv[:2] == ["vllm", "serve"] or (len(argv) > 1 and argv[0].endswith("/vllm") and argv[1] == "serve"):
        return argv[2:]
    return argv[1:] if argv[:1] == ["serve"] else argv


def _check_form(argv: list[str]) -> None:
    """The forms of a serve command preflight does not read, each refused with the form it does read."""
    if " " in argv[0] and argv[0].split()[0] in ("vllm", "serve"):
        raise UsageError(f"preflight: the serve command came as one word ({argv[0][:40]!r}...); pass its words "
                         "apart: drop the quotes around it")
    if "vllm.entrypoints.openai.api_server" in argv:
        raise UsageError("preflight: reads the vllm serve form; write the api_server command as vllm serve MODEL "
                         "[options] (its --model value first, the other options as they are)")
    words = _after_serve(argv)
    if not words or (words[0].startswith("-") and "--model" not in words and
                     not any(w.startswith("--model=") for w in words)):
        raise UsageError("preflight: the serve command names no model (vLLM would serve its own default); write "
                         "vllm serve MODEL [options], e.g. vllm serve stepfun-ai/Step-3.5-Flash")


def engine_tokens(cmd: ServeCommand, plan: BatchPlan) -> list[int]:
    """M of the fused MoE per step: each captured size and the prefill chunk; all DP ranks' tokens under EP
    (vLLM's default all2all gathers every rank's tokens, padded to the same size, into each expert rank)."""
    ranks = cmd.dp if cmd.ep else 1
    return sorted({s * ranks for s in (*plan.capture_sizes, plan.max_num_batched_tokens)})


def layer_shape(model: ModelGeometry, cmd, r: LayerRuntime, dtype: str) -> MoeShape:
    """The fused-MoE shape (and so the file) one layer of ``cmd`` (anything with tp, dp, ep) runs with ``r``."""
    ep = cmd.tp * cmd.dp if cmd.ep else 1
    return MoeShape(model.num_experts // ep, model.num_experts, r.n, model.hidden_size, model.top_k, dtype,
                    tuple(r.block) if r.block else None)


def folder(node: Node) -> Path:
    """Where vLLM will look for tuned files: $VLLM_TUNED_CONFIG_FOLDER of the serve (vLLM's bundled configs
    hold no Step-3.5-Flash shape); without it, the config dir the serve should be given."""
    return Path(node.env[TUNED_VAR]) if node.env.get(TUNED_VAR) else node.config_dir


def _find(name: str, node: Node) -> Path | None:
    path = folder(node) / name
    return path if path.is_file() else None


def _drift(path: Path, node: Node) -> list[str]:
    prov = provenance.read(path)
    if prov is None:
        return [f"{path.name} has no tune-moe provenance, so its GPU and software are unknown"]
    out = []
    if prov.run.device_name != node.gpu.device_name:
        out.append(f"tuned on {prov.run.device_name}, this serve runs on {node.gpu.device_name}")
    pin = target_triton(node.vllm_version)
    drift = mismatch(pin, prov.run.triton) if pin else None
    if drift:
        out.append(drift.replace("this node compiles", "the file was tuned"))
    if empty := prov.empty_launch_note():
        out.append(empty)
    # a file tuned under a release that launches its shape alike is a tune for the serve's (kernels_configs/vllm-0.34
    # holds 0.33's bf16 files): only a launch that differs is drift
    changes = launch_changes(prov.run.vllm, node.vllm_version, prov.shape)
    if changes:
        out.append(f"tuned for vLLM {prov.run.vllm}, the serve runs vLLM {node.vllm_version}, which "
                   f"{' and '.join(changes)}: tune it for {node.vllm_version}")
    installed = installed_fused_moe()
    if installed and prov.run.kernel_sha256 and installed_vllm_version() == node.vllm_version:
        here = hashlib.sha256(installed.read_text().encode()).hexdigest()
        if kernel_launch_changes(prov.run.kernel_sha256, here, prov.shape) != []:  # [] also for two releases alike
            out.append("tuned on another fused_moe_kernel source than the installed vLLM's")
    return out


def check(argv: list[str], node: Node) -> dict:
    """Everything preflight reports, as data."""
    env = {k: v for k, v in node.env.items() if k.startswith("VLLM_")}
    memory = MEMORY_GB[node.gpu.arch].get(node.gpu.key, node.gpu.hbm_gb)
    cmd, plan, model, dtype, answers, answered_by = _understand(argv, node.gpu.arch, memory, env, node.vllm_version)
    tokens = engine_tokens(cmd, plan)
    layers = [_layer(act, answers[act], model, cmd, dtype, node) for act in ACTIVATIONS]
    room = _room(cmd, model, dtype, node)
    problems = ([room] if room else []) + _problems(layers, tokens, node)
    fixable = _needs_tune(layers, tokens) and not _misdirected(node) and not room  # the tune plans no such layout
    return {"command": cmd, "plan": plan, "dtype": dtype, "tokens": tokens, "layers": layers, "problems": problems,
            "notes": _notes(node), "answered_by": answered_by, "advice": advice_line(cmd, dtype, node),
            "fix": _fix(cmd, model, dtype, node, layers, tokens) if fixable else None}


def _room(cmd: ServeCommand, model: ModelGeometry, dtype: str, node: Node) -> str | None:
    """The serve's weights against each GPU's memory (``fit``, at vLLM's default --gpu-memory-utilization), as one
    problem where they leave too little for the KV cache, with the layouts that would fit."""
    lay = Layout(tp=cmd.tp, dp=cmd.dp, ep=cmd.ep)
    verdict = fit(model, lay, dtype, node.gpu)
    if verdict.fits:
        return None
    others = alternatives(model, dtype, node.gpu, lay.gpus, node.vllm_version, cmd.moe_backend)
    return (f"the weights do not fit: {verdict.why(node.gpu)}"
            + ("; vLLM cannot load them" if verdict.kv_gb < 0 else "; the KV cache would hold few requests")
            + (f"; try {' or '.join(others)}" if others else ""))


def _misdirected(node: Node) -> bool:
    """--config-dir names one folder and the serve's VLLM_TUNED_CONFIG_FOLDER another: the export is the fix."""
    var = node.env.get(TUNED_VAR)
    return node.config_dir_given and bool(var) and Path(var).resolve() != node.config_dir.resolve()


def advice_line(cmd: ServeCommand, dtype: str, node: Node) -> str | None:
    """What the backend advice of the serve's release (``data/backend_advice/``) says for this GPU and layout
    (measured or not, or measured under another release only), as one line."""
    found = backend_advice.advice_for(node.gpu.key, Layout(tp=cmd.tp, dp=cmd.dp, ep=cmd.ep), dtype, node.vllm_version)
    return found if isinstance(found, str) or found is None else found.line(folder(node))


def _layer(act: str, r: LayerRuntime, model, cmd, dtype, node: Node) -> Layer:
    layer = Layer(activation=act, runtime=r)
    if r.error or not r.reads_tuned_file:
        return layer
    layer.file = layer_shape(model, cmd, r, dtype).file_name(node.gpu.device_name)
    layer.found = _find(layer.file, node)
    if reads_down_file(r, act, vllm_version=node.vllm_version, arch=node.gpu.arch, expert_parallel=cmd.ep,
                       dtype=dtype):
        layer.down_file = down_file_name(layer.file)
        layer.down_found = _find(layer.down_file, node)
    if layer.found:
        layer.keys = tuple(sorted(read_config_file(layer.found)))
        layer.drift = _drift(layer.found, node)
    return layer


def far(m: int, keys) -> bool:
    key = nearest_key(keys, m)
    return m > FAR * key or m * FAR < key


def _problems(layers: list[Layer], tokens: list[int], node: Node) -> list[str]:
    out = []
    for layer in layers:
        kind = KIND[layer.activation]
        if layer.runtime.error:
            fix = flag_fix(layer.runtime.error, node.env) or unblocked_fix(layer.runtime.error, node.vllm_version)
            error = layer.runtime.error.removesuffix(".") if fix else layer.runtime.error
            out.append(f"{kind}: vLLM will not start: {error}{f'; {fix}' if fix else ''}")
        elif layer.file and not layer.found:
            out.append(f"{kind}: {layer.file} is not in {folder(node)}; vLLM will use its default config")
        elif layer.found:
            out += [f"{kind}: {d}" for d in layer.drift]
            beyond = [m for m in tokens if far(m, layer.keys)]
            if beyond:
                out.append(f"{kind}: batch sizes {', '.join(map(str, beyond))} are more than {FAR:g}x away from "
                           f"the nearest tuned key of {layer.file}")
    if any(layer.file for layer in layers) and not node.env.get(TUNED_VAR):
        out.append(f"{TUNED_VAR} is not set for the serve, so vLLM reads only its own configs (none for this "
                   f"model); export {TUNED_VAR}={node.config_dir.resolve()}")
    elif _misdirected(node):
        out.append(f"the serve's {TUNED_VAR}={node.env[TUNED_VAR]} is not --config-dir {node.config_dir}, and vLLM "
                   f"reads the variable (checked above); export {TUNED_VAR}={node.config_dir.resolve()}")
    invariant = node.env.get("VLLM_BATCH_INVARIANT")
    if invariant is not None and "VLLM_BATCH_INVARIANT" not in unreadable_flags(node.env) and int(invariant):
        out.append("VLLM_BATCH_INVARIANT=1: vLLM's get_moe_configs returns no tuned config at all (its default "
                   "config everywhere); unset it to use the tuned files")
    return out


def _needs_tune(layers: list[Layer], tokens: list[int]) -> bool:
    """Whether a tune fixes one of the problems: a tuned file missing or drifted, or batch sizes beyond its keys.
    An unset VLLM_TUNED_CONFIG_FOLDER, VLLM_BATCH_INVARIANT or a serve vLLM refuses is no tune's to fix."""
    return any(layer.file and (not layer.found or layer.drift or any(far(m, layer.keys) for m in tokens))
               for layer in layers)


def _notes(node: Node) -> list[str]:
    notes = []
    if node.env.get("VLLM_TRITON_USE_TD") not in (None, ""):
        notes.append("VLLM_TRITON_USE_TD is set: vLLM's tensor-descriptor path (unquantized, sm100 only) is not the "
                     "kernel the files were tuned with")
    if "VLLM_USE_FLASHINFER_MOE_FP8" in node.env:
        notes.append("VLLM_USE_FLASHINFER_MOE_FP8 is not a vLLM 0.33 variable (vLLM ignores it); the MoE backend is "
                     "chosen with --moe-backend")
    return notes


def _fix(cmd: ServeCommand, model: ModelGeometry, dtype: str, node: Node, layers: list[Layer],
         tokens: list[int]) -> str | None:
    """The tune-moe command that tunes what this serve would read, for the serve's vLLM release (the node that runs
    it may have another vLLM installed, or none)."""
    wanted = [layer for layer in layers if layer.file]
    if not wanted or set(cmd.hf_overrides) & RESHAPING:
        return None  # a serve whose --hf-overrides reshape the experts is no layout the tuner plans
    lay = Layout(tp=cmd.tp, dp=cmd.dp, ep=cmd.ep)
    words = ["tune-moe", "--gpu", node.gpu.key, "--dtype", dtype, "--layouts", lay.name, "--num-gpus",
             str(cmd.tp * cmd.dp)]
    backend = _tune_backend(cmd, model, dtype, node, lay, {layer.file for layer in wanted})
    words += ["--moe-backend", backend] if backend != "auto" else []
    keys = set(BATCH_SIZES)
    extra = sorted({m for m in tokens if far(m, sorted(keys))})
    words += ["--batch-sizes", ",".join(["vllm", *map(str, extra)])] if extra else []
    words += ["--out", str(Path(node.env[TUNED_VAR]))] if node.env.get(TUNED_VAR) else []
    return shlex.join(words + ["--vllm-version", node.vllm_version])


def _tune_backend(cmd: ServeCommand, model: ModelGeometry, dtype: str, node: Node, lay: Layout, files: set[str]) -> str:
    """The serve's --moe-backend; but where the serve reads its file only through its VLLM_* variables, which the
    tune's plan does not weigh (DeepGEMM's Triton fallback with E8M0 off on a B200, under auto), the backend whose
    plan holds the same file: triton."""
    from ..plan import make_plan

    def planned(backend: str) -> set[str]:
        p = make_plan(model, node.gpu, dtype, [lay], lay.gpus, (1,), vllm_version=node.vllm_version,
                      moe_backend=backend, check_fit=False)
        return {p.file_name(shape) for shape in p.shapes}

    if cmd.moe_backend == "auto" and not files <= planned("auto") and files <= planned("triton"):
        return "triton"
    return cmd.moe_backend


# ---- text -----------------------------------------------------------------------------------------

def _ranges(tokens: list[int], keys) -> list[str]:
    """M grouped by the tuned key vLLM picks for them."""
    groups: dict[int, list[int]] = {}
    for m in tokens:
        groups.setdefault(nearest_key(keys, m), []).append(m)
    out = []
    for key, ms in sorted(groups.items()):
        span = f"{ms[0]}" if len(ms) == 1 else f"{ms[0]}-{ms[-1]} ({len(ms)} sizes)"
        worst = max(ms, key=lambda m: max(m / key, key / m))
        flag = "  <- untuned" if far(worst, keys) else ""
        out.append(f"      M {span:<24} -> key {key:<6} (farthest {worst}: {max(worst / key, key / worst):.2f}x){flag}")
    return out


def _down_line(layer: Layer) -> str:
    """vLLM 0.34's `_down.json`: whether the serve has one, and what the sorted path it unlocks measured."""
    measured = "on the H200 for this model's E=288 N=640 shard (benchmarks/README §2z)"
    if layer.down_found:
        return (f"    down file {layer.down_found}: vLLM 0.34 takes the sorted-activation path of the down projection "
                f"where an entry says \"USE_TMA\": true, which measured 0.94-0.98x of the plain path {measured}")
    return (f"    down file {layer.down_file}: none, so vLLM 0.34 runs the plain path (tune-moe writes none: the sorted "
            f"path a down file unlocks measured 0.94-0.98x of it {measured})")


def render(report: dict, node: Node) -> str:
    cmd, plan = report["command"], report["plan"]
    lines = [f"Serve: {report['dtype']} {cmd.model} on {cmd.tp * cmd.dp}x{node.gpu.key} (tp {cmd.tp}, dp {cmd.dp}"
             f"{', expert parallel' if cmd.ep else ''}), --moe-backend {cmd.moe_backend}, vLLM {node.vllm_version}",
             f"  answered by {report['answered_by']}",
             f"  per engine: max_num_seqs {plan.max_num_seqs}, max_num_batched_tokens {plan.max_num_batched_tokens}, "
             f"{len(plan.capture_sizes)} CUDA-graph sizes"
             f"{' up to ' + str(plan.capture_sizes[-1]) if plan.capture_sizes else ' (eager)'}"
             + (f"; {cmd.num_speculative_tokens} speculative tokens per step" if cmd.num_speculative_tokens else ""),
             f"  fused-MoE M per step: {report['tokens'][0]} ... {report['tokens'][-1]}"
             + (f" (all {cmd.dp} DP ranks' tokens reach each expert rank)" if cmd.ep and cmd.dp > 1 else ""), ""]
    shown = set()
    for layer in report["layers"]:
        r = layer.runtime
        head = f"{KIND[layer.activation]}: "
        if r.error:
            lines.append(head + f"vLLM refuses to start: {r.error}")
            continue
        lines.append(head + f"{r.backend} ({r.experts}), N={r.n}{', block ' + str(list(r.block)) if r.block else ''}")
        if not layer.file:
            lines.append("    reads no Triton tuned file")
            continue
        where = layer.found or f"missing (looked in {folder(node)})"
        lines += [f"    tuned file {layer.file}", f"    {'found ' if layer.found else ''}{where}"]
        lines += [f"    drift: {d}" for d in layer.drift]
        lines += [_down_line(layer)] if layer.down_file else []
        if layer.file in shown:
            lines.append("    batch sizes: as above (the same file)")
            continue
        shown.add(layer.file)
        lines += _ranges(report["tokens"], layer.keys or BATCH_SIZES)
    lines += [""] + [f"note: {n}" for n in report["notes"]]
    lines += [f"advice: {report['advice']}"] if report.get("advice") else []
    if report["problems"]:
        lines += [f"problem: {p}" for p in report["problems"]]
        if report["fix"]:
            lines += ["", f"fix: {report['fix']}"]
    else:
        lines.append("ok: every MoE layer kind the serve runs on Triton has its tuned file, current for this node")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", help="GPU of the serving node: H200, H20, H20-3e or B200 (default: this node's)")
    p.add_argument("--config-dir", metavar="DIR", help=f"tuned folder the serve will be given (default: "
                   f"${TUNED_VAR} when set, else {CONFIGS_ROOT}/vllm-<major.minor>/<device_name>); the serve "
                   f"reads ${TUNED_VAR}, so a different one set for it is a problem")
    p.add_argument("--vllm-version", help=f"vLLM the serve runs (default: the installed one, else {DEFAULT_VLLM_VERSION})")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("serve", nargs=argparse.REMAINDER, help="-- [VAR=value ...] vllm serve MODEL [options]")


def run(args: argparse.Namespace) -> int:
    words = args.serve[1:] if args.serve[:1] == ["--"] else args.serve
    assigned, argv = split_command(words)
    if not argv:
        raise UsageError("preflight: pass the serve command after '--', e.g. "
                         "tune-moe preflight --gpu H200 -- vllm serve stepfun-ai/Step-3.5-Flash --tensor-parallel-size 4")
    _check_form(argv)
    from .args import pick_gpu

    gpu = pick_gpu(args.gpu)
    env = {**{k: v for k, v in os.environ.items() if k.startswith("VLLM_")}, **assigned}
    vllm_version = args.vllm_version or installed_vllm_version() or DEFAULT_VLLM_VERSION
    config_dir = Path(args.config_dir or default_folder(gpu.device_name, vllm_version))
    if args.config_dir and not config_dir.is_dir():
        what = "a file, not a folder" if config_dir.exists() else "no such folder"
        raise UsageError(f"--config-dir {config_dir}: {what}; pass the folder holding the tuned files")
    node = Node(gpu=gpu, env=env, config_dir=config_dir, vllm_version=vllm_version,
                config_dir_given=bool(args.config_dir))
    if args.json:
        output_file(args.json, "--json")  # refused before the report, not after it
    report = check(argv, node)
    print(render(report, node))
    if args.json:
        data = {**report, "command": asdict(report["command"]), "plan": asdict(report["plan"]),
                "layers": [{**asdict(l), "found": str(l.found) if l.found else None} for l in report["layers"]]}
        atomic_write_json(output_file(args.json, "--json"), data)
    return 1 if report["problems"] else 0

