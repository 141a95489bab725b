"""``validate-serve --reduced``: one GPU runs the fused-MoE shape that one GPU of a multi-GPU layout runs.

The served folder is the hub-free Step-3.5-Flash folder (``model_folder``: the published config.json, a
tokenizer of its vocabulary). ``vllm serve`` loads it with ``--load-format dummy`` (random weights, nothing
downloaded) and ``--hf-overrides`` that reduce it, each key checked against the code that reads it:

- ``num_hidden_layers`` and ``layer_types``: a few layers, the published attention pattern;
- ``moe_layers_enum`` (never empty: vLLM 0.26's ``Step3p5DecoderLayer`` splits it on commas) and
  ``mlp_layer_types`` (vLLM 0.33's config class derives it from ``moe_layers_enum`` when it loads the file, so
  an override of ``moe_layers_enum`` alone would change nothing there; its model reads ``mlp_layer_types``):
  layer 0 dense, every other layer MoE, so the MoE's share of step time is large;
- ``swiglu_limits`` and ``swiglu_limits_shared``: the last two MoE layers clamped (limit 7.0), as the published
  model's last two layers, so both MoE layer kinds run;
- ``moe_num_experts`` and ``moe_intermediate_size``: the experts and the expert width one GPU of the layout
  holds (TP4: 288 of width 320; TP8: 288 of 160; DP4+EP: 72 of 1280). FP8 keeps the checkpoint's
  [128,128] block quantisation, so vLLM refines or pads the block as it would for the layout.

``VLLM_USE_FLASHINFER_SAMPLER=0`` (defined in vLLM 0.26's and 0.33's ``envs.py``) keeps sampling off
FlashInfer, which the one-GPU node need not have. An FP8 serve also gets ``VLLM_USE_DEEP_GEMM=0`` (both
``envs.py`` define it) unless the environment sets that variable: vLLM puts the block-FP8 dense linear layers on
DeepGEMM (``should_use_deepgemm_for_fp8_linear``), whose kernels compile at every server start
(``VLLM_DEEP_GEMM_WARMUP``, over 2300 of them: more than seven minutes on an H200 with vLLM 0.26) or, with
that warm-up skipped, while serving (steps stalled 10-20 s at each new batch size, pass after pass). Off,
those layers run CUTLASS's block-FP8 GEMM, built into vLLM; the fused MoE, which the A/B compares, is
the same kernel either way.

``served-config.json`` in the folder is config.json as vLLM sees it after the overrides: with
``tune-moe --model <it> --layouts TP1`` a tune times the routing this serve runs (for an expert-parallel
layout, top-8 over the local experts, which the layout's own tune does not).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..files import atomic_write_text
from .model_folder import layer_type, published_config, write_folder
from ..models import DEFAULT_MODEL, ModelGeometry, geometry_from_config, load_model
from ..shapes import Layout, MoeShape, Refusal, shape_for

ENV = (("VLLM_USE_FLASHINFER_SAMPLER", "0"),)
FP8_ENV = (("VLLM_USE_DEEP_GEMM", "0"),)  # unless the environment sets it (module docstring)
SERVED_CONFIG = "served-config.json"
DEFAULT_LAYERS = 12
CLAMPED_LAYERS = 2  # the last MoE layers run the clamped SwiGLU, as the published model's last two
MIN_LAYERS = 2 + CLAMPED_LAYERS  # a dense layer, a SiLU MoE layer and the clamped ones
LIMITS = (7.0, 16.0)  # swiglu_limits, swiglu_limits_shared of a clamped layer


@dataclass(frozen=True, kw_only=True)
class Reduced:
    """The one-GPU serve that runs ``layout``'s per-GPU fused-MoE shape."""

    layout: Layout  # the layout emulated
    dtype: str
    layers: int
    experts: int  # experts one GPU of the layout holds
    width: int  # one GPU's expert width, as vLLM shards it (before it pads or refines an FP8 block)
    shape: MoeShape  # what the layout's fused MoE runs on one GPU (the plan's rule)
    folder: Path
    env: tuple[tuple[str, str], ...] = ENV  # what the servers get on top of the environment (``server_env``)

    @property
    def moe_layers(self) -> list[int]:
        return list(range(1, self.layers))

    def overrides(self) -> dict:
        clamped = set(self.moe_layers[-CLAMPED_LAYERS:])
        return {
            "num_hidden_layers": self.layers,
            "layer_types": [layer_type(i) for i in range(self.layers)],
            "moe_layers_enum": ",".join(map(str, self.moe_layers)),
            "mlp_layer_types": ["sparse" if i in self.moe_layers else "dense" for i in range(self.layers)],
            "swiglu_limits": [LIMITS[0] if i in clamped else 0.0 for i in range(self.layers)],
            "swiglu_limits_shared": [LIMITS[1] if i in clamped else 0.0 for i in range(self.layers)],
            "moe_num_experts": self.experts,
            "moe_intermediate_size": self.width,
        }

    def effective_config(self) -> dict:
        """config.json as vLLM sees it after the overrides (``PretrainedConfig.update``: keys replaced)."""
        return {**published_config(self.dtype), **self.overrides()}

    def geometry(self) -> ModelGeometry:
        return geometry_from_config(self.effective_config(), f"{self.folder} with --hf-overrides")

    def model_args(self) -> tuple[str, ...]:
        return ("--load-format", "dummy", "--hf-overrides", json.dumps(self.overrides(), separators=(",", ":")))

    def write(self) -> list[Path]:
        served = self.folder / SERVED_CONFIG
        atomic_write_text(served, json.dumps(self.effective_config(), indent=1) + "\n")
        return [*write_folder(self.folder, published_config(self.dtype)), served]

    def reproduces(self) -> list[str]:
        s = self.shape
        kinds = f"{len(self.moe_layers) - CLAMPED_LAYERS} SiLU and {CLAMPED_LAYERS} clamped-SwiGLU MoE layers"
        same = [f"every MoE layer's fused MoE runs the shape one GPU of {self.layout.name} runs: {s.label}, "
                f"so vLLM reads the same tuned file ({kinds}, {self.layers} layers with layer 0 dense)"]
        if not s.expert_parallel:
            same.append(f"top-{s.top_k} routing over all {s.global_experts} experts and the same tokens per fused-MoE "
                        f"call as each {self.layout.name} rank (tensor parallel ranks all see every token)")
        return same

    def differs(self) -> list[str]:
        out = [f"{self.layers} layers instead of 45: attention, the shared experts, the dense MLP and the LM head run "
               f"unsharded on one GPU, so the fused MoE's share of step time differs from the {self.layout.name} "
               "serve's (the report estimates both)",
               "dummy (random) weights: the router is not the trained one, so experts are loaded more evenly than "
               "under real traffic; no communication between GPUs"]
        if dict(self.env).get("VLLM_USE_DEEP_GEMM") == "0":
            out.append("the dense FP8 linear layers run CUTLASS, not DeepGEMM (VLLM_USE_DEEP_GEMM=0: DeepGEMM's kernels "
                       "compile for minutes at each server start, or in serving; export VLLM_USE_DEEP_GEMM=1 to keep "
                       "them); the fused MoE is the same kernel either way")
        if self.shape.expert_parallel:
            ranks = self.layout.gpus
            out.append(f"expert parallel: the router picks top-{self.shape.top_k} over the {self.experts} local experts, "
                       f"not over {self.shape.global_experts} with the pairs of other ranks' experts dropped, so each "
                       f"local expert gets about {ranks}x the tokens per step it gets in {self.layout.name}; and one "
                       f"rank's tokens reach the fused MoE, not all {ranks} DP ranks' (M per step is {ranks}x smaller "
                       "at the same per-rank load); tune-moe tunes the faithful routing, so the tuned configs run "
                       f"off their tuned distribution here (configs tuned for this serve's routing: tune-moe --model "
                       f"{self.folder / SERVED_CONFIG} --layouts TP1 --num-gpus 1, with this run's --gpu, --dtype and "
                       "--moe-backend)")
        return out

    def as_dict(self) -> dict:
        return {"layout": self.layout.name, "dtype": self.dtype, "layers": self.layers,
                "moe_layers": self.moe_layers, "experts": self.experts, "width": self.width,
                "shape": self.shape.label, "folder": str(self.folder), "overrides": self.overrides(),
                "env": dict(self.env), "reproduces": self.reproduces(), "differs": self.differs()}


