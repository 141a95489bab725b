"""A hub-free Step-3.5-Flash model folder: the published ``config.json`` and a tokenizer built here.

``published_config`` is Step-3.5-Flash's ``config.json`` as data. Its MoE geometry is ``models.BUILTIN``'s
(288 experts, top-8, width 1280, 45 layers of which 3..44 are MoE, hidden 4096, vocab 128896, the FP8
checkpoint's [128,128] blocks); the attention and per-layer fields follow the published Step-3.x text configs
(one full-attention layer then three sliding ones, 64 and 96 heads, 8 KV groups, head_dim 128; the clamped
SwiGLU, limit 7.0, on the last two layers; the lists padded with the three MTP layers). The attention fields
were not checked against the published file here; they do not change the fused-MoE shape.

The tokenizer is a word-level vocabulary of exactly ``vocab_size`` entries written as ``tokenizer.json``
(the ``tokenizers`` format, no import needed): the special tokens, ``<think>``/``</think>`` (vLLM 0.26's
step3p5 reasoning parser refuses a tokenizer without them; 0.33's looks them up) and ``<tool_call>``/
``</tool_call>``, then one word per remaining id. Words split on whitespace and decode joined by spaces, and
nothing is added around a prompt, so a random-dataset prompt of N ids re-encodes to exactly N tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write_text
from ..models import BUILTIN, DEFAULT_MODEL

MTP_LAYERS = 3  # the per-layer lists carry the MTP layers after the 45 decoder layers
CLAMPED = {43: (7.0, 16.0), 44: (7.0, 16.0)}  # layer -> (swiglu_limits, swiglu_limits_shared)
SPECIAL = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")  # never sampled by vLLM's random dataset
ADDED = ("<think>", "</think>", "<tool_call>", "</tool_call>")  # ordinary tokens, matched whole in text
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def layer_type(i: int) -> str:
    return "full_attention" if i % 4 == 0 else "sliding_attention"


def per_layer(layers: int, full: float, sliding: float) -> list[float]:
    return [full if layer_type(i) == "full_attention" else sliding for i in range(layers)]


def published_config(dtype: str) -> dict:
    """Step-3.5-Flash's config.json (bf16), or the -FP8 checkpoint's with its block quantisation."""
    name = DEFAULT_MODEL + ("-FP8" if dtype == "fp8" else "")
    geometry = {k: v for k, v in BUILTIN[name].items() if k != "total_params"}
    padded = geometry["num_hidden_layers"] + MTP_LAYERS
    return {
        "architectures": ["Step3p5ForCausalLM"], **geometry,
        "num_attention_heads": 64, "num_attention_groups": 8, "head_dim": 128, "att_impl_type": "GQA",
        "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 96,
                                    "num_attention_groups": 8, "head_dim": 128},
        "layer_types": [layer_type(i) for i in range(padded)], "sliding_window": 512,
        "use_head_wise_attn_gate": True, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 262144, "max_seq_len": 262144,
        "rope_theta": per_layer(padded, 5000000.0, 10000.0),
        "partial_rotary_factors": per_layer(padded, 0.5, 1.0),
        "rope_scaling": {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 131072,
                         "low_freq_factor": 1.0, "high_freq_factor": 32.0},
        "yarn_only_types": ["full_attention"],
        "moe_router_activation": "sigmoid", "moe_router_scaling_factor": 3.0, "norm_expert_weight": True,
        "use_moe_router_bias": True, "need_fp32_gate": True,
        "swiglu_limits": [CLAMPED.get(i, (0.0, 0.0))[0] for i in range(padded)],
        "swiglu_limits_shared": [CLAMPED.get(i, (0.0, 0.0))[1] for i in range(padded)],
        "num_nextn_predict_layers": MTP_LAYERS, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": SPECIAL.index("<s>"), "eos_token_id": SPECIAL.index("</s>"),
        "transformers_version": "4.57.1",  # a transformers 4 config: transformers 5 skips its Mistral-regex check
    }


def tokenizer_json(vocab_size: int) -> dict:
    """A word-level ``tokenizers`` tokenizer with exactly ``vocab_size`` ids."""
    named = SPECIAL + ADDED
    vocab = {token: i for i, token in enumerate(named)}
    vocab.update((f"t{i}", i) for i in range(len(named), vocab_size))
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": t in SPECIAL} for i, t in enumerate(named)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


def tokenizer_config(max_len: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
            "eos_token": "</s>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "model_max_length": max_len, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}


def write_folder(folder: Path, config: dict) -> list[Path]:
    """config.json and the tokenizer, each written atomically; the paths written."""
    files = {"config.json": config, "tokenizer.json": tokenizer_json(config["vocab_size"]),
             "tokenizer_config.json": tokenizer_config(config["max_position_embeddings"])}
    for name, data in files.items():
        atomic_write_text(folder / name, json.dumps(data, indent=1 if name == "config.json" else None) + "\n")
    return [folder / name for name in files]
