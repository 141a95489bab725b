"""MoE model geometry, read from a Hugging Face ``config.json``.

Per-architecture differences are data (``ARCHITECTURES``): which keys hold the
expert count, top-k and expert width, and which rule picks the MoE layers.
Step-3.5-Flash and its FP8 checkpoint are embedded, so nothing needs the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import UsageError


@dataclass(frozen=True)
class ArchKeys:
    """Where one architecture keeps its MoE geometry in config.json."""

    experts: str
    top_k: str
    intermediate: str
    moe_layers: str  # name of a rule in MOE_LAYER_RULES


ARCHITECTURES: dict[str, ArchKeys] = {
    "step3p5": ArchKeys("moe_num_experts", "moe_top_k", "moe_intermediate_size", "step3p5"),
    "deepseek_v3": ArchKeys("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense"),
    "deepseek_v2": ArchKeys("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense"),
    "qwen3_moe": ArchKeys("num_experts", "num_experts_per_tok", "moe_intermediate_size", "sparse_step"),
    "qwen2_moe": ArchKeys("num_experts", "num_experts_per_tok", "moe_intermediate_size", "sparse_step"),
    "mixtral": ArchKeys("num_local_experts", "num_experts_per_tok", "intermediate_size", "all"),
}


MAX_LAYERS = 10_000  # far beyond any real model; the layer rules enumerate every layer


class _BadKey(Exception):
    """A layer-rule key of config.json holds something vLLM could not read; the message names it."""


def _int_list(cfg: dict, key: str) -> list[int]:
    value = cfg.get(key, [])
    if not isinstance(value, list) or not all(type(i) is int for i in value):
        raise _BadKey(f"{key} must be a list of layer numbers")
    return value


def _whole(cfg: dict, key: str, default: int, minimum: int) -> int:
    value = cfg.get(key, default)
    if type(value) is not int or value < minimum:
        raise _BadKey(f"{key} must be an integer >= {minimum}")
    return value


def _step3p5_layers(cfg: dict, n: int) -> list[int]:
    # vLLM's step3p5._is_moe_layer: mlp_layer_types, then moe_layers_enum, then 1..n-1.
    if "mlp_layer_types" in cfg:
        types = cfg["mlp_layer_types"]
        if not isinstance(types, list):
            raise _BadKey("mlp_layer_types must be a list of 'sparse' or 'dense' per layer")
        return [i for i, t in enumerate(types) if t == "sparse" and i < n]
    if "moe_layers_enum" in cfg:
        parts = str(cfg["moe_layers_enum"]).strip().split(",")
        try:
            layers = {int(i) for i in parts}
        except ValueError:
            raise _BadKey("moe_layers_enum must list layer numbers separated by commas, e.g. \"3,4,5\"") from None
        return sorted(i for i in layers if 0 <= i < n)  # vLLM asks per layer index, so others never match
    return list(range(1, n))


def _sparse_step_layers(cfg: dict, n: int) -> list[int]:
    step = _whole(cfg, "decoder_sparse_step", 1, 1)
    dense = _int_list(cfg, "mlp_only_layers")
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


MOE_LAYER_RULES = {
    "step3p5": _step3p5_layers,
    "first_k_dense": lambda cfg, n: list(range(_whole(cfg, "first_k_dense_replace", 0, 0), n)),
    "sparse_step": _sparse_step_layers,
    "all": lambda cfg, n: list(range(n)),
}


@dataclass(frozen=True)
class ModelGeometry:
    """What the fused-MoE shapes and the memory plan need from a model."""

    name: str
    model_type: str
    num_experts: int
    top_k: int
    moe_intermediate_size: int  # I: one expert's gate (= up) width
    hidden_size: int  # K of the first GEMM
    num_layers: int
    moe_layers: tuple[int, ...]
    vocab_size: int
    weight_block_size: tuple[int, int] | None  # block-FP8 checkpoints only
    total_params: float  # counted or estimated, in parameters

    @property
    def expert_params(self) -> float:
        """Routed-expert parameters of all MoE layers: E x (gate, up, down) x I x H."""
        return self.num_experts * 3 * self.moe_intermediate_size * self.hidden_size * len(self.moe_layers)


# stepfun-ai/Step-3.5-Flash: 45 layers, the first three dense, 196.81B parameters.
_STEP35 = {
    "model_type": "step3p5",
    "hidden_size": 4096,
    "num_hidden_layers": 45,
    "vocab_size": 128896,
    "moe_num_experts": 288,
    "moe_top_k": 8,
    "moe_intermediate_size": 1280,
    "share_expert_dim": 1280,
    "intermediate_size": 11264,
    "moe_layers_enum": ",".join(str(i) for i in range(3, 45)),
    "num_nextn_predict_layers": 3,  # the MTP modules (step3p5_mtp), after the 45 decoder layers
    "total_params": 196.81e9,
}
_FP8 = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}

BUILTIN: dict[str, dict] = {
    "stepfun-ai/Step-3.5-Flash": _STEP35,
    "stepfun-ai/Step-3.5-Flash-FP8": {**_STEP35, "quantization_config": _FP8},
}
DEFAULT_MODEL = "stepfun-ai/Step-3.5-Flash"


def load_model(spec: str = DEFAULT_MODEL, overrides: dict | None = None) -> ModelGeometry:
    """A built-in model name, a config.json path, or a directory holding one; ``overrides`` replace keys of it as
    vLLM's ``--hf-overrides`` do (the flat ones; a changed geometry drops a recorded parameter count)."""
    flat = {k: v for k, v in (overrides or {}).items() if not isinstance(v, dict)}
    cfg, name = load_config(spec)
    if flat:
        cfg = {**{k: v for k, v in cfg.items() if k != "total_params"}, **flat}
    return geometry_from_config(cfg, name + (" with --hf-overrides" if flat else ""))