def server_env(dtype: str, given: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The variables a reduced server gets on top of ``given`` (the environment and the env file)."""
    return ENV + tuple((k, v) for k, v in FP8_ENV if dtype == "fp8" and k not in given)


def plan(layout: Layout, dtype: str, *, layers: int, folder: Path, version: str, moe_backend: str,
         given: Mapping[str, str] | None = None) -> Reduced:
    """The reduced serve of ``layout``, or a one-line refusal (nothing is written); ``given``: the environment
    the servers start from (default: none set)."""
    if not MIN_LAYERS <= layers <= 45:
        raise UsageError(f"--reduced-layers {layers}: must be {MIN_LAYERS} to 45 (a dense layer, SiLU MoE layers "
                         f"and {CLAMPED_LAYERS} clamped ones)")
    full = load_model(DEFAULT_MODEL + ("-FP8" if dtype == "fp8" else ""))
    shape = shape_for(full, layout, dtype, version, moe_backend)
    if isinstance(shape, Refusal):
        raise UsageError(f"layout {layout.name}: {shape.reason}")
    ep = layout.gpus if layout.ep else 1
    width_split = 1 if layout.ep else layout.gpus
    return Reduced(layout=layout, dtype=dtype, layers=layers, experts=full.num_experts // ep,
                   width=full.moe_intermediate_size // width_split, shape=shape, folder=folder.absolute(),
                   env=server_env(dtype, given or {}))
