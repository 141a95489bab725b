"""What a serve will run, per MoE layer kind, and the serve lines a tune prints: from vLLM's rules.

``runtimes`` asks vLLM itself (``vllm_probe``, in a subprocess) when the installed vLLM is the release the
serve runs, and the mirror in ``vllm_rules`` otherwise, and says which answered. Step-3.5-Flash has two kinds of MoE
layer: SiLU, and the clamped SwiGLU ("swiglustep") of the layers with a ``swiglu_limits`` entry;
vLLM picks the backend for each kind on its own.
"""

from __future__ import annotations

from pathlib import Path

from .vllm.kernel import installed_vllm_version
from .plan import Plan
from .serve.recipe import ServeSpec, serve_line
from .shapes import Layout, parse_version
from .vllm.rules import ACTIVATIONS, KIND, LayerRuntime, ServeFacts, layer_runtime, mirrored

RECIPE_LAYOUTS = (Layout(tp=4), Layout(dp=4, ep=True))


def runtimes(serve: ServeFacts) -> tuple[dict[str, LayerRuntime], str]:
    """Per activation, what vLLM runs; and who answered (vLLM's own code, or the mirror)."""
    mirror = {act: layer_runtime(serve, act) for act in ACTIVATIONS}
    installed = installed_vllm_version()
    if installed is None:
        return mirror, "tune-moe's mirror of vLLM's rules (vLLM not importable)"
    if parse_version(installed) != parse_version(serve.vllm):
        return mirror, f"tune-moe's mirror of vLLM's rules (the installed vLLM is {installed}, not {serve.vllm})"
    try:
        from .vllm.probe import probe

        answers = probe([(serve, act) for act in ACTIVATIONS])
        return dict(zip(ACTIVATIONS, answers)), "vLLM's own selection code (vllm_probe)"
    except Exception as exc:  # another vLLM whose internals moved: the mirror still answers
        return mirror, f"vLLM could not be asked ({type(exc).__name__}); tune-moe's mirror of vLLM's rules"


def describe(act: str, r: LayerRuntime) -> str:
    if r.error:
        return f"{KIND[act]}: vLLM refuses to start ({r.error})"
    reads = "reads the tuned file" if r.reads_tuned_file else "does not read the tuned Triton file"
    return f"{KIND[act]}: {r.backend} ({r.experts}), {reads}"


def serve_lines(plan: Plan, out: Path) -> list[str]:
    """The serve command for each recipe layout the plan tuned, with the --moe-backend the tune was given, else
    as the backend advice (``backend_advice``, measured by ``compare-backends``) says to serve it, and what each
    MoE layer kind then runs. When the advised serve reads a tuned file of another shape than this plan's, the
    line says which and the tune that writes it."""
    from .vllm.backend_advice import Advice, advice_for

    lines = []
    layouts = dict.fromkeys(lay for ls in plan.shapes.values() for lay in ls if lay in RECIPE_LAYOUTS)
    for lay in layouts:
        found = advice_for(plan.gpu.key, lay, plan.dtype, plan.vllm_version)  # a str: measured under another release
        backend, env = (found.moe_backend, found.env) if isinstance(found, Advice) else ("auto", {})
        if plan.moe_backend != "auto" and plan.moe_backend != backend:  # tuned for the backend the user named
            backend, env = plan.moe_backend, {}
        spec = ServeSpec(model=plan.model.name, layout=lay, dtype=plan.dtype, tuned_folder=Path(out).resolve(),
                         moe_backend=backend, env=tuple(env.items()))
        answers, who = runtimes(plan.serve_facts(lay, backend, env))
        modeled = mirrored(plan.vllm_version) or who.startswith("vLLM's own")
        other = "" if modeled else f"; this tune targets vLLM {plan.vllm_version}, whose per-kind choice it does not model"
        notes = [describe(act, r) for act, r in answers.items()]
        notes += _other_shape(plan, lay, answers, backend)
        notes += [found.line(Path(out)) if isinstance(found, Advice) else found] if found else []
        lines.append(serve_line(spec) + "".join(f"\n    # {n}" for n in notes) + f"\n    # (answered by {who}{other})")
    return lines


def _other_shape(plan: Plan, lay: Layout, answers: dict[str, LayerRuntime], backend: str) -> list[str]:
    """The tuned files the advised serve reads that this plan did not write (e.g. the padded FP8 TP4 shard)."""
    tuned = {(s.n, s.block_shape) for s, ls in plan.shapes.items() if lay in ls}
    need = {(r.n, r.block) for r in answers.values() if r.reads_tuned_file and r.n}
    missing = sorted(need - tuned, key=str)
    if not missing:
        return []
    what = ", ".join(f"N={n}" + (f" block {list(b)}" if b else "") for n, b in missing)
    flag = f" --moe-backend {backend}" if backend != "auto" else ""
    return [f"it reads a tuned file this run did not write ({what}): tune-moe --gpu {plan.gpu.key} --dtype "
            f"{plan.dtype} --layouts {lay.name}{flag} --vllm-version {plan.vllm_version}"]