def checkpoint(name: str, quantization: str | None, overrides: dict | None = None) -> tuple[ModelGeometry, str]:
    """The served checkpoint's MoE geometry (after ``--hf-overrides``) and dtype (bf16, or the block-FP8 one)."""
    if quantization not in (None, "fp8"):
        raise UsageError(f"preflight: --quantization {quantization} is not modelled; serve the bf16 or -FP8 checkpoint")
    if name not in BUILTIN and not Path(name).exists():
        raise UsageError(f"preflight: model {name!r} is neither a built-in name ({', '.join(BUILTIN)}) nor a "
                         "local checkpoint folder; pass the folder holding its config.json")
    model = load_model(name, overrides)
    if model.weight_block_size is not None:
        return model, "fp8"
    if quantization == "fp8":
        raise UsageError("preflight: --quantization fp8 on the bf16 checkpoint runs per-tensor FP8 "
                         "(file dtype=fp8_w8a8 without block_shape), which tune-moe does not tune; "
                         "serve stepfun-ai/Step-3.5-Flash-FP8 instead")
    return model, "bf16"


def mtp_layers(spec: str) -> int:
    """The MTP modules vLLM's draft config gets for this checkpoint (``n_predict``): its ``num_nextn_predict_layers``,
    1 if absent. ``--hf-overrides`` given as JSON patch only the target model, not the draft (vLLM 0.34's
    ``SpeculativeConfig.compose_draft_hf_overrides``)."""
    cfg, name = load_config(spec)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    layers = text.get("num_nextn_predict_layers") or 1
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise UsageError(f"{name}: num_nextn_predict_layers={layers!r} is not a whole number of MTP modules; pass "
                         "the model's config.json")
    return layers


def load_config(spec: str) -> tuple[dict, str]:
    """config.json of a built-in model name, a config.json path or a directory holding one, and its name."""
    if spec in BUILTIN:
        return BUILTIN[spec], spec
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        known = ", ".join(BUILTIN)
        raise UsageError(f"--model {spec}: no such config.json; pass a config.json path, its folder, or one of {known}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--model {path}: not readable JSON ({exc}); pass the model's Hugging Face config.json") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--model {path}: expected a JSON object; pass the model's Hugging Face config.json")
    return cfg, str(path)


def geometry_from_config(cfg: dict, name: str) -> ModelGeometry:
    """Read MoE geometry from a config dict, following a nested ``text_config``; one line for anything unusable."""
    quant = cfg.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise UsageError(f"{name}: quantization_config must be a JSON object; pass the model's config.json")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    model_type = text.get("model_type", cfg.get("model_type", "?"))
    keys = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if keys is None:
        raise UsageError(
            f"{name}: model_type {model_type!r} is not a known MoE architecture "
            f"(known: {', '.join(sorted(ARCHITECTURES))}); add its keys to tuning.models.ARCHITECTURES"
        )
    wanted = (keys.experts, keys.top_k, keys.intermediate, "hidden_size", "num_hidden_layers")
    missing = [k for k in wanted if type(text.get(k)) is not int]
    if missing:
        raise UsageError(f"{name}: not a {model_type} MoE config, missing integer keys {', '.join(missing)}; "
                         "pass the model's config.json")
    small = [k for k in wanted if text[k] < 1]
    if small:
        raise UsageError(f"{name}: {', '.join(f'{k}={text[k]}' for k in small)}: must be at least 1; "
                         "pass the model's config.json")
    if text["num_hidden_layers"] > MAX_LAYERS:
        raise UsageError(f"{name}: num_hidden_layers={text['num_hidden_layers']} is more than {MAX_LAYERS}; "
                         "pass the model's config.json")
    if text[keys.top_k] > text[keys.experts]:
        raise UsageError(f"{name}: {keys.top_k}={text[keys.top_k]} is more than the {text[keys.experts]} experts "
                         f"({keys.experts}); pass the model's config.json")
    n = text["num_hidden_layers"]
    try:
        moe_layers = tuple(MOE_LAYER_RULES[keys.moe_layers](text, n))
    except _BadKey as exc:
        raise UsageError(f"{name}: {exc}; pass the model's config.json") from None
    if not moe_layers:
        raise UsageError(f"{name}: the config declares no MoE layers; pass an MoE model's config.json")
    block = quant.get("weight_block_size") if quant.get("quant_method") == "fp8" else None
    if block is not None and (not isinstance(block, list) or len(block) != 2
                              or not all(type(b) is int and b > 0 for b in block)):
        raise UsageError(f"{name}: quantization_config.weight_block_size {block!r} is not two positive integers "
                         "[block_n, block_k]; pass the block-FP8 checkpoint's config.json")
    for key in ("vocab_size", "intermediate_size", "share_expert_dim", "shared_expert_intermediate_size"):
        if key in text and (type(text[key]) is not int or text[key] < 0):
            raise UsageError(f"{name}: {key} must be a whole number; pass the model's config.json")
    geometry = ModelGeometry(
        name=name,
        model_type=model_type,
        num_experts=text[keys.experts],
        top_k=text[keys.top_k],
        moe_intermediate_size=text[keys.intermediate],
        hidden_size=text["hidden_size"],
        num_layers=n,
        moe_layers=moe_layers,
        vocab_size=text.get("vocab_size", 0),
        weight_block_size=tuple(block) if block else None,
        total_params=0.0,
    )
    total = cfg.get("total_params") or text.get("total_params")
    if total is not None and (type(total) not in (int, float) or not 0 < total < float("inf")):
        raise UsageError(f"{name}: total_params {total!r} is not a positive number; fix it or remove it")
    return replace(geometry, total_params=float(total or _estimate_params(text, geometry)))


def _estimate_params(cfg: dict, g: ModelGeometry) -> float:
    """Experts exactly; embeddings, attention (~4 H^2), shared experts and dense MLPs approximately."""
    h = g.hidden_size
    shared = 3 * h * cfg.get("share_expert_dim", cfg.get("shared_expert_intermediate_size", 0)) * len(g.moe_layers)
    dense = 3 * h * cfg.get("intermediate_size", 0) * (g.num_layers - len(g.moe_layers))
    return g.expert_params + 2 * g.vocab_size * h + 4 * h * h * g.num_layers + shared + dense

